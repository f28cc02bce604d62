"""The pipeline version registry: every pipeline, its version and where its IR is compiled to.

A pipeline's version is the package version: the components' image tag
(:mod:`components._image`), the compiled IR file ``compiled/<name>-<version>.yaml`` and the KFP
pipeline version uploaded by :mod:`labelmatch.platform.kfp` all carry the same number, so a rollback
to version X runs the exact IR, image and library of release X. Compiled files of earlier
versions stay in ``compiled/`` (they are what a rollback re-runs); only the current version's
files are rewritten.

Usage::

    python -m pipelines.registry            # compile every pipeline (``make compile``)
    python -m pipelines.registry --check    # exit 1 when a committed IR is stale (CI)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch import __version__

#: Where the compiled IR lives (relative to the repository root).
COMPILED_DIR = Path(__file__).resolve().parent / "compiled"


@dataclass(frozen=True)
class RegisteredPipeline:
    """One pipeline of the registry.

    Attributes:
        name: KFP pipeline name (``pipelineInfo.name`` of the IR).
        version: Its version (the package version).
        function: The ``@dsl.pipeline`` function.
    """

    name: str
    version: str
    function: Callable

    @property
    def filename(self) -> str:
        """``<name>-<version>.yaml``."""
        return f"{self.name}-{self.version}.yaml"


def registered_pipelines() -> list[RegisteredPipeline]:
    """Every labelmatch pipeline at the current package version."""
    from pipelines.batch import BATCH_PIPELINE, batch_pipeline
    from pipelines.deploy import DEPLOY_PIPELINE, deploy_pipeline
    from pipelines.monitor import MONITOR_PIPELINE, monitor_pipeline
    from pipelines.training import TRAINING_PIPELINE, training_pipeline

    return [
        RegisteredPipeline(TRAINING_PIPELINE, __version__, training_pipeline),
        RegisteredPipeline(DEPLOY_PIPELINE, __version__, deploy_pipeline),
        RegisteredPipeline(BATCH_PIPELINE, __version__, batch_pipeline),
        RegisteredPipeline(MONITOR_PIPELINE, __version__, monitor_pipeline),
    ]


def compile_pipeline(pipeline: RegisteredPipeline, out_dir: str | Path = COMPILED_DIR) -> Path:
    """Compile one pipeline to ``out_dir/<name>-<version>.yaml`` and return the path."""
    from kfp import compiler

    path = Path(out_dir) / pipeline.filename
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline.function, str(path), pipeline_name=pipeline.name)
    path.write_text(_stable_header(path.read_text()))
    return path


_DEFAULT = re.compile(r"^(#\s+\w+: \w+ \[Default: )(.*)(\])$")


def _sorted_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _sorted_keys(value[key]) for key in sorted(value)}
    if isinstance(value, list):
        return [_sorted_keys(item) for item in value]
    return value


def _stable_header(text: str) -> str:
    """The IR with the dict keys of its header comment's defaults in sorted order.

    KFP writes the defaults of dict and list parameters into the comment header in the order of
    a protobuf map, which changes from one process to the next; the YAML body is sorted already.
    Without this a dict default (the GPU tolerations) makes every compile differ.
    """
    lines = text.split("\n")
    for index, line in enumerate(lines):
        if not line.startswith("#"):
            break
        match = _DEFAULT.match(line)
        if match and match.group(2)[:1] in "[{":
            value = _sorted_keys(ast.literal_eval(match.group(2)))
            lines[index] = f"{match.group(1)}{value!r}{match.group(3)}"
    return "\n".join(lines)


def compile_all(out_dir: str | Path = COMPILED_DIR) -> list[Path]:
    """Compile every registered pipeline."""
    return [compile_pipeline(p, out_dir) for p in registered_pipelines()]


def stale_files(out_dir: str | Path = COMPILED_DIR) -> list[str]:
    """Names of current-version IR files in ``out_dir`` that are missing or differ from a fresh compile."""
    stale = []
    with tempfile.TemporaryDirectory() as fresh:
        for pipeline in registered_pipelines():
            committed = Path(out_dir) / pipeline.filename
            compiled = compile_pipeline(pipeline, fresh)
            if not committed.is_file() or committed.read_bytes() != compiled.read_bytes():
                stale.append(pipeline.filename)
    return stale


def main(argv: list[str] | None = None) -> int:
    """Compile (default) or check (``--check``) the IR of every pipeline."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=COMPILED_DIR, help="Directory of the compiled IR.")
    parser.add_argument("--check", action="store_true", help="Only check that the committed IR is current.")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.out)
        for name in stale:
            print(f"stale or missing: {args.out / name} (run `make compile` and commit it)", file=sys.stderr)
        return 1 if stale else 0
    for path in compile_all(args.out):
        print(f"compiled {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
