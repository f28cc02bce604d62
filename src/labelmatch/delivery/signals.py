"""A canary's live signals: prediction requests, 5xx answers and latency, from its pods' ``/metrics``.

Every model server exports ``labelmatch_request_seconds{endpoint}`` (a histogram of end-to-end
latency) and ``labelmatch_errors_total{endpoint,status}`` (:mod:`labelmatch.serving.metrics`).
A window's figures are the difference between two scrapes of **every pod** of a group (the
canary's, the stable's): Kubernetes spreads a Service's traffic over its pods, so one pod's
counters are only its share. A pod that appeared during the window counts from zero; a pod whose
counters went down restarted, and its new counts are all in the window. A pod that does not
answer is reported (a canary that cannot be scraped is rolled back).

The p99 comes from the histogram's buckets, interpolated linearly inside the bucket that holds
it, as Prometheus' ``histogram_quantile`` does: it is never finer than the buckets
(:data:`labelmatch.serving.metrics.LATENCY_BUCKETS`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: The endpoints that are prediction traffic (``labelmatch.serving.metrics.endpoint_of``).
PREDICT_ENDPOINTS = ("v1_predict", "v2_infer")


@dataclass
class PodCounts:
    """One pod's prediction counters at one scrape.

    Attributes:
        requests: Prediction requests answered.
        errors: Of them, answered with a 5xx status.
        buckets: ``{upper bound: cumulative count}`` of the latency histogram (``inf`` included).
        latency_sum: Sum of the latencies, seconds.
    """

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    latency_sum: float = 0.0

    def minus(self, earlier: PodCounts | None) -> PodCounts:
        """What happened between ``earlier`` and this scrape (all of it when the pod restarted)."""
        if earlier is None or self.requests < earlier.requests:
            return self
        return PodCounts(
            self.requests - earlier.requests, max(self.errors - earlier.errors, 0.0),
            {le: count - earlier.buckets.get(le, 0.0) for le, count in self.buckets.items()},
            self.latency_sum - earlier.latency_sum,
        )


def parse_metrics(text: str) -> PodCounts:
    """The prediction counters in a Prometheus text exposition (a model server's ``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts = PodCounts()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            endpoint = sample.labels.get("endpoint")
            if endpoint not in PREDICT_ENDPOINTS:
                continue
            if sample.name == "labelmatch_request_seconds_count":
                counts.requests += sample.value
            elif sample.name == "labelmatch_request_seconds_sum":
                counts.latency_sum += sample.value
            elif sample.name == "labelmatch_request_seconds_bucket":
                bound = float(sample.labels["le"])
                counts.buckets[bound] = counts.buckets.get(bound, 0.0) + sample.value
            elif sample.name == "labelmatch_errors_total":
                counts.errors += sample.value if sample.labels.get("status", "").startswith("5") else 0.0
    return counts


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> tuple[dict[str, PodCounts], dict[str, str]]:
    """Scrape ``<url>/metrics`` of every pod.

    Returns:
        ``({url: counts}, {url: why it could not be read})``.
    """
    import requests

    counts, failed = {}, {}
    for url in urls:
        try:
            response = requests.get(f"{url.rstrip('/')}/metrics", timeout=timeout_s)
            if response.status_code != 200:
                failed[url] = f"HTTP {response.status_code}"
                continue
            counts[url] = parse_metrics(response.text)
        except requests.RequestException as exc:
            failed[url] = type(exc).__name__
    return counts, failed


def quantile(buckets: Mapping[float, float], q: float) -> float | None:
    """The ``q`` quantile of a cumulative histogram, as Prometheus' ``histogram_quantile``
    computes it (``None`` without observations; the largest finite bound when it falls in ``+Inf``)."""
    ordered = sorted(buckets.items())
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                finite = [b for b, _ in ordered if not math.isinf(b)]
                return finite[-1] if finite else None
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return ordered[-1][0]


@dataclass
class TrafficStats:
    """A group of pods' prediction traffic over a window.

    Attributes:
        pods: Pods that contributed.
        requests: Prediction requests answered.
        errors: Of them, 5xx.
        buckets: Cumulative latency histogram over the window.
        unreachable: ``{pod url: why}`` for pods whose ``/metrics`` could not be read at the end.
    """

    pods: int = 0
    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)
    unreachable: dict[str, str] = field(default_factory=dict)

    @property
    def error_rate(self) -> float | None:
        """5xx share of the prediction requests (``None`` without requests)."""
        return self.errors / self.requests if self.requests else None

    def latency(self, q: float) -> float | None:
        """The ``q`` quantile of prediction latency, seconds."""
        return quantile(self.buckets, q)

    def to_json(self) -> dict[str, Any]:
        """JSON form (evidence)."""
        return {"pods": self.pods, "requests": int(self.requests), "errors": int(self.errors),
                "error_rate": self.error_rate, "p50_s": self.latency(0.5), "p99_s": self.latency(0.99),
                "unreachable": dict(self.unreachable)}


def window_stats(before: Mapping[str, PodCounts], after: Mapping[str, PodCounts],
                 unreachable: Mapping[str, str] | None = None) -> TrafficStats:
    """The traffic between two scrapes of a group of pods (see the module docstring)."""
    stats = TrafficStats(unreachable=dict(unreachable or {}))
    for url, counts in after.items():
        delta = counts.minus(before.get(url))
        stats.pods += 1
        stats.requests += delta.requests
        stats.errors += delta.errors
        for bound, count in delta.buckets.items():
            stats.buckets[bound] = stats.buckets.get(bound, 0.0) + count
    return stats


def latencies_quantile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile of raw latencies (nearest rank; ``None`` when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


__all__ = ["PREDICT_ENDPOINTS", "PodCounts", "TrafficStats", "latencies_quantile", "parse_metrics",
           "quantile", "scrape", "window_stats"]
