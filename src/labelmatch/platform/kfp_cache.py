"""Cache policy of a KFP run: per run (``--cache/--no-cache``) and per step (``--no-cache-step``).

**What KFP itself offers** (kubeflow/pipelines ``2.17.0``, commit 4a3592cb):

* The v2 driver decides per task: a task reuses a cached execution only when the server does not
  disable caching globally and the task's own ``cachingOptions.enableCache`` in the pipeline spec
  is true (``backend/src/v2/driver/container.go``, ``driver/cache.go`` ``getFingerPrintsAndID``).
  ``opts.Task`` is the task as its parent DAG declares it, so the tasks of nested pipelines
  (``components.<comp>.dag.tasks``) carry their own options.
* The cache key is the task's input parameter *values*, its input artifacts' MLMD ids, its outputs'
  types, command and image (``backend/src/v2/cacheutils/cache.go`` ``GenerateCacheKey``), never
  the content behind a URI given as a parameter. An ``importer`` with ``reimport=False`` hands the
  same MLMD artifact to every run that names the same URI
  (``backend/src/v2/component/importer_launcher.go`` ``findOrNewArtifactToImport``).
* The v2beta1 ``Run`` has no caching field (``backend/api/v2beta1/run.proto``); its pipeline
  comes from a oneof ``pipeline_source``: a ``pipeline_version_reference`` **or** an inline
  ``pipeline_spec``. With a version reference the server runs the version's stored spec
  (``backend/src/apiserver/resource/resource_manager.go`` ``fetchTemplateFromPipelineSpec``), so
  its compiled ``cachingOptions`` apply unchanged. The KFP SDK's ``enable_caching`` (kfp 2.17.0
  ``kfp/client/client.py`` ``_create_job_config``) only rewrites an inline spec, and only the root
  DAG's tasks (``_override_caching_options``).

So a run whose caching differs from the compiled IR is created here as the SDK does it, with the
version's stored spec inline, every DAG's tasks rewritten by :func:`apply_cache_policy` (nested
pipelines included). A policy never turns caching *on*: steps compiled with caching off (those
whose input is a mutable URI, see ``docs/pipelines.md``) stay off whatever a run asks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from labelmatch.core.errors import ConfigError


@dataclass(frozen=True)
class CachePolicy:
    """How a run may reuse KFP's cached step results.

    Attributes:
        enabled: False: no step of the run reuses a cached result (``--no-cache``, a fresh run).
            True: each step as compiled.
        off_steps: Task names (``data-prep``, ``tune-sft``, ``export-onnx``; ``_`` reads as ``-``)
            that must not reuse a cached result in this run (``--no-cache-step``), in every
            nested pipeline where a task of that name runs.
    """

    enabled: bool = True
    off_steps: tuple[str, ...] = ()

    @classmethod
    def from_options(cls, cache: bool = True, no_cache_steps: list[str] | tuple[str, ...] | None = None
                     ) -> CachePolicy:
        """The policy of the command-line options ``--cache/--no-cache`` and ``--no-cache-step``."""
        steps = tuple(dict.fromkeys(step_name(step) for step in no_cache_steps or ()))
        return cls(enabled=cache, off_steps=steps)

    @property
    def as_compiled(self) -> bool:
        """Whether the run keeps the compiled IR's caching (nothing to rewrite)."""
        return self.enabled and not self.off_steps

    def describe(self) -> str:
        """One phrase for logs and run descriptions: ``as compiled``, ``off``, ``off for grpo``."""
        if not self.enabled:
            return "off"
        if self.off_steps:
            return f"off for {', '.join(self.off_steps)}"
        return "as compiled"


def step_name(name: str) -> str:
    """A step as the IR names its task: ``export_onnx`` -> ``export-onnx``."""
    return name.strip().replace("_", "-")


def _pipeline_part(spec: dict[str, Any]) -> dict[str, Any]:
    """The pipeline spec of a stored version (``{"pipeline_spec", "platform_spec"}``) or of a bare IR."""
    return spec["pipeline_spec"] if "root" not in spec and "pipeline_spec" in spec else spec


def _dags(pipeline: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(name, tasks)`` of the root DAG and of every component that is a DAG (nested pipelines,
    condition branches)."""
    dags = [("root", pipeline.get("root", {}).get("dag", {}).get("tasks", {}))]
    for name, component in sorted(pipeline.get("components", {}).items()):
        if "dag" in component:
            dags.append((name, component["dag"].get("tasks", {})))
    return dags


def step_caching(spec: dict[str, Any]) -> dict[str, bool]:
    """Whether each step (task name) may reuse a cached result, as the v2 driver reads it.

    A task name that several DAGs share (``evaluate`` in two nested pipelines) is True only when
    every one of them may; tasks without an executor of their own (DAG and condition tasks)
    are included as the IR declares them.
    """
    found: dict[str, bool] = {}
    for _, tasks in _dags(_pipeline_part(spec)):
        for task, body in tasks.items():
            enabled = bool((body.get("cachingOptions") or {}).get("enableCache", False))
            found[task] = found.get(task, True) and enabled
    return found


def apply_cache_policy(spec: dict[str, Any], policy: CachePolicy) -> dict[str, Any]:
    """A copy of ``spec`` with caching switched off where ``policy`` says so.

    Args:
        spec: A pipeline spec: a stored version's (``{"pipeline_spec", "platform_spec"}``) or a
            compiled IR's first document.
        policy: The run's policy.

    Returns:
        The rewritten copy (``spec`` itself is not changed); for a policy ``as_compiled``, an
        unchanged copy.

    Raises:
        ConfigError: A step of ``policy.off_steps`` is no task of the pipeline (the steps are listed).
    """
    rewritten = copy.deepcopy(spec)
    pipeline = _pipeline_part(rewritten)
    known = step_caching(pipeline)
    unknown = [step for step in policy.off_steps if step not in known]
    if unknown:
        name = pipeline.get("pipelineInfo", {}).get("name", "the pipeline")
        raise ConfigError(f"--no-cache-step {unknown[0]}: no step of that name in {name} "
                          f"(steps: {', '.join(sorted(known))})")
    for _, tasks in _dags(pipeline):
        for task, body in tasks.items():
            if not policy.enabled or task in policy.off_steps:
                options = dict(body.get("cachingOptions") or {})
                options["enableCache"] = False
                body["cachingOptions"] = options
    return rewritten


__all__ = ["CachePolicy", "apply_cache_policy", "step_caching", "step_name"]
