"""KubeRay's RayJob: the manifest, its creation, following and deletion through the Kubernetes API.

Generic, used by every stage that runs on a Ray cluster of its own (tuning, batch
classification):

* :func:`build_rayjob` writes the ``ray.io/v1`` RayJob: a head that offers Ray no CPUs and no
  GPUs (``num-cpus: "0"``, ``num-gpus: "0"``: it runs the driver and schedules, trials and
  actors all land on the workers), one worker group of N workers, and an ``entrypoint``; the
  cluster is deleted when the job ends (``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``).
* :func:`submit_rayjob` creates it through the Kubernetes API (``CustomObjectsApi``) and
  follows its status until it finishes.
* :func:`run_rayjob` creates a RayJob, follows it and deletes it whatever happened.

What runs in it is the caller's: :mod:`labelmatch.tuning.rayjob` (``labelmatch tune``),
:mod:`labelmatch.batch.rayjob` (``labelmatch classify``).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.platform import kube
from labelmatch.platform.images import image

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
            f"creating RayJob {namespace}/{name} failed: {exc.status} {exc.reason}: {api_message(exc)}"
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
            f"deleting RayJob {namespace}/{name} failed: {exc.status} {exc.reason}: {api_message(exc)}"
        ) from exc
    return True


def api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError):
        return str(exc.body or "")


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
