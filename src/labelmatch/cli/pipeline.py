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

from labelmatch import __version__
from labelmatch.cli.cluster import _parse_params, pipeline_app
from labelmatch.core.errors import ConfigError


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
    version: Annotated[str, typer.Option(help="Compiled version to run.")] = __version__,
    root: Annotated[Path, typer.Option("--root", help="Pipeline root: one directory per run.")] = Path(
        "runs/pipelines"
    ),
) -> None:
    """Run a compiled pipeline (the IR a cluster runs) with kfp.local and list its artifacts."""
    registry = _registry()
    from pipelines.local import LocalPipelineRegistry, run_artifacts

    run = LocalPipelineRegistry(registry.COMPILED_DIR, root).create_run(name, version, _parse_params(param))
    run_dir = Path(run.run_id)
    typer.echo(f"run: {run_dir}")
    for artifact in run_artifacts(run_dir):
        typer.echo(f"  {artifact.task:>14} {artifact.output:<12} {artifact.kind:<14} {artifact.path}")
