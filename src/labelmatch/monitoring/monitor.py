"""``labelmatch monitor``: a window of logged predictions against the model's reference profile.

Signals (each a two-sample test against the reference, see :mod:`labelmatch.monitoring.statistics`):

==================  ===========================================================  ===================
signal              what is compared                                             fires when
==================  ===========================================================  ===================
``embedding``       documents as cosines to the model's labels: MMD, RBF kernels  p < ``alpha``
                    at three bandwidths, permutation p-value
``max_score``       each document's highest score: Kolmogorov–Smirnov           p < ``alpha``
``low_confidence``  share of documents whose highest score is below the          p < ``alpha``
                    default threshold: Fisher exact, one-sided (a rise)
``label_rates``     each label's predicted rate: Fisher exact per label,         p < ``alpha``
                    Bonferroni over labels
``label_scores``    each label's score distribution: PSI over the reference's    PSI >
                    quantile bins (descriptive; off unless configured)           ``label_score_psi``
``feedback``        user scores (1–5) in the window vs the window before it:     p < ``alpha``
                    Mann–Whitney U, one-sided (a drop)
==================  ===========================================================  ===================

Under no drift each test fires with probability at most ``alpha`` (0.01 by default); five tests
at 0.01 keep the chance that *any* fires at most 0.05 (union bound), which is the stated
false-alarm rate per report. ``bench/bench_drift.py`` measures it on real data.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.errors import ConfigError
from labelmatch.core.settings import SettingsFile, build_settings, load_settings
from labelmatch.monitoring.profile import ReferenceProfile, cosines_from_scores
from labelmatch.monitoring.statistics import PSI_LARGE, mmd_permutation_test, psi

SIGNALS = ("embedding", "max_score", "low_confidence", "label_rates", "label_scores", "feedback")


@dataclass
class MonitorConfig:
    """Drift rules (a ``monitor.json`` / ``.yaml`` file; every key optional).

    Attributes:
        alpha: Significance level of each test (its false-alarm rate under no drift).
        rules: Signals whose firing counts as drift (and triggers retraining).
        min_documents: Fewer usable logged predictions than this: nothing fires (too little data).
        min_feedback: Feedback records needed in both windows for the feedback test.
        permutations: Permutations of the MMD test.
        label_score_psi: PSI above which ``label_scores`` fires (``None``: reported only).
        seed: Seed of the permutations.
    """

    alpha: float = 0.01
    rules: list[str] = field(default_factory=lambda: ["embedding", "max_score", "low_confidence",
                                                      "label_rates", "feedback"])
    min_documents: int = 100
    min_feedback: int = 20
    permutations: int = 500
    label_score_psi: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ConfigError(f"alpha must be within (0, 1), got {self.alpha}")
        unknown = [rule for rule in self.rules if rule not in SIGNALS]
        if unknown:
            raise ConfigError(f"unknown rule(s) in rules: {', '.join(unknown)}; known: {', '.join(SIGNALS)}")
        if self.min_documents < 2:
            raise ConfigError(f"min_documents must be >= 2, got {self.min_documents}")
        if self.permutations < 19:
            raise ConfigError(f"permutations must be >= 19 (a p-value below 0.05 needs them), got "
                              f"{self.permutations}")
        if self.min_feedback < 1:
            raise ConfigError(f"min_feedback must be >= 1, got {self.min_feedback}")
        if self.label_score_psi is not None and not self.label_score_psi > 0:
            raise ConfigError(f"label_score_psi must be > 0 (or null: reported only), got "
                              f"{self.label_score_psi}")

    @classmethod
    def from_file(cls, path: str | Path) -> MonitorConfig:
        """Read a rules file (JSON, or YAML by extension); every field is type-checked and a bad
        one is named with its line (:mod:`labelmatch.core.settings`).

        Raises:
            DataError: ``monitor.json:2: field 'alpha': expected a number, got a string '0.01'``.
        """
        return load_settings(cls, path)[0]

    @classmethod
    def from_mapping(cls, body: Any, source: str | Path = "<rules>", raw: str = "") -> MonitorConfig:
        """Rules from a parsed mapping; errors name ``source``, the field and (given ``raw``) its line."""
        return build_settings(cls, body, SettingsFile(Path(str(source)), raw, body))


@dataclass
class MonitorReport:
    """One monitoring window's verdict (stored in the serving state; ``report.json``).

    Attributes:
        model_version: The monitored model version.
        created_at: Unix time of the report.
        window: ``{"start", "end", "documents", "skipped"}`` (Unix times; logged predictions
            used, and those skipped because their request replaced the model's labels).
        drift: Whether a rule in ``rules`` fired.
        fired: The rules that fired.
        signals: ``{signal: {"statistic", "p_value", "threshold", "fired", "detail"}}``.
        low_confidence_share: ``{"reference", "window"}``.
        rules: The rules in force.
        alpha: Their significance level.
    """

    model_version: str
    created_at: float
    window: dict[str, Any]
    drift: bool
    fired: list[str]
    signals: dict[str, dict[str, Any]]
    low_confidence_share: dict[str, float]
    rules: list[str]
    alpha: float

    def to_json(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def _signal(statistic: float | None, p_value: float | None, threshold: float, fired: bool,
            **detail: Any) -> dict[str, Any]:
    return {"statistic": None if statistic is None else float(statistic),
            "p_value": None if p_value is None else float(p_value), "threshold": threshold,
            "fired": bool(fired), "detail": detail}


def _feedback_signal(scores: Sequence[int], previous: Sequence[int], config: MonitorConfig) -> dict[str, Any]:
    from scipy.stats import mannwhitneyu

    if min(len(scores), len(previous)) < config.min_feedback:
        return _signal(None, None, config.alpha, False, window=len(scores), previous=len(previous),
                       skipped=f"fewer than {config.min_feedback} feedback records in a window")
    p_value = float(mannwhitneyu(scores, previous, alternative="less").pvalue)
    return _signal(float(np.mean(scores)) - float(np.mean(previous)), p_value, config.alpha,
                   p_value < config.alpha, window=len(scores), previous=len(previous),
                   mean=float(np.mean(scores)), previous_mean=float(np.mean(previous)))


def evaluate_window(profile: ReferenceProfile, records: Sequence[Any], config: MonitorConfig | None = None,
                    model_version: str = "", feedback: Sequence[int] = (),
                    previous_feedback: Sequence[int] = (), start: float | None = None,
                    end: float | None = None) -> MonitorReport:
    """Compare logged predictions with the reference profile.

    Args:
        profile: The model's reference profile.
        records: Logged predictions (anything with ``labels`` and ``scores``, e.g.
            :class:`~labelmatch.state.serving_state.PredictionRecord`).
        config: Drift rules.
        model_version: The monitored model version (for the report).
        feedback: User scores (1–5) given in the window.
        previous_feedback: User scores given in the window before it.
        start: Window start (Unix time; default: the oldest record's).
        end: Window end (default: now).
    """
    from scipy.stats import fisher_exact, ks_2samp

    config = config or MonitorConfig()
    usable = [r for r in records if all(name in r.scores for name in profile.feature_labels)]
    own = profile.labels
    times = [getattr(r, "created_at", 0.0) for r in usable]
    window = {"start": start if start is not None else (min(times) if times else 0.0),
              "end": end if end is not None else time.time(), "documents": len(usable),
              "skipped": len(records) - len(usable)}
    ref_share = profile.low_confidence_share
    signals: dict[str, dict[str, Any]] = {}
    share = None
    if len(usable) >= config.min_documents:
        alpha = config.alpha
        features = cosines_from_scores([r.scores for r in usable], profile.feature_labels, profile.scale,
                                       profile.bias)
        mmd2, p = mmd_permutation_test(profile.features, features, config.permutations, config.seed)
        signals["embedding"] = _signal(mmd2, p, alpha, p < alpha, dimensions=len(profile.feature_labels))

        max_scores = np.array([max((r.scores[n] for n in own if n in r.scores), default=0.0) for r in usable])
        ks = ks_2samp(profile.max_scores, max_scores)
        signals["max_score"] = _signal(ks.statistic, ks.pvalue, alpha, ks.pvalue < alpha,
                                       psi=psi(np.asarray(profile.max_scores), max_scores),
                                       reference_mean=float(np.mean(profile.max_scores)),
                                       window_mean=float(max_scores.mean()))

        low_ref = round(ref_share * profile.documents)
        low_win = int((max_scores < profile.low_confidence_below).sum())
        share = low_win / len(usable)
        p = float(fisher_exact([[low_win, len(usable) - low_win], [low_ref, profile.documents - low_ref]],
                               alternative="greater")[1])
        signals["low_confidence"] = _signal(share - ref_share, p, alpha, p < alpha, window=share,
                                            reference=ref_share, below=profile.low_confidence_below)

        counts = dict.fromkeys(own, 0)
        for record in usable:
            for name in record.labels:
                if name in counts:
                    counts[name] += 1
        tested = [n for n in own if counts[n] or profile.label_counts.get(n, 0)]
        shifts = []
        for name in tested:
            a, b = counts[name], profile.label_counts.get(name, 0)
            p_label = float(fisher_exact([[a, len(usable) - a], [b, profile.documents - b]])[1])
            shifts.append((name, a / len(usable) - b / profile.documents, p_label))
        p = min((min(1.0, p_label * len(tested)) for _, _, p_label in shifts), default=1.0)
        top = sorted(shifts, key=lambda item: item[2])[:10]
        signals["label_rates"] = _signal(
            max((abs(s) for _, s, _ in shifts), default=0.0), p, alpha, p < alpha, labels_tested=len(tested),
            top=[{"label": n, "shift": round(s, 4), "p_value": pv} for n, s, pv in top])

        label_psi = {name: psi(profile.features[:, j], features[:, j])
                     for j, name in enumerate(profile.feature_labels)}
        worst = sorted(label_psi.items(), key=lambda item: -item[1])[:10]
        threshold = config.label_score_psi
        signals["label_scores"] = _signal(
            worst[0][1] if worst else 0.0, None, threshold if threshold is not None else PSI_LARGE,
            threshold is not None and bool(worst) and worst[0][1] > threshold,
            top=[{"label": n, "psi": round(v, 4)} for n, v in worst],
            above_large=sum(v > PSI_LARGE for v in label_psi.values()))
    signals["feedback"] = _feedback_signal(feedback, previous_feedback, config)
    fired = [name for name in config.rules if signals.get(name, {}).get("fired")]
    return MonitorReport(
        model_version=model_version, created_at=time.time(), window=window, drift=bool(fired), fired=fired,
        signals=signals, low_confidence_share={"reference": ref_share, "window": share}, rules=config.rules,
        alpha=config.alpha,
    )


def write_report(report: MonitorReport, profile: ReferenceProfile, records: Sequence[Any],
                 out_dir: str | Path) -> Path:
    """Write ``report.json``, ``report.md`` and ``report.png`` (max-score distributions and the
    largest label-rate shifts) into ``out_dir``; returns the Markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    _plot(report, profile, records, out / "report.png")
    (out / "report.md").write_text(render_markdown(report))
    return out / "report.md"


def render_markdown(report: MonitorReport) -> str:
    """The report as Markdown (one table of signals, the verdict, the largest label shifts)."""
    window = report.window
    verdict = f"**drift** (fired: {', '.join(report.fired)})" if report.drift else "no drift"
    lines = [
        f"# Monitor report: model {report.model_version}",
        "",
        f"Window: {_iso(window['start'])} to {_iso(window['end'])}, {window['documents']} logged predictions "
        f"({window['skipped']} skipped: their request replaced the model's labels). Verdict: {verdict}. "
        f"Each test's false-alarm rate under no drift: {report.alpha:g}.",
        "",
        "| signal | statistic | p-value | threshold | fired | rule |",
        "|---|---|---|---|---|---|",
    ]
    for name in SIGNALS:
        signal = report.signals.get(name)
        if signal is None:
            lines.append(f"| {name} | — | — | — | not run (too few documents) | {name in report.rules} |")
            continue
        stat = "—" if signal["statistic"] is None else f"{signal['statistic']:.4f}"
        p_value = "—" if signal["p_value"] is None else f"{signal['p_value']:.4g}"
        fired = "**yes**" if signal["fired"] else ("skipped" if "skipped" in signal["detail"] else "no")
        threshold = f"{signal['threshold']:g}"
        lines.append(f"| {name} | {stat} | {p_value} | {threshold} | {fired} | {name in report.rules} |")
    share = report.low_confidence_share
    if share.get("window") is not None:
        lines += ["", f"Low-confidence share: {share['window']:.3f} (reference {share['reference']:.3f})."]
    top = (report.signals.get("label_rates") or {}).get("detail", {}).get("top", [])
    if top:
        lines += ["", "Largest label-rate shifts (window − reference):", "", "| label | shift | p-value |",
                  "|---|---|---|"]
        lines += [f"| {row['label']} | {row['shift']:+.3f} | {row['p_value']:.3g} |" for row in top]
    lines += ["", "What each signal means and what to do when it fires: docs/monitoring.md.", "",
              "![report](report.png)", ""]
    return "\n".join(lines)


def _iso(ts: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else "—"


def _plot(report: MonitorReport, profile: ReferenceProfile, records: Sequence[Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    own = profile.labels
    window = [max((r.scores[n] for n in own if n in r.scores), default=0.0) for r in records]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    bins = np.linspace(0, 1, 21)
    left.hist(profile.max_scores, bins=bins, density=True, alpha=0.6, label="reference (validation)")
    if window:
        left.hist(window, bins=bins, density=True, alpha=0.6, label="window")
    left.axvline(profile.low_confidence_below, color="k", ls="--", lw=1, label="low-confidence below")
    left.set_xlabel("highest score per document")
    left.set_title("max-score distribution")
    left.legend(fontsize=7)
    top = (report.signals.get("label_rates") or {}).get("detail", {}).get("top", [])
    if top:
        right.barh([row["label"][:28] for row in top][::-1], [row["shift"] for row in top][::-1])
        right.axvline(0, color="k", lw=0.8)
    right.set_xlabel("predicted rate, window − reference")
    right.set_title("largest label-rate shifts")
    fig.suptitle(f"model {report.model_version}: {'DRIFT' if report.drift else 'no drift'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["SIGNALS", "MonitorConfig", "MonitorReport", "evaluate_window", "render_markdown", "write_report"]
