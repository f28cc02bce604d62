"""Prediction: label sets, labels changed at request time, zero-shot, chunking, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ConfigError
from labelmatch.model.chunking import Chunking, document_windows
from labelmatch.model.classifier import Classifier

CUSTOMS = {"customs_duty": "Import duties, tariffs and customs declarations for goods crossing a border."}


@pytest.fixture(scope="module")
def classifier(trained_model):
    return Classifier.load(trained_model)


def test_predictions_follow_thresholds(classifier):
    texts = ["The VAT return for Q1 2023 was filed late.", "Transfer pricing documentation for the group."]
    names, probs = classifier.scores(texts)
    for prediction, row in zip(classifier.predict(texts), probs, strict=True):
        expected = {
            n for n, p in zip(names, row, strict=True) if p >= classifier.thresholds.for_labels([n])[0]
        }
        assert set(prediction.labels) == expected
        assert list(prediction.scores) == names


def test_added_and_replaced_labels_without_retraining(classifier):
    text = ["The container of machine parts was held at the border until import duties were paid."]
    added = classifier.predict(text, labels=CUSTOMS)[0]
    assert set(added.scores) == {*classifier.labels, "customs_duty"}
    replaced = classifier.predict(text, labels=CUSTOMS, replace=True)[0]
    assert list(replaced.scores) == ["customs_duty"]
    assert replaced.scores["customs_duty"] == pytest.approx(added.scores["customs_duty"])
    assert added.scores["customs_duty"] > added.scores["transfer_pricing"]


def test_zero_shot_bundled_encoder_ranks_the_right_label():
    labels = {
        "vat": "Value added tax charged on sales of goods and services.",
        "weather": "Weather forecasts, rain, sunshine and temperatures.",
    }
    clf = Classifier.zero_shot(labels)
    _, probs = clf.scores(
        ["We charged 21% VAT on the invoice for consulting services.", "Heavy rain and storms tomorrow."]
    )
    assert probs[0, 0] > probs[0, 1] and probs[1, 1] > probs[1, 0]


def test_chunking_max_pools_over_windows(classifier):
    long_text = (
        "Routine board minutes about catering and parking. " * 60
    ) + "The VAT refund claim for 2021 was rejected."
    truncate = classifier.chunking
    classifier.chunking = Chunking.for_model("chunk", classifier.encoder.max_length)
    try:
        texts = [long_text, "short text"]
        _, owner = document_windows(texts, classifier.encoder.offsets, classifier.chunking)
        assert (owner == 0).sum() > 1 and (owner == 1).sum() == 1
        names, chunked = classifier.scores([long_text])
    finally:
        classifier.chunking = truncate
    _, truncated = classifier.scores([long_text])
    assert chunked[0, names.index("vat")] > truncated[0, names.index("vat")]
    assert np.all(chunked >= truncated - 1e-6)


def test_cli_train_evaluate_predict(tmp_path, sample_dir):
    model, report = tmp_path / "m", tmp_path / "r"
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"max_length": 48, "epochs": 1, "batch_size": 32, "min_steps": 0}))

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "labelmatch.cli", *args], capture_output=True, text=True, timeout=600
        )

    trained = run(
        "train", "--data", str(sample_dir), "--out", str(model), "--config", str(config), "--no-progress"
    )
    assert trained.returncode == 0, trained.stderr
    assert "model written to" in trained.stdout
    evaluated = run("evaluate", "--model", str(model), "--data", str(sample_dir), "--out", str(report))
    assert evaluated.returncode == 0, evaluated.stderr
    metrics = json.loads((report / "metrics.json").read_text())
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and (report / "reliability.png").stat().st_size > 1000
    manifest = verify_artifact(report, "Report")  # the report is an artifact like any other
    assert manifest["lineage"]["model"] == artifact_digest(model) and manifest["summary"]["split"] == "test"
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(CUSTOMS))
    predicted = run("predict", "--model", str(model), "--labels", str(extra), "Import duties on steel.")
    lines = [json.loads(line) for line in predicted.stdout.splitlines() if line.startswith("{")]
    assert predicted.returncode == 0 and "customs_duty" in lines[0]["scores"]


def test_label_sets_past_the_maximum_are_refused_in_one_line(monkeypatch):
    from labelmatch.model import matching

    monkeypatch.setattr(matching, "MAX_LABELS", 3)
    matching.check_label_count(3)
    with pytest.raises(ConfigError, match=r"^4 labels exceed the maximum of 3 per label set"):
        matching.check_label_count(4)


def test_many_label_descriptions_are_embedded_in_chunks_with_progress(monkeypatch, capsys):
    from labelmatch.model import matching

    monkeypatch.setattr(matching, "LABEL_CHUNK", 4)
    calls = []

    def embed(texts):
        calls.append(len(texts))
        return np.array([[float(len(t))] for t in texts], dtype=np.float32)

    texts = [f"label {'x' * i}" for i in range(10)]
    out = matching.embed_in_chunks(embed, texts)
    assert calls == [4, 4, 2] and out[:, 0].tolist() == [len(t) for t in texts]
    assert "label descriptions" in capsys.readouterr().err
    assert matching.embed_in_chunks(embed, texts[:4]).shape == (4, 1) and calls[-1] == 4
