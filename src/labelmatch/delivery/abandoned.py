"""A canary whose deploy step stopped before deciding it: a deadline, and who settles it.

A canary deploy (:func:`labelmatch.delivery.kserve.deploy_canary`) rolls its canary back itself on
any error, but a step that is killed (its pod evicted or OOM-killed, the run terminated, the node
gone) leaves the canary at its traffic share with nobody watching. So, before it patches the
InferenceService, the deploy stores a ``started`` delivery event in the serving state
(:meth:`labelmatch.state.serving_state.ServingState.save_delivery_event`) with:

* a **deadline**: the latest time its own step can still be deciding (the rollout wait, the
  longest window, one more look, the decision's patch and wait, :data:`DEADLINE_SLACK_S`);
* what a rollback needs: the KServe mode, the stable revision or Deployment, the canary's name and
  (Serverless) the stable predictor's containers.

Every replica of the service exports the newest event (``labelmatch_canary_decision{decision=
"started"}`` and ``labelmatch_canary_deadline_timestamp_seconds``), so the serving chart's
PrometheusRule alerts once a canary outlives its deadline (``LabelmatchCanaryOverdue``). The
serving chart's CronJob (``labelmatch settle-canary``) rolls it back once its deadline has passed,
and the next deploy of the service settles it too (:func:`settle_abandoned_canary`): before the
deadline another canary or shadow is refused (the first step may still be watching), unless it is
a retry of the same pipeline run (whose earlier attempt died); after it the abandoned canary is
rolled back, if the InferenceService still carries its release, and a ``rolled_back`` event
(``reason: abandoned``) takes the ``started`` one's place. A replace deploy is never refused (an
operator's rollback must not wait); it clears the canary itself and records it as ``superseded``.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any

from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.delivery.rules import CanaryRules
from labelmatch.platform.kserve import ANNOTATION_PREFIX, DeployConfig

log = logging.getLogger(__name__)

#: The decision a canary has while its deploy step watches it.
STARTED = "started"
#: Seconds added to a canary's longest run for its deadline (scheduling, slow API answers).
DEADLINE_SLACK_S = 120.0


def canary_deadline(config: DeployConfig, rules: CanaryRules, start: float) -> float:
    """The latest Unix time a canary deploy started at ``start`` can still be deciding it.

    Args:
        config: The deploy's settings (``timeout_s`` bounds each wait on KServe).
        rules: The canary's rules (its longest window and how often it looks).
        start: When the canary's patch is sent.
    """
    # The canary's rollout, its longest window and one more look, then the decision: a Serverless
    # rollback waits twice (the stable's revision rebuilt, then the traffic back).
    return start + config.timeout_s + rules.longest_window_s + rules.check_every_s + 2 * config.timeout_s \
        + DEADLINE_SLACK_S


def started_event(deadline: float, mode: str, stable: str, canary: str,
                  stable_containers: list[dict[str, Any]] | None, traffic_percent: int,
                  run_id: str = "") -> dict[str, Any]:
    """The ``started`` event's body: its deadline, its run and what a rollback by another step needs."""
    return {"deadline": deadline, "mode": mode, "stable": stable, "canary": canary,
            "stable_containers": stable_containers, "traffic_percent": traffic_percent, "run_id": run_id,
            "results": []}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def settle_abandoned_canary(api: Any, config: DeployConfig, state_url: str | None, *, replace: bool = False,
                            run_id: str = "", now: float | None = None,
                            overdue_only: bool = False) -> str | None:
    """Settle a canary of ``config.service`` that was started and never decided.

    Args:
        api: A ``CustomObjectsApi`` (``None``: in-cluster or kubeconfig, made only when needed).
        config: The service, namespace and timeouts (of the deploy about to run).
        state_url: The serving state; ``None``: nothing is known, nothing is done.
        replace: Called after a replace (or a rollback to an earlier release), which cleared any
            canary: never refused; an undecided canary is recorded as ``superseded``.
        run_id: The KFP run deploying. A canary started by the same run was its own earlier attempt
            (the step is retried because that one died): it is rolled back at once.
        now: The time to judge the deadline by (default: now).
        overdue_only: Settle only a canary past its deadline, and leave one before it alone
            (return ``started``) instead of refusing: the scheduled reaper
            (``labelmatch settle-canary``), which deploys nothing.

    Returns:
        What was done: ``None`` (no undecided canary), ``started`` (``overdue_only``: not yet
        overdue, left alone), ``rolled_back`` or ``superseded``.

    Raises:
        ConfigError: A canary or shadow deploy while another canary's step may still be deciding it
            (before its deadline).
        LabelmatchError: The rollback failed (the InferenceService is left as it was).
    """
    if not state_url:
        return None
    from labelmatch.delivery.kserve import save_decision
    from labelmatch.state.serving_state import ServingState

    state = ServingState(state_url)
    try:
        found = state.latest_delivery_event(config.service)
    finally:
        state.close()
    if found is None or found[1].get("decision") != STARTED:
        return None
    event = found[1]
    release_id, deadline = event.get("release_id", ""), float(event.get("deadline") or 0.0)
    now = time.time() if now is None else now
    where = f"InferenceService {config.namespace}/{config.service}"
    retried = bool(run_id) and event.get("run_id") == run_id
    if now < deadline and not (replace or retried):
        if overdue_only:
            log.info("%s: the canary of release %s is being decided until %s", where, release_id,
                     _iso(deadline))
            return STARTED
        raise ConfigError(f"{where}: the canary of release {release_id} is still being decided until "
                          f"{_iso(deadline)} (its deploy step may be watching it); deploy again after that")
    if api is None:
        from labelmatch.platform.kserve import kube_custom_objects

        api = kube_custom_objects()
    reason = "abandoned" if now >= deadline or retried else "replaced while being decided"
    decision = _undo(api, config, event, replace=replace, retried=retried)
    # Not over an event another step stored meanwhile (a new canary's "started").
    stored = save_decision(state_url, config.service, release_id, "canary", decision,
                           {"reason": reason, "deadline": deadline, "results": []}, newest_id=found[0])
    if not stored:
        log.warning("%s: another step stored a delivery event meanwhile; the %s of release %s is not "
                    "recorded over it", where, decision, release_id)
    return decision


#: How often a rollback is retried when the InferenceService changes between its read and its patch.
_ATTEMPTS = 3


def _undo(api: Any, config: DeployConfig, event: dict[str, Any], *, replace: bool, retried: bool) -> str:
    """Roll the undecided canary of ``event`` back if the InferenceService still carries its release.

    The rollback patch carries the ``resourceVersion`` that was read, so a deploy that changed the
    InferenceService in between (its own canary, a replace) is never undone: the API server answers
    409 and the object is read again.

    Returns:
        ``rolled_back``, or ``superseded`` (a replace, or another release carried now).
    """
    from labelmatch.delivery.kserve import ChangedMeanwhile, KServeTraffic, _predictor_status, get_isvc

    release_id, where = event.get("release_id", ""), f"InferenceService {config.namespace}/{config.service}"
    for _ in range(_ATTEMPTS):
        isvc = get_isvc(api, config) or {}
        metadata = isvc.get("metadata") or {}
        carried = (metadata.get("annotations") or {}).get(ANNOTATION_PREFIX + "release-id")
        if replace or carried != release_id:
            why = "this replace cleared it" if replace else f"it now carries release {carried}"
            log.warning("%s: the undecided canary of release %s is recorded as superseded (%s)", where,
                        release_id, why)
            return "superseded"
        log.warning("%s: the canary of release %s has no decision and nobody deciding it (%s); "
                    "rolling it back", where, release_id,
                    "an earlier attempt of this run" if retried else
                    f"its deadline {_iso(float(event.get('deadline') or 0.0))} passed")
        mode, canary = event.get("mode", "raw"), event.get("canary", "")
        if mode == "knative" and not canary:  # its revision was named after the event was stored
            canary = _predictor_status(isvc).get("latestCreatedRevision", "")
        traffic = KServeTraffic(api, config, mode, event.get("stable", ""), canary,
                                event.get("stable_containers"))
        try:
            traffic.rollback(resource_version=metadata.get("resourceVersion"))
            return "rolled_back"
        except ChangedMeanwhile as exc:
            log.info("%s; reading it again", exc)
    raise LabelmatchError(f"{where} changed under each of {_ATTEMPTS} rollbacks of the canary of release "
                          f"{release_id}; nothing was rolled back")


__all__ = ["DEADLINE_SLACK_S", "STARTED", "canary_deadline", "settle_abandoned_canary", "started_event"]
