"""``labelmatch pipeline compile | run-local``: the pipeline definitions on this machine.

Both commands need the repository's ``pipelines/`` and ``components/`` (run them from the
repository root); ``upload``, ``versions`` and ``run`` (the cluster side) are in
:mod:`labelmatch.cli.cluster`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from labelmatch.cli.cluster import _parse_params, pipeline_app
from labelmatch.errors import ConfigError


def _registry() -> Any:
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        from pipelines import registry
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"cannot import the pipeline definitions ({exc}); run from the repository root"
        ) from exc
    return registry


def _typed(pipeline: Any, params: dict[str, str]) -> dict[str, Any]:
    """Convert ``key=value`` strings to the types the pipeline declares, naming a bad one."""
    inputs = pipeline.component_spec.inputs or {}
    casts = {
        "Integer": int,
        "Float": float,
        "String": str,
        "Boolean": lambda v: {"true": True, "false": False}[v.lower()],
    }
    typed = {}
    for key, value in params.items():
        if key not in inputs:
            raise ConfigError(
                f"--param {key}: the pipeline has no such parameter (has: {', '.join(sorted(inputs))})"
            )
        try:
            typed[key] = casts[inputs[key].type](value)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"--param {key}={value!r}: expected {inputs[key].type}") from exc
    return typed


@pipeline_app.command("compile")
def pipeline_compile(
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory of the IR (default pipelines/compiled).")
    ] = None,
    check: Annotated[
        bool, typer.Option("--check", help="Only check that the committed IR is current.")
    ] = False,
) -> None:
    """Compile every registered pipeline to <out>/<name>-<version>.yaml (or check it is current)."""
    registry = _registry()
    argv = [*(["--out", str(out)] if out else []), *(["--check"] if check else [])]
    raise typer.Exit(registry.main(argv))


@pipeline_app.command("run-local")
def pipeline_run_local(
    name: Annotated[str, typer.Argument(help="Pipeline name: labelmatch-training or labelmatch-deploy.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Pipeline parameter key=value (repeatable).")
    ] = None,
    root: Annotated[Path, typer.Option("--root", help="Pipeline root: one directory per run.")] = Path(
        "runs/pipelines"
    ),
) -> None:
    """Run a pipeline with kfp.local (SubprocessRunner, this interpreter) and list its artifacts."""
    registry = _registry()
    from pipelines.local import run_artifacts, run_locally

    pipelines = {p.name: p for p in registry.registered_pipelines()}
    if name not in pipelines:
        raise ConfigError(f"unknown pipeline {name!r} (known: {', '.join(sorted(pipelines))})")
    function = pipelines[name].function
    run_dir = run_locally(function, root, **_typed(function, _parse_params(param)))
    typer.echo(f"run: {run_dir}")
    for artifact in run_artifacts(run_dir):
        typer.echo(f"  {artifact.task:>14} {artifact.output:<12} {artifact.kind:<14} {artifact.path}")
