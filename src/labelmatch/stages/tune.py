"""The pipeline's ``tune_sft`` stage: PBT on a local Ray, an existing Ray cluster, or a KubeRay RayJob.

One entry point (:func:`run_tune_step`) for the three places tuning runs:

* ``local`` (the default; ``kfp.local``, the demo, CI): a Ray started inside the step, bound to
  127.0.0.1. In a cluster this runs the trials inside the KFP pod, with its CPUs and GPUs.
* ``ray``: an existing Ray cluster at ``ray_address`` (``ray://head:10001``). Tune's storage must
  then be ``s3://`` (the KFP pod's disk is not the workers').
* ``rayjob``: the production path. The step creates a KubeRay RayJob (a head that takes no
  trials: no CPUs and no GPUs for Ray to schedule; N one-GPU workers, node selector and
  tolerations of the GPU pool), which runs the same tuning against its own Ray cluster with
  checkpoints and experiment state in the store, follows it to the end (status lines in the
  step's log), deletes it, and downloads the verified best Model. The RayJob cannot outlive the
  step: it is named for this run (:meth:`TuneStepConfig.rayjob_spec`), owned by the step's pod
  (``POD_NAME``/``POD_UID`` from the downward API), given an ``activeDeadlineSeconds`` inside the
  step's own deadline, and deleted on SIGTERM. Unless the trials' GPU request
  was set, each trial asks for one worker's GPUs (:func:`rayjob_trial_resources`), so the
  workers' GPUs never idle by default.

Storage for ``ray`` and ``rayjob`` defaults to ``<LABELMATCH_STORE_ROOT>/tune/<run id>``: the
store root comes from the namespace's ``labelmatch-pipeline-config`` ConfigMap in a cluster.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from labelmatch.core.errors import ConfigError
from labelmatch.platform.kube import pod_namespace
from labelmatch.platform.kuberay import RayJobSpec, WaitPolicy, rayjob_name
from labelmatch.tuning.pbt import TuneConfig, tune_sft
from labelmatch.tuning.rayjob import TUNE_NAME_PREFIX, run_tune_rayjob

BACKENDS = ("local", "ray", "rayjob")
#: The variable naming the labelmatch store root (``s3://bucket[/prefix]``).
STORE_ROOT_VAR = "LABELMATCH_STORE_ROOT"
#: Time the step keeps for itself outside the RayJob, within its pod's deadline: the pod's start
#: and KFP's input download, the dataset upload before the RayJob; the model and report download,
#: KFP's output upload and the RayJob's deletion after it.
DEFAULT_MARGIN_S = 1800.0


@dataclass
class TuneStepConfig:
    """Where the tune step runs its trials.

    Attributes:
        backend: ``local``, ``ray`` (existing cluster at ``ray_address``) or ``rayjob`` (KubeRay).
        ray_address: The Ray cluster of the ``ray`` backend (``ray://head:10001``).
        storage_uri: Tune storage (checkpoints, experiment state): a directory or ``s3://``;
            empty: next to the report for ``local``, ``<store root>/tune/<run id>`` otherwise.
        run_id: The pipeline run (names the storage folder and the RayJob).
        rayjob: The RayJob's shape; its ``name`` is this run's (:meth:`rayjob_spec`), its
            ``namespace`` the pod's when empty.
        deadline_s: The step pod's ``activeDeadlineSeconds`` (the pipeline passes its own); the
            RayJob's ``activeDeadlineSeconds`` and the wait for it end ``margin_s`` before it,
            so the step deletes the RayJob before the kubelet stops the pod. 0: no deadline.
        margin_s: Time kept for the step's work outside the RayJob (:data:`DEFAULT_MARGIN_S`).
        poll_s: Seconds between reads of the RayJob's status.
        dead_driver_grace_s: How long the RayJob may stay ``Running`` after its Ray job ended (or
            KubeRay lost sight of it) before the step fails
            (:func:`labelmatch.platform.kuberay.stalled_reason`).
        name: The RayJob's name: ``lm-tune-<8 hex of sha256(run id)>-<5 random>``, drawn once per
            config (two configs, even of the same or an empty run id, never share one).
    """

    backend: Literal["local", "ray", "rayjob"] = "local"
    ray_address: str = ""
    storage_uri: str = ""
    run_id: str = ""
    rayjob: RayJobSpec = field(default_factory=RayJobSpec)
    deadline_s: float = 0.0
    margin_s: float = DEFAULT_MARGIN_S
    poll_s: float = 10.0
    dead_driver_grace_s: float = WaitPolicy.dead_driver_grace_s
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or rayjob_name(TUNE_NAME_PREFIX, self.run_id)
        if self.deadline_s and not 0 < self.margin_s < self.deadline_s:
            raise ConfigError(
                f"tune step margin_s must be above 0 and below its deadline_s ({self.deadline_s:g} s), "
                f"got {self.margin_s:g}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"tune backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.backend == "ray" and not self.ray_address:
            raise ConfigError("the ray tune backend needs ray_address (e.g. ray://raycluster-head:10001)")
        if self.backend == "rayjob" and not self.rayjob.image:
            raise ConfigError("the rayjob tune backend needs the image of the RayJob's pods (rayjob_image)")
        if self.backend != "ray" and self.ray_address:
            raise ConfigError(
                f"ray_address is set but the tune backend is {self.backend!r}: use backend 'ray'"
            )

    @classmethod
    def from_parameters(cls, backend: str = "local", ray_address: str = "", storage_uri: str = "",
                        run_id: str = "", deadline_s: float = 0.0, **rayjob: Any) -> TuneStepConfig:
        """Build from the tune component's flat parameters (``rayjob_<field>`` for the RayJob).

        Args:
            backend: ``local``, ``ray`` or ``rayjob``.
            ray_address: The ``ray`` backend's cluster.
            storage_uri: Tune storage.
            run_id: The pipeline run.
            deadline_s: The step pod's deadline (0: none).
            rayjob: ``rayjob_image``, ``rayjob_workers``, ``rayjob_gpu_type`` (→ ``gpu_resource``),
                ``rayjob_s3_secret`` (→ ``env_secret``), ``rayjob_config_map``
                (→ ``env_config_map``) and the other :class:`RayJobSpec` fields, prefixed.
        """
        renamed = {"gpu_type": "gpu_resource", "s3_secret": "env_secret", "config_map": "env_config_map"}
        values: dict[str, Any] = {}
        for key, value in rayjob.items():
            if not key.startswith("rayjob_"):
                raise ConfigError(f"unknown tune step parameter {key!r}")
            name = key.removeprefix("rayjob_")
            values[renamed.get(name, name)] = value
        for name in ("env_secret", "env_config_map"):
            values[name] = values.get(name) or None
        return cls(backend=backend, ray_address=ray_address, storage_uri=storage_uri, run_id=run_id,
                   deadline_s=deadline_s, rayjob=RayJobSpec(**values))

    def work_uri(self, env: dict[str, str] | None = None) -> str:
        """Tune storage of a cluster backend: ``storage_uri``, else ``<store root>/tune/<run id>``."""
        if self.storage_uri:
            if not self.storage_uri.startswith("s3://"):
                raise ConfigError(
                    f"storage_uri {self.storage_uri!r}: the {self.backend} backend needs s3:// storage "
                    "that every Ray node can reach"
                )
            return self.storage_uri.rstrip("/")
        root = (os.environ if env is None else env).get(STORE_ROOT_VAR, "")
        if not root.startswith("s3://"):
            raise ConfigError(
                f"the {self.backend} tune backend needs s3:// storage: set storage_uri, or {STORE_ROOT_VAR} "
                "(the labelmatch-pipeline-config ConfigMap sets it in a cluster)"
            )
        return f"{root.rstrip('/')}/tune/{self.run_id or 'unnamed-run'}"

    def rayjob_spec(self) -> RayJobSpec:
        """The RayJob's shape, named :attr:`name` (22 characters, well inside KubeRay's 47:
        :data:`labelmatch.platform.kuberay.MAX_NAME_LENGTH`) and in this pod's namespace unless
        one is set."""
        return replace(self.rayjob, name=self.name, namespace=self.rayjob.namespace or pod_namespace())

    def ends_by(self, started: float) -> float | None:
        """``time.monotonic()`` by which the RayJob must be over for a step that started at
        ``started``: its deadline less the margin; ``None`` without a deadline."""
        return started + self.deadline_s - self.margin_s if self.deadline_s else None

    def wait_policy(self) -> WaitPolicy:
        """How the step follows its RayJob (the timeout comes from :meth:`ends_by`)."""
        return WaitPolicy(poll_s=self.poll_s, dead_driver_grace_s=self.dead_driver_grace_s)


def rayjob_trial_resources(resources: dict[str, float], spec: RayJobSpec) -> dict[str, float]:
    """The Ray resources of one trial on a RayJob's cluster: one trial per GPU worker by default.

    A request that already asks for GPUs (``GPU`` > 0, set by the user) is kept as it is. Otherwise
    the trial asks for all the GPUs of one worker (``spec.gpus_per_worker``), so that each GPU
    worker runs one trial on its GPUs instead of the trials running on the workers' CPUs and
    leaving the GPUs idle. A RayJob without GPUs (``gpus_per_worker`` 0) keeps the request.

    Args:
        resources: The trial's requested Ray resources, e.g. ``{"CPU": 1}``.
        spec: The RayJob the trials run on.

    Returns:
        A new mapping, e.g. ``{"CPU": 1, "GPU": 1}`` for 1-GPU workers.
    """
    derived = dict(resources)
    if derived.get("GPU", 0) <= 0 and spec.gpus_per_worker > 0:
        derived["GPU"] = spec.gpus_per_worker
    return derived


def run_tune_step(
    dataset_dir: str | Path, model_dir: str | Path, report_dir: str | Path, tune: TuneConfig,
    step: TuneStepConfig, api_client: Any = None,
) -> dict[str, Any]:
    """Run PBT where ``step`` says and write the best Model and the report.

    Args:
        dataset_dir: The Dataset artifact (from ``data_prep``).
        model_dir: The best Model artifact to write.
        report_dir: The tuning Report artifact to write.
        tune: Tuning settings (population, iterations, resources per trial, ...). With ``rayjob``
            a request without GPUs gets one worker's GPUs (:func:`rayjob_trial_resources`).
        step: Where the trials run.
        api_client: Kubernetes API client for ``rayjob`` (default: the pod's service account).

    Returns:
        The tuning summary (:func:`labelmatch.tuning.pbt.tune_sft`).
    """
    started = time.monotonic()
    if step.backend == "local":
        config = replace(tune, address=None, storage_path=step.storage_uri or tune.storage_path)
        return tune_sft(dataset_dir, model_dir, report_dir, config)
    work = step.work_uri()
    if step.backend == "ray":
        config = replace(tune, address=step.ray_address, storage_path=f"{work}/ray")
        return tune_sft(dataset_dir, model_dir, report_dir, config)
    spec = step.rayjob_spec()
    config = replace(tune, resources_per_trial=rayjob_trial_resources(tune.resources_per_trial, spec))
    return run_tune_rayjob(dataset_dir, model_dir, report_dir, config, spec, work, api_client=api_client,
                           wait=step.wait_policy(), ends_by=step.ends_by(started))
