"""Pooling comes from the encoder's own sentence-transformers files and travels to export and serving."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_dataset, tiny_config

from labelmatch.core.errors import ConfigError
from labelmatch.model.encoder import Pooling, base_pooling, resolve_base_model


def _encoder_dir(tmp_path, pooling_config: dict | None) -> str:
    """The bundled MiniLM copied locally, with its Pooling module's config replaced."""
    target = tmp_path / "encoder"
    shutil.copytree(resolve_base_model("bundled:minilm"), target)
    if pooling_config is None:
        (target / "modules.json").unlink()
    else:
        (target / "1_Pooling" / "config.json").write_text(json.dumps(pooling_config))
    return str(target)


def test_pooling_is_read_from_the_models_files(tmp_path):
    assert base_pooling("bundled:minilm") == Pooling("mean", True)
    cls_dir = _encoder_dir(tmp_path / "a", {"pooling_mode_cls_token": True})
    assert Pooling.from_model_dir(cls_dir) == Pooling("cls")
    assert Pooling.from_model_dir(_encoder_dir(tmp_path / "b", {"pooling_mode": "lasttoken"})).mode == "last"
    assert Pooling.from_model_dir(_encoder_dir(tmp_path / "c", None)) == Pooling("mean", True)
    with pytest.raises(ConfigError, match="no supported pooling mode"):
        Pooling.from_model_dir(_encoder_dir(tmp_path / "d", {"pooling_mode_max_tokens": True}))
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert Pooling("cls").pool(hidden, mask).tolist() == [[0, 1], [6, 7]]
    assert Pooling("last").pool(hidden, mask).tolist() == [[2, 3], [10, 11]]
    assert Pooling("mean").pool(hidden, mask).tolist() == [[1, 2], [8, 9]]


def test_a_cls_pooled_encoder_trains_exports_and_serves_with_fp32_parity(tmp_path):
    from labelmatch.export.onnx import ExportConfig, export_onnx
    from labelmatch.model.classifier import Classifier
    from labelmatch.runtime.onnx_classifier import OnnxClassifier, OrtConfig
    from labelmatch.training.sft import train_sft

    base = _encoder_dir(tmp_path, {"word_embedding_dimension": 384, "pooling_mode_cls_token": True,
                                   "pooling_mode_mean_tokens": False})
    dataset = make_tiny_dataset()
    model = tmp_path / "model"
    train_sft(dataset, tiny_config(base_model=base, epochs=1), model)
    info = json.loads((model / "labelmatch.json").read_text())
    assert info["pooling"] == "cls"
    clf = Classifier.load(model)
    texts = [d.text for d in dataset.split("val").documents[:8]]
    tokens = clf.encoder.tokenize(texts)
    with torch.no_grad():
        hidden = clf.encoder.model(**tokens).last_hidden_state
    cls_vectors = torch.nn.functional.normalize(hidden[:, 0], dim=-1)
    assert torch.allclose(clf.encoder(tokens), cls_vectors, atol=1e-5), "the CLS token, not the mean"

    onnx = tmp_path / "onnx"
    parity = export_onnx(model, onnx, ExportConfig(agreement_gate=0.0, fp32_fallback="off"), dataset)
    assert json.loads((onnx / "labelmatch.json").read_text())["pooling"] == "cls"
    assert parity["fp32"]["label_set_agreement"] == 1.0 and parity["fp32"]["cosine_min"] > 0.9999
    served = OnnxClassifier.load(onnx, OrtConfig(intra_op_threads=1), model_file="model_fp32.onnx")
    torch_emb = clf.encoder.embed(texts).numpy()
    assert ((served.encoder.embed(texts) * torch_emb).sum(axis=1) > 0.9999).all()
