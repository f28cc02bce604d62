"""ONNX export of the real bundled encoder (trained tiny model): artifact, parity, thresholds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import make_tiny_dataset

from labelmatch.artifacts import verify_artifact
from labelmatch.errors import ArtifactError, ConfigError
from labelmatch.export import ExportConfig, ParityError, check_parity
from labelmatch.metrics import tune_global_threshold, tune_label_thresholds
from labelmatch.onnx_classifier import OnnxClassifier, OrtConfig


def test_artifact_follows_the_contract(onnx_model):
    root, _ = onnx_model
    manifest = verify_artifact(root, "OnnxModel")
    for name in ("model.onnx", "model_fp32.onnx", "tokenizer/tokenizer.json", "labels.json",
                 "label_embeddings.npy", "thresholds.json", "labelmatch.json", "parity.json"):
        assert name in manifest["files"], name
    assert not list(root.glob("model_raw*")), "the un-optimised export must not ship"
    info = json.loads((root / "labelmatch.json").read_text())
    assert info["onnx"]["quantization"]["per_channel"] is True
    assert (root / "model.onnx").stat().st_size < 0.5 * (root / "model_fp32.onnx").stat().st_size


def test_parity_fp32_exact_int8_close(onnx_model):
    _, parity = onnx_model
    assert parity["documents"] > 10 and parity["thresholds_retuned"]
    assert parity["fp32"]["cosine_min"] > 0.9999
    assert parity["fp32"]["label_set_agreement"] == 1.0
    assert parity["int8"]["cosine_mean"] > 0.98
    assert parity["int8"]["cosine_min"] > 0.95
    # Thresholds re-tuned on the int8 scores cannot do worse on that split than the old ones.
    assert parity["int8"]["macro_f1_retuned"] >= parity["int8"]["macro_f1"] - 1e-9
    assert abs(parity["int8"]["macro_f1_retuned_delta"]) < 0.1


def test_thresholds_are_retuned_on_int8_scores(onnx_model, trained_model):
    root, _ = onnx_model
    dataset = make_tiny_dataset()
    val = dataset.split("val")
    clf = OnnxClassifier.load(root)
    _, _, probs = clf.scores([d.text for d in val.documents], dataset.labels, replace=True)
    default, _ = tune_global_threshold(val.label_matrix(), probs)
    expected = tune_label_thresholds(val.label_matrix(), probs, default)
    shipped = json.loads((root / "thresholds.json").read_text())
    assert shipped["default"] == pytest.approx(default)
    assert [shipped["labels"][n] for n in dataset.label_names] == pytest.approx(list(expected))
    assert shipped != json.loads((trained_model / "thresholds.json").read_text())


def test_dynamic_axes_and_label_embeddings(onnx_model):
    root, _ = onnx_model
    texts = ["VAT", "Corporate income tax return for 2023 filed late " * 40, "Transfer pricing documentation"]
    fp32 = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1), model_file="model_fp32.onnx")
    embedded = fp32.encoder.embed(texts)
    assert embedded.shape == (3, fp32.encoder.dim)
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-4)
    alone = fp32.encoder.embed(texts[2:])
    assert np.allclose(alone[0], embedded[2], atol=1e-4), "padding must not change an fp32 embedding"
    int8 = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1))
    # Dynamic int8 scales activations per tensor, i.e. per batch: close, not identical. (The
    # stored label embeddings were computed as one batch, as they are compared here.)
    assert float(int8.encoder.embed(texts)[2] @ int8.encoder.embed(texts[2:])[0]) > 0.97
    stored = np.load(root / "label_embeddings.npy")
    labels = json.loads((root / "labels.json").read_text())
    assert np.allclose(stored, int8.encoder.embed(list(labels.values())), atol=1e-5)


def test_parity_gate_refuses_drift(onnx_model):
    _, parity = onnx_model
    check_parity(parity, parity["int8"]["label_set_agreement"], "model")
    with pytest.raises(ParityError, match="below the gate"):
        check_parity(parity, parity["int8"]["label_set_agreement"] + 1e-6, "model")
    with pytest.raises(ConfigError):
        ExportConfig(agreement_gate=1.5)


def test_corrupted_onnx_artifact_is_refused_by_name(onnx_model, tmp_path):
    root, _ = onnx_model
    copy = tmp_path / "onnx"
    shutil.copytree(root, copy)
    labels = copy / "labels.json"
    labels.write_text(labels.read_text().replace('"', "'", 2))
    with pytest.raises(ArtifactError, match=r"labels\.json is corrupted"):
        OnnxClassifier.load(copy)


def test_serving_path_imports_no_torch():
    code = ("import sys, labelmatch.serve, labelmatch.onnx_classifier; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
