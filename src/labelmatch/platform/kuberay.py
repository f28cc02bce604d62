"""KubeRay's RayJob: the manifest, its creation, following and deletion through the Kubernetes API.

Generic, used by every stage that runs on a Ray cluster of its own (tuning, batch
classification):

* :func:`build_rayjob` writes the ``ray.io/v1`` RayJob: a head that offers Ray no CPUs and no
  GPUs (``num-cpus: "0"``, ``num-gpus: "0"``: it runs the driver and schedules, trials and
  actors all land on the workers), one worker group of N workers, and an ``entrypoint``; the
  cluster is deleted when the job ends (``shutdownAfterJobFinishes``, ``ttlSecondsAfterFinished``);
  with an owner pod, an ``ownerReference`` to it, so that deleting the pod deletes the RayJob.
  Every pod it makes KubeRay create passes Pod Security "restricted" (:data:`RESTRICTED`), the
  submitter Job's pod included (``submitterPodTemplate``: KubeRay's default submitter sets no
  security context, and a namespace enforcing "restricted" would refuse it).
* :func:`submit_rayjob` creates it through the Kubernetes API (``CustomObjectsApi``) and
  follows its status until it ends, retrying API calls that fail for a moment
  (:mod:`labelmatch.platform.kube_retry`) and bounding a RayJob that stays ``Running`` after its
  Ray job ended (:func:`stalled_reason`).
* :func:`run_rayjob` creates a RayJob, follows it and deletes it whatever happened, SIGTERM
  included.

The status semantics are KubeRay v1.7.0's (``ray-operator/apis/ray/v1/rayjob_types.go``,
``ray-operator/controllers/ray/rayjob_controller.go``; ``tests/kuberay_double.py`` plays them).
What runs in it is the caller's: :mod:`labelmatch.tuning.rayjob` (``labelmatch tune``),
:mod:`labelmatch.batch.rayjob` (``labelmatch classify``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import secrets
import signal
import string
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.platform import kube
from labelmatch.platform.images import image
from labelmatch.platform.kube import PodIdentity, own_pod
from labelmatch.platform.kube_retry import RetryPolicy, call_with_retry, describe, is_transient

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
#: ``status.jobDeploymentStatus`` values after which KubeRay changes nothing any more:
#: ``IsJobDeploymentTerminal`` (``Complete``, ``Failed``; ``Failed`` turns into ``Retrying`` only
#: with a ``backoffLimit``, which these RayJobs do not set) and ``ValidationFailed`` (the spec
#: was refused; the controller stops there).
TERMINAL_DEPLOYMENT = ("Complete", "Failed", "ValidationFailed")
#: ``status.jobStatus`` values of a Ray job that has ended (``IsJobTerminal``).
TERMINAL_JOB = ("SUCCEEDED", "FAILED", "STOPPED")
#: The longest RayJob name KubeRay accepts: ``MaxRayJobNameLength`` = ``MaxRayClusterNameLength``
#: (53: a Service name of 63 less ``-serve-svc``) less the 6 characters ``GenerateRayClusterName``
#: appends (KubeRay v1.7.0, ``ray-operator/controllers/ray/utils/constant.go``; enforced with
#: ``IsDNS1035Label`` by ``ValidateRayJobMetadata`` in ``utils/validation.go``).
MAX_NAME_LENGTH = 47
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
#: The security context of every container the RayJob's pods run (Pod Security "restricted";
#: KubeRay's ``wait-gcs-ready`` init container copies the Ray container's).
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
        active_deadline_seconds: KubeRay fails the job this long after it started
            (``None``: no limit; :func:`within_deadline` derives it from a step's deadline).
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
        check_name(self.name)
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
        """Read a values file (YAML, or JSON by its ``.json`` suffix; ``None``: none) over
        ``defaults`` and apply flag overrides (``None`` = not given).

        Every field of the file is type-checked and a bad one named with its line
        (:mod:`labelmatch.core.settings`); CPU and memory quantities may be numbers (``4``, ``0.5``)
        and are read as Kubernetes quantities (``"4"``, ``"0.5"``).

        Raises:
            DataError: A bad values file (``values.yaml:3: field 'workers': expected an integer,
                got a string 'two'``).
            ConfigError: A bad flag or default.
        """
        from labelmatch.core.settings import build_settings, read_settings

        values: dict[str, Any] = {}
        if path:
            settings = read_settings(path, default_format="yaml")
            if isinstance(settings.body, dict):
                settings.body = values = {k: str(v) if k in QUANTITIES and _is_number(v) else v
                                          for k, v in settings.body.items()}
            build_settings(cls, settings.body, settings)  # the file alone: its fields named with their lines
        values = {**(defaults or {}), **values, **{k: v for k, v in overrides.items() if v is not None}}
        return build_settings(cls, values, "RayJob settings")


#: RayJobSpec fields that are Kubernetes quantities (a number in a values file is read as one).
QUANTITIES = ("worker_cpu", "worker_memory", "head_cpu", "head_memory")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_name(name: str) -> None:
    """Refuse a name KubeRay would refuse (:data:`MAX_NAME_LENGTH`, a DNS-1035 label), in one line."""
    if len(name) > MAX_NAME_LENGTH or not DNS1035_LABEL.match(name):
        raise ConfigError(
            f"RayJob name {name!r}: KubeRay needs a DNS-1035 label (a-z, 0-9, '-', starting with a letter) "
            f"of at most {MAX_NAME_LENGTH} characters"
        )


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


def _submitter_template(spec: RayJobSpec, component: str) -> dict[str, Any]:
    """The pod of the Job that submits the entrypoint (``K8sJobMode``): KubeRay's default submitter
    (``GetDefaultSubmitterContainer``: the head's image, 500m/200Mi up to 1 CPU/1Gi, the command
    KubeRay fills in) with the restricted security context KubeRay's default lacks."""
    container = {
        "name": "ray-job-submitter",
        "image": spec.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": {"cpu": "500m", "memory": "200Mi"},
                      "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": copy.deepcopy(RESTRICTED),
    }
    return {
        "metadata": {"labels": {"app.kubernetes.io/name": "labelmatch",
                                "app.kubernetes.io/component": component}},
        "spec": {
            "restartPolicy": "Never",  # a Job's pod; KubeRay's Job retries (backoffLimit)
            "containers": [container],
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            # It only talks to the Ray dashboard: no API token.
            "automountServiceAccountToken": False,
        },
    }


def build_rayjob(spec: RayJobSpec, entrypoint: str, component: str = "tune",
                 owner: PodIdentity | None = None) -> dict[str, Any]:
    """The RayJob manifest (``ray.io/v1``) running ``entrypoint`` on a fresh Ray cluster.

    Args:
        spec: The cluster's shape.
        entrypoint: The shell command the job runs (with ``--address auto``).
        component: The ``app.kubernetes.io/component`` label (``tune``, ``batch``).
        owner: The pod whose deletion deletes the RayJob (:func:`rayjob_owner`); ``None``: none.

    Raises:
        ConfigError: ``owner`` is in another namespace than the RayJob.
    """
    if owner is not None and owner.namespace != spec.namespace:
        raise ConfigError(
            f"RayJob {spec.namespace}/{spec.name}: owner pod {owner.name} is in namespace {owner.namespace}; "
            "an ownerReference cannot cross namespaces"
        )
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
        "submitterPodTemplate": _submitter_template(spec, component),
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
    metadata: dict[str, Any] = {
        "name": spec.name,
        "namespace": spec.namespace,
        "labels": {"app.kubernetes.io/name": "labelmatch", "app.kubernetes.io/component": component},
    }
    if owner is not None:
        metadata["ownerReferences"] = [owner.owner_reference()]
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "metadata": metadata, "spec": job_spec}


def rayjob_name(prefix: str, seed: str = "") -> str:
    """A RayJob name of its own for each call: ``<prefix>-<8 hex of sha256(seed)>-<5 random>``.

    The hash keeps the name traceable to what ``seed`` names (a pipeline run, an output prefix);
    the random part keeps two runs with the same seed (an empty run id, the same output) apart.

    Args:
        prefix: A DNS-1035 label of at most 32 characters, e.g. ``lm-tune``.
        seed: What the RayJob is for; empty: no hash part.

    Raises:
        ConfigError: The name would not be a valid RayJob name (:data:`MAX_NAME_LENGTH`).
    """
    suffix = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(5))
    digest = f"{hashlib.sha256(seed.encode()).hexdigest()[:8]}-" if seed else ""
    name = f"{prefix}-{digest}{suffix}"
    check_name(name)
    return name


def rayjob_owner(namespace: str, log: Callable[[str], Any] | None = print,
                 env: Mapping[str, str] | None = None) -> PodIdentity | None:
    """The pod that should own a RayJob in ``namespace``: this process's pod, when it is known.

    Known: ``POD_NAME`` and ``POD_UID`` are set (the pipeline's tune step gets them through the
    downward API). A RayJob in another namespace gets no owner: Kubernetes garbage collection
    ignores an owner reference across namespaces (a namespaced dependent's owner must be in its
    namespace), so that case is said in one ``log`` line and left to the step's own deletion and
    the RayJob's ``activeDeadlineSeconds``.

    Args:
        namespace: The RayJob's namespace.
        log: Called with the line about a namespace mismatch.
        env: The environment to read (default ``os.environ``).
    """
    pod = own_pod(env)
    if pod is None or pod.namespace == namespace:
        return pod
    if log is not None:
        log(f"RayJob namespace {namespace} is not this pod's ({pod.namespace}): no ownerReference to pod "
            f"{pod.name} (garbage collection does not cross namespaces); the RayJob ends by this step's "
            "deletion or its activeDeadlineSeconds")
    return None


@dataclass(frozen=True)
class WaitPolicy:
    """How a RayJob is followed.

    Attributes:
        poll_s: Seconds between status reads.
        timeout_s: Give up (and delete the RayJob) after this long; ``None``: no limit.
        dead_driver_grace_s: How long a RayJob may stay ``Running`` once the Ray job has ended
            (or KubeRay can no longer read it) before the wait stops (:func:`stalled_reason`).
            KubeRay >= 1.3 resolves that itself after 300 s
            (``DEFAULT_RAYJOB_DEPLOYMENT_STATUS_TRANSITION_GRACE_PERIOD_SECONDS``,
            ``DEFAULT_RAYJOB_STATUS_CHECK_TIMEOUT_SECONDS``); the default leaves it that time first
            and bounds older operators, or one that is down, too.
        retry: Retries of each Kubernetes API call.
    """

    poll_s: float = 10.0
    timeout_s: float | None = None
    dead_driver_grace_s: float = 360.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)


#: How long the wait for a RayJob goes on past the RayJob's own ``activeDeadlineSeconds``: KubeRay
#: sees the deadline at its next reconcile (it requeues every few seconds), the status reaches us
#: at the next poll.
DEADLINE_SLACK_S = 60.0


def within_deadline(
    spec: RayJobSpec, wait: WaitPolicy, ends_by: float | None
) -> tuple[RayJobSpec, WaitPolicy]:
    """Fit a RayJob about to be created, and the wait for it, into the time left before ``ends_by``.

    The RayJob gets ``activeDeadlineSeconds`` = the time left minus :data:`DEADLINE_SLACK_S` (or its
    own, if shorter), so KubeRay fails it and frees its pods first; the wait ends at ``ends_by``
    at the latest, so the caller's ``finally`` (which deletes the RayJob) runs before whatever
    deadline ``ends_by`` was derived from.

    Args:
        spec: The RayJob's shape.
        wait: How it is followed.
        ends_by: ``time.monotonic()`` by which the wait must be over; ``None``: no deadline.

    Raises:
        LabelmatchError: Less than a minute would be left for the RayJob.
    """
    if ends_by is None:
        return spec, wait
    left = int(ends_by - time.monotonic() - DEADLINE_SLACK_S)
    if left < 60:
        raise LabelmatchError(
            f"RayJob {spec.namespace}/{spec.name}: only {max(left, 0)} s left before the step's deadline; "
            "not starting it"
        )
    active = min(left, spec.active_deadline_seconds or left)
    timeout = active + DEADLINE_SLACK_S
    if wait.timeout_s is not None:
        timeout = min(timeout, wait.timeout_s)
    return replace(spec, active_deadline_seconds=active), replace(wait, timeout_s=timeout)


def stalled_reason(status: dict[str, Any]) -> str | None:
    """Why a RayJob that KubeRay reports ``Running`` is not running any more; ``None``: it is.

    Read from KubeRay v1.7.0 (``ray-operator/controllers/ray/rayjob_controller.go``):

    * ``jobStatus`` terminal (``SUCCEEDED``, ``FAILED``, ``STOPPED``) under ``Running``: in
      ``K8sJobMode`` the deployment status moves on only once the submitter Kubernetes Job has
      finished too; until then the Ray job is over but the RayJob (and its GPUs) is not. Before
      1.3 nothing ended that state (kuberay#2154); since, KubeRay ends it 300 s after the Ray
      job's ``rayJobInfo.endTime``.
    * ``jobStatusCheckFailureStartTime`` set under ``Running``: KubeRay cannot read the Ray job from
      the head's dashboard (the head is gone or hangs); KubeRay fails it after 300 s
      (``JobStatusCheckTimeoutExceeded``).
    """
    if status.get("jobDeploymentStatus") != "Running":
        return None
    job = status.get("jobStatus")
    if job in TERMINAL_JOB:
        return f"the Ray job is {job} but the RayJob is still Running (its submitter has not finished)"
    if status.get("jobStatusCheckFailureStartTime"):
        return (f"KubeRay has not read the Ray job's status since {status['jobStatusCheckFailureStartTime']} "
                "(the Ray head or its dashboard is gone)")
    return None


def succeeded(status: dict[str, Any]) -> bool:
    """True when the Ray job succeeded: ``Complete``/``SUCCEEDED``, or ``SUCCEEDED`` still under
    ``Running`` past the grace period (:func:`stalled_reason`), as KubeRay itself then decides."""
    deployment = status.get("jobDeploymentStatus")
    return status.get("jobStatus") == "SUCCEEDED" and deployment in ("Complete", "Running")


def _api(api_client: Any) -> Any:
    from kubernetes import client

    return client.CustomObjectsApi(api_client or kube.api_client())


def _failed(action: str, namespace: str, name: str, exc: Exception) -> LabelmatchError:
    from kubernetes.client import ApiException

    if isinstance(exc, ApiException):
        detail = f"{exc.status} {exc.reason}: {api_message(exc)}"
    else:
        detail = describe(exc)
    retried = " (after retries)" if is_transient(exc) else ""
    return LabelmatchError(f"{action} RayJob {namespace}/{name} failed{retried}: {detail}")


def _create(
    api: Any, manifest: dict[str, Any], policy: RetryPolicy, log: Callable[[str], Any] | None
) -> None:
    """Create the RayJob; a ``409`` after a failed attempt is our own earlier attempt, if it is ours."""
    from kubernetes.client import ApiException

    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    attempts = 0

    def create() -> Any:
        nonlocal attempts
        attempts += 1
        return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest,
                                                   _request_timeout=policy.request_timeout_s)

    try:
        call_with_retry(create, f"creating RayJob {namespace}/{name}", policy, log)
    except ApiException as exc:
        if exc.status != 409 or attempts == 1:
            raise _failed("creating", namespace, name, exc) from exc
        existing = _read(api, namespace, name, policy, log)
        if existing.get("spec", {}).get("entrypoint") != manifest["spec"]["entrypoint"]:
            raise _failed("creating", namespace, name, exc) from exc
        if log is not None:
            log(f"RayJob {namespace}/{name}: created by an earlier attempt whose answer was lost")
    except Exception as exc:
        raise _failed("creating", namespace, name, exc) from exc


def _read(api: Any, namespace: str, name: str, policy: RetryPolicy, log: Callable[[str], Any] | None) -> dict:
    def read() -> Any:
        return api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                _request_timeout=policy.request_timeout_s)

    try:
        return call_with_retry(read, f"reading RayJob {namespace}/{name}", policy, log)
    except Exception as exc:
        raise _failed("reading", namespace, name, exc) from exc


def submit_rayjob(
    manifest: dict[str, Any],
    api_client: Any = None,
    on_status: Callable[[dict[str, Any]], None] | None = None,
    wait: WaitPolicy | None = None,
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Create the RayJob and follow its status until it has ended.

    Ended: ``jobDeploymentStatus`` is ``Complete``, ``Failed`` or ``ValidationFailed``, or it has
    stayed ``Running`` for ``wait.dead_driver_grace_s`` after the Ray job ended
    (:func:`stalled_reason`): then a ``SUCCEEDED`` Ray job counts as ended, anything else fails.
    Each API call is retried on ``429``, ``5xx`` and connection errors (``wait.retry``).

    Args:
        manifest: From :func:`build_rayjob`.
        api_client: ``kubernetes.client.ApiClient``; ``None`` loads the kubeconfig (or the
            in-cluster service account).
        on_status: Called with the ``status`` object each time it changes.
        wait: Polling, timeout, grace period and retries (default :class:`WaitPolicy`).
        log: Called with a line for each retry and for a stalled RayJob.

    Returns:
        The last ``status`` of the RayJob.

    Raises:
        LabelmatchError: An API call failed (at once, or after its retries), the wait timed out,
            or the RayJob stayed ``Running`` past the grace period with a Ray job that did not
            succeed.
    """
    wait = wait or WaitPolicy()
    api = _api(api_client)
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    _create(api, manifest, wait.retry, log)
    started, last, stalled_since = time.monotonic(), None, None
    while True:
        status = _read(api, namespace, name, wait.retry, log).get("status") or {}
        if status != last and on_status is not None:
            on_status(status)
        last = status
        if status.get("jobDeploymentStatus") in TERMINAL_DEPLOYMENT:
            return status
        now = time.monotonic()
        reason = stalled_reason(status)
        if reason is None:
            stalled_since = None
        elif stalled_since is None:
            stalled_since = now
            if log is not None:
                log(f"RayJob {namespace}/{name}: {reason}; "
                    f"waiting up to {wait.dead_driver_grace_s:g} s for KubeRay")
        elif now - stalled_since >= wait.dead_driver_grace_s:
            if succeeded(status):
                return status
            raise LabelmatchError(
                f"RayJob {namespace}/{name}: {reason} for {now - stalled_since:.0f} s; giving up "
                f"(last status: {json.dumps(status)})"
            )
        if wait.timeout_s is not None and now - started > wait.timeout_s:
            raise LabelmatchError(
                f"RayJob {namespace}/{name} not finished after {wait.timeout_s:.0f} s "
                f"(last status: {json.dumps(status)})"
            )
        time.sleep(wait.poll_s)


def delete_rayjob(namespace: str, name: str, api_client: Any = None, retry: RetryPolicy | None = None,
                  log: Callable[[str], Any] | None = None) -> bool:
    """Delete the RayJob (and, through its owner references, its Ray cluster); False when absent.

    Retried on ``429``, ``5xx`` and connection errors (``retry``).

    Raises:
        LabelmatchError: The API refused, or kept failing.
    """
    from kubernetes.client import ApiException

    api = _api(api_client)
    policy = retry or RetryPolicy()

    def delete() -> Any:
        return api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                   propagation_policy="Background",
                                                   _request_timeout=policy.request_timeout_s)

    try:
        call_with_retry(delete, f"deleting RayJob {namespace}/{name}", policy, log)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise _failed("deleting", namespace, name, exc) from exc
    except Exception as exc:
        raise _failed("deleting", namespace, name, exc) from exc
    return True


def api_message(exc: Any) -> str:
    """The ``message`` of a Kubernetes ``Status`` answer (else the raw body)."""
    try:
        return json.loads(exc.body).get("message", "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "")


def describe_status(namespace: str, name: str, status: dict[str, Any]) -> str:
    """One log line for a RayJob status (deployment status, job status, reason, message)."""
    parts = [status.get("jobDeploymentStatus") or "Pending", status.get("jobStatus") or "",
             status.get("reason") or ""]
    message = status.get("message")
    line = f"RayJob {namespace}/{name}: {' '.join(p for p in parts if p)}"
    return f"{line} ({message})" if message else line


class StopSignal(BaseException):
    """SIGTERM or SIGINT arrived while a RayJob was followed (a ``BaseException``, like
    ``KeyboardInterrupt``, so that no ``except Exception`` on the way swallows it).

    Args:
        signum: The signal's number.
    """

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Retries of the deletion after a signal: the kubelet sends SIGKILL 30 s after SIGTERM by
#: default (``terminationGracePeriodSeconds``), so this stays well inside that.
STOP_RETRY = RetryPolicy(attempts=4, first_delay_s=0.5, max_delay_s=2.0, request_timeout_s=5.0)


class _SignalGuard:
    """While active (main thread only), SIGTERM and SIGINT raise :class:`StopSignal` once; during
    the cleanup they are only recorded, and :meth:`redeliver` hands them to the handlers that were
    there before, once those are back."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.raising = True
        self.pending: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.pending = self.pending or signum
        if self.raising:
            self.raising = False
            raise StopSignal(signum)

    def __enter__(self) -> _SignalGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def redeliver(self) -> None:
        """Raise the recorded signal again, now that the old handlers are back (SIGTERM's default
        ends the process, SIGINT's raises ``KeyboardInterrupt``)."""
        if self.pending is not None:
            signal.raise_signal(self.pending)


def run_rayjob(
    manifest: dict[str, Any],
    api_client: Any = None,
    on_status: Callable[[str], None] | None = print,
    wait: WaitPolicy | None = None,
    keep: bool = False,
) -> dict[str, Any]:
    """Create the RayJob, follow it to its end and delete it; returns its last status.

    The RayJob is deleted whatever happened (unless ``keep``, which leaves a finished or failed
    one for debugging): after success, failure, timeout, an API error past its retries, and on
    SIGTERM or SIGINT (a KFP Terminate, the pod's deadline, Ctrl-C), which are caught while the
    RayJob is followed (main thread only), delete it even with ``keep``, and are then raised again
    with the previous handlers back, so the process ends as the signal says. A deletion that fails
    while an error is already on its way is logged, not raised over it.

    Args:
        manifest: From :func:`build_rayjob`.
        api_client: Kubernetes API client (default: in-cluster service account or kubeconfig).
        on_status: Called with a line for each RayJob status change, retry and deletion.
        wait: Polling, timeout, grace period and retries (default :class:`WaitPolicy`).
        keep: Leave the ended RayJob in place (for debugging).

    Raises:
        LabelmatchError: The RayJob did not succeed, did not finish in time, or the Kubernetes API
            kept failing; or a signal whose previous handler returned stopped it.
    """
    wait = wait or WaitPolicy()
    namespace, name = manifest["metadata"]["namespace"], manifest["metadata"]["name"]
    api_client = api_client or kube.api_client()
    guard = _SignalGuard()

    def cleanup(retry: RetryPolicy, failing: bool) -> None:
        guard.raising = False
        try:
            deleted = delete_rayjob(namespace, name, api_client, retry, on_status)
        except LabelmatchError as exc:
            if not failing:
                raise
            if on_status:
                on_status(f"{exc}: it ends at its activeDeadlineSeconds, or with this pod (ownerReference)")
            return
        if on_status and deleted:
            on_status(f"RayJob {namespace}/{name}: deleted")

    with guard:
        try:
            status = submit_rayjob(
                manifest, api_client, wait=wait, log=on_status,
                on_status=(lambda s: on_status(describe_status(namespace, name, s))) if on_status else None,
            )
        except StopSignal as stop:
            if on_status:
                on_status(f"RayJob {namespace}/{name}: {stop} received, deleting it")
            cleanup(STOP_RETRY, failing=True)
        except BaseException:
            if not keep:
                cleanup(wait.retry, failing=True)
            raise
        else:
            if not keep:
                cleanup(wait.retry, failing=False)
    if guard.pending is not None:
        guard.redeliver()
        raise LabelmatchError(f"RayJob {namespace}/{name}: stopped by {signal.Signals(guard.pending).name}")
    if not succeeded(status):
        raise LabelmatchError(f"RayJob {namespace}/{name} did not succeed: {json.dumps(status)}")
    return status
