"""Deploy a model artifact from the store to a KServe InferenceService and record the release.

:func:`deploy_model` is what the pipeline's ``deploy`` step calls in a cluster:

1. check every object of the model artifact against its manifest (and the expected digest);
2. create the InferenceService, or patch the existing one (for instance the one the
   ``labelmatch-serving`` Helm chart installed) so that its ``kserve-container`` points at the
   new model; everything else the chart set is kept;
3. wait until KServe reports the *new* generation Ready, with a timeout;
4. append a release record (service, model URI and digest, pipeline version, run id, time).

The predictor is our own container (``labelmatch serve``). KServe's storage initializer
downloads ``STORAGE_URI`` into ``/mnt/models`` with the S3 credentials of the predictor's service
account; ``LABELMATCH_MODEL_DIGEST`` tells the server which artifact digest it must find there, and
a changed digest rolls the pods even when a rollback reuses an earlier URI.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from labelmatch import __version__
from labelmatch.core.errors import ArtifactError, ConfigError, LabelmatchError
from labelmatch.platform.artifact_store import ArtifactStore
from labelmatch.platform.images import image as image_name
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
CONTAINER = "kserve-container"  # KServe mounts the storage initializer's download into this container
MODEL_DIR = "/mnt/models"
DIGEST_ENV = "LABELMATCH_MODEL_DIGEST"
ANNOTATION_PREFIX = "labelmatch.io/"
#: Parameters the deploy pipeline must declare so that a rollback can re-run it.
DEPLOY_PARAMETERS = ("model_uri", "model_digest", "service", "namespace", "target", "release_root")


@dataclass(frozen=True)
class DeployConfig:
    """Where and how to serve.

    Args:
        service: InferenceService name (a Kubernetes name).
        namespace: Its namespace.
        image: Predictor image (used only when the InferenceService is created); default: this
            release's serve image in ``$LABELMATCH_IMAGE_REGISTRY``
            (:func:`labelmatch.platform.images.image`), read when the config is made.
        service_account: Service account whose Secret holds the S3 credentials (KServe convention).
        min_replicas: Minimum predictor replicas (at least 1: no scale-from-zero model loads).
        max_replicas: Maximum predictor replicas; more than 1 needs ``state_secret``.
        state_secret: Secret holding the SQLAlchemy URL of the shared serving state (PostgreSQL)
            under ``state_url_key``; empty means a SQLite file on the pod's ``/tmp`` (one replica).
        state_url_key: Key of the URL in ``state_secret``.
        port: Container port of the model server.
        memory: Memory of the predictor container (request = limit), a Kubernetes quantity, or
            ``auto``: sized from the OnnxModel's own graphs (:func:`serving_memory`).
        timeout_s: How long to wait for Ready.
        poll_s: Seconds between status checks.
        crd_path: InferenceService CRD file to validate the object against before it is sent.
    """

    service: str
    namespace: str = "default"
    image: str = field(default_factory=lambda: image_name("serve"))
    service_account: str = "labelmatch-serving"
    min_replicas: int = 1
    max_replicas: int = 1
    state_secret: str = ""
    state_url_key: str = "url"
    port: int = 8080
    memory: str = "auto"
    timeout_s: float = 600.0
    poll_s: float = 5.0
    crd_path: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"replicas: need 1 <= min_replicas <= max_replicas, got "
                              f"{self.min_replicas}..{self.max_replicas}")
        if self.max_replicas > 1 and not self.state_secret:
            raise ConfigError("max_replicas > 1 needs state_secret (the PostgreSQL URL of the shared serving "
                              "state): without it each pod keeps its own label sets and prediction records")


def _set_env(container: dict[str, Any], name: str, value: str) -> None:
    env = [item for item in container.get("env", []) if item.get("name") != name]
    container["env"] = [*env, {"name": name, "value": value}]


def inference_service(
    config: DeployConfig, model_uri: str, model_digest: str, release: dict[str, str]
) -> dict:
    """A new InferenceService serving ``model_uri`` with the labelmatch predictor container.

    Args:
        config: Deployment settings.
        model_uri: ``s3://`` URI of the model artifact.
        model_digest: Its artifact digest.
        release: ``labelmatch.io/*`` annotation values (release id, pipeline version, run id).
    """
    memory = MIN_SERVING_MEMORY if config.memory == "auto" else config.memory
    container = {
        "name": CONTAINER,
        "image": config.image,
        "command": ["labelmatch"],
        "args": [
            "serve",
            "--model",
            MODEL_DIR,
            "--model-name",
            config.service,
            "--host",
            "0.0.0.0",
            "--port",
            str(config.port),
            # The root filesystem is read-only: a SQLite state (one replica) lives on /tmp.
            "--state-dir",
            "/tmp/labelmatch-state",
        ],
        "env": [{"name": "STORAGE_URI", "value": model_uri}, {"name": DIGEST_ENV, "value": model_digest}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "ports": [{"name": "http1", "containerPort": config.port, "protocol": "TCP"}],
        "readinessProbe": {"httpGet": {"path": f"/v2/models/{config.service}/state", "port": config.port},
                           "periodSeconds": 10},
        "resources": {"requests": {"cpu": "1", "memory": memory}, "limits": {"cpu": "2", "memory": memory}},
        "securityContext": {
            "runAsNonRoot": True,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if config.state_secret:
        container["env"].append({"name": "LABELMATCH_STATE_URL", "valueFrom": {"secretKeyRef": {
            "name": config.state_secret, "key": config.state_url_key}}})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "InferenceService",
        "metadata": {
            "name": config.service,
            "namespace": config.namespace,
            "labels": {
                "app.kubernetes.io/name": "labelmatch",
                "app.kubernetes.io/managed-by": "labelmatch-deploy",
            },
            "annotations": {
                "serving.kserve.io/deploymentMode": "RawDeployment",
                **{ANNOTATION_PREFIX + key: value for key, value in release.items()},
            },
        },
        "spec": {
            "predictor": {
                "minReplicas": config.min_replicas,
                "maxReplicas": config.max_replicas,
                "serviceAccountName": config.service_account,
                "automountServiceAccountToken": False,
                "containers": [container],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "512Mi"}}],
            }
        },
    }


def point_at_model(existing: dict, model_uri: str, model_digest: str, release: dict[str, str]) -> dict:
    """The merge patch that points an existing InferenceService at another model, keeping the rest.

    Raises:
        LabelmatchError: The InferenceService has no ``kserve-container`` to point.
    """
    containers = copy.deepcopy(existing.get("spec", {}).get("predictor", {}).get("containers", []))
    target = next((c for c in containers if c.get("name") == CONTAINER), None)
    if target is None:
        name = existing.get("metadata", {}).get("name", "?")
        raise LabelmatchError(
            f"InferenceService {name!r} has no container '{CONTAINER}' to point at the model"
        )
    _set_env(target, "STORAGE_URI", model_uri)
    _set_env(target, DIGEST_ENV, model_digest)
    return {
        "metadata": {"annotations": {ANNOTATION_PREFIX + key: value for key, value in release.items()}},
        # A JSON merge patch replaces lists whole: send every container, changed in place.
        "spec": {"predictor": {"containers": containers}},
    }


def merged(existing: dict, patch: dict) -> dict:
    """``existing`` with a JSON merge patch (RFC 7386) applied, as the API server would."""
    result = copy.deepcopy(existing)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merged(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def kube_custom_objects(host: str | None = None) -> Any:
    """A ``CustomObjectsApi``: in-cluster credentials, else the kubeconfig; ``host`` for tests."""
    from kubernetes import client

    from labelmatch.platform.kube import api_client

    return client.CustomObjectsApi(api_client(host))


def _api_error(what: str, exc: Exception) -> LabelmatchError:
    status = getattr(exc, "status", "?")
    reason = getattr(exc, "reason", "") or type(exc).__name__
    return LabelmatchError(f"{what}: Kubernetes API answered {status} {reason}")


def apply_inference_service(
    api: Any, config: DeployConfig, model_uri: str, model_digest: str, release: dict[str, str]
) -> dict:
    """Create the InferenceService, or patch an existing one to serve ``model_uri``; returns it."""
    from kubernetes.client.exceptions import ApiException

    from labelmatch.platform.k8s_schema import validate_against_crd

    where = f"InferenceService {config.namespace}/{config.service}"
    try:
        existing = api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.service)
    except ApiException as exc:
        if exc.status != 404:
            raise _api_error(f"{where}: get", exc) from None
        existing = None
    if existing is None:
        body = inference_service(config, model_uri, model_digest, release)
        if config.crd_path:
            validate_against_crd(body, config.crd_path)
        try:
            return api.create_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, body)
        except ApiException as exc:
            raise _api_error(f"{where}: create", exc) from None
    patch = point_at_model(existing, model_uri, model_digest, release)
    if config.crd_path:
        result = merged(existing, patch)
        validate_against_crd({key: result[key] for key in ("apiVersion", "kind", "spec")}, config.crd_path)
    try:
        return api.patch_namespaced_custom_object(
            GROUP, VERSION, config.namespace, PLURAL, config.service, patch
        )
    except ApiException as exc:
        raise _api_error(f"{where}: patch", exc) from None


def _ready(obj: dict, generation: int) -> tuple[bool, str]:
    status = obj.get("status") or {}
    conditions = {c.get("type"): c for c in status.get("conditions", [])}
    ready = conditions.get("Ready", {})
    detail = ready.get("message") or ready.get("reason") or "no Ready condition yet"
    if status.get("observedGeneration", 0) < generation:
        return False, f"generation {generation} not observed yet; Ready: {detail}"
    return ready.get("status") == "True", detail


def wait_ready(api: Any, config: DeployConfig, generation: int) -> dict:
    """Poll until KServe reports ``generation`` of the InferenceService Ready.

    Raises:
        LabelmatchError: Not Ready within ``config.timeout_s``; names the last status seen.
    """
    from kubernetes.client.exceptions import ApiException

    deadline = time.monotonic() + config.timeout_s
    detail = "not checked"
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.service)
        except ApiException as exc:
            raise _api_error(f"InferenceService {config.namespace}/{config.service}: get", exc) from None
        ready, detail = _ready(obj, generation)
        if ready:
            return obj
        if time.monotonic() >= deadline:
            raise LabelmatchError(
                f"InferenceService {config.namespace}/{config.service} "
                f"not Ready after {config.timeout_s:g} s "
                f"({detail})"
            )
        time.sleep(config.poll_s)


#: The predictor's memory when nothing says more (MiniLM measured about 400 MiB with its fallback).
MIN_SERVING_MEMORY = "2Gi"
#: The model server's own memory beside the graphs it maps (bge-m3's server measured 0.56 GB with
#: little of its int8 graph read; MiniLM's 0.4 GB with both graphs).
SERVER_BASELINE_BYTES = 512 * 2**20


def serving_memory(parity: dict[str, Any], info: dict[str, Any], headroom: float = 1.25) -> str:
    """The predictor's memory for an OnnxModel, from its own graphs: the served engine's graph plus
    the fp32 fallback graph where the engine has one, all resident (ONNX Runtime maps external
    data, and a long enough run reads all of it), plus :data:`SERVER_BASELINE_BYTES`, times
    ``headroom``, rounded up to 256 Mi and at least :data:`MIN_SERVING_MEMORY`.

    For bge-m3's shape (``make bench-production-shape``): int8 1.3 GB + fallback 2.2 GB → ``5Gi``.

    Args:
        parity: The artifact's ``parity.json`` (``graph_bytes`` and ``engines``; an export written
            before graph sizes were recorded gets the minimum).
        info: Its ``labelmatch.json`` (``engine``: what serves unless the server is told otherwise).
        headroom: Factor over the estimate.
    """
    sizes, engines, engine = parity.get("graph_bytes") or {}, parity.get("engines") or {}, info.get("engine")
    if engine not in sizes:
        return MIN_SERVING_MEMORY
    graphs = sizes[engine] + (sizes.get("ort-fp32", 0) if (engines.get(engine) or {}).get("fallback") else 0)
    step = 256 * 2**20
    need = -(-int((graphs + SERVER_BASELINE_BYTES) * headroom) // step) * step
    floor = 2 * 2**30
    return f"{max(need, floor) // 2**20}Mi"


def deploy_model(
    config: DeployConfig,
    model_uri: str,
    store: ArtifactStore,
    release_root: str,
    pipeline_version: str = __version__,
    run_id: str = "",
    expected_digest: str | None = None,
    api: Any = None,
) -> ReleaseRecord:
    """Serve the model artifact at ``model_uri`` and append its release record.

    Args:
        config: Service, namespace, image, timeouts.
        model_uri: ``s3://`` URI of a ``Model`` or ``OnnxModel`` artifact.
        store: The artifact store holding the model and the release records.
        release_root: ``s3://bucket/prefix`` under which ``releases/`` lives.
        pipeline_version: The pipeline version deploying (recorded for rollbacks).
        run_id: The KFP run id, when run by a pipeline.
        expected_digest: Refuse the model unless its artifact digest is this one (rollbacks).
        api: A ``CustomObjectsApi``; default :func:`kube_custom_objects`.

    Returns:
        The release record written.
    """
    digest = store.verify_remote(model_uri, kind=("OnnxModel", "Model"))
    if expected_digest and digest != expected_digest:
        raise ArtifactError(
            f"{model_uri}: artifact digest {digest[:12]}… is not the expected {expected_digest[:12]}…; "
            "refusing to deploy"
        )
    if config.memory == "auto":
        config = dataclasses.replace(config, memory=_artifact_serving_memory(store, model_uri))
    record = ReleaseRecord.new(
        service=config.service,
        namespace=config.namespace,
        model_uri=model_uri,
        model_digest=digest,
        pipeline_version=pipeline_version,
        run_id=run_id,
        image=config.image,
    )
    annotations = {"release-id": record.release_id, "pipeline-version": pipeline_version, "run-id": run_id}
    api = api or kube_custom_objects()
    applied = apply_inference_service(api, config, model_uri, digest, annotations)
    log.info(
        "InferenceService %s/%s now points at %s; waiting for Ready",
        config.namespace,
        config.service,
        model_uri,
    )
    wait_ready(api, config, int(applied.get("metadata", {}).get("generation", 1)))
    uri = ReleaseLog(store, release_root).append(record)
    log.info("release %s recorded at %s", record.release_id, uri)
    return record


def _artifact_serving_memory(store: ArtifactStore, model_uri: str) -> str:
    """:func:`serving_memory` of the artifact at ``model_uri`` (its two JSON files only)."""
    try:
        _, files = store.read_members(model_uri, ["parity.json", "labelmatch.json"], "OnnxModel")
    except ArtifactError:  # a torch Model, or an export without parity.json
        return MIN_SERVING_MEMORY
    memory = serving_memory(json.loads(files["parity.json"]), json.loads(files["labelmatch.json"]))
    log.info("predictor memory for %s: %s (its graphs, resident, + server, x1.25)", model_uri, memory)
    return memory
