"""One monitoring run: read a window of logged predictions, compare, report, publish, maybe retrain.

What ``labelmatch monitor`` and the ``monitor`` KFP component call.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError
from labelmatch.monitoring.monitor import MonitorConfig, MonitorReport, evaluate_window, write_report
from labelmatch.monitoring.profile import ReferenceProfile

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(value: str, now: float | None = None) -> float:
    """Unix time of ``value``: a duration back from now (``90m``, ``24h``, ``7d``), an ISO-8601
    time (UTC when no zone is given) or a Unix timestamp.

    Raises:
        ConfigError: None of these.
    """
    now = time.time() if now is None else now
    text = value.strip()
    match = _DURATION.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"time {value!r}: expected a duration (90m, 24h, 7d), an ISO-8601 time or a "
                          "Unix timestamp") from exc
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()


@dataclass
class MonitorRun:
    """Where a monitoring run reads and writes.

    Attributes:
        model_dir: The served OnnxModel artifact (local directory).
        state_url: SQLAlchemy URL of the serving state (its prediction log).
        since: Window start (Unix time).
        until: Window end (Unix time; ``None``: now).
        limit: Only the newest ``limit`` logged predictions of the window.
        feedback_url: The feedback store (default: ``state_url``).
        rules: Drift rules.
        out_dir: Where ``report.{json,md,png}`` go.
        publish: Store the report in the serving state (the servers' gauges read it).
    """

    model_dir: Path
    state_url: str
    since: float
    until: float | None = None
    limit: int | None = None
    feedback_url: str | None = None
    rules: MonitorConfig = field(default_factory=MonitorConfig)
    out_dir: Path = Path("runs/monitor")
    publish: bool = True


def _feedback_scores(url: str, model_version: str, since: float, until: float) -> tuple[list[int], list[int]]:
    """User scores of ``model_version`` in ``[since, until)`` and in the window of equal length before."""
    from labelmatch.feedback.feedback_store import FeedbackStore

    span = until - since
    current, previous = FeedbackStore(url).scores_between(
        model_version, (since, until), (since - span, since)
    )
    return current, previous


def run_monitor(run: MonitorRun) -> tuple[MonitorReport, dict[str, Any]]:
    """Evaluate the window, write the report files and (``publish``) store the report.

    Returns:
        The report and the artifact's ``labelmatch.json``.
    """
    from labelmatch.runtime.onnx_classifier import served_model_version
    from labelmatch.state.serving_state import ServingState

    info = json.loads((run.model_dir / "labelmatch.json").read_text())
    profile = ReferenceProfile.load(run.model_dir)
    version = served_model_version(run.model_dir, info)
    until = run.until if run.until is not None else time.time()
    if until <= run.since:
        raise ConfigError(f"the window is empty: --since {run.since} is not before --until {until}")
    state = ServingState(run.state_url)
    try:
        records = state.logged_predictions(version, run.since, until, run.limit)
        feedback, previous = _feedback_scores(run.feedback_url or run.state_url, version, run.since, until)
        report = evaluate_window(profile, records, run.rules, version, feedback, previous, run.since, until)
        write_report(report, profile, records, run.out_dir)
        if run.publish:
            state.save_monitor_report(version, report.to_json(), report.drift)
    finally:
        state.close()
    return report, info


__all__ = ["MonitorRun", "parse_time", "run_monitor"]
