"""The shadow comparison report: the candidate's answers to live traffic against the serving model's.

The serving replicas mirror their prediction requests to the shadow and log one row per document
(:mod:`labelmatch.serving.shadow`, the serving state's ``shadow_log``). :func:`build_shadow_report`
turns a window of those rows into what a platform team asks before letting a candidate answer:

* **label-set agreement**: the share of documents the shadow gave exactly the serving model's
  label set (and the mean Jaccard overlap, and which labels it adds or drops most);
* **score shift**: the mean absolute difference of the two answers' scores over their labels, per
  document (mean, p50, p99, max);
* **latency**: p50 and p99 of each model's inference time per request (the serving model's as it
  answered, the shadow's from its ``Server-Timing``), and the mirror's failures.

``labelmatch deploy --strategy shadow`` writes it after its window (``shadow_report.{json,md}`` in
the deploy step's Report); ``labelmatch shadow-report`` writes it for any window.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labelmatch.delivery.signals import latencies_quantile


@dataclass
class ShadowReport:
    """A window of mirrored traffic, serving model vs shadow.

    Attributes:
        serving_version: The serving model's version.
        shadow_versions: The model versions that answered as the shadow.
        window: ``{"start", "end"}`` (Unix times).
        documents: Mirrored documents.
        requests: Mirrored requests.
        answered: Documents the shadow answered.
        errors: ``{reason: documents}`` the shadow did not answer.
        agreement: Share of answered documents with the same label set (``None``: none answered).
        jaccard: Mean Jaccard overlap of the two label sets (both empty: 1).
        score_shift: ``{"mean", "p50", "p99", "max"}`` of the per-document score shift.
        latency_ms: ``{"serving": {"p50", "p99"}, "shadow": {"p50", "p99"}}`` per request, milliseconds.
        labels_added: The labels the shadow gives most often where the serving model does not.
        labels_dropped: The labels the serving model gives most often where the shadow does not.
    """

    serving_version: str
    shadow_versions: list[str]
    window: dict[str, float]
    documents: int
    requests: int
    answered: int
    errors: dict[str, int]
    agreement: float | None
    jaccard: float | None
    score_shift: dict[str, float | None]
    latency_ms: dict[str, dict[str, float | None]]
    labels_added: list[dict[str, Any]]
    labels_dropped: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _jaccard(a: set[str], b: set[str]) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def build_shadow_report(rows: Sequence[Any], serving_version: str, start: float, end: float) -> ShadowReport:
    """The report over ``rows`` (:class:`~labelmatch.state.serving_state.ShadowRow`) of one window."""
    answered = [row for row in rows if row.shadow_labels is not None]
    errors = Counter(row.error or "no answer" for row in rows if row.shadow_labels is None)
    shifts = [row.score_shift for row in answered if row.score_shift is not None]
    added, dropped = Counter(), Counter()
    for row in answered:
        served, shadow = set(row.labels), set(row.shadow_labels)
        added.update(shadow - served)
        dropped.update(served - shadow)
    per_request: dict[str, tuple[float, float | None]] = {}
    for row in rows:
        per_request.setdefault(row.request_id, (row.serving_ms, row.shadow_ms))
    serving_ms = [value[0] for value in per_request.values()]
    shadow_ms = [value[1] for value in per_request.values() if value[1] is not None]
    return ShadowReport(
        serving_version=serving_version,
        shadow_versions=sorted({row.shadow_version for row in answered if row.shadow_version}),
        window={"start": start, "end": end}, documents=len(rows), requests=len(per_request),
        answered=len(answered), errors=dict(errors),
        agreement=(sum(sorted(r.labels) == sorted(r.shadow_labels) for r in answered) / len(answered)
                   if answered else None),
        jaccard=(sum(_jaccard(set(r.labels), set(r.shadow_labels)) for r in answered) / len(answered)
                 if answered else None),
        score_shift={"mean": sum(shifts) / len(shifts) if shifts else None,
                     "p50": latencies_quantile(shifts, 0.5), "p99": latencies_quantile(shifts, 0.99),
                     "max": max(shifts) if shifts else None},
        latency_ms={"serving": {"p50": latencies_quantile(serving_ms, 0.5),
                                "p99": latencies_quantile(serving_ms, 0.99)},
                    "shadow": {"p50": latencies_quantile(shadow_ms, 0.5),
                               "p99": latencies_quantile(shadow_ms, 0.99)}},
        labels_added=[{"label": name, "documents": n} for name, n in added.most_common(10)],
        labels_dropped=[{"label": name, "documents": n} for name, n in dropped.most_common(10)],
    )


def shadow_report(state_url: str, serving_version: str, since: float, until: float) -> ShadowReport:
    """The report of the shadow log rows of ``serving_version`` in ``[since, until)``."""
    from labelmatch.state.serving_state import ServingState

    state = ServingState(state_url)
    try:
        rows = state.shadow_rows(serving_version, since, until)
    finally:
        state.close()
    return build_shadow_report(rows, serving_version, since, until)


def _fmt(value: float | None, pattern: str = "{:.3f}") -> str:
    return "—" if value is None else pattern.format(value)


def _iso(ts: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts)) if ts else "—"


def render_markdown(report: ShadowReport) -> str:
    """The report as Markdown."""
    lat = report.latency_ms
    errors = ", ".join(f"{reason}: {n}" for reason, n in report.errors.items())
    lines = [
        f"# Shadow report: serving {report.serving_version} vs shadow "
        f"{', '.join(report.shadow_versions) or '—'}",
        "",
        f"Window: {_iso(report.window['start'])} to {_iso(report.window['end'])}: {report.documents} "
        f"mirrored "
        f"documents in {report.requests} requests, {report.answered} answered by the shadow.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| label-set agreement | {_fmt(report.agreement)} |",
        f"| mean Jaccard overlap | {_fmt(report.jaccard)} |",
        f"| score shift mean / p99 / max | {_fmt(report.score_shift['mean'], '{:.4f}')} / "
        f"{_fmt(report.score_shift['p99'], '{:.4f}')} / {_fmt(report.score_shift['max'], '{:.4f}')} |",
        f"| serving latency p50 / p99 (ms, inference) | {_fmt(lat['serving']['p50'], '{:.2f}')} / "
        f"{_fmt(lat['serving']['p99'], '{:.2f}')} |",
        f"| shadow latency p50 / p99 (ms, inference) | {_fmt(lat['shadow']['p50'], '{:.2f}')} / "
        f"{_fmt(lat['shadow']['p99'], '{:.2f}')} |",
        f"| not answered | {sum(report.errors.values())} ({errors or 'none'}) |",
    ]
    for title, rows in (("Labels the shadow adds", report.labels_added),
                        ("Labels the shadow drops", report.labels_dropped)):
        if rows:
            lines += ["", f"{title} (documents):", ""]
            lines += [f"- {row['label']}: {row['documents']}" for row in rows]
    return "\n".join(lines) + "\n"


def write_shadow_report(report: ShadowReport, out_dir: str | Path) -> Path:
    """Write ``shadow_report.json`` and ``shadow_report.md`` into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "shadow_report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out / "shadow_report.md").write_text(render_markdown(report))
    return out / "shadow_report.md"


__all__ = ["ShadowReport", "build_shadow_report", "render_markdown", "shadow_report", "write_shadow_report"]
