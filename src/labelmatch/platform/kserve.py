"""Deploy a model artifact from the store to a KServe InferenceService and record the release.

:func:`deploy_model` is what the pipeline's ``deploy`` step calls in a cluster:

1. check every object of the model artifact against its manifest (and the expected digest);
2. create the InferenceService, or patch the existing one (for instance the one the
   ``labelmatch-serving`` Helm chart installed) so that its ``kserve-container`` points at the
   new model; everything else the chart set is kept;
3. wait until the change is rolled out as KServe and Kubernetes report it, in either deployment
   mode (:mod:`labelmatch.platform.kserve_rollout`), with a timeout;
4. ask the model server what it serves (``GET /v2/models/<service>/labels``: model digest, release
   id, engine, label-set version, thresholds) and refuse a server that serves something else;
5. append a release record: the whole served state (model URI and digest, serve image and the
   image digest the pods run, engine, label-set version and thresholds, the predictor's args,
   resources and replicas, pipeline version, run id, time).

A rollback (``restore``) re-applies all of a release's served state, not only its model.

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
import uuid
from dataclasses import dataclass, field
from typing import Any

from labelmatch import __version__
from labelmatch.core.errors import ArtifactError, ConfigError, LabelmatchError
from labelmatch.platform.artifact_store import ArtifactStore
from labelmatch.platform.images import image as image_name
from labelmatch.platform.kserve_rollout import CONTAINER, RELEASE_ENV
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
MODEL_DIR = "/mnt/models"
DIGEST_ENV = "LABELMATCH_MODEL_DIGEST"
ANNOTATION_PREFIX = "labelmatch.io/"
LABEL_SET_ENV = "LABELMATCH_LABEL_SET_VERSION"
#: Parameters the deploy pipeline must declare so that a rollback can re-run it.
DEPLOY_PARAMETERS = ("model_uri", "model_digest", "service", "namespace", "target", "release_root",
                     "restore_release")


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
        verify_served: After the rollout, ask the model server (``status.address.url``) what it
            serves and refuse a release it does not serve.
        auth_secret: Secret (which you create) whose key ``auth_secret_key`` is the tokens file of
            ``labelmatch serve --auth tokens`` (:mod:`labelmatch.serving.auth`), mounted read-only;
            the serving chart's ``auth.existingSecret`` default. Without it the pod does not start.
        auth_secret_key: Key of the tokens file in ``auth_secret`` (the chart's ``auth.secretKey``).
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
    verify_served: bool = True
    auth_secret: str = "labelmatch-serving-auth"
    auth_secret_key: str = "tokens.yaml"

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ConfigError(f"replicas: need 1 <= min_replicas <= max_replicas, got "
                              f"{self.min_replicas}..{self.max_replicas}")
        if self.max_replicas > 1 and not self.state_secret:
            raise ConfigError("max_replicas > 1 needs state_secret (the PostgreSQL URL of the shared serving "
                              "state): without it each pod keeps its own label sets and prediction records")


def _set_env(container: dict[str, Any], name: str, value: str | None) -> None:
    """Set (or, with ``None``, remove) a plain env var of ``container``."""
    env = [item for item in container.get("env", []) if item.get("name") != name]
    container["env"] = env if value is None else [*env, {"name": name, "value": value}]


def _point(container: dict[str, Any], model_uri: str, model_digest: str, release_id: str) -> None:
    _set_env(container, "STORAGE_URI", model_uri)
    _set_env(container, DIGEST_ENV, model_digest)
    # A new value per deploy: the pod template always changes, so there is always a rollout to
    # wait for, and the server reports which release it belongs to.
    _set_env(container, RELEASE_ENV, release_id)


#: Where the predictor finds the tokens file of ``DeployConfig.auth_secret`` (the chart's mount).
AUTH_DIR = "/etc/labelmatch-auth"
#: The serve image's user (images/serve/Dockerfile), as the chart's podSecurityContext.
SERVE_USER = 10001


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
    auth_file = f"{AUTH_DIR}/{config.auth_secret_key}"
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
            # Feedback and label-set writes need a token of the mounted tokens file (as the chart).
            "--auth",
            "tokens",
            "--auth_tokens_file",
            auth_file,
        ],
        "env": [{"name": "STORAGE_URI", "value": model_uri}, {"name": DIGEST_ENV, "value": model_digest},
                {"name": RELEASE_ENV, "value": release.get("release-id", "")}],
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "auth", "mountPath": AUTH_DIR, "readOnly": True}],
        "ports": [{"name": "http1", "containerPort": config.port, "protocol": "TCP"}],
        # Ready = model and label set loaded; not the database (an outage must not make every
        # replica unready: predictions need none). /v2/models/<name>/state reports the store.
        "readinessProbe": {"httpGet": {"path": f"/v2/models/{config.service}/ready", "port": config.port},
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
                # Pod Security "restricted", as the chart's podSecurityContext (the images' user).
                "securityContext": {"runAsNonRoot": True, "runAsUser": SERVE_USER, "runAsGroup": SERVE_USER,
                                    "fsGroup": SERVE_USER, "seccompProfile": {"type": "RuntimeDefault"}},
                "containers": [container],
                "volumes": [
                    {"name": "tmp", "emptyDir": {"sizeLimit": "512Mi"}},
                    # Only the tokens file, readable by the pod's group (fsGroup); a missing Secret
                    # or key keeps the pod from starting instead of serving with no tokens.
                    {"name": "auth", "secret": {
                        "secretName": config.auth_secret, "defaultMode": 0o440,
                        "items": [{"key": config.auth_secret_key, "path": config.auth_secret_key}]}},
                ],
            }
        },
    }


def point_at_model(existing: dict, model_uri: str, model_digest: str, release: dict[str, str],
                   image: str | None = None, restore: ReleaseRecord | None = None) -> dict:
    """The merge patch that points an existing InferenceService at another model, keeping the rest.

    Args:
        existing: The InferenceService as read.
        model_uri: The model artifact's ``s3://`` URI.
        model_digest: Its artifact digest.
        release: ``labelmatch.io/*`` annotation values; ``release-id`` also goes into the pods'
            ``LABELMATCH_RELEASE_ID``.
        image: The predictor image (the deploying version's serve image); ``None`` keeps it.
        restore: A release whose whole served state comes back (a rollback): its image (by
            digest where it was recorded), label-set version, args (and with them the engine),
            resources and replicas; the auth flags stay today's. Without it a pinned label set is
            unpinned (the new model serves its newest).

    Raises:
        LabelmatchError: The InferenceService has no ``kserve-container`` to point.
    """
    predictor = copy.deepcopy(existing.get("spec", {}).get("predictor", {}))
    containers = predictor.get("containers", [])
    target = next((c for c in containers if c.get("name") == CONTAINER), None)
    if target is None:
        name = existing.get("metadata", {}).get("name", "?")
        raise LabelmatchError(
            f"InferenceService {name!r} has no container '{CONTAINER}' to point at the model"
        )
    _point(target, model_uri, model_digest, release["release-id"])
    patch_predictor: dict[str, Any] = {"containers": containers}
    spec_patch: dict[str, Any] = {"predictor": patch_predictor}
    # A replace (or a rollback) takes all the traffic: a canary left behind (Serverless
    # canaryTrafficPercent, say 0 after a rolled-back canary, or RawDeployment spec.canary) goes.
    if "canaryTrafficPercent" in predictor:
        patch_predictor["canaryTrafficPercent"] = None
    if existing.get("spec", {}).get("canary"):
        spec_patch["canary"] = None
    if restore is None:
        if image:
            target["image"] = image
        _set_env(target, LABEL_SET_ENV, None)
    else:
        served = restore.predictor
        target["image"] = restore.image_id or restore.image or target.get("image")
        security = _security_args(target.get("args", []))
        for key in ("args", "resources"):
            if key in served:
                target[key] = copy.deepcopy(served[key])
        # Who may write (auth, rate limits) is today's setting, never an older release's.
        target["args"] = [*_security_args(target.get("args", []), keep=False), *security]
        for key in ("minReplicas", "maxReplicas"):
            if key in served:
                patch_predictor[key] = served[key]
        _set_env(target, LABEL_SET_ENV, None if restore.label_set_version is None
                 else str(restore.label_set_version))
        # The engine comes back with the args (--engine) or the artifact's own choice; the server's
        # report is checked against the release after the rollout (check_served). No env is set
        # for it: a later plain deploy of another artifact must not inherit it.
    return {
        "metadata": {"annotations": {ANNOTATION_PREFIX + key: value for key, value in release.items()}},
        # A JSON merge patch replaces lists whole: send every container, changed in place.
        "spec": spec_patch,
    }


#: Server flags that say who may write (labelmatch.serving.auth); a rollback keeps today's.
SECURITY_FLAGS = ("--auth", "--feedback_rate_per_minute", "--feedback_burst")


def _security_args(args: list[str], keep: bool = True) -> list[str]:
    """The ``--auth*`` and feedback rate-limit flags of ``args`` (with their values), or, with
    ``keep=False``, every other argument."""
    picked, rest, taking = [], [], False
    for arg in args:
        if taking:
            picked.append(arg)
            taking = False
        elif arg.startswith(SECURITY_FLAGS):
            picked.append(arg)
            taking = "=" not in arg
        else:
            rest.append(arg)
    return picked if keep else rest


def predictor_settings(isvc: dict) -> dict[str, Any]:
    """The predictor settings a release records (the chart values that matter): the
    ``kserve-container``'s args and resources, and the replica bounds."""
    predictor = isvc.get("spec", {}).get("predictor", {})
    container = next((c for c in predictor.get("containers", []) if c.get("name") == CONTAINER), {})
    settings = {key: copy.deepcopy(container[key]) for key in ("args", "resources") if key in container}
    settings.update({key: predictor[key] for key in ("minReplicas", "maxReplicas") if key in predictor})
    return settings


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


def api_error(what: str, exc: Exception) -> LabelmatchError:
    """A Kubernetes API failure as one line naming what was attempted."""
    status = getattr(exc, "status", "?")
    reason = getattr(exc, "reason", "") or type(exc).__name__
    return LabelmatchError(f"{what}: Kubernetes API answered {status} {reason}")


def apply_inference_service(
    api: Any, config: DeployConfig, model_uri: str, model_digest: str, release: dict[str, str],
    restore: ReleaseRecord | None = None,
) -> tuple[dict | None, dict]:
    """Create the InferenceService, or patch an existing one to serve ``model_uri``.

    Args:
        restore: A release whose whole served state a rollback brings back (see
            :func:`point_at_model`).

    Returns:
        ``(the object before the change or None, the object after it)``.
    """
    from kubernetes.client.exceptions import ApiException

    from labelmatch.platform.k8s_schema import validate_against_crd

    where = f"InferenceService {config.namespace}/{config.service}"
    try:
        existing = api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.service)
    except ApiException as exc:
        if exc.status != 404:
            raise api_error(f"{where}: get", exc) from None
        existing = None
    if existing is None:
        body = inference_service(config, model_uri, model_digest, release)
        if restore is not None:  # the service is gone: create it, then put the release's state back
            body = merged(body, point_at_model(body, model_uri, model_digest, release, restore=restore))
        if config.crd_path:
            validate_against_crd(body, config.crd_path)
        try:
            return None, api.create_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, body)
        except ApiException as exc:
            raise api_error(f"{where}: create", exc) from None
    patch = point_at_model(existing, model_uri, model_digest, release, image=config.image, restore=restore)
    if config.crd_path:
        result = merged(existing, patch)
        validate_against_crd({key: result[key] for key in ("apiVersion", "kind", "spec")}, config.crd_path)
    try:
        return existing, api.patch_namespaced_custom_object(
            GROUP, VERSION, config.namespace, PLURAL, config.service, patch
        )
    except ApiException as exc:
        raise api_error(f"{where}: patch", exc) from None


def wait_rolled_out(api: Any, config: DeployConfig, release_id: str, previous_revision: str = "") -> dict:
    """Poll until release ``release_id`` serves on every predictor replica and the
    InferenceService is Ready, as KServe reports it in its deployment mode
    (:func:`labelmatch.platform.kserve_rollout.rollout_state`).

    Args:
        api: A ``CustomObjectsApi`` (its ``api_client`` also reads the predictor Deployment).
        config: Service, namespace, timeout and poll interval.
        release_id: The release the new pods carry.
        previous_revision: Knative's latest created revision before the change (Serverless).

    Raises:
        LabelmatchError: Not rolled out within ``config.timeout_s`` (naming what was awaited), or
            the rollout failed (a crash loop past the progress deadline, a failed revision).
    """
    from kubernetes.client.exceptions import ApiException

    from labelmatch.platform.kserve_rollout import RolloutFailed, rollout_state

    where = f"InferenceService {config.namespace}/{config.service}"
    deadline = time.monotonic() + config.timeout_s
    delay = min(0.25, config.poll_s)  # quick first looks, then every poll_s
    while True:
        try:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.service)
            state = rollout_state(obj, api.api_client, release_id, previous_revision)
        except ApiException as exc:
            raise api_error(f"{where}: get", exc) from None
        except RolloutFailed as exc:
            raise LabelmatchError(f"{where}: release {release_id} failed to roll out: {exc}") from None
        if state.done:
            return obj
        if time.monotonic() >= deadline:
            raise LabelmatchError(f"{where} not Ready after {config.timeout_s:g} s ({state.detail})")
        time.sleep(delay)
        delay = min(2 * delay, config.poll_s)


def served_state(isvc: dict, config: DeployConfig, release_id: str) -> dict[str, Any]:
    """What the model server behind the InferenceService reports it serves
    (``GET <status.address.url>/v2/models/<service>/labels``), once it answers for ``release_id``.

    Raises:
        LabelmatchError: No address, or no answer for that release within ``config.timeout_s``.
    """
    import requests

    from labelmatch.platform.kserve_rollout import served_url

    base = served_url(isvc)
    if not base:
        raise LabelmatchError(f"InferenceService {config.namespace}/{config.service} is Ready but reports "
                              "no address; cannot check what it serves (verify_served=False skips this)")
    url = f"{base}/v2/models/{config.service}/labels"
    deadline = time.monotonic() + config.timeout_s
    last = "no answer"
    delay = min(0.25, config.poll_s)
    while True:
        try:
            response = requests.get(url, timeout=10)
            if response.status_code == 200:
                served = response.json()
                if served.get("release_id") == release_id:
                    return served
                last = f"answered for release {served.get('release_id') or '(none)'}"
            else:
                last = f"HTTP {response.status_code}"
        except (requests.RequestException, ValueError) as exc:
            last = type(exc).__name__
        if time.monotonic() >= deadline:
            raise LabelmatchError(f"{url}: no answer for release {release_id} after {config.timeout_s:g} s "
                                  f"({last}); deploy from inside the cluster network, or skip this check "
                                  "(verify_served=False, --no-verify-served)")
        time.sleep(delay)
        delay = min(2 * delay, config.poll_s)


def check_served(served: dict[str, Any], model_digest: str, restore: ReleaseRecord | None) -> None:
    """Refuse a server that does not serve the model (and, for a rollback, the label set and
    engine) of the release.

    Raises:
        LabelmatchError: Naming the first difference.
    """
    expected: dict[str, Any] = {"model_digest": model_digest}
    if restore is not None:
        if restore.label_set_version is not None:
            expected["label_set_version"] = restore.label_set_version
        if restore.engine:
            expected["engine"] = restore.engine
        if restore.thresholds:
            expected["thresholds"] = restore.thresholds
    for key, value in expected.items():
        if served.get(key) != value:
            raise LabelmatchError(f"the model server serves {key} {served.get(key)!r}, not the release's "
                                  f"{value!r}; no release recorded")


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
    restore: ReleaseRecord | None = None,
    record: bool = True,
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
        restore: The release a rollback brings back whole (its model must be ``model_uri``).
        record: Append the release record (``False``: only return it; a shadow records its own
            after its window).

    Returns:
        The release record written.
    """
    from labelmatch.platform.kserve_rollout import predictor_revision

    digest = store.verify_remote(model_uri, kind=("OnnxModel", "Model"))
    if expected_digest and digest != expected_digest:
        raise ArtifactError(
            f"{model_uri}: artifact digest {digest[:12]}… is not the expected {expected_digest[:12]}…; "
            "refusing to deploy"
        )
    if restore is not None and restore.model_digest != digest:
        raise ArtifactError(f"{model_uri}: digest {digest[:12]}… is not release {restore.release_id}'s "
                            f"{restore.model_digest[:12]}…; refusing to restore it")
    if config.memory == "auto":
        config = dataclasses.replace(config, memory=artifact_serving_memory(store, model_uri))
    release_id = uuid.uuid4().hex[:12]
    annotations = {"release-id": release_id, "pipeline-version": pipeline_version, "run-id": run_id}
    api = api or kube_custom_objects()
    before, applied = apply_inference_service(api, config, model_uri, digest, annotations, restore)
    log.info("InferenceService %s/%s now points at %s (release %s); waiting for the rollout",
             config.namespace, config.service, model_uri, release_id)
    ready = wait_rolled_out(api, config, release_id, predictor_revision(before) if before else "")
    served: dict[str, Any] = {}
    if config.verify_served:
        served = served_state(ready, config, release_id)
        check_served(served, digest, restore)
    container = next(c for c in applied["spec"]["predictor"]["containers"] if c.get("name") == CONTAINER)
    release = ReleaseRecord.new(
        release_id=release_id,
        service=config.service,
        namespace=config.namespace,
        model_uri=model_uri,
        model_digest=digest,
        pipeline_version=pipeline_version,
        run_id=run_id,
        image=container.get("image", ""),
        image_id=release_image_id(api, config, release_id),
        engine=served.get("engine", ""),
        label_set_version=served.get("label_set_version"),
        thresholds=served.get("thresholds") or {},
        predictor=predictor_settings(applied),
    )
    if record:
        uri = ReleaseLog(store, release_root).append(release)
        log.info("release %s recorded at %s", release.release_id, uri)
    return release


def release_image_id(api: Any, config: DeployConfig, release_id: str) -> str:
    """The image digest the release's predictor pods run ("" when the pods cannot be listed)."""
    from kubernetes.client.exceptions import ApiException

    from labelmatch.platform.kserve_rollout import predictor_image_ids

    try:
        ids = predictor_image_ids(api.api_client, config.namespace, config.service, release_id)
    except ApiException as exc:
        log.warning("cannot list the predictor pods (%s %s): the release records the image by tag only",
                    exc.status, exc.reason)
        return ""
    if len(ids) > 1:
        log.warning("predictor pods of release %s run different images: %s", release_id, ", ".join(ids))
    return ids[0] if ids else ""


def artifact_serving_memory(store: ArtifactStore, model_uri: str) -> str:
    """:func:`serving_memory` of the artifact at ``model_uri`` (its two JSON files only)."""
    try:
        _, files = store.read_members(model_uri, ["parity.json", "labelmatch.json"], "OnnxModel")
    except ArtifactError:  # a torch Model, or an export without parity.json
        return MIN_SERVING_MEMORY
    memory = serving_memory(json.loads(files["parity.json"]), json.loads(files["labelmatch.json"]))
    log.info("predictor memory for %s: %s (its graphs, resident, + server, x1.25)", model_uri, memory)
    return memory
