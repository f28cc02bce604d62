"""Whether a change to an InferenceService is rolled out, read the way KServe and Kubernetes report it.

What KServe's controller really sets (kserve/kserve ``pkg/apis/serving/v1beta1/
inference_service_status.go``, the same in v0.15.0, v0.16.0 and master at v0.20.0-104):

* ``status.observedGeneration`` is **not** the InferenceService's: ``PropagateRawStatus`` copies the
  predictor Deployment's ``status.observedGeneration`` (RawDeployment, called ``Standard`` since
  v0.20) and ``PropagateStatus`` the Knative Service's (Serverless, now ``Knative``). Comparing it
  with the InferenceService's ``metadata.generation`` can pass on a stale Ready (the Deployment's
  generation is ahead, e.g. after HPA scaling) or never pass (an InferenceService change that
  leaves the Deployment alone). Nothing here reads it.
* RawDeployment: ``PredictorReady`` comes from the Deployment's ``Available`` / ``Progressing``
  conditions, and stays True **during** a rolling update (``Available`` is True while the old
  pods serve). So readiness of *our* change is read from the predictor Deployment itself
  (``<name>-predictor``, ``constants.PredictorServiceName``): its pod template must carry this
  release (``LABELMATCH_RELEASE_ID`` in ``kserve-container``: KServe copied our spec), and its
  rollout must be complete the way ``kubectl rollout status`` decides it
  (kubernetes/kubectl ``pkg/polymorphichelpers/rollout_status.go``, ``DeploymentStatusViewer``):
  observed generation caught up, every replica updated, no old replica left, every updated replica
  available; ``Progressing=False`` with ``ProgressDeadlineExceeded`` is a failure.
* Serverless: ``status.components.predictor`` has Knative's ``latestCreatedRevision`` and
  ``latestReadyRevision``, and ``latestRolledoutRevision`` once the ready revision takes 100 % of
  the traffic. Our change is rolled out when a revision newer than the one before the change was
  created, is ready, and is rolled out. ``PredictorConfigurationReady=False`` (Knative's
  ``ConfigurationsReady``: the new revision failed) is a failure. The revision itself is not read
  (that needs RBAC on ``serving.knative.dev``): patching an InferenceService whose *first* revision
  KServe has not created yet could take that revision for ours.
* In both modes the aggregated ``Ready`` condition (``PredictorReady`` and ``IngressReady``) must
  be True, and ``status.modelStatus.transitionStatus == BlockedByFailedLoad`` (the storage
  initializer or the model server failed on the new pods) is a failure.

Every deploy sets a new ``LABELMATCH_RELEASE_ID``, so every deploy changes the pod template:
there is always a new ReplicaSet or revision to wait for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: The env var that names the release a predictor pod belongs to.
RELEASE_ENV = "LABELMATCH_RELEASE_ID"
CONTAINER = "kserve-container"
RAW_MODES = ("RawDeployment", "Standard")
KNATIVE_MODES = ("Serverless", "Knative")
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"


class RolloutFailed(Exception):
    """The rollout cannot succeed without someone acting (a crash loop, a failed revision)."""


@dataclass(frozen=True)
class Rollout:
    """Where a rollout stands.

    Attributes:
        done: The change serves every replica (and the InferenceService is Ready).
        detail: What is awaited, for logs and the timeout message.
    """

    done: bool
    detail: str


def deployment_mode(isvc: dict[str, Any]) -> str | None:
    """``raw`` or ``knative``: the controller's ``status.deploymentMode``, else the annotation;
    ``None`` while neither says (the controller has not reconciled a new object yet)."""
    mode = (isvc.get("status") or {}).get("deploymentMode") or (
        isvc.get("metadata", {}).get("annotations") or {}
    ).get(MODE_ANNOTATION)
    if mode in RAW_MODES:
        return "raw"
    if mode in KNATIVE_MODES:
        return "knative"
    return None


def predictor_deployment_name(isvc: dict[str, Any]) -> str:
    """The predictor Deployment's name (``constants.PredictorServiceName``)."""
    name = isvc["metadata"]["name"]
    predictor_name = (isvc.get("spec", {}).get("predictor") or {}).get("name")
    return f"{name}-{predictor_name}-predictor" if predictor_name else f"{name}-predictor"


def predictor_revision(isvc: dict[str, Any]) -> str:
    """Knative's latest created revision of the predictor ("" when none)."""
    components = (isvc.get("status") or {}).get("components") or {}
    return (components.get("predictor") or {}).get("latestCreatedRevision", "")


def _conditions(obj: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def _why(condition: dict[str, Any] | None) -> str:
    if not condition:
        return "not reported yet"
    text = condition.get("message") or condition.get("reason") or ""
    return f"{condition.get('status')}{': ' + text if text else ''}"


def _check_model_status(isvc: dict[str, Any]) -> None:
    model = (isvc.get("status") or {}).get("modelStatus") or {}
    if model.get("transitionStatus") == "BlockedByFailedLoad":
        info = model.get("lastFailureInfo") or {}
        raise RolloutFailed(
            f"the model failed to load ({info.get('reason', 'ModelLoadFailed')}: "
            f"{info.get('message', 'no message')})"
        )


def _isvc_ready(isvc: dict[str, Any]) -> Rollout:
    conditions = _conditions(isvc)
    if (conditions.get("Ready") or {}).get("status") == "True":
        return Rollout(True, "Ready")
    return Rollout(False, f"InferenceService Ready {_why(conditions.get('Ready'))}")


def container_env(template: dict[str, Any], container: str = CONTAINER) -> dict[str, str]:
    """Plain ``env`` values of ``container`` in a pod template (or pod) spec."""
    spec = template.get("spec", template)
    for item in spec.get("containers") or []:
        if item.get("name") == container:
            return {e["name"]: e.get("value", "") for e in item.get("env") or [] if "name" in e}
    return {}


def raw_rollout(isvc: dict[str, Any], deployment: dict[str, Any] | None, release_id: str) -> Rollout:
    """Whether the predictor Deployment runs ``release_id`` on every replica (RawDeployment).

    Raises:
        RolloutFailed: The rollout exceeded its progress deadline, or the model failed to load.
    """
    if deployment is None:
        return Rollout(False, "the predictor Deployment does not exist yet")
    name = deployment["metadata"]["name"]
    running = container_env(deployment["spec"]["template"]).get(RELEASE_ENV)
    if running != release_id:
        return Rollout(
            False,
            f"Deployment {name} still has release {running or '(none)'}: KServe has not "
            "applied the change yet",
        )
    status = deployment.get("status") or {}
    conditions = _conditions(deployment)
    progressing = conditions.get("Progressing") or {}
    if progressing.get("reason") == "ProgressDeadlineExceeded":
        raise RolloutFailed(
            f"Deployment {name} exceeded its progress deadline: {progressing.get('message', '')}"
        )
    failure = conditions.get("ReplicaFailure") or {}
    if failure.get("status") == "True":
        raise RolloutFailed(f"Deployment {name}: {failure.get('reason')}: {failure.get('message', '')}")
    _check_model_status(isvc)
    generation = deployment["metadata"].get("generation", 0)
    if status.get("observedGeneration", 0) < generation:
        return Rollout(False, f"Deployment {name}: generation {generation} not observed yet")
    wanted = deployment["spec"].get("replicas", 1)
    updated = status.get("updatedReplicas", 0)
    if updated < wanted:
        return Rollout(False, f"Deployment {name}: {updated} of {wanted} new replicas updated")
    if status.get("replicas", 0) > updated:
        return Rollout(
            False, f"Deployment {name}: {status['replicas'] - updated} old replicas pending termination"
        )
    if status.get("availableReplicas", 0) < updated:
        return Rollout(
            False,
            f"Deployment {name}: {status.get('availableReplicas', 0)} of {updated} updated "
            "replicas available",
        )
    return _isvc_ready(isvc)


def knative_rollout(isvc: dict[str, Any], previous_revision: str) -> Rollout:
    """Whether a revision newer than ``previous_revision`` is ready and takes all traffic (Serverless).

    Raises:
        RolloutFailed: The new revision failed, or the model failed to load.
    """
    predictor = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
    created = predictor.get("latestCreatedRevision", "")
    if not created or created == previous_revision:
        return Rollout(False, f"no revision after {previous_revision or '(none)'} created yet")
    configuration = _conditions(isvc).get("PredictorConfigurationReady") or {}
    if configuration.get("status") == "False":
        raise RolloutFailed(f"revision {created} failed: {_why(configuration)}")
    _check_model_status(isvc)
    if predictor.get("latestReadyRevision") != created:
        return Rollout(
            False, f"revision {created} not ready yet (ready: {predictor.get('latestReadyRevision')})"
        )
    if predictor.get("latestRolledoutRevision") != created:
        return Rollout(False, f"revision {created} is ready but does not take all traffic yet")
    return _isvc_ready(isvc)


def read_deployment(api_client: Any, namespace: str, name: str) -> dict[str, Any] | None:
    """The Deployment as the API server returns it (camelCase JSON), ``None`` when absent."""
    from kubernetes import client

    try:
        response = client.AppsV1Api(api_client).read_namespaced_deployment(
            name, namespace, _preload_content=False
        )
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise
    return json.loads(response.data)


def rollout_state(isvc: dict[str, Any], api_client: Any, release_id: str, previous_revision: str) -> Rollout:
    """Where the rollout of ``release_id`` stands, in whichever mode the InferenceService runs.

    Raises:
        RolloutFailed: See :func:`raw_rollout` and :func:`knative_rollout`.
    """
    mode = deployment_mode(isvc)
    if mode is None:
        return Rollout(False, "KServe has not reconciled the InferenceService yet (no deploymentMode)")
    if mode == "knative":
        return knative_rollout(isvc, previous_revision)
    namespace = isvc["metadata"].get("namespace", "default")
    deployment = read_deployment(api_client, namespace, predictor_deployment_name(isvc))
    return raw_rollout(isvc, deployment, release_id)


def predictor_image_ids(api_client: Any, namespace: str, service: str, release_id: str) -> list[str]:
    """The image digests (``repo@sha256:…``) the ready predictor pods of ``release_id`` run.

    Pods carry KServe's ``serving.kserve.io/inferenceservice`` and ``component=predictor`` labels
    (``components/predictor.go`` ``buildObjectMeta``); a kubelet reports ``imageID`` per container,
    ``docker-pullable://`` prefixed on some runtimes.
    """
    from kubernetes import client

    selector = f"serving.kserve.io/inferenceservice={service},component=predictor"
    response = client.CoreV1Api(api_client).list_namespaced_pod(
        namespace, label_selector=selector, _preload_content=False
    )
    found = set()
    for pod in json.loads(response.data).get("items", []):
        if container_env(pod).get(RELEASE_ENV) != release_id:
            continue
        for status in (pod.get("status") or {}).get("containerStatuses") or []:
            if status.get("name") == CONTAINER and status.get("ready") and status.get("imageID"):
                found.add(status["imageID"].split("://", 1)[-1])
    return sorted(found)


def served_url(isvc: dict[str, Any]) -> str:
    """Where the InferenceService answers inside the cluster (``status.address.url``, else ``status.url``)."""
    status = isvc.get("status") or {}
    return ((status.get("address") or {}).get("url") or status.get("url") or "").rstrip("/")
