"""The canary's rules: how much traffic it gets, for how long, and what it must hold to be promoted.

A rules file is JSON, or YAML by extension (``labelmatch deploy --strategy canary --rules
canary.yaml``); every key is optional and every field is type-checked through
:mod:`labelmatch.core.settings`, so a bad one is one line naming file, line and field, before
anything is deployed (``canary.yaml:3: field 'max_error_rate': expected a number or null, got a
string '1%'``). The same fields are accepted inline (a JSON object) or from an ``s3://`` URI (the
pipeline's ``canary_rules`` parameter).

Each rule is off when its threshold is ``null``. What each reads (:mod:`labelmatch.delivery.canary`):

=========================  ====================================================================
rule                       fails when (over the canary's own traffic in the window)
=========================  ====================================================================
``max_error_rate``         5xx answers / prediction requests of the canary's pods is above it
``max_p99_latency_s``      the canary's p99 prediction latency is above it (seconds)
``max_p99_latency_ratio``  its p99 is above ratio × the stable's p99 (same window) + ``latency_slack_s``
``drift_signals``          a drift test (:mod:`labelmatch.monitoring`) of the canary's logged
                           predictions against its export's reference profile fires at ``drift_alpha``
                           (``low_confidence`` is the low-confidence share test)
``min_mean_feedback``      the mean user score (1–5) of the canary's predictions is below it
``max_feedback_drop``      the canary's mean score is more than this below the stable's in the same
                           window, and a one-sided Mann–Whitney test says so at ``feedback_alpha``
=========================  ====================================================================

Error rate and latency need ``min_requests`` canary prediction requests; the window is extended up
to ``max_window_s`` to get them, and a canary that never gets them is decided by
``on_insufficient`` (``rollback`` unless told otherwise: nothing proved it good). Drift needs
``min_documents`` logged predictions and feedback ``min_feedback`` records on each side; with
fewer, those rules are reported as not run and do not decide.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from labelmatch.core.errors import ConfigError, DataError
from labelmatch.core.settings import SettingsFile, build_settings, load_settings

#: Drift tests a canary rule may use (those of :data:`labelmatch.monitoring.monitor.SIGNALS` that
#: compare the canary's own predictions with its reference profile).
DRIFT_SIGNALS = ("embedding", "max_score", "low_confidence", "label_rates")


@dataclass
class CanaryRules:
    """How a canary runs and what it must hold (a ``canary.json`` / ``.yaml`` file; every key optional).

    Attributes:
        traffic_percent: Share of prediction traffic the canary gets (1–99).
        window_s: Seconds the canary is watched before the decision.
        check_every_s: Seconds between looks at its signals (a failing error rate rolls back at
            the first look that has ``min_requests``, without waiting for the window's end).
        min_requests: Canary prediction requests needed before error rate and latency decide.
        max_window_s: Longest the window is extended waiting for ``min_requests`` (``null``: 3 ×
            ``window_s``).
        on_insufficient: What happens when ``min_requests`` never arrive: ``rollback`` or ``promote``.
        max_error_rate: Highest share of the canary's prediction requests answered 5xx.
        max_p99_latency_s: Highest p99 prediction latency of the canary, in seconds.
        max_p99_latency_ratio: Highest canary p99 / stable p99 (both over the same window).
        latency_slack_s: Seconds added to the ratio's bound (histogram buckets are coarse, and a
            millisecond p99 doubles from one slow request).
        drift_signals: Drift tests against the canary's reference profile that must not fire.
        drift_alpha: Their significance level.
        min_documents: Logged canary predictions needed for the drift tests.
        permutations: Permutations of the embedding test.
        min_feedback: Feedback records needed on each side for the feedback rules.
        min_mean_feedback: Lowest mean user score (1–5) of the canary's predictions.
        max_feedback_drop: Largest drop of the canary's mean score below the stable's.
        feedback_alpha: Significance of that drop (one-sided Mann–Whitney U).
        kserve_version: The cluster's KServe version (``major.minor``): RawDeployment canaries
            need a release after v0.20.0 (docs/cluster.md, "What each KServe version allows").
    """

    traffic_percent: int = 10
    window_s: float = 600.0
    check_every_s: float = 15.0
    min_requests: int = 100
    max_window_s: float | None = None
    on_insufficient: Literal["rollback", "promote"] = "rollback"
    max_error_rate: float | None = 0.01
    max_p99_latency_s: float | None = None
    max_p99_latency_ratio: float | None = 2.0
    latency_slack_s: float = 0.05
    drift_signals: list[str] = field(default_factory=lambda: ["low_confidence", "max_score"])
    drift_alpha: float = 0.01
    min_documents: int = 50
    permutations: int = 200
    min_feedback: int = 20
    min_mean_feedback: float | None = None
    max_feedback_drop: float | None = 0.5
    feedback_alpha: float = 0.05
    kserve_version: str = "0.20"

    def __post_init__(self) -> None:
        if not 1 <= self.traffic_percent <= 99:
            raise ConfigError(f"traffic_percent must be within 1..99, got {self.traffic_percent}")
        for name in ("window_s", "check_every_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_window_s is not None and self.max_window_s < self.window_s:
            raise ConfigError(f"max_window_s must be >= window_s ({self.window_s:g}), got "
                              f"{self.max_window_s}")
        if self.min_requests < 1:
            raise ConfigError(f"min_requests must be >= 1, got {self.min_requests}")
        if self.max_error_rate is not None and not 0 <= self.max_error_rate < 1:
            raise ConfigError(f"max_error_rate must be within [0, 1), got {self.max_error_rate}")
        for name in ("max_p99_latency_s", "max_p99_latency_ratio"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"{name} must be > 0 (or null: off), got {value}")
        if self.latency_slack_s < 0:
            raise ConfigError(f"latency_slack_s must be >= 0, got {self.latency_slack_s}")
        unknown = [name for name in self.drift_signals if name not in DRIFT_SIGNALS]
        if unknown:
            raise ConfigError(f"unknown drift signal(s) in drift_signals: {', '.join(unknown)}; known: "
                              f"{', '.join(DRIFT_SIGNALS)}")
        for name in ("drift_alpha", "feedback_alpha"):
            if not 0 < getattr(self, name) < 1:
                raise ConfigError(f"{name} must be within (0, 1), got {getattr(self, name)}")
        if self.min_documents < 2:
            raise ConfigError(f"min_documents must be >= 2, got {self.min_documents}")
        if self.permutations < 19:
            raise ConfigError(f"permutations must be >= 19, got {self.permutations}")
        if self.min_feedback < 1:
            raise ConfigError(f"min_feedback must be >= 1, got {self.min_feedback}")
        if self.min_mean_feedback is not None and not 1 <= self.min_mean_feedback <= 5:
            raise ConfigError(f"min_mean_feedback must be within [1, 5] (or null: off), got "
                              f"{self.min_mean_feedback}")
        if self.max_feedback_drop is not None and not 0 <= self.max_feedback_drop < 4:
            raise ConfigError(f"max_feedback_drop must be within [0, 4) (or null: off), got "
                              f"{self.max_feedback_drop}")
        kserve_version(self.kserve_version)

    @property
    def longest_window_s(self) -> float:
        """How long the window may be extended waiting for ``min_requests``."""
        return self.max_window_s if self.max_window_s is not None else 3 * self.window_s

    def to_json(self) -> dict[str, Any]:
        """JSON form (recorded with the decision)."""
        return asdict(self)

    @classmethod
    def from_file(cls, path: str | Path) -> CanaryRules:
        """Read a rules file (JSON, or YAML by extension); a bad field is named with its line.

        Raises:
            DataError: ``canary.json:2: field 'traffic_percent': expected an integer, got a string '10'``.
        """
        return load_settings(cls, path)[0]


def kserve_version(text: str) -> tuple[int, int]:
    """``(major, minor)`` of a KServe version written ``0.20``, ``v0.20`` or ``v0.20.1``.

    Raises:
        ConfigError: Not such a version.
    """
    parts = text.strip().removeprefix("v").split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise ConfigError(f"kserve_version {text!r}: expected major.minor, e.g. 0.20") from None
    return major, minor


def load_rules(spec: str | Path | None, store: Any = None) -> CanaryRules:
    """The canary rules ``spec`` names: ``None``/``""`` (the defaults), a JSON object inline, a file,
    or an ``s3://`` URI of a file (downloaded with ``store``, an
    :class:`~labelmatch.platform.artifact_store.ArtifactStore`).

    Raises:
        DataError: A file's bad field, with file and line.
        ConfigError: An inline value's bad field, or an unreadable URI.
    """
    if spec is None or not str(spec).strip():
        return CanaryRules()
    text = str(spec).strip()
    if text.startswith("{"):
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"canary rules: not a JSON object ({exc.msg}, column {exc.colno})") from None
        return build_settings(CanaryRules, body, SettingsFile(Path("canary rules"), text, body))
    if text.startswith("s3://"):
        from labelmatch.platform.artifact_store import S3Uri

        uri = S3Uri.parse(text)
        data = store.get_bytes(uri) if store is not None else None
        if data is None:
            raise ConfigError(f"{text}: not found in the object store")
        name = Path(uri.key).name or "canary.json"
        with tempfile.TemporaryDirectory(prefix="labelmatch-rules-") as tmp:
            local = Path(tmp) / name
            local.write_bytes(data)
            try:
                return CanaryRules.from_file(local)
            except DataError as exc:  # name the URI, not the temporary copy
                raise DataError(text, exc.message, exc.line, exc.field) from None
    return CanaryRules.from_file(text)


__all__ = ["DRIFT_SIGNALS", "CanaryRules", "kserve_version", "load_rules"]
