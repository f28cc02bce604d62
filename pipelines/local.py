"""Running labelmatch pipelines on this machine with ``kfp.local`` (no Docker, no cluster).

``kfp.local.SubprocessRunner(use_venv=False)`` runs every component as a subprocess of the
current interpreter (where ``labelmatch`` is installed); each task writes its outputs under
``<pipeline_root>/<pipeline name>-<timestamp>/<task>/<output>``. What ``kfp.local`` does not do
is listed in ``docs/pipelines.md`` (resource requests and kfp-kubernetes settings are ignored).

What runs is the **compiled IR** (``pipelines/compiled/<name>-<version>.yaml``, loaded with
``kfp.components.load_component_from_file``): the very file a cluster runs, component code
embedded. :class:`LocalPipelineRegistry` serves those files the way a KFP server serves
pipeline versions, so a rollback (:mod:`labelmatch.platform.rollback`) can re-run an earlier version's
deploy IR here, and remembers each run (``<run dir>/labelmatch-run.json``: pipeline, version,
parameters, and the job id its steps saw) the way a KFP server keeps runs, so a retraining
trigger (:mod:`labelmatch.monitoring.trigger`) can read back the parameters of the run a release
record names.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.artifacts import MANIFEST, verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.platform.kfp import (
    PipelineVersion,
    RunInfo,
    pick_version,
    pipeline_inputs,
    read_package,
)


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


def run_locally(pipeline: Callable | str | Path, pipeline_root: str | Path, **arguments: Any) -> Path:
    """Run a pipeline with ``kfp.local`` in this interpreter and return the run directory.

    Args:
        pipeline: A compiled IR file (what ships; see the module docstring) or a
            ``@dsl.pipeline`` function.
        pipeline_root: Where runs are written (one sub-directory per run).
        arguments: The pipeline's parameters.

    Raises:
        RuntimeError: a task failed (``kfp.local`` raises; the task's log names the cause).
    """
    from kfp import local
    from kfp.components import load_component_from_file

    if isinstance(pipeline, str | Path):
        pipeline = load_component_from_file(str(pipeline))

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


#: The record :class:`LocalPipelineRegistry` keeps of a run, inside its run directory.
RUN_RECORD = "labelmatch-run.json"


def job_ids(run_dir: str | Path) -> list[str]:
    """The pipeline job ids a local run's steps recorded (``lineage.run_id`` of its artifacts'
    manifests: ``dsl.PIPELINE_JOB_ID_PLACEHOLDER``, the id a deploy writes into its release record)."""
    found = set()
    for manifest in Path(run_dir).glob(f"*/*/{MANIFEST}"):
        try:
            lineage = json.loads(manifest.read_text()).get("lineage") or {}
        except (OSError, ValueError):
            continue
        if isinstance(lineage, dict) and lineage.get("run_id"):
            found.add(str(lineage["run_id"]))
    return sorted(found)


def task_names(run_dir: str | Path) -> set[str]:
    """Names of the tasks that ran (those that wrote an output directory)."""
    return {p.name for p in Path(run_dir).iterdir() if p.is_dir()}


class LocalPipelineRegistry:
    """The compiled IR files of a directory served like pipeline versions, run with ``kfp.local``.

    The calls :class:`labelmatch.platform.kfp.PipelineRegistry` offers a rollback (``find_version``,
    ``create_run``) and a retraining trigger (``find_run``, ``run_parameters``), answered from
    ``<compiled_dir>/<name>-<version>.yaml`` and the runs under ``pipeline_root``.

    Args:
        compiled_dir: Directory of compiled IR files (``pipelines/compiled``).
        pipeline_root: Where the runs are written.
    """

    def __init__(self, compiled_dir: str | Path, pipeline_root: str | Path):
        self.compiled_dir = Path(compiled_dir)
        self.pipeline_root = Path(pipeline_root)

    def versions(self, name: str) -> list[PipelineVersion]:
        """Every compiled version of pipeline ``name`` in the directory."""
        found = []
        for path in sorted(self.compiled_dir.glob(f"{name}-*.yaml")):
            if read_package(path)[0] != name:
                continue
            version = path.stem[len(name) + 1 :]
            parameters, required = pipeline_inputs(path)
            found.append(PipelineVersion(name, str(self.compiled_dir), version, str(path), "", parameters,
                                         required))
        return found

    def find_version(self, name: str, version: str) -> PipelineVersion:
        """The compiled version ``version`` of ``name``; :class:`ConfigError` lists the known ones."""
        return pick_version(self.versions(name), name, version, f"compiled in {self.compiled_dir}")

    def create_run(self, name: str, version: str, params: dict[str, str] | None = None,
                   run_name: str | None = None, **_: Any) -> RunInfo:
        """Run version ``version`` of ``name`` to completion with ``kfp.local``.

        Args:
            name: Pipeline name.
            version: Compiled version.
            params: Parameters as strings, converted to the declared types; unknown names are refused.
            run_name: Display name of the run.

        Returns:
            The run; ``run_id`` is its directory.
        """
        target = self.find_version(name, version)
        typed = target.typed_parameters(params)
        run_dir = run_locally(target.version_id, self.pipeline_root, **typed)
        run = RunInfo(run_id=str(run_dir), name=run_name or f"{name} {version}", pipeline=name,
                      version=version, parameters=typed)
        record = {**asdict(run), "job_ids": job_ids(run_dir)}
        (run_dir / RUN_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return run

    def find_run(self, run_id: str) -> RunInfo:
        """A run this registry made: ``run_id`` is its directory, or the job id its steps recorded
        (what a release record names).

        Raises:
            ConfigError: No run of that id under ``pipeline_root``.
        """
        direct = Path(run_id) / RUN_RECORD
        records = [direct] if direct.is_file() else sorted(self.pipeline_root.glob(f"*/{RUN_RECORD}"))
        for path in records:
            record = json.loads(path.read_text())
            if path == direct or run_id in record.pop("job_ids", []):
                record.pop("job_ids", None)
                return RunInfo(**record)
        raise ConfigError(f"run {run_id!r} is not a run under {self.pipeline_root}")

    def run_parameters(self, run_id: str) -> dict[str, Any]:
        """The parameters run ``run_id`` ran with (:meth:`find_run`)."""
        return self.find_run(run_id).parameters
