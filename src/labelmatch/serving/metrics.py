"""Prometheus metrics of the model server and the ASGI guard that enforces request limits.

KServe already exports ``request_preprocess_seconds``, ``request_predict_seconds`` and
``request_postprocess_seconds`` (per model) on ``/metrics``; these add what an operator of a
label-matching service asks about: end-to-end latency per endpoint, model-only latency,
documents per request, how often each label is predicted, and errors by endpoint and status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: What ``labelmatch_canary_decision`` may say of a service's newest canary
#: (:mod:`labelmatch.delivery.abandoned` adds ``started`` and ``superseded``).
CANARY_DECISIONS = ("started", "promoted", "rolled_back", "superseded")
#: Request-time labels are not counted by name: clients choose them, and an unbounded label
#: value set would blow up the metric's cardinality.
REQUEST_LABEL = "_request_label"

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


class ServeMetrics:
    """The labelmatch metrics, registered once per process.

    Args:
        registry: Where to register (KServe serves the default registry on ``/metrics``).
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY):
        self.request_seconds = Histogram(
            "labelmatch_request_seconds", "End-to-end HTTP request latency by endpoint.",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.inference_seconds = Histogram(
            "labelmatch_inference_seconds", "Model-only latency (tokenise + ONNX Runtime + scoring).",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.batch_documents = Histogram(
            "labelmatch_batch_documents", "Documents per prediction request.",
            buckets=BATCH_BUCKETS, registry=registry)
        self.label_predictions = Counter(
            "labelmatch_label_predictions_total", "Documents predicted with each served label.",
            ["label"], registry=registry)
        self.errors = Counter(
            "labelmatch_errors_total", "Responses with status >= 400 by endpoint and status.",
            ["endpoint", "status"], registry=registry)
        self.feedback = Counter(
            "labelmatch_feedback_total", "Feedback records stored.", registry=registry)
        self.refused = Counter(
            "labelmatch_refused_total",
            "Writes refused (feedback, label sets) by endpoint and reason: unauthenticated, forbidden, "
            "rate_limited, invalid, unknown_prediction, store_unavailable.",
            ["endpoint", "reason"], registry=registry)
        self.fp32_fallback = Counter(
            "labelmatch_fp32_fallback_documents_total",
            "Documents re-embedded by the fp32 graph because an int8 score sat near a decision boundary.",
            registry=registry)
        self.state_seconds = Histogram(
            "labelmatch_state_seconds", "Time writing one batch of prediction records to the shared state.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0), registry=registry)
        self.state_errors = Counter(
            "labelmatch_state_errors_total",
            "Prediction records dropped (shared state unreachable or the record queue full).",
            registry=registry)
        self.state_waiting = Gauge(
            "labelmatch_state_waiting_records",
            "Prediction records not written yet: queued, or held back while the shared state is unreachable "
            "(written when it is back).",
            registry=registry)
        self.label_set_version = Gauge(
            "labelmatch_label_set_version", "Version of the served label set (0: the model's own).",
            registry=registry)
        self.logged_predictions = Counter(
            "labelmatch_logged_predictions_total",
            "Predictions written to the prediction log that labelmatch monitor reads (--log_sample_rate).",
            registry=registry)
        # The newest `labelmatch monitor` report of the served model version (docs/monitoring.md).
        self.drift_detected = Gauge(
            "labelmatch_drift_detected", "1 when the newest monitor report fired a drift rule, else 0.",
            registry=registry)
        self.drift_signal_fired = Gauge(
            "labelmatch_drift_signal_fired", "1 when the signal's rule fired in the newest monitor report.",
            ["signal"], registry=registry)
        self.drift_signal_p_value = Gauge(
            "labelmatch_drift_signal_p_value", "p-value of the signal's test (newest monitor report).",
            ["signal"], registry=registry)
        self.drift_signal_statistic = Gauge(
            "labelmatch_drift_signal_statistic", "The signal's statistic (newest monitor report).",
            ["signal"], registry=registry)
        self.low_confidence_share = Gauge(
            "labelmatch_low_confidence_share",
            "Share of documents whose highest score is below the default threshold, in the monitored window.",
            registry=registry)
        self.monitor_window_documents = Gauge(
            "labelmatch_monitor_window_documents", "Logged predictions in the newest report's window.",
            registry=registry)
        self.monitor_report_timestamp = Gauge(
            "labelmatch_monitor_report_timestamp_seconds", "Unix time of the newest monitor report.",
            registry=registry)
        # Shadow traffic (labelmatch.serving.shadow) and progressive delivery (labelmatch.delivery).
        self.shadow_documents = Counter(
            "labelmatch_shadow_documents_total",
            "Documents mirrored to the shadow, by result: agree (same label set), disagree, error "
            "(no answer).",
            ["result"], registry=registry)
        self.shadow_dropped = Counter(
            "labelmatch_shadow_dropped_total", "Requests not mirrored because the mirror's queue was full.",
            registry=registry)
        self.shadow_seconds = Histogram(
            "labelmatch_shadow_seconds", "Round trip of a mirrored request to the shadow.",
            buckets=LATENCY_BUCKETS, registry=registry)
        self.canary_decision = Gauge(
            "labelmatch_canary_decision",
            "1 for the decision of the service's newest canary (started: not decided yet; promoted, "
            "rolled_back, superseded), 0 for the others.",
            ["decision"], registry=registry)
        self.canary_deadline = Gauge(
            "labelmatch_canary_deadline_timestamp_seconds",
            "Unix time by which the service's newest started canary must be decided (its deploy step "
            "stopped if not).", registry=registry)
        self.canary_rule_failed = Gauge(
            "labelmatch_canary_rule_failed",
            "1 when the rule failed in the service's newest canary decision.",
            ["rule"], registry=registry)
        self.canary_decision_timestamp = Gauge(
            "labelmatch_canary_decision_timestamp_seconds",
            "Unix time of the service's newest canary decision.",
            registry=registry)
        self.shadow_agreement = Gauge(
            "labelmatch_shadow_report_agreement",
            "Label-set agreement of the service's newest shadow report (serving vs shadow).",
            registry=registry)

    def count_labels(self, predicted: Iterable[list[str]], served: set[str]) -> None:
        """Count predicted labels; request-time labels are pooled under one name."""
        for labels in predicted:
            for label in labels:
                self.label_predictions.labels(label if label in served else REQUEST_LABEL).inc()


    def show_monitor_report(self, report: dict[str, Any]) -> None:
        """Set the drift gauges from a ``labelmatch monitor`` report (:class:`MonitorReport` JSON)."""
        self.drift_detected.set(1 if report.get("drift") else 0)
        for name, signal in (report.get("signals") or {}).items():
            self.drift_signal_fired.labels(name).set(1 if signal.get("fired") else 0)
            if signal.get("p_value") is not None:
                self.drift_signal_p_value.labels(name).set(signal["p_value"])
            if signal.get("statistic") is not None:
                self.drift_signal_statistic.labels(name).set(signal["statistic"])
        share = (report.get("low_confidence_share") or {}).get("window")
        if share is not None:
            self.low_confidence_share.set(share)
        self.monitor_window_documents.set((report.get("window") or {}).get("documents", 0))
        self.monitor_report_timestamp.set(report.get("created_at", 0))


    def show_delivery_event(self, event: dict[str, Any]) -> None:
        """Set the canary (or shadow) gauges from a decision stored by the deploy
        (:meth:`labelmatch.state.serving_state.ServingState.save_delivery_event`)."""
        if event.get("strategy") == "shadow":
            agreement = (event.get("report") or {}).get("agreement")
            if agreement is not None:
                self.shadow_agreement.set(agreement)
            return
        decision = event.get("decision")
        for name in CANARY_DECISIONS:
            self.canary_decision.labels(name).set(1 if decision == name else 0)
        if decision == "started":
            self.canary_rule_failed.clear()  # the previous canary's rules
            self.canary_deadline.set(event.get("deadline", 0))
        for result in event.get("results") or []:
            failed = 1 if result.get("passed") is False else 0
            self.canary_rule_failed.labels(result.get("rule", "?")).set(failed)
        self.canary_decision_timestamp.set(event.get("created_at", 0))


def endpoint_of(path: str) -> str:
    """A small, fixed set of endpoint names for metric labels."""
    if path.endswith(":predict"):
        return "v1_predict"
    if path.endswith("/infer"):
        return "v2_infer"
    for suffix in ("labels", "feedback", "metrics"):
        if path.endswith("/" + suffix):
            return suffix
    if "/health/" in path or path.endswith("/ready") or path == "/":
        return "health"
    return "other"


@dataclass
class RequestLimits:
    """Bounds on what one request may carry.

    Attributes:
        max_body_bytes: Largest accepted request body (413 above it).
        max_docs: Most documents in one prediction request (413 above it).
        max_chars: Longest accepted document in characters (413 above it); texts within it
            are still truncated to the model's token limit by the tokenizer.
    """

    max_body_bytes: int = 2 * 1024 * 1024
    max_docs: int = 64
    max_chars: int = 20_000


class RequestGuard:
    """ASGI middleware: body-size limit, JSON check, latency and error metrics, version header.

    The body is read here (bounded by ``max_body_bytes``) and replayed to the application, so
    an oversized or chunked body is refused before any handler parses it, and bad JSON gets
    the same precise 400 on the v1 and v2 prediction paths.

    Args:
        app: The wrapped ASGI application.
        metrics: Where latency and errors are recorded.
        limits: The body-size limit.
        version: Returns the model version for the ``x-model-version`` response header.
    """

    def __init__(self, app: ASGIApp, metrics: ServeMetrics, limits: RequestLimits,
                 version: Callable[[], str]):
        self.app = app
        self.metrics = metrics
        self.limits = limits
        self.version = version

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = endpoint_of(scope["path"])
        start = time.perf_counter()
        status = {"code": 500}

        async def send_with_version(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                version = (b"x-model-version", self.version().encode())
                message["headers"] = [*message.get("headers", []), version]
            await send(message)

        try:
            if scope["method"] in ("POST", "PUT"):
                body, problem = await self._read_body(scope, receive)
                if problem is not None:
                    await _json_error(send_with_version, *problem)
                    return
                receive = _replay(body, receive)
            await self.app(scope, receive, send_with_version)
        finally:
            self.metrics.request_seconds.labels(endpoint).observe(time.perf_counter() - start)
            if status["code"] >= 400:
                self.metrics.errors.labels(endpoint, str(status["code"])).inc()

    async def _read_body(self, scope: dict, receive: Callable) -> tuple[bytes, tuple[int, str] | None]:
        limit = self.limits.max_body_bytes
        headers = dict(scope.get("headers", []))
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            message = f"request body is {int(declared)} bytes; the limit is {limit} bytes (--max_body_bytes)"
            return b"", (413, message)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return b"", (413, f"request body exceeds {limit} bytes (--max_body_bytes)")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        binary_v2 = b"inference-header-content-length" in headers
        if endpoint_of(scope["path"]) in ("v1_predict", "v2_infer", "labels", "feedback") and not binary_v2:
            from labelmatch.serving.request_schema import MAX_JSON_DEPTH, json_depth

            depth = json_depth(body)
            if depth > MAX_JSON_DEPTH:
                return body, (400, f"request body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}")
            try:
                json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                return body, (400, f"request body is not valid JSON: {exc}")
        return body, None


def _replay(body: bytes, upstream: Callable) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A ``receive`` that yields the buffered body once, then waits on the real connection."""
    sent = {"done": False}

    async def receive() -> dict[str, Any]:
        if sent["done"]:
            return await upstream()
        sent["done"] = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _json_error(send: Callable, status: int, message: str) -> None:
    payload = json.dumps({"error": message}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
