"""ONNX export of the real bundled encoder (trained tiny model): artifact, parity, thresholds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import make_tiny_dataset

from labelmatch.core.artifacts import verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.evaluation.metrics import tune_global_threshold
from labelmatch.export.onnx import (
    ExportConfig,
    ParityError,
    calibrate_fallback,
    check_parity,
    choose_thresholds,
    export_onnx,
)
from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig


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


def executed_operators(path, config: OrtConfig, profile_dir) -> set[str]:
    """Operator types ONNX Runtime ran for one call of the serving session, read from its own profile."""
    options = config.session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(profile_dir / "ort")
    session = config.create_session(path, options)
    session.run(None, {i.name: np.ones((1, 16), dtype=np.int64) for i in session.get_inputs()})
    with open(session.end_profiling()) as handle:
        events = json.load(handle)
    return {e["args"]["op_name"] for e in events if e.get("cat") == "Node" and "op_name" in e.get("args", {})}


def test_residual_layer_norm_is_not_fused_into_the_slow_kernel(onnx_model, tmp_path):
    # ORT's CPU SkipLayerNormalization kernel is ~5x slower than Add + LayerNormalization: the
    # export leaves the pair unfused and the session must not fuse it back.
    root, _ = onnx_model
    info = json.loads((root / "labelmatch.json").read_text())
    assert "SkipLayerNormalization" not in info["onnx"]["fused_operators"]
    assert info["onnx"]["fused_operators"]["Attention"] >= 1
    served = executed_operators(root / "model.onnx", OrtConfig(intra_op_threads=1), tmp_path)
    assert {"LayerNormalization", "QAttention"} <= served and "SkipLayerNormalization" not in served
    refused = executed_operators(root / "model.onnx", OrtConfig(intra_op_threads=1, disabled_optimizers=()),
                                 tmp_path)
    assert "SkipLayerNormalization" in refused, "ORT's own fusion would re-create it"


def test_parity_fp32_exact_int8_close(onnx_model):
    # Margins that hold on AVX2, AVX-512 and VNNI/AMX machines alike: int8 rounding differs
    # between them, fp32 does not (beyond float noise).
    _, parity = onnx_model
    assert parity["documents"] > 10
    assert parity["fp32"]["cosine_min"] > 0.9999
    assert parity["fp32"]["label_set_agreement"] == 1.0
    assert parity["int8"]["cosine_mean"] > 0.98
    assert parity["int8"]["cosine_min"] > 0.95


def test_shipped_thresholds_are_the_better_candidate_on_validation(onnx_model, trained_model):
    root, parity = onnx_model
    choice = parity["thresholds"]
    candidates = choice["candidates"]
    assert set(candidates) == {"model", "retuned"}
    f1 = {k: v["served_macro_f1"] for k, v in candidates.items()}
    other = "model" if choice["shipped"] == "retuned" else "retuned"
    # Whatever the CPU's int8 rounding made of the scores, what ships never scores lower on the
    # split it was chosen on, and parity.json's top level describes what ships.
    assert f1[choice["shipped"]] >= f1[other]
    assert parity["thresholds_retuned"] == (choice["shipped"] == "retuned")
    for key in ("fp32", "int8", "fallback"):
        assert parity[key] == candidates[choice["shipped"]][key]
    shipped = json.loads((root / "thresholds.json").read_text())
    model = json.loads((trained_model / "thresholds.json").read_text())
    assert shipped["default"] == pytest.approx(candidates[choice["shipped"]]["thresholds"]["default"])
    if choice["shipped"] == "model":
        assert shipped == model


def test_thresholds_choice_prefers_the_model_unless_retuning_is_no_worse():
    assert choose_thresholds({"model": 0.64, "retuned": 0.63}) == "model"
    assert choose_thresholds({"model": 0.64, "retuned": 0.64}) == "retuned"
    assert choose_thresholds({"model": 0.60, "retuned": 0.70}) == "retuned"
    assert choose_thresholds({"model": None}) == "model"


def test_retuned_thresholds_are_tuned_on_the_served_scores(trained_model, tmp_path):
    # Without a fallback the served scores are int8's: the re-tuned candidate is the library's
    # rule applied to the int8 graph's validation probabilities.
    out = tmp_path / "onnx"
    parity = export_onnx(trained_model, out, ExportConfig(agreement_gate=0.0, fp32_fallback="off",
                                                          engine="ort-int8-dynamic"), make_tiny_dataset())
    assert parity["fallback"] is None
    dataset = make_tiny_dataset()
    val = dataset.split("val")
    clf = OnnxClassifier.load(out)
    _, probs = clf.scores([d.text for d in val.documents], dataset.labels, replace=True)
    default, _ = tune_global_threshold(val.label_matrix(), probs)
    retuned = parity["thresholds"]["candidates"]["retuned"]
    assert retuned["thresholds"]["default"] == pytest.approx(default)
    assert retuned["fallback"] is None
    assert retuned["served_macro_f1"] == pytest.approx(retuned["int8"]["macro_f1"])


def test_dynamic_axes_and_label_embeddings(onnx_model):
    root, _ = onnx_model
    texts = ["VAT", "Corporate income tax return for 2023 filed late " * 40, "Transfer pricing documentation"]
    fp32 = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1), model_file="model_fp32.onnx")
    embedded = fp32.encoder.embed(texts)
    assert embedded.shape == (3, fp32.encoder.dim)
    assert np.allclose(np.linalg.norm(embedded, axis=1), 1.0, atol=1e-4)
    alone = fp32.encoder.embed(texts[2:])
    assert np.allclose(alone[0], embedded[2], atol=1e-4), "padding must not change an fp32 embedding"
    int8 = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1), model_file="model.onnx")
    # Dynamic int8 scales activations per tensor, i.e. per batch: one document per run (the
    # default) makes a document's embedding independent of the others in the request.
    assert np.array_equal(int8.encoder.embed(texts)[2], int8.encoder.embed(texts[2:])[0])
    batched = OnnxClassifier.load(root, OrtConfig(intra_op_threads=1, batch_size=8), model_file="model.onnx")
    assert float(batched.encoder.embed(texts)[2] @ batched.encoder.embed(texts[2:])[0]) > 0.97
    # Shipped label embeddings come from torch (full precision): the fp32 graph reproduces them.
    stored = np.load(root / "label_embeddings.npy")
    labels = json.loads((root / "labels.json").read_text())
    assert np.allclose(stored, fp32.encoder.embed(list(labels.values())), atol=1e-4)


def test_parity_gate_refuses_drift(onnx_model):
    _, parity = onnx_model
    served = parity["served"]["label_set_agreement"]
    check_parity(parity, served, "model")
    with pytest.raises(ParityError, match="below the gate"):
        check_parity(parity, served + 1e-6, "model")
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
    code = ("import sys, labelmatch.serving.server, labelmatch.runtime.onnx_classifier; "
            "heavy = [m for m in ('torch', 'transformers', 'peft') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fallback_margin_is_calibrated_on_one_half_and_measured_on_the_other():
    boundary = np.array([0.3, 0.5], dtype=np.float32)
    torch_pred = np.array([[1, 0], [0, 0], [1, 1], [0, 1], [1, 0], [0, 0]], dtype=bool)
    fp32 = np.where(torch_pred, boundary + 0.2, boundary - 0.2)  # fp32 agrees with torch
    int8 = fp32.copy()
    int8[0, 0] = 0.29   # calibration half: wrong, 0.01 from the boundary
    int8[1, 1] = 0.52   # calibration half: wrong, 0.02 from the boundary
    int8[2, 0] = 0.305  # right but close: re-embedded, stays right
    int8[4, 0] = 0.27   # holdout: wrong by 0.03, beyond the margin (0.024): not caught
    int8[5, 1] = 0.51   # holdout: wrong by 0.01, caught
    plan = calibrate_fallback(int8, fp32, torch_pred, boundary, safety=1.2)
    assert plan["margin"] == pytest.approx(0.024)
    assert plan["calibration_documents"] == 3 and plan["holdout_documents"] == 3
    assert plan["label_set_agreement_calibration"] == 1.0 and plan["fallback_fraction_calibration"] == 1.0
    assert plan["label_set_agreement"] == pytest.approx(2 / 3)  # doc 4 stays wrong
    assert plan["fallback_fraction"] == pytest.approx(1 / 3)  # only doc 5 is near a boundary
    assert calibrate_fallback(fp32, fp32, torch_pred, boundary, 1.2)["margin"] == 0.0
    # A target below 1 leaves the farthest wrong document (0.02) to int8: one of three may stay wrong.
    cheaper = calibrate_fallback(int8, fp32, torch_pred, boundary, safety=1.2, target=0.6)
    assert cheaper["margin"] == pytest.approx(0.012, abs=1e-6)
    assert cheaper["label_set_agreement_calibration"] == pytest.approx(2 / 3)  # doc 1 stays wrong
    assert cheaper["fallback_fraction_calibration"] == pytest.approx(2 / 3)  # docs 0 and 2
    assert cheaper["label_set_agreement"] == pytest.approx(2 / 3)  # doc 5 caught, doc 4 not
    # The default target sits halfway between the gate and 1.
    assert ExportConfig(agreement_gate=0.98).fallback_agreement_target == pytest.approx(0.99)
    assert ExportConfig(fallback_target=1.0).fallback_agreement_target == 1.0
    with pytest.raises(ConfigError, match="fallback_target"):
        ExportConfig(fallback_target=0.0)


def test_fp32_fallback_re_embeds_only_documents_near_a_boundary(onnx_model, tmp_path):
    root, _ = onnx_model
    texts = [d.text for d in make_tiny_dataset().split("val").documents]
    config = OrtConfig(intra_op_threads=1)
    int8 = OnnxClassifier.load(root, config, model_file="model.onnx")
    fp32 = OnnxClassifier.load(root, config, model_file="model_fp32.onnx")
    names, int8_cos = int8.similarities(texts)
    _, fp32_cos = fp32.similarities(texts)
    distance = np.abs(int8_cos - int8.boundary_cosines(names)).min(axis=1)
    margin = float(np.median(distance))
    copy = tmp_path / "onnx"
    shutil.copytree(root, copy)
    info = json.loads((copy / "labelmatch.json").read_text())
    info["engines"]["ort-int8-dynamic"]["fallback"] = {"model": "model_fp32.onnx", "margin": margin}
    (copy / "labelmatch.json").write_text(json.dumps(info))
    counts: list[int] = []
    cascade = OnnxClassifier.load(copy, config, verify=False, engine_name="ort-int8-dynamic")
    cascade.on_fallback = counts.append
    _, cos = cascade.similarities(texts)
    near = distance < margin
    assert counts == [int(near.sum())] and 0 < near.sum() < len(texts)
    assert np.allclose(cos[near], fp32_cos[near], atol=1e-5)
    assert np.allclose(cos[~near], int8_cos[~near], atol=1e-5)
    (copy / "model_fp32.onnx").unlink()
    with pytest.raises(ArtifactError, match=r"model_fp32\.onnx"):
        OnnxClassifier.load(copy, config, verify=False, engine_name="ort-int8-dynamic")


def test_export_plans_the_fallback_and_the_server_loads_it(trained_model, tmp_path):
    out = tmp_path / "onnx"
    config = ExportConfig(agreement_gate=0.0, fp32_fallback="always", fallback_target=1.0,
                          engine="ort-int8-dynamic")
    parity = export_onnx(trained_model, out, config, make_tiny_dataset())
    plan = parity["fallback"]
    # Target 1: the margin covers every wrong int8 decision of the calibration half, and fp32
    # agrees with torch.
    assert parity["fp32"]["label_set_agreement"] == 1.0
    assert plan["label_set_agreement_calibration"] == 1.0
    assert plan["holdout_documents"] + plan["calibration_documents"] == parity["documents"]
    info = json.loads((out / "labelmatch.json").read_text())
    assert info["onnx"]["fallback"] == {"model": "model_fp32.onnx", "margin": plan["margin"]}
    clf = OnnxClassifier.load(out)
    assert clf.fallback is not None and clf.fallback_margin == plan["margin"]
    with pytest.raises(ConfigError, match="keep_fp32"):
        ExportConfig(fp32_fallback="always", keep_fp32=False)


def test_an_export_without_room_on_disk_is_refused_before_it_writes_anything(trained_model, tmp_path,
                                                                             monkeypatch):
    from labelmatch.export import onnx as export_module

    out = tmp_path / "onnx"
    out.mkdir()
    (out / "earlier.txt").write_text("the artifact already there")
    weights = export_module.model_weight_bytes(trained_model)
    assert weights > 10**7  # the bundled MiniLM's weights, found through the adapter's base model
    monkeypatch.setattr("labelmatch.core.disk.shutil.disk_usage",
                        lambda path: SimpleNamespace(total=10**12, used=10**12 - 10**6, free=10**6))
    with pytest.raises(ArtifactError, match=rf"export of {trained_model} needs about "
                                            rf"{3 * weights / 1e9:.1f} GB free .* which has 0\.0 GB"):
        export_onnx(trained_model, out, ExportConfig(agreement_gate=0.0), make_tiny_dataset())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["onnx"]  # no staging or scratch directory
    assert [p.name for p in out.iterdir()] == ["earlier.txt"]
