"""The ``evaluate`` stage and its deploy gate: should the candidate replace the serving model?

The rule (the original team's, made configurable): evaluate the candidate and the model that is
serving now **on the same test split** with each model's own thresholds; deploy only when

* the candidate's macro-F1 beats the serving model's by at least ``min_improvement``
  (default 0.02, i.e. two points), and
* no label's F1 drops by more than ``max_label_regression`` (default 0.05); labels without a
  positive test document are skipped (their F1 says nothing), and
* micro-F1 does not fall by more than ``max_micro_regression`` (default 0.01, one point): a gain
  on a few labels (e.g. where GRPO's feedback arrived) cannot buy a loss spread thinly over many
  others, which neither macro-F1 nor the per-label rule would see.

The decision names the rules that refused the candidate (``decided_by``).

With no serving model the candidate is deployed (there is nothing to protect). The decision,
every reason behind it and both models' metrics are written to the report.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ConfigError

DECISION_FILE = "decision.json"
#: The variable naming the labelmatch store root (release records live under it).
STORE_ROOT_VAR = "LABELMATCH_STORE_ROOT"


@dataclass
class GateConfig:
    """Thresholds of the deploy gate.

    Attributes:
        min_improvement: Macro-F1 the candidate must gain over the serving model (absolute).
        max_label_regression: Largest allowed per-label F1 drop (absolute).
        max_micro_regression: Largest allowed micro-F1 drop against the serving model (absolute).
        split: The dataset split both models are evaluated on.
    """

    min_improvement: float = 0.02
    max_label_regression: float = 0.05
    max_micro_regression: float = 0.01
    split: str = "test"

    def __post_init__(self) -> None:
        if not -1.0 <= self.min_improvement <= 1.0:
            raise ConfigError(f"GateConfig.min_improvement must be in [-1, 1], got {self.min_improvement}")
        if not 0.0 <= self.max_label_regression <= 1.0:
            raise ConfigError(
                f"GateConfig.max_label_regression must be in [0, 1], got {self.max_label_regression}"
            )
        if not 0.0 <= self.max_micro_regression <= 1.0:
            raise ConfigError(
                f"GateConfig.max_micro_regression must be in [0, 1], got {self.max_micro_regression}"
            )
        if self.split not in ("train", "val", "test", "all"):
            raise ConfigError(f"GateConfig.split must be train, val, test or all, got {self.split!r}")


@dataclass
class GateDecision:
    """The outcome of the gate.

    Attributes:
        deploy: Whether the candidate should be deployed.
        reasons: Why, one sentence per rule checked.
        candidate_macro_f1: The candidate's macro-F1 on the split.
        serving_macro_f1: The serving model's, or ``None`` when nothing serves.
        label_deltas: ``{label: candidate F1 - serving F1}`` for labels with test support.
        decided_by: The rules that refused the candidate (``min_improvement``,
            ``max_label_regression``, ``max_micro_regression``); empty when it is deployed.
        candidate_micro_f1: The candidate's micro-F1 on the split.
        serving_micro_f1: The serving model's, or ``None`` when nothing serves.
    """

    deploy: bool
    reasons: list[str]
    candidate_macro_f1: float
    serving_macro_f1: float | None = None
    label_deltas: dict[str, float] = field(default_factory=dict)
    decided_by: list[str] = field(default_factory=list)
    candidate_micro_f1: float | None = None
    serving_micro_f1: float | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON form (``decision.json``)."""
        return asdict(self)


def decide(candidate: dict[str, Any], serving: dict[str, Any] | None, config: GateConfig) -> GateDecision:
    """Apply the gate to two metric dicts of :func:`labelmatch.evaluation.evaluate.evaluate`.

    Args:
        candidate: Metrics of the candidate.
        serving: Metrics of the serving model on the same split, or ``None``.
        config: Gate thresholds.
    """
    cand_f1, cand_micro = float(candidate["macro_f1"]), float(candidate["micro_f1"])
    if serving is None:
        return GateDecision(True, ["no model is serving: deploy the candidate"], cand_f1,
                            candidate_micro_f1=cand_micro)
    if serving["documents"] != candidate["documents"] or set(serving["per_label"]) - set(
        candidate["per_label"]
    ):
        raise ConfigError(
            "the serving model was not evaluated on the same documents and labels as the candidate"
        )
    serv_f1 = float(serving["macro_f1"])
    gain = cand_f1 - serv_f1
    ok_gain = gain >= config.min_improvement - 1e-12
    reasons = [
        f"macro-F1 {cand_f1:.4f} vs serving {serv_f1:.4f}: {gain:+.4f} "
        f"{'meets' if ok_gain else 'is below'} the required {config.min_improvement:+.4f}"
    ]
    deltas = {
        name: round(row["f1"] - serving["per_label"][name]["f1"], 6)
        for name, row in candidate["per_label"].items()
        if name in serving["per_label"] and row["support"] > 0
    }
    regressions = {n: d for n, d in deltas.items() if d < -config.max_label_regression - 1e-12}
    if regressions:
        worst = ", ".join(f"{n} {d:+.3f}" for n, d in sorted(regressions.items(), key=lambda kv: kv[1]))
        reasons.append(f"label F1 regresses by more than {config.max_label_regression:.3f}: {worst}")
    else:
        reasons.append(f"no label's F1 drops by more than {config.max_label_regression:.3f}")
    serv_micro = float(serving["micro_f1"])
    micro_change = cand_micro - serv_micro
    ok_micro = micro_change >= -config.max_micro_regression - 1e-12
    reasons.append(
        f"micro-F1 {cand_micro:.4f} vs serving {serv_micro:.4f}: {micro_change:+.4f} "
        f"{'within' if ok_micro else 'falls by more than'} the allowed drop of "
        f"{config.max_micro_regression:.4f}"
    )
    refused = [rule for rule, ok in (("min_improvement", ok_gain), ("max_label_regression", not regressions),
                                     ("max_micro_regression", ok_micro)) if not ok]
    return GateDecision(not refused, reasons, cand_f1, serv_f1, deltas, refused, cand_micro, serv_micro)


def _gate_markdown(decision: GateDecision, config: GateConfig, baseline: dict[str, Any] | None = None) -> str:
    verdict = "**deploy**" if decision.deploy else "**do not deploy**"
    lines = ["## Deploy gate", "", f"Decision: {verdict}"]
    if decision.decided_by:
        lines.append(f"Refused by: {', '.join(f'`{rule}`' for rule in decision.decided_by)}")
    lines += [""] + [f"- {r}" for r in decision.reasons]
    if baseline:
        digest = baseline["digest"][:12]
        lines += ["", f"Serving now: `{baseline['uri']}` ({baseline['source']}, digest {digest}…)."]
    lines += [
        "",
        f"Rule: macro-F1 gain ≥ {config.min_improvement:+.3f} (`min_improvement`), no label F1 drop > "
        f"{config.max_label_regression:.3f} (`max_label_regression`) and no micro-F1 drop > "
        f"{config.max_micro_regression:.3f} (`max_micro_regression`), both models on the "
        f"{config.split!r} split.",
        "",
    ]
    if decision.label_deltas:
        lines += ["| label | F1 change vs serving |", "|---|---|"]
        lines += [f"| {n} | {d:+.4f} |" for n, d in decision.label_deltas.items()] + [""]
    return "\n".join(lines)


def find_serving_model(
    serving_model: str | Path | None, service: str = "", release_root: str = ""
) -> tuple[str, str] | None:
    """What serves now: ``(artifact URI or path, where that came from)``, or ``None``.

    An explicit ``serving_model`` wins. Otherwise the latest release record of ``service`` under
    ``release_root`` (or ``$LABELMATCH_STORE_ROOT``) names it: release records name the OnnxModel
    that was deployed, which the gate then scores as it is served.
    """
    if serving_model:
        return str(serving_model), "given"
    root = release_root or os.environ.get(STORE_ROOT_VAR, "")
    if not service or not root:
        return None
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog

    records = ReleaseLog(ArtifactStore.from_env(), root).list(service)
    if not records:
        return None
    latest = records[-1]
    return latest.model_uri, f"release {latest.release_id} of {service} ({latest.time})"


def evaluate_candidate(
    model_dir: str | Path,
    dataset_dir: str | Path,
    report_dir: str | Path,
    serving_model: str | Path | None = None,
    config: GateConfig | None = None,
    lineage: dict[str, Any] | None = None,
    service: str = "",
    release_root: str = "",
) -> dict[str, Any]:
    """Evaluate a candidate against the model serving now, both as served, and write the gated report.

    Both models are scored by the classifier a server would run (an OnnxModel: int8 with its
    fp32 fallback and its shipped thresholds; a Model: torch), on the same split.

    Args:
        model_dir: The candidate: an OnnxModel (the pipeline gates the exported model) or a Model.
        dataset_dir: The Dataset artifact (from ``data_prep``) holding the evaluation split.
        report_dir: The Report artifact directory to write: ``metrics.json`` (candidate),
            ``serving_metrics.json`` (when a model serves), ``decision.json``, ``report.md``
            and its PNG plots.
        serving_model: The artifact serving now (path, ``s3://`` or KFP ``minio://`` URI:
            downloaded and verified first); ``None``: the latest release of ``service``.
        config: Gate thresholds.
        lineage: Recorded in the report manifest.
        service: The service whose latest release is the baseline when ``serving_model`` is not
            given.
        release_root: Where the release records are (default ``$LABELMATCH_STORE_ROOT``).

    Returns:
        ``{"metrics": candidate metrics, "serving_metrics": ... | None, "decision": {...}}``.

    Raises:
        ArtifactError: an input artifact is missing, of the wrong kind or corrupted (naming the
            artifact and the file).
    """
    from labelmatch.data.dataset import load_dataset
    from labelmatch.evaluation.evaluate import evaluate, load_as_served, write_report
    from labelmatch.platform.artifact_store import local_artifact

    config = config or GateConfig()
    verify_artifact(dataset_dir, "Dataset")
    dataset = load_dataset(dataset_dir)
    metrics = evaluate(load_as_served(model_dir), dataset, config.split)
    serving, baseline = None, find_serving_model(serving_model, service, release_root)
    serving_digest = None
    if baseline is not None:
        with local_artifact(baseline[0], ("Model", "OnnxModel")) as local:
            serving = evaluate(load_as_served(local), dataset, config.split)
            serving_digest = artifact_digest(local)
    decision = decide(metrics, serving, config)
    lineage = {
        **(lineage or {}),
        "model": artifact_digest(model_dir),
        "dataset": artifact_digest(dataset_dir),
        **({"serving_model": serving_digest} if serving_digest else {}),
    }
    baseline_info = None
    if baseline is not None:
        baseline_info = {"uri": baseline[0], "source": baseline[1], "digest": serving_digest}
    title = f"Evaluation of the candidate, as served, on the {config.split} split"
    write_report(
        metrics, report_dir, title, lineage, {"stage": "evaluate", "deploy": decision.deploy},
        preface=_gate_markdown(decision, config, baseline_info) + "\n",
        extra_json={**({"serving_metrics.json": serving} if serving is not None else {}),
                    DECISION_FILE: {**decision.to_json(), "serving_model": baseline_info,
                                    "config": asdict(config)}},
    )
    return {"metrics": metrics, "serving_metrics": serving, "decision": decision.to_json()}
