"""Label hierarchies: read and checked, carried by models, enforced at prediction, scored per level."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_tiny_dataset

from labelmatch.core.artifacts import write_manifest
from labelmatch.core.errors import DataError
from labelmatch.data.hierarchy import Hierarchy, level_metrics, load_hierarchy

LABELS = {"banking": "Banking.", "transfer": "Move money.", "balance": "Account balance.", "travel": "Trips."}


def test_both_formats_are_read_and_bad_files_are_named(tmp_path):
    path = tmp_path / "hierarchy.json"
    path.write_text(json.dumps({"banking": ["transfer", "balance"]}))
    assert load_hierarchy(path, LABELS).parent_of == {"transfer": "banking", "balance": "banking"}
    path.write_text(json.dumps({"transfer": "banking"}))
    assert load_hierarchy(path, LABELS).parent_of == {"transfer": "banking"}
    path.write_text(json.dumps({"banking": ["transfer"], "travel": ["transfer"]}))
    with pytest.raises(DataError, match=r"hierarchy.json: field 'transfer': label 'transfer' has two"):
        load_hierarchy(path, LABELS)
    path.write_text(json.dumps({"banking": ["cards"]}))
    with pytest.raises(DataError, match=r"not a label of the dataset: cards"):
        load_hierarchy(path, LABELS)
    path.write_text(json.dumps({"banking": ["transfer"], "transfer": ["banking"]}))
    with pytest.raises(DataError, match=r"cycle"):
        load_hierarchy(path, LABELS)


def test_a_child_brings_its_parent_and_levels_are_scored_apart():
    hierarchy = Hierarchy({"transfer": "banking", "balance": "banking"})
    assert hierarchy.enforce(["transfer"]) == ["transfer", "banking"]
    assert hierarchy.enforce(["transfer"], known=["transfer"]) == ["transfer"], "an unserved parent stays out"
    names = list(LABELS)
    truth = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])
    raw = np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 1]])  # the first misses the parent
    assert hierarchy.inconsistent_rate(raw, names) == pytest.approx(1 / 3)
    levels = level_metrics(truth, raw, names, hierarchy)
    assert levels["inconsistent_rate"] == pytest.approx(1 / 3)
    assert levels["parent"] == {"labels": 1, "micro_f1": 1.0, "macro_f1": 1.0}, "scored after the rule"
    assert levels["child"]["labels"] == 2 and levels["child"]["macro_f1"] == 1.0
    composed = hierarchy.compose(LABELS)
    assert composed["transfer"] == "Banking. Move money." and composed["travel"] == "Trips."


@pytest.fixture(scope="module")
def tax_hierarchy() -> dict[str, list[str]]:
    return {"tax_problem": ["vat", "withholding_tax"]}


def _with_hierarchy(src, dst, kind, hierarchy):
    shutil.copytree(src, dst)
    (dst / "hierarchy.json").write_text(json.dumps(hierarchy))
    write_manifest(dst, kind)
    return dst


def test_torch_and_onnx_predictions_are_consistent_and_evaluation_reports_levels(
    trained_model, onnx_model, tmp_path, tax_hierarchy
):
    from labelmatch.evaluation.evaluate import evaluate
    from labelmatch.model.classifier import Classifier
    from labelmatch.runtime.onnx_classifier import OnnxClassifier

    dataset = make_tiny_dataset()
    texts = [d.text for d in dataset.documents]
    torch_dir = _with_hierarchy(trained_model, tmp_path / "m", "Model", tax_hierarchy)
    onnx_dir = _with_hierarchy(onnx_model[0], tmp_path / "o", "OnnxModel", tax_hierarchy)
    for clf in (Classifier.load(torch_dir), OnnxClassifier.load(onnx_dir)):
        predictions = clf.predict(texts)
        labels = [p.labels for p in predictions]
        with_child = [ls for ls in labels if {"vat", "withholding_tax"} & set(ls)]
        assert with_child and all("tax_problem" in ls for ls in with_child), "100% consistent"
        metrics = evaluate(clf, dataset, "test")
        assert set(metrics["levels"]) >= {"inconsistent_rate", "parent", "child"}
        assert metrics["levels"]["child"]["labels"] == 2
