"""Watch a canary on its own live signals and promote it or roll it back.

:func:`watch_canary` is the whole decision, whatever routes the traffic (KServe in a cluster,
:mod:`labelmatch.delivery.kserve`; a splitter in the tests). It reads:

* **error rate and latency** from the ``/metrics`` of every canary pod and every stable pod,
  scraped at the start and at every look (:mod:`labelmatch.delivery.signals`): the canary's 5xx
  share and p99, and the stable's p99 over the same window as the baseline;
* **drift and low confidence** from the canary's logged predictions in the serving state
  (``prediction_log``, the rows of the canary's model version in the window), tested against the
  reference profile its export shipped, with the monitor's own tests (:mod:`labelmatch.monitoring`);
* **user feedback** from the feedback store: scores given to the canary's predictions and to the
  stable's in the window.

Every rule of :class:`~labelmatch.delivery.rules.CanaryRules` gives a :class:`RuleResult`
(passed, failed, or not run with the reason); all that ran must pass for a promotion. The
decision, every rule's figures and the signals behind them form a :class:`CanaryDecision`, which
the deploy records in the release record and the serving state (every replica exports it as
``labelmatch_canary_decision``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from labelmatch.delivery.rules import CanaryRules
from labelmatch.delivery.signals import PodCounts, TrafficStats, scrape, window_stats

log = logging.getLogger(__name__)

Decision = Literal["promoted", "rolled_back"]


class TrafficControl(Protocol):
    """Who routes the traffic: where the canary's and the stable's pods answer, and the two ends."""

    def canary_pods(self) -> list[str]:
        """Base URLs of the canary's pods (their ``/metrics``)."""
        ...

    def stable_pods(self) -> list[str]:
        """Base URLs of the stable's pods."""
        ...

    def promote(self) -> None:
        """Give the canary all the traffic."""
        ...

    def rollback(self) -> None:
        """Give the stable all the traffic back."""
        ...


@dataclass
class CanaryTarget:
    """What is compared.

    Attributes:
        canary_version: The canary's model version (its prediction log rows and feedback).
        stable_version: The stable's model version.
        profile: The canary's reference profile (``None``: its export had no validation data; the
            drift rules do not run).
        state_url: SQLAlchemy URL of the serving state (``None``: drift and feedback rules do not run).
        feedback_url: The feedback store (default: ``state_url``).
    """

    canary_version: str
    stable_version: str
    profile: Any = None
    state_url: str | None = None
    feedback_url: str | None = None


@dataclass
class RuleResult:
    """One rule's verdict.

    Attributes:
        rule: The rule's name (a :class:`CanaryRules` field, or ``drift:<signal>``).
        passed: ``True``/``False``; ``None`` when it did not run (``detail`` says why).
        value: What was measured.
        threshold: What it was held to.
        detail: The figures behind it.
    """

    rule: str
    passed: bool | None
    value: float | None = None
    threshold: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class CanaryDecision:
    """The outcome of a canary and its evidence (recorded in the release record).

    Attributes:
        decision: ``promoted`` or ``rolled_back``.
        reason: One line: the rules that failed, or that all held.
        traffic_percent: The canary's share of the traffic.
        window: ``{"start", "end", "seconds"}`` (Unix times).
        canary_version: Its model version.
        stable_version: The stable's.
        results: Every rule's :class:`RuleResult`.
        canary: The canary's traffic (:meth:`TrafficStats.to_json`).
        stable: The stable's.
        drift: The drift tests' signals (``{}`` when they did not run).
        feedback: ``{"canary": {"n", "mean"}, "stable": {...}}``.
        rules: The rules in force.
        decided_at: ISO 8601 UTC.
    """

    decision: Decision
    reason: str
    traffic_percent: int
    window: dict[str, float]
    canary_version: str
    stable_version: str
    results: list[RuleResult]
    canary: dict[str, Any]
    stable: dict[str, Any]
    drift: dict[str, Any]
    feedback: dict[str, Any]
    rules: dict[str, Any]
    decided_at: str

    @property
    def failed(self) -> list[str]:
        """The rules that failed."""
        return [result.rule for result in self.results if result.passed is False]

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return {"strategy": "canary", **asdict(self)}


def _scores_in_window(url: str, version: str, start: float, end: float) -> list[int]:
    """User scores given to ``version``'s predictions in ``[start, end)``."""
    from labelmatch.feedback.feedback_store import FeedbackStore

    [scores] = FeedbackStore(url).scores_between(version, (start, end))
    return scores


def traffic_rules(rules: CanaryRules, canary: TrafficStats, stable: TrafficStats) -> list[RuleResult]:
    """Error-rate and latency rules over the window's traffic."""
    results = []
    enough = canary.requests >= rules.min_requests
    short = {"requests": int(canary.requests), "min_requests": rules.min_requests}
    if rules.max_error_rate is not None:
        if enough:
            rate = canary.error_rate or 0.0
            results.append(RuleResult("max_error_rate", rate <= rules.max_error_rate, rate,
                                      rules.max_error_rate,
                                      {"errors": int(canary.errors), "requests": int(canary.requests)}))
        else:
            results.append(RuleResult("max_error_rate", None, None, rules.max_error_rate,
                                      {"skipped": "too few canary requests", **short}))
    p99 = canary.latency(0.99)
    if rules.max_p99_latency_s is not None:
        if enough and p99 is not None:
            results.append(RuleResult("max_p99_latency_s", p99 <= rules.max_p99_latency_s, p99,
                                      rules.max_p99_latency_s, {"p50_s": canary.latency(0.5)}))
        else:
            results.append(RuleResult("max_p99_latency_s", None, None, rules.max_p99_latency_s,
                                      {"skipped": "too few canary requests", **short}))
    if rules.max_p99_latency_ratio is not None:
        baseline = stable.latency(0.99)
        if enough and p99 is not None and baseline is not None:
            bound = rules.max_p99_latency_ratio * baseline + rules.latency_slack_s
            ratio = p99 / baseline if baseline else None
            results.append(RuleResult("max_p99_latency_ratio", p99 <= bound, ratio,
                                      rules.max_p99_latency_ratio,
                                      {"canary_p99_s": p99, "stable_p99_s": baseline, "bound_s": bound,
                                       "slack_s": rules.latency_slack_s}))
        else:
            why = "too few canary requests" if not enough else "no stable traffic in the window"
            results.append(RuleResult("max_p99_latency_ratio", None, None, rules.max_p99_latency_ratio,
                                      {"skipped": why, **short, "stable_requests": int(stable.requests)}))
    return results


def drift_rules(rules: CanaryRules, target: CanaryTarget, start: float,
                end: float) -> tuple[list[RuleResult], dict[str, Any]]:
    """The drift tests of the canary's logged predictions against its reference profile."""
    names = [f"drift:{signal}" for signal in rules.drift_signals]
    if not names:
        return [], {}
    why = None
    if target.state_url is None:
        why = "no serving state to read the canary's logged predictions from"
    elif target.profile is None:
        why = "the canary's artifact has no reference profile (exported without validation data)"
    elif target.canary_version == target.stable_version:
        why = ("the canary and the stable serve the same model version: their logged predictions cannot "
               "be told apart")
    if why:
        return [RuleResult(name, None, detail={"skipped": why}) for name in names], {}
    from labelmatch.monitoring.monitor import MonitorConfig, evaluate_window
    from labelmatch.state.serving_state import ServingState

    state = ServingState(target.state_url)  # type: ignore[arg-type]
    try:
        records = state.logged_predictions(target.canary_version, start, end)
    finally:
        state.close()
    config = MonitorConfig(alpha=rules.drift_alpha, rules=list(rules.drift_signals),
                           min_documents=rules.min_documents, permutations=rules.permutations)
    report = evaluate_window(target.profile, records, config, target.canary_version, start=start, end=end)
    results = []
    for signal in rules.drift_signals:
        found = report.signals.get(signal)
        if found is None:
            results.append(RuleResult(f"drift:{signal}", None, threshold=rules.drift_alpha,
                                      detail={"skipped": "too few logged canary predictions",
                                              "documents": report.window["documents"],
                                              "min_documents": rules.min_documents}))
            continue
        results.append(RuleResult(f"drift:{signal}", not found["fired"], found["p_value"], rules.drift_alpha,
                                  {"statistic": found["statistic"], **found["detail"]}))
    evidence = {"documents": report.window["documents"], "skipped": report.window["skipped"],
                "low_confidence_share": report.low_confidence_share,
                "signals": {name: report.signals[name] for name in rules.drift_signals
                            if name in report.signals}}
    return results, evidence


def feedback_rules(rules: CanaryRules, target: CanaryTarget, start: float,
                   end: float) -> tuple[list[RuleResult], dict[str, Any]]:
    """The feedback rules: the canary's mean user score, and its drop below the stable's."""
    wanted = [name for name in ("min_mean_feedback", "max_feedback_drop") if getattr(rules, name) is not None]
    if not wanted:
        return [], {}
    url = target.feedback_url or target.state_url
    why = None
    if url is None:
        why = "no feedback store to read"
    elif target.canary_version == target.stable_version:
        why = "the canary and the stable serve the same model version: their feedback cannot be told apart"
    if why:
        return [RuleResult(name, None, threshold=getattr(rules, name), detail={"skipped": why})
                for name in wanted], {}
    canary = _scores_in_window(url, target.canary_version, start, end)  # type: ignore[arg-type]
    stable = _scores_in_window(url, target.stable_version, start, end)  # type: ignore[arg-type]

    def summary(scores: Sequence[int]) -> dict[str, Any]:
        return {"n": len(scores), "mean": sum(scores) / len(scores) if scores else None}

    evidence = {"canary": summary(canary), "stable": summary(stable)}
    results = []
    mean = evidence["canary"]["mean"]
    if rules.min_mean_feedback is not None:
        if len(canary) >= rules.min_feedback:
            results.append(RuleResult("min_mean_feedback", mean >= rules.min_mean_feedback, mean,
                                      rules.min_mean_feedback, {"n": len(canary)}))
        else:
            results.append(RuleResult("min_mean_feedback", None, mean, rules.min_mean_feedback,
                                      {"skipped": "too little feedback on the canary", "n": len(canary),
                                       "min_feedback": rules.min_feedback}))
    if rules.max_feedback_drop is not None:
        if min(len(canary), len(stable)) >= rules.min_feedback:
            from scipy.stats import mannwhitneyu

            drop = evidence["stable"]["mean"] - mean
            p_value = float(mannwhitneyu(canary, stable, alternative="less").pvalue)
            failed = drop > rules.max_feedback_drop and p_value < rules.feedback_alpha
            results.append(RuleResult("max_feedback_drop", not failed, drop, rules.max_feedback_drop,
                                      {"p_value": p_value, "alpha": rules.feedback_alpha,
                                       "canary_mean": mean, "stable_mean": evidence["stable"]["mean"],
                                       "canary_n": len(canary), "stable_n": len(stable)}))
        else:
            results.append(RuleResult("max_feedback_drop", None, None, rules.max_feedback_drop,
                                      {"skipped": "too little feedback on one side", "canary_n": len(canary),
                                       "stable_n": len(stable), "min_feedback": rules.min_feedback}))
    return results, evidence


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def watch_canary(rules: CanaryRules, control: TrafficControl, target: CanaryTarget,
                 sleep: Callable[[float], None] = time.sleep, act: bool = True) -> CanaryDecision:
    """Watch the canary for ``rules.window_s`` (longer when it has too few requests), decide, and
    promote it or roll it back through ``control``.

    Rolls back at once when a canary pod's ``/metrics`` cannot be read, or when its error rate
    fails with ``min_requests`` behind it; otherwise decides at the end of the window on every rule.

    Args:
        rules: The rules.
        control: The traffic's routing (pods to scrape, promote, roll back).
        target: Model versions, reference profile, serving state.
        sleep: How to wait between looks (tests).
        act: Promote or roll back (``False``: only decide).

    Returns:
        The decision with its evidence.
    """
    start = time.time()
    before: dict[str, dict[str, PodCounts]] = {
        "canary": scrape(control.canary_pods())[0], "stable": scrape(control.stable_pods())[0]}
    log.info("canary: watching %d%% of the traffic for %g s (rules: %s)", rules.traffic_percent,
             rules.window_s, ", ".join(name for name, value in rules.to_json().items()
                                       if name.startswith(("max_", "min_mean")) and value is not None))
    early: str | None = None
    while True:
        sleep(rules.check_every_s)
        now = time.time()
        canary_now, canary_down = scrape(control.canary_pods())
        stable_now, stable_down = scrape(control.stable_pods())
        canary = window_stats(before["canary"], canary_now, canary_down)
        stable = window_stats(before["stable"], stable_now, stable_down)
        elapsed = now - start
        log.info("canary: %.0f s, %d requests (%d 5xx), p99 %s", elapsed, canary.requests, canary.errors,
                 canary.latency(0.99))
        if canary_down or not canary_now:
            early = f"canary pod(s) not answering: {canary_down or 'none found'}"
            break
        traffic = traffic_rules(rules, canary, stable)
        if any(r.rule == "max_error_rate" and r.passed is False for r in traffic):
            early = "the error rate failed before the window's end"
            break
        if elapsed >= rules.window_s and canary.requests >= rules.min_requests:
            break
        if elapsed >= rules.longest_window_s:
            break
    end = time.time()
    results = traffic_rules(rules, canary, stable)
    drift: dict[str, Any] = {}
    feedback: dict[str, Any] = {}
    if early is None:
        more, drift = drift_rules(rules, target, start, end)
        results += more
        more, feedback = feedback_rules(rules, target, start, end)
        results += more
    failed = [r.rule for r in results if r.passed is False]
    if early is not None:
        decision: Decision = "rolled_back"
        reason = early + (f" ({', '.join(failed)})" if failed else "")
        if not failed:
            results.append(RuleResult("canary_reachable", False, detail={"unreachable": canary.unreachable}))
    elif failed:
        decision, reason = "rolled_back", f"rule(s) failed: {', '.join(failed)}"
    elif canary.requests < rules.min_requests:
        decision = "promoted" if rules.on_insufficient == "promote" else "rolled_back"
        reason = (f"only {int(canary.requests)} canary requests in {end - start:.0f} s (min_requests "
                  f"{rules.min_requests}); on_insufficient: {rules.on_insufficient}")
    else:
        ran = [r.rule for r in results if r.passed]
        decision, reason = "promoted", f"every rule held: {', '.join(ran) or 'none ran'}"
    result = CanaryDecision(
        decision=decision, reason=reason, traffic_percent=rules.traffic_percent,
        window={"start": start, "end": end, "seconds": round(end - start, 3)},
        canary_version=target.canary_version, stable_version=target.stable_version, results=results,
        canary=canary.to_json(), stable=stable.to_json(), drift=drift, feedback=feedback,
        rules=rules.to_json(), decided_at=_iso(end))
    log.info("canary %s: %s", decision, reason)
    if act:
        (control.promote if decision == "promoted" else control.rollback)()
    return result


__all__ = ["CanaryDecision", "CanaryTarget", "RuleResult", "TrafficControl", "drift_rules", "feedback_rules",
           "traffic_rules", "watch_canary"]
