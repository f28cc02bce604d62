"""Running labelmatch pipelines on this machine with ``kfp.local`` (no Docker, no cluster).

``kfp.local.SubprocessRunner(use_venv=False)`` runs every component as a subprocess of the
current interpreter (where ``labelmatch`` is installed); each task writes its outputs under
``<pipeline_root>/<pipeline name>-<timestamp>/<task>/<output>``. What ``kfp.local`` does not do
is listed in ``docs/pipelines.md`` (resource requests and kfp-kubernetes settings are ignored).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.artifacts import MANIFEST, verify_artifact
from labelmatch.errors import ArtifactError


@dataclass(frozen=True)
class LocalArtifact:
    """One artifact a local run wrote.

    Attributes:
        task: The task that wrote it (``data-prep``, ``tune-sft``, ``evaluate-2``, ...).
        output: The output's name.
        path: Its directory.
        kind: The manifest's kind.
    """

    task: str
    output: str
    path: Path
    kind: str


def run_locally(pipeline: Callable, pipeline_root: str | Path, **arguments: Any) -> Path:
    """Run ``pipeline`` with ``kfp.local`` in this interpreter and return the run directory.

    Args:
        pipeline: A ``@dsl.pipeline`` function.
        pipeline_root: Where runs are written (one sub-directory per run).
        arguments: The pipeline's parameters.

    Raises:
        RuntimeError: a task failed (``kfp.local`` raises; the task's log names the cause).
    """
    from kfp import local

    root = Path(pipeline_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    before = set(root.iterdir())
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
    with warnings.catch_warnings():
        # kfp.local warns for every task whose base image is not named "python..."; ours is the
        # labelmatch image, and use_venv=False runs the very interpreter that image would hold.
        warnings.filterwarnings(
            "ignore", message="You may be attemping to run a task", category=RuntimeWarning
        )
        pipeline(**arguments)
    runs = sorted(set(root.iterdir()) - before, key=lambda p: p.stat().st_mtime)
    if not runs:
        raise RuntimeError(f"kfp.local wrote no run directory under {root}")
    return runs[-1]


def run_artifacts(run_dir: str | Path) -> list[LocalArtifact]:
    """Every labelmatch artifact (a directory with ``manifest.json``) of a local run, verified.

    Raises:
        ArtifactError: an artifact fails verification (names the artifact and file).
    """
    run_dir = Path(run_dir)
    found = []
    for manifest in sorted(run_dir.glob(f"*/*/{MANIFEST}")):
        artifact = manifest.parent
        kind = verify_artifact(artifact)["kind"]
        found.append(LocalArtifact(artifact.parent.name, artifact.name, artifact, kind))
    if not found:
        raise ArtifactError(f"no artifact with a {MANIFEST} under {run_dir}")
    return found


def task_names(run_dir: str | Path) -> set[str]:
    """Names of the tasks that ran (those that wrote an output directory)."""
    return {p.name for p in Path(run_dir).iterdir() if p.is_dir()}
