"""Canary and shadow deploys on KServe: the InferenceService changes, what each KServe version allows.

What KServe's source says (kserve/kserve, read at v0.15.0, v0.20.0 and master at v0.20.0-104):

* **Serverless (Knative), every version read.** ``spec.predictor.canaryTrafficPercent``
  (``pkg/apis/serving/v1beta1/component.go``) is read by the Knative reconciler only
  (``pkg/controller/v1beta1/inferenceservice/reconcilers/knative/ksvc_reconciler.go``): a changed
  predictor makes a new revision, which gets ``canaryTrafficPercent`` % of the traffic while the
  *last rolled-out* revision (``status.components.predictor.latestRolledoutRevision``, tag ``prev``)
  keeps the rest. It splits only once a revision has rolled out (``lastRolledoutRevision != ""``);
  before that the new revision takes everything. Promoting removes the field (the latest revision
  gets 100 %, and ``PropagateStatus`` in ``inference_service_status.go`` makes it the
  ``latestRolledoutRevision``); rolling back sets it to ``0`` (the previous revision gets 100 % at
  once, no pod restarts).
* **RawDeployment (Standard).** The raw reconciler ignores ``canaryTrafficPercent``. v0.20.0
  adds ``spec.canary`` (``pkg/apis/serving/v1beta1/inference_service.go`` ``CanarySpec``: a named
  predictor and ``trafficPercent``; kserve#5672 for kserve#5335), accepted in Standard mode only
  (``inference_service_validation.go``), and reconciles each canary as its own Deployment and
  Service ``<isvc>-<name>-predictor`` with ``status.canaryStatuses`` and the
  ``CanaryPredictorReady`` condition (``components/predictor.go`` ``reconcileCanaryDeployments``).
  But v0.20.0 routes no traffic to it: the Gateway API HTTPRoute's weighted backends
  (``reconcilers/ingress/httproute_reconciler.go`` ``applyCanaryWeights``, kserve#5912, and the
  readiness gate of kserve#5984) were merged after the v0.20.0 release branch. So a RawDeployment
  canary needs a KServe release after v0.20.0 with the Gateway API; below that the deploy refuses
  it in one line (``--strategy shadow`` works in every mode). Promotion is KServe's zero-restart
  one: ``spec.predictor.name`` becomes the canary's name and the canary entry goes; rollback
  removes the entry (the controller deletes the canary Deployment).

The canary's pods and the stable's are found through the pod list (Knative:
``serving.knative.dev/revision``; RawDeployment: ``app=isvc.<deployment>``, KServe's
``GetRawServiceLabel``), so their ``/metrics`` are read pod by pod
(:mod:`labelmatch.delivery.signals`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from labelmatch import __version__
from labelmatch.core.errors import ArtifactError, ConfigError, LabelmatchError
from labelmatch.delivery.canary import CanaryDecision, CanaryTarget, watch_canary
from labelmatch.delivery.rules import CanaryRules, kserve_version
from labelmatch.platform.artifact_store import ArtifactStore
from labelmatch.platform.kserve import (
    ANNOTATION_PREFIX,
    GROUP,
    PLURAL,
    VERSION,
    DeployConfig,
    api_error,
    merged,
    point_at_model,
    predictor_settings,
    release_image_id,
)
from labelmatch.platform.kserve_rollout import (
    CONTAINER,
    RolloutFailed,
    container_env,
    deployment_mode,
    predictor_deployment_name,
    raw_rollout,
    read_deployment,
    served_url,
)
from labelmatch.platform.releases import ReleaseLog, ReleaseRecord

log = logging.getLogger(__name__)

#: The first KServe release whose RawDeployment canary gets traffic (kserve#5912; after v0.20.0).
RAW_CANARY_SINCE = (0, 21)
KNATIVE_REVISION_LABEL = "serving.knative.dev/revision"


def refuse_raw(where: str, version: str) -> ConfigError:
    """The one line that refuses a RawDeployment canary on a KServe that cannot split its traffic."""
    return ConfigError(
        f"{where} runs in RawDeployment mode, and KServe {version} cannot give a canary a share of its "
        "traffic there (canaryTrafficPercent is Knative-only; v0.20.0's spec.canary creates the canary "
        "Deployment but its gateway routes it nothing: the HTTPRoute weights came after v0.20.0, "
        "kserve#5912): deploy with --strategy shadow or replace, or Serverless mode (docs/cluster.md)")


def canary_mode(isvc: dict[str, Any], rules: CanaryRules) -> str:
    """``knative`` or ``raw``: how this InferenceService can take a canary.

    Raises:
        ConfigError: It cannot (one line saying why and what to do instead).
    """
    meta = isvc.get("metadata", {})
    where = f"InferenceService {meta.get('namespace', '?')}/{meta.get('name', '?')}"
    mode = deployment_mode(isvc)
    if mode == "knative":
        predictor = ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}
        if not predictor.get("latestRolledoutRevision"):
            raise ConfigError(f"{where} has no rolled-out revision yet, and KServe splits traffic only "
                              "after one (ksvc_reconciler.go): deploy it once with --strategy replace")
        return "knative"
    if mode == "raw":
        if kserve_version(rules.kserve_version) < RAW_CANARY_SINCE:
            raise refuse_raw(where, rules.kserve_version)
        return "raw"
    raise ConfigError(f"{where}: KServe has not reconciled it yet (no deployment mode); try again when it "
                      "is Ready")


def canary_name(release_id: str) -> str:
    """The RawDeployment canary's ``predictor.name`` (its Deployment is ``<isvc>-<name>-predictor``)."""
    return f"canary-{release_id[:8]}"


def knative_canary_patch(existing: dict[str, Any], model_uri: str, digest: str, release: dict[str, str],
                         image: str | None, percent: int) -> dict[str, Any]:
    """The merge patch that starts a Serverless canary: the predictor points at the candidate (a
    new revision) with ``canaryTrafficPercent``."""
    patch = point_at_model(existing, model_uri, digest, release, image=image)
    patch["spec"]["predictor"]["canaryTrafficPercent"] = percent
    return patch


def raw_canary_patch(existing: dict[str, Any], model_uri: str, digest: str, release: dict[str, str],
                     image: str | None, percent: int, name: str) -> dict[str, Any]:
    """The merge patch that starts a RawDeployment canary (``spec.canary``, KServe > v0.20.0): a
    named predictor with the candidate's containers and one replica; KServe merges it over the
    stable predictor (``buildCanaryPredictor``), which keeps serving unchanged."""
    pointed = merged(existing, point_at_model(existing, model_uri, digest, release, image=image))
    containers = pointed["spec"]["predictor"]["containers"]
    return {
        "metadata": {"annotations": {ANNOTATION_PREFIX + key: value for key, value in release.items()}},
        "spec": {"canary": [{"trafficPercent": percent,
                             "predictor": {"name": name, "minReplicas": 1, "containers": containers}}]},
    }


def promote_patch(mode: str, isvc: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that gives the canary all the traffic."""
    if mode == "knative":
        return {"spec": {"predictor": {"canaryTrafficPercent": None}}}
    [canary] = isvc["spec"]["canary"]
    return {"spec": {"predictor": {"name": canary["predictor"]["name"],
                                   "containers": canary["predictor"]["containers"]},
                     "canary": None}}


def rollback_patch(mode: str, stable_containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The merge patch that gives the stable all the traffic back.

    Serverless: ``canaryTrafficPercent: 0`` (the last rolled-out revision gets 100 % at once) with
    the stable's containers back in the predictor, so that the revision Knative makes of them,
    not the rolled-back one, becomes the latest ready revision that a later deploy's
    ``latestRevision`` target would route to before its own revision is ready.
    """
    if mode == "knative":
        predictor: dict[str, Any] = {"canaryTrafficPercent": 0}
        if stable_containers is not None:
            predictor["containers"] = stable_containers
        return {"spec": {"predictor": predictor}}
    return {"spec": {"canary": None}}


def _predictor_status(isvc: dict[str, Any]) -> dict[str, Any]:
    return ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}


def _traffic(isvc: dict[str, Any]) -> dict[str, int]:
    """``{revision: percent}`` of the predictor's traffic as KServe reports it."""
    shares: dict[str, int] = {}
    for target in _predictor_status(isvc).get("traffic") or []:
        if target.get("revisionName") and target.get("percent") is not None:
            shares[target["revisionName"]] = shares.get(target["revisionName"], 0) + int(target["percent"])
    return shares


def _ready(isvc: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (isvc.get("status") or {}).get("conditions") or [])


def _check_failed(isvc: dict[str, Any], what: str) -> None:
    conditions = {c.get("type"): c for c in (isvc.get("status") or {}).get("conditions") or []}
    configuration = conditions.get("PredictorConfigurationReady") or {}
    if configuration.get("status") == "False":
        raise RolloutFailed(f"{what} failed: {configuration.get('message') or configuration.get('reason')}")
    model = (isvc.get("status") or {}).get("modelStatus") or {}
    if model.get("transitionStatus") == "BlockedByFailedLoad":
        info = model.get("lastFailureInfo") or {}
        raise RolloutFailed(f"the model failed to load ({info.get('reason', 'ModelLoadFailed')}: "
                            f"{info.get('message', 'no message')})")


class ChangedMeanwhile(LabelmatchError):
    """A patch sent with ``metadata.resourceVersion`` found the object changed since it was read
    (the API server's optimistic lock: 409 ``Conflict``)."""


class KServeTraffic:
    """The canary's routing on KServe (:class:`~labelmatch.delivery.canary.TrafficControl`).

    Args:
        api: A ``CustomObjectsApi`` (its ``api_client`` lists pods and reads Deployments).
        config: Service, namespace, timeouts.
        mode: ``knative`` or ``raw``.
        stable: The stable revision (Knative) or predictor Deployment (raw).
        canary: The canary revision (Knative) or its ``predictor.name`` (raw).
        stable_containers: The stable predictor's containers (a Serverless rollback puts them back).
    """

    def __init__(self, api: Any, config: DeployConfig, mode: str, stable: str, canary: str,
                 stable_containers: list[dict[str, Any]] | None = None):
        self.api, self.config, self.mode, self.stable, self.canary = api, config, mode, stable, canary
        self.stable_containers = stable_containers
        self.where = f"InferenceService {config.namespace}/{config.service}"

    def _get(self) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.api.get_namespaced_custom_object(GROUP, VERSION, self.config.namespace, PLURAL,
                                                         self.config.service)
        except ApiException as exc:
            raise api_error(f"{self.where}: get", exc) from None

    def _patch(self, patch: dict[str, Any], resource_version: str | None = None) -> dict[str, Any]:
        """Merge-patch the InferenceService; with ``resource_version``, only if it is still that one.

        Raises:
            ChangedMeanwhile: ``resource_version`` is no longer the object's.
            LabelmatchError: Any other refusal.
        """
        from kubernetes.client.exceptions import ApiException

        if resource_version:  # the API server's precondition: 409 Conflict if it changed since
            patch = {**patch, "metadata": {**patch.get("metadata", {}), "resourceVersion": resource_version}}
        try:
            return self.api.patch_namespaced_custom_object(GROUP, VERSION, self.config.namespace, PLURAL,
                                                           self.config.service, patch)
        except ApiException as exc:
            if resource_version and exc.status == 409:
                raise ChangedMeanwhile(f"{self.where} changed since resourceVersion {resource_version} "
                                       "was read") from None
            raise api_error(f"{self.where}: patch", exc) from None

    def _pods(self, selector: str) -> list[str]:
        from kubernetes import client

        response = client.CoreV1Api(self.api.api_client).list_namespaced_pod(
            self.config.namespace, label_selector=selector, _preload_content=False)
        urls = []
        for pod in json.loads(response.data).get("items", []):
            status = pod.get("status") or {}
            ready = [s for s in status.get("containerStatuses") or [] if s.get("name") == CONTAINER]
            if not status.get("podIP") or not (ready and ready[0].get("ready")):
                continue
            container = next((c for c in pod["spec"]["containers"] if c.get("name") == CONTAINER), {})
            port = next((p.get("containerPort") for p in container.get("ports") or []), self.config.port)
            urls.append(f"http://{status['podIP']}:{port}")
        return urls

    def _selector(self, which: str) -> str:
        if self.mode == "knative":
            return f"{KNATIVE_REVISION_LABEL}={which}"
        return f"app=isvc.{which}"

    def canary_pods(self) -> list[str]:
        """Base URLs of the canary's ready pods."""
        name = self.canary if self.mode == "knative" else f"{self.config.service}-{self.canary}-predictor"
        return self._pods(self._selector(name))

    def stable_pods(self) -> list[str]:
        """Base URLs of the stable's ready pods."""
        return self._pods(self._selector(self.stable))

    def _wait(self, what: str, done: Any) -> dict[str, Any]:
        deadline = time.monotonic() + self.config.timeout_s
        delay = min(0.25, self.config.poll_s)
        while True:
            isvc = self._get()
            try:
                state = done(isvc)
            except RolloutFailed as exc:
                raise LabelmatchError(f"{self.where}: {what}: {exc}") from None
            if state is True:
                return isvc
            if time.monotonic() >= deadline:
                raise LabelmatchError(f"{self.where}: {what} not done after {self.config.timeout_s:g} s "
                                      f"({state})")
            time.sleep(delay)
            delay = min(2 * delay, self.config.poll_s)

    def wait_canary(self, release_id: str, percent: int, previous_revision: str) -> dict[str, Any]:
        """Wait until the canary serves its share; sets :attr:`canary` (Knative: the new revision)."""
        if self.mode == "knative":
            def done(isvc: dict[str, Any]) -> bool | str:
                predictor = _predictor_status(isvc)
                created = predictor.get("latestCreatedRevision", "")
                if not created or created == previous_revision:
                    return f"no revision after {previous_revision} yet"
                _check_failed(isvc, f"revision {created}")
                if predictor.get("latestReadyRevision") != created:
                    return f"revision {created} not ready yet"
                shares = _traffic(isvc)
                if shares.get(created) != percent or shares.get(self.stable, 0) != 100 - percent:
                    return f"traffic is {shares or 'not reported'}, not {percent}% to {created}"
                self.canary = created
                return True

            return self._wait("the canary's rollout", done)
        deployment = f"{self.config.service}-{self.canary}-predictor"

        def done_raw(isvc: dict[str, Any]) -> bool | str:
            _check_failed(isvc, "the canary")
            statuses = {s.get("name"): s for s in (isvc.get("status") or {}).get("canaryStatuses") or []}
            if not (statuses.get(self.canary) or {}).get("ready"):
                return f"canary {self.canary} not ready yet"
            state = raw_rollout(isvc, read_deployment(self.api.api_client, self.config.namespace, deployment),
                                release_id)
            return True if state.done else state.detail

        return self._wait("the canary's rollout", done_raw)

    def promote(self) -> None:
        """Give the canary all the traffic and wait until it has it."""
        isvc = self._patch(promote_patch(self.mode, self._get()))
        if self.mode == "knative":
            canary = self.canary

            def done(isvc: dict[str, Any]) -> bool | str:
                predictor = _predictor_status(isvc)
                if predictor.get("latestRolledoutRevision") != canary or _traffic(isvc).get(canary) != 100:
                    return f"revision {canary} does not take all traffic yet"
                return True if _ready(isvc) else "not Ready"
        else:
            name = f"{self.config.service}-{self.canary}-predictor"
            release = container_env(isvc["spec"]["predictor"]).get("LABELMATCH_RELEASE_ID", "")

            def done(isvc: dict[str, Any]) -> bool | str:
                if predictor_deployment_name(isvc) != name:
                    return "the predictor is not renamed yet"
                deployment = read_deployment(self.api.api_client, self.config.namespace, name)
                state = raw_rollout(isvc, deployment, release)
                return True if state.done else state.detail

        self._wait("promoting the canary", done)

    def rollback(self, resource_version: str | None = None) -> None:
        """Give the stable all the traffic back and wait until it has it.

        Serverless, in two steps: the last rolled-out revision takes 100 % at once
        (``canaryTrafficPercent: 0``) while Knative makes a revision of the stable's containers;
        once that is ready, ``canaryTrafficPercent`` goes and it takes the traffic, so no trace of
        the canary is left for the next deploy.

        Args:
            resource_version: Roll back only if the InferenceService is still at this version (a
                step other than the canary's own, which read it to decide; raises
                :class:`ChangedMeanwhile` otherwise).
        """
        self._patch(rollback_patch(self.mode, self.stable_containers), resource_version)
        if self.mode == "knative":
            stable, canary = self.stable, self.canary

            def back(isvc: dict[str, Any]) -> bool | str:
                shares = _traffic(isvc)
                return True if shares.get(stable) == 100 else f"traffic is {shares}, not 100% to {stable}"

            self._wait("rolling the canary back", back)

            def rebuilt(isvc: dict[str, Any]) -> bool | str:
                predictor = _predictor_status(isvc)
                created = predictor.get("latestCreatedRevision", "")
                if created in (stable, canary) or predictor.get("latestReadyRevision") != created:
                    return "the stable's containers have no ready revision yet"
                return True

            isvc = self._wait("rebuilding the stable revision", rebuilt)
            restored = _predictor_status(isvc)["latestCreatedRevision"]
            self._patch({"spec": {"predictor": {"canaryTrafficPercent": None}}})

            def done(isvc: dict[str, Any]) -> bool | str:
                rolled_out = _predictor_status(isvc).get("latestRolledoutRevision")
                if rolled_out != restored or _traffic(isvc).get(restored) != 100:
                    return f"revision {restored} does not take all traffic yet"
                return True if _ready(isvc) else "not Ready"
        else:
            deployment = f"{self.config.service}-{self.canary}-predictor"

            def done(isvc: dict[str, Any]) -> bool | str:
                if (isvc.get("status") or {}).get("canaryStatuses") or read_deployment(
                        self.api.api_client, self.config.namespace, deployment) is not None:
                    return f"the canary Deployment {deployment} is still there"
                return True

        self._wait("rolling the canary back", done)


def _served(url: str, service: str, timeout_s: float = 10.0) -> dict[str, Any]:
    """What the model server at ``url`` reports it serves (``GET /v2/models/<service>/labels``)."""
    import requests

    try:
        response = requests.get(f"{url}/v2/models/{service}/labels", timeout=timeout_s)
        response.raise_for_status()
        return response.json()
    except (requests.RequestException, ValueError) as exc:
        raise LabelmatchError(f"{url}/v2/models/{service}/labels: {type(exc).__name__}: cannot ask the "
                              "pod what it serves") from None


def _profile(store: ArtifactStore, model_uri: str, model_dir: str | Path | None) -> Any:
    """The candidate's reference profile (``None`` when its export had none)."""
    from labelmatch.monitoring.profile import FEATURES_FILE, PROFILE_FILE, ReferenceProfile

    if model_dir is not None:
        try:
            return ReferenceProfile.load(model_dir)
        except ArtifactError:
            return None
    try:
        _, files = store.read_members(model_uri, [PROFILE_FILE, FEATURES_FILE], "OnnxModel")
    except ArtifactError:
        return None
    with tempfile.TemporaryDirectory(prefix="labelmatch-profile-") as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data if isinstance(data, bytes) else data.encode())
        return ReferenceProfile.load(tmp)


def get_isvc(api: Any, config: DeployConfig) -> dict[str, Any] | None:
    """The InferenceService ``config.service`` as the API server has it, ``None`` if there is none."""
    from kubernetes.client.exceptions import ApiException

    try:
        return api.get_namespaced_custom_object(GROUP, VERSION, config.namespace, PLURAL, config.service)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise api_error(f"InferenceService {config.namespace}/{config.service}: get", exc) from None


def save_decision(state_url: str | None, service: str, release_id: str, strategy: str, decision: str,
                  event: dict[str, Any], newest_id: int | None = None) -> int:
    """Store the decision in the serving state: every replica of ``service`` exports it as a metric.

    Args:
        newest_id: Store it only while the event with this id is still the service's newest
            (:meth:`~labelmatch.state.serving_state.ServingState.save_delivery_event`).

    Returns:
        The stored event's id; 0 when nothing was stored (no serving state, or a newer event).
    """
    if not state_url:
        log.info("no serving state given: the %s decision is in the release record only", strategy)
        return 0
    from labelmatch.state.serving_state import ServingState

    state = ServingState(state_url)
    try:
        return state.save_delivery_event(service, release_id, strategy, decision, event, newest_id=newest_id)
    finally:
        state.close()


def deploy_canary(config: DeployConfig, model_uri: str, store: ArtifactStore, release_root: str,
                  rules: CanaryRules, pipeline_version: str = __version__, run_id: str = "",
                  expected_digest: str | None = None, api: Any = None, state_url: str | None = None,
                  model_dir: str | Path | None = None) -> tuple[ReleaseRecord, CanaryDecision]:
    """Roll ``model_uri`` out as a canary of the serving InferenceService, watch it, promote it or
    roll it back, and append the release record with the decision and its evidence.

    Args:
        config: Service, namespace, image, timeouts, CRD to validate against.
        model_uri: ``s3://`` URI of the candidate OnnxModel.
        store: The artifact store (model, release records).
        release_root: ``s3://bucket/prefix`` of the release records.
        rules: How the canary runs and what it must hold.
        pipeline_version: Recorded in the release.
        run_id: The KFP run, recorded.
        expected_digest: Refuse the model unless its digest is this.
        api: A ``CustomObjectsApi`` (default: in-cluster or kubeconfig).
        state_url: The serving state (drift, feedback, and the decision's metric); ``None``: those
            rules do not run and the decision is in the release record only.
        model_dir: A local copy of the artifact (its reference profile); default: read from the store.

    Returns:
        The release record (``strategy: canary``, ``delivery``: the decision) and the decision.

    Raises:
        ConfigError: The InferenceService does not exist yet or cannot take a canary (its mode,
            the KServe version).
        LabelmatchError: The canary did not roll out, or its pods do not serve the release.
    """
    from labelmatch.platform.k8s_schema import validate_against_crd
    from labelmatch.platform.kserve import kube_custom_objects

    digest = store.verify_remote(model_uri, kind=("OnnxModel",))
    if expected_digest and digest != expected_digest:
        raise ArtifactError(f"{model_uri}: artifact digest {digest[:12]}… is not the expected "
                            f"{expected_digest[:12]}…; refusing to deploy")
    from labelmatch.delivery.abandoned import STARTED, canary_deadline, settle_abandoned_canary, started_event

    api = api or kube_custom_objects()
    where = f"InferenceService {config.namespace}/{config.service}"
    settle_abandoned_canary(api, config, state_url, run_id=run_id)
    existing = get_isvc(api, config)
    if existing is None:
        raise ConfigError(f"{where} does not exist: a canary needs a model serving already; deploy the first "
                          "one with --strategy replace")
    mode = canary_mode(existing, rules)
    release_id = uuid.uuid4().hex[:12]
    annotations = {"release-id": release_id, "pipeline-version": pipeline_version, "run-id": run_id}
    if mode == "knative":
        stable = _predictor_status(existing)["latestRolledoutRevision"]
        traffic = KServeTraffic(api, config, mode, stable, "", existing["spec"]["predictor"]["containers"])
        patch = knative_canary_patch(existing, model_uri, digest, annotations, config.image,
                                     rules.traffic_percent)
        candidate = merged(existing, patch)["spec"]["predictor"]
    else:
        stable = predictor_deployment_name(existing)
        traffic = KServeTraffic(api, config, mode, stable, canary_name(release_id))
        patch = raw_canary_patch(existing, model_uri, digest, annotations, config.image,
                                 rules.traffic_percent, traffic.canary)
        candidate = {**existing["spec"]["predictor"], **patch["spec"]["canary"][0]["predictor"]}
    if config.crd_path:
        result = merged(existing, patch)
        validate_against_crd({key: result[key] for key in ("apiVersion", "kind", "spec")}, config.crd_path)
    stable_pods = traffic.stable_pods()
    if not stable_pods:
        raise LabelmatchError(f"{where}: no ready pod of the stable ({stable}) to compare the canary with")
    stable_served = _served(stable_pods[0], config.service)
    log.info("%s: canary of %s at %d%% (release %s, %s mode)", where, model_uri, rules.traffic_percent,
             release_id, mode)
    # Should this step die before its decision, the next deploy (and an alert) know by when it is
    # overdue and how to roll it back (labelmatch.delivery.abandoned).
    save_decision(state_url, config.service, release_id, "canary", STARTED, started_event(
        canary_deadline(config, rules, time.time()), mode, stable, traffic.canary, traffic.stable_containers,
        rules.traffic_percent, run_id))
    traffic._patch(patch)
    try:
        traffic.wait_canary(release_id, rules.traffic_percent, _predictor_status(existing).get(
            "latestCreatedRevision", ""))
        canary_pods = traffic.canary_pods()
        if not canary_pods:
            raise LabelmatchError(f"{where}: the canary is ready but none of its pods is")
        served = _served(canary_pods[0], config.service)
        if served.get("release_id") != release_id or served.get("model_digest") != digest:
            raise LabelmatchError(f"{where}: the canary pod serves release {served.get('release_id')!r} "
                                  f"(digest {str(served.get('model_digest'))[:12]}…), not {release_id}")
        target = CanaryTarget(canary_version=served.get("model_version", ""),
                              stable_version=stable_served.get("model_version", ""),
                              profile=_profile(store, model_uri, model_dir), state_url=state_url)
        decision = watch_canary(rules, traffic, target)
    except Exception as exc:  # the canary never got its decision: the stable takes everything back
        log.error("%s: the canary failed before its decision (%s); rolling it back", where, exc)
        try:
            traffic.rollback()
        except LabelmatchError as again:  # the started event stays: its deadline applies
            log.error("%s: rolling the canary back failed too: %s", where, again)
        else:
            try:
                save_decision(state_url, config.service, release_id, "canary", "rolled_back",
                              {"reason": f"failed before its decision: {exc}", "results": []})
            except LabelmatchError as unsaved:  # the started event stays: its deadline applies
                log.error("%s: the rollback could not be stored: %s", where, unsaved)
        if isinstance(exc, LabelmatchError):
            raise LabelmatchError(f"{exc}; the canary was rolled back, no release recorded") from None
        raise
    container = next(c for c in candidate["containers"] if c.get("name") == CONTAINER)
    record = ReleaseRecord.new(
        release_id=release_id, service=config.service, namespace=config.namespace, model_uri=model_uri,
        model_digest=digest, pipeline_version=pipeline_version, run_id=run_id,
        image=container.get("image", ""),
        image_id=release_image_id(api, config, release_id) if decision.decision == "promoted" else "",
        engine=served.get("engine", ""), label_set_version=served.get("label_set_version"),
        thresholds=served.get("thresholds") or {},
        predictor=predictor_settings({"spec": {"predictor": candidate}}),
        strategy="canary", delivery=decision.to_json())
    uri = ReleaseLog(store, release_root).append(record)
    log.info("release %s (%s) recorded at %s", release_id, decision.decision, uri)
    save_decision(state_url, config.service, release_id, "canary", decision.decision, decision.to_json())
    return record, decision


def deploy_shadow(config: DeployConfig, model_uri: str, store: ArtifactStore, release_root: str,
                  window_s: float, state_url: str, pipeline_version: str = __version__, run_id: str = "",
                  expected_digest: str | None = None, api: Any = None,
                  sleep: Any = time.sleep) -> tuple[ReleaseRecord, Any]:
    """Serve ``model_uri`` as a shadow of the serving InferenceService for ``window_s`` seconds and
    report how its answers compare (:mod:`labelmatch.delivery.shadow`).

    The shadow is its own InferenceService ``<service>-shadow`` (created or re-pointed like a
    replace deploy); the serving replicas mirror their prediction requests to it while the serving
    state's shadow target for their model version says so (set here for the window, then cleared).
    Nothing it answers reaches a user. The release record (``strategy: shadow``, never serving)
    carries the report.

    Raises:
        ConfigError: No serving InferenceService, or no serving state (the replicas find the
            shadow target and log both answers there).
    """
    from labelmatch.delivery.shadow import shadow_report
    from labelmatch.platform.kserve import deploy_model, kube_custom_objects
    from labelmatch.state.serving_state import ServingState

    where = f"InferenceService {config.namespace}/{config.service}"
    if not state_url:
        raise ConfigError("the shadow strategy needs the serving state (--state-url / LABELMATCH_STATE_URL): "
                          "the serving replicas find the shadow target there and log both answers")
    from labelmatch.delivery.abandoned import settle_abandoned_canary

    api = api or kube_custom_objects()
    existing = get_isvc(api, config)
    if existing is None or not served_url(existing):
        raise ConfigError(f"{where} does not serve yet: a shadow needs live traffic to copy")
    state = ServingState(state_url)  # unreachable: refused here, before anything changes
    try:
        state.check_writable()
    finally:
        state.close()
    if settle_abandoned_canary(api, config, state_url, run_id=run_id):
        existing = get_isvc(api, config) or existing
    shadow_service = f"{config.service}-shadow"
    shadow_config = dataclasses.replace(config, service=shadow_service, min_replicas=1, max_replicas=1)
    shadow = deploy_model(shadow_config, model_uri, store, release_root, pipeline_version, run_id,
                          expected_digest, api=api, record=False)
    shadow_isvc = get_isvc(api, shadow_config)
    url = f"{served_url(shadow_isvc or {})}/v1/models/{shadow_service}:predict"
    mode = deployment_mode(existing) or "raw"
    serving = (_predictor_status(existing).get("latestRolledoutRevision", "") if mode == "knative"
               else predictor_deployment_name(existing))
    stable = KServeTraffic(api, config, mode, serving, "")
    pods = stable.stable_pods()
    if not pods:
        raise LabelmatchError(f"{where}: no ready pod to mirror from")
    serving_version = _served(pods[0], config.service).get("model_version", "")
    state = ServingState(state_url)
    try:
        start = time.time()
        # The target expires by itself at the window's end, should this process die before.
        state.set_shadow_target(serving_version, url, start + window_s)
        log.info("%s: mirroring to %s for %g s", where, url, window_s)
        sleep(window_s)
        state.clear_shadow_target(serving_version)
        end = time.time()
        sleep(min(shadow_config.timeout_s, 2.0))  # requests in flight land in the log
    finally:
        state.close()
    report = shadow_report(state_url, serving_version, start, end + 2.0)
    report.window = {"start": start, "end": end}
    record = dataclasses.replace(
        shadow, service=config.service, namespace=config.namespace, strategy="shadow",
        delivery={"strategy": "shadow", "shadow_service": shadow_service, "shadow_url": url,
                  "serving_version": serving_version, "report": report.to_json()})
    ReleaseLog(store, release_root).append(record)
    save_decision(state_url, config.service, record.release_id, "shadow", "reported",
                  {"report": report.to_json()})
    return record, report


__all__ = ["RAW_CANARY_SINCE", "KServeTraffic", "canary_mode", "canary_name", "deploy_canary",
           "deploy_shadow", "get_isvc", "knative_canary_patch", "promote_patch", "raw_canary_patch",
           "refuse_raw", "rollback_patch", "save_decision"]
