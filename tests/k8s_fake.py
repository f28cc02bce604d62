"""A test double of the Kubernetes API and of the controllers behind an InferenceService, on 127.0.0.1.

**API server** (as any Kubernetes API server answers): InferenceServices get, create and JSON
merge patch (``metadata.generation`` bumps on ``spec`` changes only, ``resourceVersion`` on every
write, and a ``resourceVersion`` in a patch is a precondition; 404/409/415 ``Status`` objects);
Deployments (``apps/v1``) get; Pods (``v1``) list by label selector. Nothing else is served (an
unexpected path fails the request).

**Controllers**, written from their source, not from labelmatch's code. They advance one step per
API request (a "tick"), so a test sets how long things take in requests, deterministically:

* KServe's InferenceService controller, kserve/kserve ``pkg/apis/serving/v1beta1/
  inference_service_status.go`` (identical in v0.15.0, v0.16.0 and master at v0.20.0-104):

  - RawDeployment (``Standard`` since v0.20): after ``controller_lag`` ticks it writes the
    predictor's pod template into the Deployment ``<name>-predictor``
    (``constants.PredictorServiceName``; labels ``serving.kserve.io/inferenceservice`` and
    ``component=predictor`` from ``components/predictor.go`` ``buildObjectMeta``). The replica
    count is left to the HPA after creation. ``PropagateRawStatus`` is ported as written:
    ``PredictorReady`` from the Deployment's ``Available``/``Progressing``/``ReplicaFailure``
    conditions (True while ``Available`` is True, i.e. **during** a rolling update too), and
    ``status.observedGeneration`` **copied from the Deployment's status**.
  - RawDeployment canaries (``spec.canary``, v0.20.0, ``components/predictor.go``
    ``reconcileCanaryDeployments``): a Deployment ``<name>-<canary>-predictor`` per entry (the
    stable predictor with the canary's fields over it, ``minReplicas`` or ceil(stable ×
    trafficPercent / 100) replicas), ``status.canaryStatuses`` and ``CanaryPredictorReady``; every
    predictor Deployment the spec does not name is deleted (promotion by ``predictor.name`` keeps the
    canary's Deployment as the stable; removing the entry deletes the canary). Pods carry
    ``app: isvc.<deployment>`` (``deployment_reconciler.go``, ``GetRawServiceLabel``).
  - Serverless (``Knative``): each template change makes the Knative Service create a revision
    ``<name>-predictor-0000N``; the Knative Service's traffic is KServe's
    (``reconcilers/knative/ksvc_reconciler.go``, v0.20.0 as v0.15.0): ``canaryTrafficPercent`` %
    to the latest revision and the rest to ``latestRolledoutRevision`` (tag ``prev``) when both
    are set, else 100 % to the latest; Knative's route resolves ``latestRevision`` to the latest
    *ready* revision and moves once every revision it names is ready; a revision the route no
    longer names keeps its pod ``scale_to_zero_ticks`` ticks more, then scales to zero (the KPA
    scales an idle revision to zero only after ``stable-window`` 60 s and
    ``scale-to-zero-grace-period`` 30 s: knative/serving ``config/core/configmaps/autoscaler.yaml``),
    so a request the gateway sent by the old route still finds it. ``PropagateStatus`` is
    ported: ``latestCreatedRevision``, ``latestReadyRevision``,
    ``latestRolledoutRevision`` / ``previousRolledoutRevision`` (from the traffic, as written, with
    its "rolled back over the same revision" case), ``traffic``, ``PredictorReady`` /
    ``PredictorConfigurationReady`` / ``PredictorRouteReady`` from the Knative Service's ``Ready``
    / ``ConfigurationsReady`` / ``RoutesReady``, ``status.observedGeneration`` copied from the
    Knative Service's.
  - ``Ready`` is the living condition set of ``PredictorReady`` and ``IngressReady``; the ingress
    reconciler marks ``IngressReady`` once the predictor has been ready.
  - ``modelStatus.transitionStatus``: ``InProgress`` while the new pods start, ``UpToDate`` when
    ready, ``BlockedByFailedLoad`` when they crash (``PropagateModelStatus``).

* Kubernetes' Deployment controller (kubernetes ``pkg/controller/deployment/rolling.go``,
  ``progress.go``; default strategy maxSurge 25 % rounded up, maxUnavailable 25 % rounded down, so
  one new pod is added before an old one goes): ``observedGeneration`` catches up one tick after a
  spec change; a template change creates the new ReplicaSet's pods, which become ready after
  ``pod_start_ticks`` (``Progressing`` True ``ReplicaSetUpdated``); then the old pods go
  (``NewReplicaSetAvailable``). Pods that never become ready end in ``Progressing`` False
  ``ProgressDeadlineExceeded`` after ``progress_deadline_ticks``.

**Pods** are not run unless a ``pod_runner`` is given: then each new pod is a real process
(the test's runner starts the container's own command on 127.0.0.1) and ``status.address.url``
points at the ready one, as KServe's Service would; the pod list gives such a pod ``podIP``
127.0.0.1 and its real port as the ``kserve-container`` port, and a Knative revision's pods the
``serving.knative.dev/revision`` label.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

ISVC_PREFIX = "/apis/serving.kserve.io/v1beta1/namespaces/"
DEPLOY_PREFIX = "/apis/apps/v1/namespaces/"
PODS_PREFIX = "/api/v1/namespaces/"
SERVICE_PREFIX = "/svc/"
RAW_MODES = ("RawDeployment", "Standard")
MODE_ANNOTATION = "serving.kserve.io/deploymentMode"


def _component(isvc: dict) -> dict:
    """``status.components.predictor`` as the controller last wrote it."""
    return ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


@dataclass
class Pod:
    """One predictor pod: its template, when it is ready, and the process behind it (if any)."""

    template: dict
    starting: int
    ready: bool = False
    crashed: bool = False
    handle: Any = None  # what pod_runner returned: has .url and .stop()


@dataclass
class Predictor:
    """What the controllers keep for one InferenceService."""

    mode: str
    lag: int
    deployment: dict | None = None
    pods: list[Pod] = field(default_factory=list)
    deadline: int = 0
    ever_ready: bool = False
    canaries: dict[str, Predictor] = field(default_factory=dict)  # RawDeployment spec.canary, by Deployment
    # Knative
    revisions: list[dict] = field(default_factory=list)
    ksvc_generation: int = 0
    traffic: list[dict] = field(default_factory=list)  # the Knative route's resolved targets


@dataclass
class KubeState:
    """The objects, the controllers' state, the requests seen, and the knobs of the world."""

    objects: dict[tuple[str, str], dict] = field(default_factory=dict)
    predictors: dict[tuple[str, str], Predictor] = field(default_factory=dict)
    requests: list[tuple[str, str, str, Any]] = field(default_factory=list)  # method, path, type, body
    default_mode: str = "RawDeployment"
    controller_lag: int = 1
    pod_start_ticks: int = 2
    progress_deadline_ticks: int = 6
    scale_to_zero_ticks: int = 20  # how long an unrouted Knative revision keeps its pod
    crash: bool = False  # new pods never become ready (the model server exits)
    pod_runner: Callable[..., Any] | None = None  # (kserve-container, namespace, volumes=pod volumes)
    base_url: str = ""
    lock: threading.RLock = field(default_factory=threading.RLock)

    # -- what a test does as "someone else" --------------------------------------------------
    def hpa_scale(self, namespace: str, name: str, replicas: int) -> None:
        """The HPA scales the predictor Deployment: its generation bumps, the template stays."""
        with self.lock:
            deployment = self.predictors[(namespace, name)].deployment
            assert deployment is not None
            deployment["spec"]["replicas"] = replicas
            deployment["metadata"]["generation"] += 1

    def deployment(self, namespace: str, name: str) -> dict | None:
        """The predictor Deployment of InferenceService ``name``."""
        return self.predictors[(namespace, name)].deployment

    # -- controllers --------------------------------------------------------------------------
    def tick(self) -> None:
        """One step of every controller."""
        with self.lock:
            for key, isvc in self.objects.items():
                predictor = self.predictors[key]
                if predictor.mode == "raw":
                    self._kserve_raw(isvc, predictor)
                    self._deployment_controller(predictor)
                    for canary in predictor.canaries.values():
                        self._deployment_controller(canary)
                    self._propagate_raw(isvc, predictor)
                else:
                    self._kserve_knative(isvc, predictor)
                    self._propagate_knative(isvc, predictor)

    def _start_pod(self, template: dict, namespace: str) -> Pod:
        return Pod(copy.deepcopy(template), self.pod_start_ticks)

    def _advance_pod(self, pod: Pod, namespace: str) -> None:
        if pod.ready or pod.crashed:
            return
        pod.starting -= 1
        if pod.starting > 0:
            return
        if self.crash:
            pod.crashed = True
            return
        if self.pod_runner is not None:
            [container] = [c for c in pod.template["spec"]["containers"] if c["name"] == "kserve-container"]
            volumes = pod.template["spec"].get("volumes", [])
            pod.handle = self.pod_runner(container, namespace, volumes=volumes)
        pod.ready = True

    @staticmethod
    def _template(isvc: dict, predictor: dict | None = None, deployment: str = "") -> dict:
        """The pod template of a predictor (``predictor``: a canary's, merged over the stable's);
        RawDeployment pods carry ``app: isvc.<deployment>`` (``deployment_reconciler.go``,
        ``GetRawServiceLabel``)."""
        predictor = predictor or isvc["spec"]["predictor"]
        spec = {
            key: copy.deepcopy(predictor[key])
            for key in ("containers", "volumes", "serviceAccountName")
            if key in predictor
        }
        name = isvc["metadata"]["name"]
        labels = {
            **isvc["metadata"].get("labels", {}),
            "serving.kserve.io/inferenceservice": name,
            "component": "predictor",
            **({"app": f"isvc.{deployment}"} if deployment else {}),
        }
        return {"metadata": {"labels": labels}, "spec": spec}

    @staticmethod
    def _new_deployment(name: str, namespace: str, template: dict, replicas: int) -> dict:
        return {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": name, "namespace": namespace, "generation": 1,
                         "labels": template["metadata"]["labels"]},
            "spec": {"replicas": replicas, "template": template},
            "status": {},
        }

    def _stop(self, pods: list[Pod]) -> None:
        for pod in pods:
            if pod.handle is not None:
                pod.handle.stop()
                pod.handle = None

    def _kserve_raw(self, isvc: dict, predictor: Predictor) -> None:
        """KServe's raw reconciler for the stable predictor and, from v0.20.0, ``spec.canary``
        (``components/predictor.go`` ``reconcileCanaryDeployments``): each canary is a Deployment
        ``<isvc>-<name>-predictor`` of the stable predictor with the canary's fields over it
        (``buildCanaryPredictor``: mergo with override), ``minReplicas`` or ceil(stable minReplicas ×
        trafficPercent / 100) replicas; ``status.canaryStatuses`` (ready: ``availableReplicas > 0``)
        and ``CanaryPredictorReady``; every predictor Deployment not named by the spec is deleted
        (so promotion, ``predictor.name`` set to a canary's name with its entry removed, keeps that
        canary's Deployment and pods as the stable, and removing an entry deletes the canary)."""
        if predictor.lag > 0:
            predictor.lag -= 1
            return
        name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
        stable = isvc["spec"]["predictor"]
        stable_name = f"{name}-{stable['name']}-predictor" if stable.get("name") else f"{name}-predictor"
        template = self._template(isvc, deployment=stable_name)
        if predictor.deployment is not None and predictor.deployment["metadata"]["name"] != stable_name:
            self._stop(predictor.pods)  # the old stable Deployment is an orphan now
            adopted = predictor.canaries.pop(stable_name, None)
            predictor.deployment, predictor.pods = ((adopted.deployment, adopted.pods) if adopted
                                                    else (None, []))
        if predictor.deployment is None:
            predictor.deployment = self._new_deployment(stable_name, namespace, template,
                                                        stable.get("minReplicas", 1))
        elif predictor.deployment["spec"]["template"] != template:
            predictor.deployment["spec"]["template"] = template
            predictor.deployment["metadata"]["generation"] += 1
        expected = set()
        for canary in isvc["spec"].get("canary") or []:
            spec = canary["predictor"]
            deployment = f"{name}-{spec['name']}-predictor"
            expected.add(deployment)
            override = {k: v for k, v in spec.items() if v not in (None, [], {}, "")}
            merged = {**copy.deepcopy(stable), **override}
            replicas = spec.get("minReplicas") or math.ceil(
                stable.get("minReplicas", 1) * canary["trafficPercent"] / 100)
            canary_template = self._template(isvc, merged, deployment)
            current = predictor.canaries.get(deployment)
            if current is None:
                current = predictor.canaries[deployment] = Predictor("raw", 0)
                current.deployment = self._new_deployment(deployment, namespace, canary_template, replicas)
            elif current.deployment["spec"]["template"] != canary_template:
                current.deployment["spec"]["template"] = canary_template
                current.deployment["metadata"]["generation"] += 1
        for deployment in [d for d in predictor.canaries if d not in expected]:
            self._stop(predictor.canaries.pop(deployment).pods)

    def _deployment_controller(self, predictor: Predictor) -> None:
        deployment = predictor.deployment
        if deployment is None:
            return
        status = deployment["status"]
        namespace = deployment["metadata"]["namespace"]
        # One sync (``syncRolloutStatus`` / ``calculateStatus``): the observed generation and the
        # replica counts for the current template are written together.
        status["observedGeneration"] = deployment["metadata"]["generation"]
        template, replicas = deployment["spec"]["template"], deployment["spec"]["replicas"]
        new = [p for p in predictor.pods if p.template == template]
        old = [p for p in predictor.pods if p.template != template]
        conditions = {}
        if len(new) < replicas:
            predictor.pods += [self._start_pod(template, namespace) for _ in range(replicas - len(new))]
            predictor.deadline = self.progress_deadline_ticks
            conditions["Progressing"] = ("True", "ReplicaSetUpdated", "ReplicaSet is progressing.")
        else:
            for pod in new:
                self._advance_pod(pod, namespace)
            if all(p.ready for p in new):
                for pod in old + new[replicas:]:  # the old ReplicaSet, and pods above a scale-down
                    if pod.handle is not None:
                        pod.handle.stop()
                predictor.pods = new[:replicas]
                old = []
                conditions["Progressing"] = (
                    "True",
                    "NewReplicaSetAvailable",
                    "ReplicaSet has successfully progressed.",
                )
            else:
                predictor.deadline -= 1
                if predictor.deadline <= 0:
                    conditions["Progressing"] = (
                        "False",
                        "ProgressDeadlineExceeded",
                        f'ReplicaSet "{deployment["metadata"]["name"]}" has timed out progressing.',
                    )
                else:
                    conditions["Progressing"] = ("True", "ReplicaSetUpdated", "ReplicaSet is progressing.")
        new = [p for p in predictor.pods if p.template == template]
        available = sum(p.ready for p in predictor.pods)
        # maxUnavailable 25 % of the replicas, rounded down.
        conditions["Available"] = (
            ("True", "MinimumReplicasAvailable", "Deployment has minimum availability.")
            if available >= replicas - replicas // 4
            else ("False", "MinimumReplicasUnavailable", "Deployment does not have minimum availability.")
        )
        status.update(
            replicas=len(predictor.pods),
            updatedReplicas=len(new),
            readyReplicas=available,
            availableReplicas=available,
        )
        previous = {c["type"]: c for c in status.get("conditions", [])}
        for kind, (value, reason, message) in conditions.items():
            previous[kind] = {"type": kind, "status": value, "reason": reason, "message": message}
        status["conditions"] = list(previous.values())

    def _url(self, isvc: dict, pods: list[Pod]) -> str:
        """The InferenceService's address: a stable Service URL. With real pods it is served by
        this double (``/svc/<namespace>/<name>/...``), forwarding to a ready pod as a Service would."""
        name, namespace = isvc["metadata"]["name"], isvc["metadata"]["namespace"]
        if self.pod_runner is not None:
            return f"{self.base_url}{SERVICE_PREFIX}{namespace}/{name}"
        return f"http://{name}.{namespace}.svc.cluster.local"

    def endpoint(self, namespace: str, name: str) -> str | None:
        """The URL of a ready pod behind the Service (``None`` when there is none); for Knative, of
        the revision with the largest share of the route (weighted routing is the test's splitter's)."""
        with self.lock:
            targets = self.route(namespace, name)
            if targets:
                url = max(targets, key=lambda target: target[1])[0]
                if url:
                    return url
            predictor = self.predictors.get((namespace, name))
            ready = [p for p in predictor.pods if p.ready and p.handle is not None] if predictor else []
            return ready[-1].handle.url if ready else None

    def route(self, namespace: str, name: str) -> list[tuple[str, int]]:
        """The Knative route as a gateway is programmed with it, in one snapshot: each target's
        ready pod URL (``""`` when it has none) and its percent."""
        with self.lock:
            predictor = self.predictors.get((namespace, name))
            return [(self.revision_url(namespace, name, target["revisionName"]) or "", target["percent"])
                    for target in (predictor.traffic if predictor else [])]

    @staticmethod
    def _set(conditions: dict, kind: str, value: str, reason: str = "", message: str = "") -> None:
        conditions[kind] = {
            "type": kind,
            "status": value,
            **({"reason": reason} if reason else {}),
            **({"message": message} if message else {}),
        }

    def _finish(self, isvc: dict, predictor: Predictor, conditions: dict, status: dict) -> None:
        """IngressReady, Ready (living condition set: all True → True, any False → False) and
        modelStatus, then write the status."""
        ready = conditions.get("PredictorReady", {}).get("status") == "True"
        predictor.ever_ready = predictor.ever_ready or ready
        if predictor.ever_ready:
            self._set(conditions, "IngressReady", "True")
        dependents = [
            conditions.get(k, {}).get("status", "Unknown") for k in ("PredictorReady", "IngressReady")
        ]
        overall = (
            "True"
            if all(v == "True" for v in dependents)
            else ("False" if "False" in dependents else "Unknown")
        )
        failing = next(
            (
                conditions[k]
                for k in ("PredictorReady", "IngressReady")
                if conditions.get(k, {}).get("status") != "True" and k in conditions
            ),
            {},
        )
        self._set(conditions, "Ready", overall, failing.get("reason", ""), failing.get("message", ""))
        status["conditions"] = list(conditions.values())
        status["url"] = self._url(isvc, predictor.pods)
        status["address"] = {"url": status["url"]}
        isvc["status"] = status

    def _model_status(self, pods: list[Pod]) -> dict:
        if any(p.crashed for p in pods):
            return {
                "transitionStatus": "BlockedByFailedLoad",
                "lastFailureInfo": {"reason": "ModelLoadFailed", "message": "container exited with 1"},
            }
        if pods and all(p.ready for p in pods):
            return {"transitionStatus": "UpToDate"}
        return {"transitionStatus": "InProgress"}

    def _propagate_raw(self, isvc: dict, predictor: Predictor) -> None:
        """``PropagateRawStatus`` (inference_service_status.go), one Deployment."""
        status = copy.deepcopy(isvc.get("status") or {})
        status["deploymentMode"] = "RawDeployment"
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        deployment = predictor.deployment
        if deployment is None:
            self._set(conditions, "PredictorReady", "Unknown")
            return self._finish(isvc, predictor, conditions, status)
        deployment_conditions = {c["type"]: c for c in deployment["status"].get("conditions", [])}
        available = deployment_conditions.get("Available")
        progressing = deployment_conditions.get("Progressing")
        failure = deployment_conditions.get("ReplicaFailure")
        component = ("False", "", "")
        if available and available["status"] == "True":
            component = ("True", available["reason"], available["message"])
        if progressing:
            if progressing["status"] == "False":
                if progressing.get("message"):
                    component = ("False", progressing["reason"], progressing["message"])
            elif progressing["reason"] == "NewReplicaSetAvailable":
                component = ("True", progressing["reason"], progressing["message"])
            elif not (available and available["status"] == "True"):
                component = ("Unknown", progressing["reason"], progressing["message"])
        if available and available["status"] == "False":
            component = ("False", available["reason"], available["message"])
        if failure and failure["status"] == "True":
            component = ("False", failure["reason"], failure["message"])
        self._set(conditions, "PredictorReady", *component)
        if deployment["status"]:
            status["observedGeneration"] = deployment["status"].get("observedGeneration", 0)
        status["modelStatus"] = self._model_status(
            [p for p in predictor.pods if p.template == deployment["spec"]["template"]]
        )
        # reconcileCanaryDeployments' status (components/predictor.go, v0.20.0), written by the
        # reconcile that made the Deployments (not while the controller has not seen the change)
        if predictor.lag > 0:
            return self._finish(isvc, predictor, conditions, status)
        canaries = isvc["spec"].get("canary") or []
        name = isvc["metadata"]["name"]
        statuses = []
        for canary in canaries:
            current = predictor.canaries.get(f"{name}-{canary['predictor']['name']}-predictor")
            available = (current.deployment["status"].get("availableReplicas", 0)
                         if current and current.deployment else 0)
            statuses.append({"name": canary["predictor"]["name"], "ready": available > 0,
                             "trafficPercent": canary["trafficPercent"]})
        if statuses:
            status["canaryStatuses"] = statuses
            ready = all(item["ready"] for item in statuses)
            self._set(conditions, "CanaryPredictorReady", "True" if ready else "False",
                      "AllCanariesReady" if ready else "CanariesNotReady")
        else:
            status.pop("canaryStatuses", None)
            conditions.pop("CanaryPredictorReady", None)
        self._finish(isvc, predictor, conditions, status)

    def _kserve_knative(self, isvc: dict, predictor: Predictor) -> None:
        """KServe's Knative reconciler (``reconcilers/knative/ksvc_reconciler.go``, v0.20.0, as in
        v0.15.0) and Knative Serving behind it: a changed template makes a revision; the Knative
        Service's traffic is ``canaryTrafficPercent`` % to the latest revision and the rest to the
        InferenceService's ``latestRolledoutRevision`` (tag ``prev``) when both are set, else 100 %
        to the latest; Knative's route resolves ``latestRevision`` to the latest *ready* revision.
        A revision that no route target references scales to zero (its pod stops) after
        ``scale_to_zero_ticks`` ticks unrouted."""
        if predictor.lag > 0:
            predictor.lag -= 1
            return
        template = self._template(isvc)
        namespace = isvc["metadata"]["namespace"]
        if not predictor.revisions or predictor.revisions[-1]["template"] != template:
            predictor.ksvc_generation += 1
            name = f"{isvc['metadata']['name']}-predictor-{predictor.ksvc_generation:05d}"
            predictor.revisions.append(
                {"name": name, "template": template, "pod": self._start_pod(template, namespace)}
            )
            return
        latest = predictor.revisions[-1]
        self._advance_pod(latest["pod"], namespace)
        canary = isvc["spec"]["predictor"].get("canaryTrafficPercent")
        rolled_out = _component(isvc).get("latestRolledoutRevision", "")
        if canary is not None and rolled_out:
            targets = [{"latestRevision": True, "percent": canary}]
            if canary < 100:
                targets.append({"revisionName": rolled_out, "latestRevision": False, "percent": 100 - canary,
                                "tag": "prev"})
        else:
            targets = [{"latestRevision": True, "percent": 100}]
        ready = [r for r in predictor.revisions if r["pod"].ready]
        if not ready:
            return
        resolved = [{**t, "revisionName": ready[-1]["name"] if t["latestRevision"] else t["revisionName"]}
                    for t in targets]
        by_name = {r["name"]: r for r in predictor.revisions}
        if all(by_name.get(t["revisionName"], {}).get("pod") and by_name[t["revisionName"]]["pod"].ready
               for t in resolved):
            predictor.traffic = resolved  # the route moves once every target it names is ready
        routed = {t["revisionName"] for t in predictor.traffic if t["percent"] > 0}
        for revision in predictor.revisions:
            if revision["name"] in routed or revision is latest:
                revision["idle_ticks"] = 0
                continue
            revision["idle_ticks"] = revision.get("idle_ticks", 0) + 1
            if revision["idle_ticks"] > self.scale_to_zero_ticks and revision["pod"].handle is not None:
                revision["pod"].handle.stop()
                revision["pod"].handle = None
        predictor.pods = [r["pod"] for r in predictor.revisions  # what runs until it scales to zero
                          if r["name"] in routed or (r is latest and not r["pod"].crashed)
                          or (r["pod"].ready and r["idle_ticks"] <= self.scale_to_zero_ticks)]

    def _propagate_knative(self, isvc: dict, predictor: Predictor) -> None:
        """``PropagateStatus`` (inference_service_status.go, v0.20.0) from the Knative Service's status."""
        status = copy.deepcopy(isvc.get("status") or {})
        status["deploymentMode"] = "Serverless"
        conditions = {c["type"]: c for c in status.get("conditions", [])}
        if not predictor.revisions:
            self._set(conditions, "PredictorReady", "Unknown")
            return self._finish(isvc, predictor, conditions, status)
        latest = predictor.revisions[-1]
        ready = [r for r in predictor.revisions if r["pod"].ready]
        latest_ready = ready[-1]["name"] if ready else ""
        components = status.setdefault("components", {}).setdefault("predictor", {})
        components["latestCreatedRevision"] = latest["name"]
        revision_traffic: dict[str, int] = {}
        for target in predictor.traffic:
            revision_traffic[target["revisionName"]] = revision_traffic.get(target["revisionName"], 0) + \
                target["percent"]
        for target in predictor.traffic:
            if target["revisionName"] == latest_ready and target.get("latestRevision"):
                if components.get("latestRolledoutRevision") != latest_ready:
                    if target["percent"] == 100:  # track the last revision that is fully rolled out
                        if components.get("latestRolledoutRevision"):
                            components["previousRolledoutRevision"] = components["latestRolledoutRevision"]
                        components["latestRolledoutRevision"] = latest_ready
                # rolled out at 100 % and then rolled back over the same revision
                elif latest_ready == latest["name"] and target["percent"] < 100 and \
                        revision_traffic.get(target["revisionName"]) == 100 and \
                        components.get("previousRolledoutRevision"):
                    components["latestRolledoutRevision"] = components["previousRolledoutRevision"]
        if latest_ready:
            components["latestReadyRevision"] = latest_ready
        if predictor.traffic:
            components["traffic"] = copy.deepcopy(predictor.traffic)
        routed = {t["revisionName"] for t in predictor.traffic}
        route_ready = bool(predictor.traffic) and all(
            r["pod"].ready for r in predictor.revisions if r["name"] in routed)
        if latest["pod"].crashed:
            configuration = (
                "False",
                "RevisionFailed",
                f'Revision "{latest["name"]}" failed with message: Container failed with: exit status 1.',
            )
            service = configuration
        else:
            waiting = ("Unknown", "RevisionMissing",
                       f'Configuration "{isvc["metadata"]["name"]}-predictor" is waiting for a Revision to '
                       "become ready.")
            configuration = ("True", "", "") if latest["pod"].ready else waiting
            # The Knative Service is Ready when its configuration and its route are.
            service = ("True", "", "") if latest["pod"].ready and route_ready else waiting
        self._set(conditions, "PredictorConfigurationReady", *configuration)
        self._set(conditions, "PredictorRouteReady", "True" if route_ready else "Unknown")
        self._set(conditions, "PredictorReady", *service)
        status["observedGeneration"] = predictor.ksvc_generation
        status["modelStatus"] = self._model_status([latest["pod"]])
        self._finish(isvc, predictor, conditions, status)

    def revision_url(self, namespace: str, name: str, revision: str) -> str | None:
        """The URL of the ready pod of a Knative revision (``None`` when it has none)."""
        with self.lock:
            predictor = self.predictors.get((namespace, name))
            for item in predictor.revisions if predictor else []:
                if item["name"] == revision and item["pod"].ready and item["pod"].handle is not None:
                    return item["pod"].handle.url
        return None

    def pods(self, namespace: str, selector: dict[str, str]) -> list[dict]:
        """The pods a label selector matches, as the API returns them. A Knative revision's pod
        carries ``serving.knative.dev/revision``; a pod with a process behind it has
        ``status.podIP`` 127.0.0.1 and its ``kserve-container`` port is the one the process
        listens on (a kubelet's pod IP and container port, as seen from this machine)."""
        items = []
        for (ns, name), predictor in self.predictors.items():
            revisions = {id(r["pod"]): r["name"] for r in predictor.revisions}
            owners = [predictor, *predictor.canaries.values()]
            pods = [pod for owner in owners for pod in owner.pods]
            for index, pod in enumerate(pods):
                labels = dict(pod.template["metadata"]["labels"])
                if id(pod) in revisions:
                    labels["serving.knative.dev/revision"] = revisions[id(pod)]
                if ns != namespace or any(labels.get(k) != v for k, v in selector.items()):
                    continue
                statuses = [
                    {
                        "name": c["name"],
                        "ready": pod.ready,
                        "image": c["image"],
                        "imageID": f"docker-pullable://{c['image'].split(':')[0].split('@')[0]}@sha256:"
                        f"{hashlib.sha256(c['image'].encode()).hexdigest()}",
                    }
                    for c in pod.template["spec"]["containers"]
                ]
                spec = copy.deepcopy(pod.template["spec"])
                status: dict[str, Any] = {"containerStatuses": statuses}
                if pod.handle is not None:
                    status["podIP"] = "127.0.0.1"
                    port = int(urlparse(pod.handle.url).port or 80)
                    for container in spec["containers"]:
                        if container["name"] == "kserve-container":
                            container["ports"] = [{"name": "http1", "containerPort": port, "protocol": "TCP"}]
                items.append(
                    {
                        "metadata": {"name": f"{name}-predictor-{index}", "namespace": ns, "labels": labels},
                        "spec": spec,
                        "status": status,
                    }
                )
        return items

    def stop_pods(self) -> None:
        """Stop every pod process (end of a test)."""
        with self.lock:
            for predictor in self.predictors.values():
                for owner in (predictor, *predictor.canaries.values()):
                    self._stop(owner.pods)
                    owner.pods.clear()
                for revision in predictor.revisions:
                    self._stop([revision["pod"]])


class _Handler(BaseHTTPRequestHandler):
    state: KubeState

    def log_message(self, *args: Any) -> None:
        """Silence the per-request log."""

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _status(self, code: int, reason: str, message: str) -> None:
        self._send(
            code,
            {
                "kind": "Status",
                "apiVersion": "v1",
                "status": "Failure",
                "reason": reason,
                "message": message,
                "code": code,
            },
        )

    def _body(self) -> Any:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        self.state.requests.append((self.command, self.path, self.headers.get("Content-Type", ""), body))
        return body

    def _isvc_key(self) -> tuple[str, str | None]:
        assert self.path.startswith(ISVC_PREFIX), self.path
        parts = urlparse(self.path).path[len(ISVC_PREFIX) :].split("/")
        assert parts[1] == "inferenceservices", self.path
        return parts[0], parts[2] if len(parts) > 2 else None

    def _forward(self) -> bool:
        """Service traffic (``/svc/<namespace>/<name>/<path>``) goes to a ready pod; False if not."""
        if not self.path.startswith(SERVICE_PREFIX):
            return False
        import requests

        namespace, name, rest = self.path[len(SERVICE_PREFIX) :].split("/", 2)
        target = self.state.endpoint(namespace, name)
        if target is None:
            self._send(503, {"error": "no ready endpoints"})
            return True
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("content-type", "authorization")}
        response = requests.request(self.command, f"{target}/{rest}", data=data, headers=headers, timeout=120)
        self.send_response(response.status_code)
        self.send_header("Content-Type", response.headers.get("Content-Type", "application/json"))
        for name in ("server-timing", "x-model-version", "retry-after", "www-authenticate"):
            if name in response.headers:  # a Service passes every header on
                self.send_header(name, response.headers[name])
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)
        return True

    def do_PUT(self) -> None:
        if not self._forward():
            self._status(405, "MethodNotAllowed", "PUT is not served by this double")

    def do_GET(self) -> None:
        if self._forward():
            return
        self._body()
        state = self.state
        with state.lock:
            state.tick()
            path = urlparse(self.path)
            if path.path.startswith(DEPLOY_PREFIX):
                namespace, kind, name = path.path[len(DEPLOY_PREFIX) :].split("/")
                assert kind == "deployments", self.path
                for (ns, _), predictor in state.predictors.items():
                    for owner in (predictor, *predictor.canaries.values()):
                        deployment = owner.deployment
                        if ns == namespace and deployment and deployment["metadata"]["name"] == name:
                            return self._send(200, deployment)
                return self._status(404, "NotFound", f'deployments.apps "{name}" not found')
            if path.path.startswith(PODS_PREFIX) and path.path.endswith("/pods"):
                namespace = path.path[len(PODS_PREFIX) :].split("/")[0]
                raw = parse_qs(path.query).get("labelSelector", [""])[0]
                selector = dict(part.split("=", 1) for part in raw.split(",") if part)
                return self._send(
                    200, {"kind": "PodList", "apiVersion": "v1", "items": state.pods(namespace, selector)}
                )
            key = self._isvc_key()
            if key not in state.objects:
                return self._status(
                    404, "NotFound", f'inferenceservices.serving.kserve.io "{key[1]}" not found'
                )
            return self._send(200, state.objects[key])

    def do_POST(self) -> None:
        if self._forward():
            return
        body = self._body()
        namespace, _ = self._isvc_key()
        key = (namespace, body["metadata"]["name"])
        state = self.state
        with state.lock:
            if key in state.objects:
                return self._status(
                    409, "AlreadyExists", f'inferenceservices.serving.kserve.io "{key[1]}" already exists'
                )
            obj = json.loads(json.dumps(body))
            obj["metadata"].update(generation=1, resourceVersion="1", uid=f"uid-{key[1]}")
            obj.pop("status", None)
            mode = (obj["metadata"].get("annotations") or {}).get(MODE_ANNOTATION, state.default_mode)
            state.objects[key] = obj
            state.predictors[key] = Predictor("raw" if mode in RAW_MODES else "knative", state.controller_lag)
            return self._send(201, obj)

    def do_PATCH(self) -> None:
        patch = self._body()
        key = self._isvc_key()
        state = self.state
        with state.lock:
            if self.headers.get("Content-Type") != "application/merge-patch+json":
                return self._status(415, "UnsupportedMediaType", self.headers.get("Content-Type", ""))
            if key not in state.objects:
                return self._status(
                    404, "NotFound", f'inferenceservices.serving.kserve.io "{key[1]}" not found'
                )
            old = state.objects[key]
            # A resourceVersion in the patch is a precondition: k8s.io/apiserver
            # pkg/registry/generic/registry/store.go, Store.Update, compares the patched object's
            # resourceVersion with the stored one and answers NewConflict(OptimisticLockErrorMsg).
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != old["metadata"]["resourceVersion"]:
                return self._status(
                    409, "Conflict", f'Operation cannot be fulfilled on inferenceservices.serving.kserve.io '
                    f'"{key[1]}": the object has been modified; please apply your changes to the latest '
                    "version and try again")
            new = json.loads(json.dumps(merge_patch(old, patch)))
            if new["spec"] != old["spec"]:
                new["metadata"]["generation"] = old["metadata"]["generation"] + 1
                state.predictors[key].lag = state.controller_lag
            new["metadata"]["resourceVersion"] = str(int(old["metadata"]["resourceVersion"]) + 1)
            new["status"] = old.get("status", {})
            state.objects[key] = new
            return self._send(200, new)


@contextlib.contextmanager
def kube_fake_server(**knobs: Any) -> Iterator[tuple[str, KubeState]]:
    """Serve the double on 127.0.0.1 (free port); yield ``(http://host:port, state)``.

    Args:
        knobs: :class:`KubeState` fields (``default_mode``, ``pod_start_ticks``, ``pod_runner``, ...).
    """
    state = KubeState(**knobs)
    handler = type("Handler", (_Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state.base_url, state
    finally:
        server.shutdown()
        server.server_close()
        state.stop_pods()


def kubeconfig(path: Path, server: str, namespace: str = "default") -> Path:
    """Write a kubeconfig pointing at a local API double (with a token, as a real one would have)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "kube-token"}}],
        "contexts": [
            {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": namespace}}
        ],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))
    return path
