"""Run ``labelmatch tune`` on a cluster: a KubeRay RayJob, or a job on an existing Ray cluster.

* :func:`build_rayjob` writes the ``ray.io/v1`` RayJob: a head that offers Ray no CPUs and no
  GPUs (``num-cpus: "0"``, ``num-gpus: "0"``: it runs the driver and schedules, trials and
  actors all land on the workers), one worker group of N GPU workers, and an ``entrypoint`` that runs
  ``labelmatch tune --address auto`` against the cluster KubeRay creates for the job; the
  cluster is deleted when the job ends (``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``).
* :func:`submit_rayjob` creates it through the Kubernetes API (``CustomObjectsApi``) and
  follows its status until it finishes.
* :func:`submit_ray_job` submits the same entrypoint to a running Ray cluster through the Ray
  Jobs API (``JobSubmissionClient``) and streams its logs.
* :func:`run_rayjob` creates a RayJob, follows it and deletes it whatever happened (also used
  by ``labelmatch classify --rayjob``, :mod:`labelmatch.batch.rayjob`).
* :func:`run_tune_rayjob` is the whole round trip the pipeline's tune step (and
  ``labelmatch tune --rayjob``) makes: upload the Dataset artifact to the store, create the
  RayJob, stream its status, delete it whatever happened, download and verify the best Model
  and the report.

The cluster run writes checkpoints and experiment state to shared storage (``s3://`` on MinIO)
and uploads the best model and the report there (``--upload-to``, manifest last); the
submitting side downloads them, verified.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.platform import kube
from labelmatch.platform.images import image

if TYPE_CHECKING:
    from labelmatch.platform.store import ArtifactStore
    from labelmatch.tuning.pbt import TuneConfig

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
#: RayJob ``status.jobDeploymentStatus`` values after which nothing changes any more.
TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")
RESTRICTED = {
    "runAsNonRoot": True,
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


@dataclass
class RayJobSpec:
    """What the RayJob runs on; set by flags or a values file (YAML/JSON, same keys).

    Attributes:
        name: RayJob name (also the Ray cluster's name prefix).
        namespace: Kubernetes namespace.
        image: Image with labelmatch[tune] and the encoder (head and workers); default: this
            release's train image in ``$LABELMATCH_IMAGE_REGISTRY``.
        ray_version: Ray version in the image (KubeRay's ``rayVersion``).
        workers: GPU worker pods (the production shape: 4 × 1-GPU A10).
        gpus_per_worker: GPUs per worker pod.
        gpu_resource: The GPU's extended resource name (``nvidia.com/gpu``).
        worker_cpu: CPU request/limit per worker.
        worker_memory: Memory request/limit per worker.
        head_cpu: CPU request/limit of the head.
        head_memory: Memory request/limit of the head.
        node_selector: Node selector of the worker pods (e.g. a GPU node pool).
        tolerations: Tolerations of the worker pods (e.g. ``nvidia.com/gpu`` taints).
        env: Plain environment variables of every pod (e.g. ``LABELMATCH_S3_ENDPOINT`` of MinIO).
        env_secret: Secret whose keys become environment variables (S3 credentials).
        env_config_map: ConfigMap whose keys become environment variables (the S3 endpoint and
            region, e.g. the one ``charts/labelmatch-pipelines`` creates).
        service_account: Service account of the pods (``None``: the namespace default).
        shutdown_after_job_finishes: Delete the Ray cluster when the job ends.
        ttl_seconds_after_finished: Seconds to keep the finished RayJob (and its logs).
        active_deadline_seconds: Fail the job after this long (``None``: no limit).
    """

    name: str = "labelmatch-tune"
    namespace: str = "default"
    image: str = field(default_factory=lambda: image("train"))
    ray_version: str = "2.60.0"
    workers: int = 4
    gpus_per_worker: int = 1
    gpu_resource: str = "nvidia.com/gpu"
    worker_cpu: str = "4"
    worker_memory: str = "16Gi"
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    env_secret: str | None = None
    env_config_map: str | None = None
    service_account: str | None = None
    shutdown_after_job_finishes: bool = True
    ttl_seconds_after_finished: int = 600
    active_deadline_seconds: int | None = None

    def __post_init__(self) -> None:
        if self.workers < 1 or self.gpus_per_worker < 0:
            raise ConfigError(
                f"RayJob needs workers >= 1 and gpus_per_worker >= 0, got {self.workers}, "
                f"{self.gpus_per_worker}"
            )
        for toleration in self.tolerations:
            unknown = set(toleration) - {"key", "operator", "value", "effect", "tolerationSeconds"}
            if unknown:
                raise ConfigError(f"toleration {toleration}: unknown field(s) {', '.join(sorted(unknown))}")

    @classmethod
    def from_values(cls, path: str | Path | None, defaults: dict[str, Any] | None = None,
                    **overrides: Any) -> RayJobSpec:
        """Read a values file (YAML or JSON; ``None``: none) over ``defaults`` and apply flag
        overrides (``None`` = not given)."""
        import yaml

        values = yaml.safe_load(Path(path).read_text()) or {} if path else {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of RayJob settings")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(
                f"{path}: unknown RayJob setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        values = {**(defaults or {}), **values, **{k: v for k, v in overrides.items() if v is not None}}
        return cls(**values)


def _container(
    name: str,
    image: str,
    cpu: str,
    memory: str,
    gpus: int,
    env: list[dict[str, Any]],
    env_from: list[dict[str, Any]],
    gpu_resource: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    limits: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus and gpu_resource:
        limits[gpu_resource] = gpus
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(limits), "limits": limits},
        "securityContext": RESTRICTED,
        # Ray writes its session files under /tmp/ray: an emptyDir keeps them off the image layer.
        "volumeMounts": [{"name": "ray-tmp", "mountPath": "/tmp/ray"}],
    }
    if env:
        container["env"] = env
    if env_from:
        container["envFrom"] = env_from
    return container


def _pod_template(spec: RayJobSpec, container: dict[str, Any], worker: bool) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": [{"name": "ray-tmp", "emptyDir": {}}],
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
    }
    if worker and spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if worker and spec.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.tolerations]
    if spec.service_account:
        pod["serviceAccountName"] = spec.service_account
    else:
        pod["automountServiceAccountToken"] = False
    return {
        "metadata": {
            "labels": {"app.kubernetes.io/name": "labelmatch", "app.kubernetes.io/component": "tune"}
        },
        "spec": pod,
    }


def build_rayjob(spec: RayJobSpec, entrypoint: str, component: str = "tune") -> dict[str, Any]:
    """The RayJob manifest (``ray.io/v1``) running ``entrypoint`` on a fresh Ray cluster.

    Args:
        spec: The cluster's shape.
        entrypoint: The shell command the job runs (with ``--address auto``).
        component: The ``app.kubernetes.io/component`` label (``tune``, ``batch``).
    """
    env = [{"name": k, "value": v} for k, v in sorted(spec.env.items())]
    env_from = [{"configMapRef": {"name": spec.env_config_map}}] if spec.env_config_map else []
    env_from += [{"secretRef": {"name": spec.env_secret}}] if spec.env_secret else []
    head = _container("ray-head", spec.image, spec.head_cpu, spec.head_memory, 0, env, env_from)
    head["ports"] = [
        {"containerPort": 6379, "name": "gcs"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    worker = _container(
        "ray-worker", spec.image, spec.worker_cpu, spec.worker_memory, spec.gpus_per_worker, env, env_from,
        spec.gpu_resource,
    )
    job_spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": spec.shutdown_after_job_finishes,
        "ttlSecondsAfterFinished": spec.ttl_seconds_after_finished,
        "submissionMode": "K8sJobMode",
        "rayClusterSpec": {
            "rayVersion": spec.ray_version,
            "headGroupSpec": {
                # The head only runs the driver and schedules: with no CPUs or GPUs to offer, no
                # trial (or batch actor) can land on it, whatever the trial asks for.
                "rayStartParams": {"num-cpus": "0", "num-gpus": "0", "dashboard-host": "0.0.0.0"},
                "template": _pod_template(spec, head, worker=False),
            },
            "workerGroupSpecs": [
                {
                    "groupName": "gpu-workers" if spec.gpus_per_worker else "cpu-workers",
                    "replicas": spec.workers,
                    "minReplicas": spec.workers,
                    "maxReplicas": spec.workers,
                    "rayStartParams": {},
                    "template": _pod_template(spec, worker, worker=True),
                }
            ],
        },
    }
    if spec.active_deadline_seconds:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RayJob",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": {"app.kubernetes.io/name": "labelmatch", "app.kubernetes.io/component": component},
        },
        "spec": job_spec,
    }


def _is_terminal(status: dict[str, Any]) -> bool:
    return status.get("jobDeploymentStatus") in TERMINAL_DEPLOYMENT


def submit_rayjob(
    manifest: dict[str, Any],
    api_client: Any = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    poll_seconds: float = 5.0,
    timeout_seconds: float | None = None,
) -> dict[str, Any]:
    """Create the RayJob and follow its status until it is ``Complete`` or ``Failed``.

    Args:
        manifest: From :func:`build_rayjob`.
        api_client: ``kubernetes.client.ApiClient``; ``None`` loads the kubeconfig (or the
            in-cluster service account).
        on_status: Called with the ``status`` object each time it changes.
        poll_seconds: Seconds between status reads.
        timeout_seconds: Give up waiting (the job keeps running) after this long.

    Returns:
        The last ``status`` of the RayJob.
    """
    from kubernetes import client

    api = client.CustomObjectsApi(api_client or kube.api_client())
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    except client.ApiException as exc:
        raise LabelmatchError(
            f"creating RayJob {namespace}/{name} failed: {exc.status} {exc.reason}: {_api_message(exc)}"
        ) from exc
    started, last = time.monotonic(), None
    while True:
        status = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name).get("status") or {}
        if status != last and on_status is not None:
            on_status(status)
        last = status
        if _is_terminal(status):
            return status
        if timeout_seconds is not None and time.monotonic() - started > timeout_seconds:
            raise LabelmatchError(
                f"RayJob {namespace}/{name} not finished after {timeout_seconds:.0f} s "
                f"(last status: {json.dumps(status)})"
            )
        time.sleep(poll_seconds)


def delete_rayjob(namespace: str, name: str, api_client: Any = None) -> bool:
    """Delete the RayJob (and, through its owner references, its Ray cluster); False when absent."""
    from kubernetes import client

    api = client.CustomObjectsApi(api_client or kube.api_client())
    try:
        api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                            propagation_policy="Background")
    except client.ApiException as exc:
        if exc.status == 404:
            return False
        raise LabelmatchError(
            f"deleting RayJob {namespace}/{name} failed: {exc.status} {exc.reason}: {_api_message(exc)}"
        ) from exc
    return True


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError):
        return str(exc.body or "")


def submit_ray_job(
    address: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    on_log: Callable[[str], None] | None = None,
    poll_seconds: float = 2.0,
) -> tuple[str, str]:
    """Submit ``entrypoint`` to a Ray cluster's Jobs API and wait, streaming the logs.

    Args:
        address: Jobs API (dashboard) URL, e.g. ``http://raycluster-head:8265``.
        entrypoint: Shell command run on the cluster (``labelmatch tune ... --address auto``).
        runtime_env: Ray runtime environment (``env_vars`` such as ``AWS_ENDPOINT_URL``).
        on_log: Called with each new chunk of the job's logs.
        poll_seconds: Seconds between status reads.

    Returns:
        ``(job id, final status)``: ``SUCCEEDED``, ``FAILED`` or ``STOPPED``.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(address)
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    shown = 0
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id)
        if on_log is not None and len(logs) > shown:
            on_log(logs[shown:])
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status.value)
        time.sleep(poll_seconds)


def cluster_entrypoint(config: TuneConfig, data_uri: str, upload_to: str) -> str:
    """The ``labelmatch tune`` command a Ray cluster runs: these settings, the cluster's own Ray
    (``--address auto``), and the best model and report uploaded to ``upload_to`` at the end."""
    values = config.to_dict()
    values.update(address="auto", num_cpus=None, dashboard=False, ray_temp_dir=None)
    args = [
        "labelmatch", "tune", "--data", data_uri,
        "--out", "/tmp/labelmatch/model", "--report", "/tmp/labelmatch/report",
        "--upload-to", upload_to, "--config", json.dumps(values),
    ]
    return shlex.join(args)


def describe_status(namespace: str, name: str, status: dict[str, Any]) -> str:
    """One log line for a RayJob status (deployment status, job status, message)."""
    parts = [status.get("jobDeploymentStatus") or "Pending", status.get("jobStatus") or ""]
    message = status.get("message")
    line = f"RayJob {namespace}/{name}: {' '.join(p for p in parts if p)}"
    return f"{line} ({message})" if message else line


def run_rayjob(
    manifest: dict[str, Any],
    api_client: Any = None,
    on_status: Callable[[str], None] | None = print,
    poll_seconds: float = 10.0,
    timeout_seconds: float | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Create the RayJob, follow it to its end and delete it (also on failure or interruption,
    unless ``keep``); returns its last status.

    Args:
        manifest: From :func:`build_rayjob`.
        api_client: Kubernetes API client (default: in-cluster service account or kubeconfig).
        on_status: Called with a line for each RayJob status change.
        poll_seconds: Seconds between status reads.
        timeout_seconds: Give up (and delete the RayJob) after this long.
        keep: Leave the finished RayJob in place (for debugging).

    Raises:
        LabelmatchError: The RayJob did not succeed, or did not finish in time.
    """
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api_client = api_client or kube.api_client()
    try:
        status = submit_rayjob(
            manifest, api_client, poll_seconds=poll_seconds, timeout_seconds=timeout_seconds,
            on_status=(lambda s: on_status(describe_status(namespace, name, s))) if on_status else None,
        )
    finally:
        if not keep:
            deleted = delete_rayjob(namespace, name, api_client)
            if on_status and deleted:
                on_status(f"RayJob {namespace}/{name}: deleted")
    if status.get("jobDeploymentStatus") != "Complete" or status.get("jobStatus") != "SUCCEEDED":
        raise LabelmatchError(f"RayJob {namespace}/{name} did not succeed: {json.dumps(status)}")
    return status


def run_tune_rayjob(
    data: str | Path,
    out_model_dir: str | Path,
    report_dir: str | Path,
    config: TuneConfig,
    spec: RayJobSpec,
    work_uri: str,
    store: ArtifactStore | None = None,
    api_client: Any = None,
    on_status: Callable[[str], None] | None = print,
    poll_seconds: float = 10.0,
    timeout_seconds: float | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Tune on a KubeRay RayJob and bring the best Model and the report back here.

    1. The dataset (a local Dataset artifact, or an ``s3://`` URI left as it is) is uploaded
       to ``<work_uri>/dataset``.
    2. A RayJob runs :func:`cluster_entrypoint` with Tune's storage at ``<work_uri>/ray``
       (checkpoints and experiment state every Ray node can reach: PBT exploits restore other
       trials' checkpoints from there) and the outputs at ``<work_uri>/outputs``.
    3. Its status is followed until it finishes (``on_status`` gets one line per change); the
       RayJob is deleted afterwards, also when it failed or this process is interrupted, unless
       ``keep``.
    4. ``outputs/model`` and ``outputs/report`` are downloaded and verified into
       ``out_model_dir`` and ``report_dir``.

    Args:
        data: Dataset artifact directory or ``s3://`` URI of one.
        out_model_dir: The best Model artifact (written atomically).
        report_dir: The tuning Report artifact.
        config: Tuning settings (``address`` and ``storage_path`` are set here).
        spec: The RayJob's shape (:class:`RayJobSpec`).
        work_uri: ``s3://bucket/prefix`` for this run's dataset copy, Tune storage and outputs.
        store: The artifact store (default: from the environment).
        api_client: Kubernetes API client (default: in-cluster service account or kubeconfig).
        on_status: Called with a line for each RayJob status change.
        poll_seconds: Seconds between status reads.
        timeout_seconds: Give up (and delete the RayJob) after this long.
        keep: Leave the finished RayJob in place (for debugging).

    Returns:
        The tuning summary (the report's ``summary.json``).

    Raises:
        ConfigError: ``work_uri`` is not ``s3://``.
        LabelmatchError: the RayJob failed, or did not finish in time.
    """
    from labelmatch.platform.store import ArtifactStore, S3Uri, is_s3_uri

    if not is_s3_uri(work_uri):
        raise ConfigError(
            f"work_uri {work_uri!r}: a RayJob needs s3:// storage that every Ray node can reach"
        )
    store = store or ArtifactStore.from_env()
    work = str(S3Uri.parse(work_uri))
    data_uri = str(data) if is_s3_uri(data) else f"{work}/dataset"
    if not is_s3_uri(data):
        store.upload_artifact(data, data_uri, kind="Dataset")
    cluster_config = dataclasses.replace(config, address="auto", storage_path=f"{work}/ray")
    manifest = build_rayjob(spec, cluster_entrypoint(cluster_config, data_uri, f"{work}/outputs"))
    run_rayjob(manifest, api_client, on_status, poll_seconds, timeout_seconds, keep)
    store.download_artifact(f"{work}/outputs/model", out_model_dir, kind="Model")
    store.download_artifact(f"{work}/outputs/report", report_dir, kind="Report")
    return json.loads((Path(report_dir) / "summary.json").read_text())
