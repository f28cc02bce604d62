"""The deploy gate: margin on macro-F1, per-label regressions, no serving model, real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_tiny_dataset

from labelmatch.core.artifacts import verify_artifact, write_manifest
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.data.dataset import load_dataset, save_dataset
from labelmatch.evaluation.gate import GateConfig, decide, evaluate_candidate


def _metrics(macro: float, per_label: dict[str, float], support: int = 5, micro: float | None = None) -> dict:
    return {
        "documents": 40,
        "macro_f1": macro,
        "micro_f1": macro if micro is None else micro,
        "per_label": {
            n: {"f1": f, "support": support, "precision": f, "recall": f} for n, f in per_label.items()
        },
    }


def test_no_serving_model_deploys() -> None:
    decision = decide(_metrics(0.3, {"a": 0.3}), None, GateConfig())
    assert decision.deploy and "no model is serving" in decision.reasons[0]


def test_margin_is_required() -> None:
    serving = _metrics(0.70, {"a": 0.7, "b": 0.7})
    assert decide(_metrics(0.73, {"a": 0.73, "b": 0.73}), serving, GateConfig()).deploy
    small = decide(_metrics(0.71, {"a": 0.71, "b": 0.71}), serving, GateConfig())
    assert not small.deploy and "is below the required +0.0200" in small.reasons[0]
    assert decide(_metrics(0.71, {"a": 0.71, "b": 0.71}), serving, GateConfig(min_improvement=0.01)).deploy


def test_a_label_regression_blocks_even_a_better_model() -> None:
    serving = _metrics(0.60, {"a": 0.9, "b": 0.3})
    candidate = _metrics(0.70, {"a": 0.8, "b": 0.6})
    decision = decide(candidate, serving, GateConfig(max_label_regression=0.05))
    assert not decision.deploy
    assert "a -0.100" in decision.reasons[1] and decision.label_deltas == {"a": -0.1, "b": 0.3}
    assert decide(candidate, serving, GateConfig(max_label_regression=0.15)).deploy


def test_a_slice_gain_that_costs_two_micro_points_is_refused_and_the_rule_named() -> None:
    """GRPO's failure mode: feedback labels gain (macro-F1 up, no single label falls > 0.05), but the
    loss spread thinly over the rest costs two micro-F1 points; the micro rule refuses it."""
    rest = {f"rest{i}": 0.80 for i in range(20)}
    serving = _metrics(0.70, {"fb1": 0.40, "fb2": 0.40, **rest}, micro=0.80)
    candidate = _metrics(0.73, {"fb1": 0.75, "fb2": 0.75, **{n: 0.77 for n in rest}}, micro=0.78)
    decision = decide(candidate, serving, GateConfig())
    assert not decision.deploy and decision.decided_by == ["max_micro_regression"]
    assert "micro-F1 0.7800 vs serving 0.8000: -0.0200 falls by more than" in decision.reasons[2]
    assert decide(candidate, serving, GateConfig(max_micro_regression=0.025)).deploy
    small = _metrics(0.73, {"fb1": 0.75, "fb2": 0.75, **{n: 0.77 for n in rest}}, micro=0.7905)
    assert decide(small, serving, GateConfig()).deploy  # within the default 1 point


def test_every_refusing_rule_is_named() -> None:
    serving = _metrics(0.70, {"a": 0.9, "b": 0.5}, micro=0.8)
    candidate = _metrics(0.69, {"a": 0.7, "b": 0.68}, micro=0.7)
    decision = decide(candidate, serving, GateConfig())
    assert decision.decided_by == ["min_improvement", "max_label_regression", "max_micro_regression"]
    assert decide(_metrics(0.8, {"a": 0.9, "b": 0.7}), serving, GateConfig()).decided_by == []


def test_labels_without_support_are_ignored() -> None:
    serving = _metrics(0.5, {"a": 0.5})
    serving["per_label"]["rare"] = {"f1": 1.0, "support": 0}
    candidate = _metrics(0.6, {"a": 0.6})
    candidate["per_label"]["rare"] = {"f1": 0.0, "support": 0}
    assert decide(candidate, serving, GateConfig()).deploy


def test_models_on_different_documents_are_refused() -> None:
    other = _metrics(0.5, {"a": 0.5})
    other["documents"] = 12
    with pytest.raises(ConfigError, match="same documents"):
        decide(_metrics(0.6, {"a": 0.6}), other, GateConfig())


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_label_regression"):
        GateConfig(max_label_regression=-0.1)
    with pytest.raises(ConfigError, match="split"):
        GateConfig(split="dev")
    with pytest.raises(ConfigError, match="max_micro_regression"):
        GateConfig(max_micro_regression=1.5)


@pytest.fixture(scope="module")
def dataset_artifact(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gate") / "dataset"
    save_dataset(make_tiny_dataset(), out)
    write_manifest(out, "Dataset")
    return out


def test_real_models_gate_both_ways(trained_model: Path, dataset_artifact: Path, tmp_path: Path) -> None:
    """Nothing serving: deploy. The same model serving: no gain, so no deploy unless the margin is 0."""
    first = evaluate_candidate(trained_model, dataset_artifact, tmp_path / "first")
    assert first["decision"]["deploy"] and first["serving_metrics"] is None
    same = evaluate_candidate(
        trained_model, dataset_artifact, tmp_path / "same", serving_model=trained_model
    )
    assert not same["decision"]["deploy"]
    assert same["decision"]["candidate_macro_f1"] == same["decision"]["serving_macro_f1"]
    assert decide(same["metrics"], same["serving_metrics"], GateConfig(min_improvement=0.0)).deploy
    manifest = verify_artifact(tmp_path / "same", "Report")
    assert manifest["summary"] == {"stage": "evaluate", "deploy": False}
    decision = json.loads((tmp_path / "same" / "decision.json").read_text())
    assert decision["config"]["min_improvement"] == 0.02
    assert decision["config"]["max_micro_regression"] == 0.01
    assert decision["decided_by"] == ["min_improvement"]
    report = (tmp_path / "same" / "report.md").read_text()
    assert "Decision: **do not deploy**" in report and "per_label_f1.png" in report
    assert "Refused by: `min_improvement`" in report


def test_bad_input_artifacts_are_named(trained_model: Path, dataset_artifact: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"kind is 'Dataset', expected 'Model' or 'OnnxModel'"):
        evaluate_candidate(dataset_artifact, dataset_artifact, tmp_path / "r")
    with pytest.raises(ArtifactError, match=r"missing manifest\.json"):
        evaluate_candidate(trained_model, tmp_path, tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_the_gate_scores_the_exported_model_as_served_against_the_latest_release(
    onnx_model, trained_model: Path, dataset_artifact: Path, tmp_path: Path, monkeypatch
) -> None:
    """The candidate is the OnnxModel (int8, its fallback, its shipped thresholds); with no
    baseline given, the latest release record of the service names what serves."""
    from s3_server import moto_s3_server, s3_env

    from labelmatch.core.artifacts import artifact_digest
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog, ReleaseRecord
    from labelmatch.runtime.onnx_classifier import OnnxClassifier

    onnx_dir, _ = onnx_model
    served = evaluate(OnnxClassifier.load(onnx_dir), load_dataset(dataset_artifact), "test")
    with moto_s3_server() as url:
        for key, value in s3_env(url).items():
            monkeypatch.setenv(key, value)
        store = ArtifactStore.from_env()
        uri = "s3://lm-gate/models/onnx/a"
        digest = store.upload_artifact(onnx_dir, uri, kind="OnnxModel")
        record = ReleaseRecord.new(service="tax", namespace="ml", model_uri=uri, model_digest=digest,
                                   pipeline_version="0.1.0", run_id="")
        ReleaseLog(store, "s3://lm-gate").append(record)
        result = evaluate_candidate(onnx_dir, dataset_artifact, tmp_path / "r", service="tax",
                                    release_root="s3://lm-gate")
        nothing = evaluate_candidate(onnx_dir, dataset_artifact, tmp_path / "n", service="other",
                                     release_root="s3://lm-gate")
    assert result["metrics"]["macro_f1"] == served["macro_f1"], "the candidate scored as the server scores it"
    assert result["serving_metrics"]["macro_f1"] == served["macro_f1"] and not result["decision"]["deploy"]
    decision = json.loads((tmp_path / "r" / "decision.json").read_text())
    assert decision["serving_model"]["uri"] == uri and decision["serving_model"]["digest"] == digest
    assert decision["serving_model"]["source"].startswith("release ")
    assert verify_artifact(tmp_path / "r", "Report")["lineage"]["serving_model"] == artifact_digest(onnx_dir)
    assert nothing["serving_metrics"] is None and nothing["decision"]["deploy"]
