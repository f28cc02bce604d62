"""One rule for long documents: torch (validation, evaluation, prediction) and the server agree."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import make_tiny_dataset

from labelmatch.core.artifacts import write_manifest
from labelmatch.core.errors import ConfigError
from labelmatch.model.chunking import Chunking, document_windows, max_over_windows

FILLER = ("The committee met on Tuesday to discuss the new office furniture, the parking rules and the "
          "summer party; members also reviewed the cafeteria menu and the cleaning schedule. ") * 6


def test_windows_cover_the_document_with_the_configured_overlap():
    chunking = Chunking.for_model("chunk", max_length=12, stride=4)  # 10 content tokens per window
    offsets = [(2 * i, 2 * i + 1) for i in range(23)]  # 23 one-character tokens
    spans = chunking.spans(offsets)
    starts = [a // 2 for a, _ in spans]
    assert starts == [0, 4, 8, 12, 13], "every 4 tokens, and a last window ending at the end"
    assert spans[-1][1] == offsets[-1][1]
    assert Chunking.for_model("chunk", 12).spans(offsets[:10]) == [(0, 19)], "short: one window"
    assert Chunking.for_model("truncate", 12).spans(offsets) == [(0, 45)], "truncate: the text as is"
    windows, owner = document_windows(["ab", "cd"], lambda t: [(0, 1), (1, 2)], Chunking("truncate"))
    assert windows == ["ab", "cd"] and owner.tolist() == [0, 1]
    cos = max_over_windows(np.array([[0.1, 0.5], [0.3, 0.2], [0.0, 0.9]]), np.array([0, 0, 1]), 2)
    assert np.allclose(cos, [[0.3, 0.5], [0.0, 0.9]])
    with pytest.raises(ConfigError, match="long_documents"):
        Chunking("paragraphs")


@pytest.fixture(scope="module")
def chunked_models(trained_model, tmp_path_factory):
    """The tiny model with the ``chunk`` rule, exported; the server re-embeds every document in
    fp32 (fallback margin covering every cosine), so its scores are torch's up to float noise
    on any CPU, whatever int8 would round."""
    from labelmatch.export.onnx import ExportConfig, export_onnx

    root = tmp_path_factory.mktemp("chunk")
    model = root / "model"
    shutil.copytree(trained_model, model)
    info = json.loads((model / "labelmatch.json").read_text())
    info.update(long_documents="chunk", chunk_stride=20)
    (model / "labelmatch.json").write_text(json.dumps(info))
    (model / "README.md").unlink()
    write_manifest(model, "Model")
    onnx = root / "onnx"
    # fp32 served: the comparison with torch below is about windows, not int8 rounding.
    config = ExportConfig(agreement_gate=0.0, fp32_fallback="off", engine="ort-fp32")
    export_onnx(model, onnx, config, make_tiny_dataset())
    served = json.loads((onnx / "labelmatch.json").read_text())
    assert (served["long_documents"], served["chunk_stride"], served["engine"]) == ("chunk", 20, "ort-fp32")
    return model, onnx


def test_a_long_document_gets_the_same_labels_from_torch_and_from_the_server(chunked_models, tmp_path):
    from labelmatch.model.classifier import Classifier
    from labelmatch.sample_data import sample_path
    from labelmatch.stages.deploy import serve_and_classify

    model, onnx = chunked_models
    docs = [json.loads(line) for line in (sample_path("tax") / "docs.jsonl").read_text().splitlines()]
    vat = next(d["text"] for d in docs if d["labels"] == ["vat"])
    long_doc = FILLER + vat  # the evidence sits past the first window
    torch_clf = Classifier.load(model)
    assert torch_clf.chunking.mode == "chunk"
    [torch_pred] = torch_clf.predict([long_doc])
    served = serve_and_classify(onnx, [long_doc], tmp_path / "server.log", timeout_s=120)["predictions"][0]
    thresholds = torch_clf.thresholds.for_labels(list(torch_pred.scores))
    for (name, p), t in zip(torch_pred.scores.items(), thresholds, strict=True):
        assert served["scores"][name] == pytest.approx(p, abs=1e-3), name
        if abs(p - t) > 1e-3:  # a decision this close to its threshold may go either way in fp32
            assert (name in served["labels"]) == (name in torch_pred.labels), name
    # Reading the whole document matters: the evidence at its end raises the VAT score.
    truncated = Classifier(torch_clf.encoder, torch_clf.labels, None, torch_clf.scale, torch_clf.bias,
                           torch_clf.thresholds, Chunking.for_model("truncate", torch_clf.encoder.max_length))
    [cut] = truncated.predict([long_doc])
    assert torch_pred.scores["vat"] > cut.scores["vat"] + 0.05
    assert all(torch_pred.scores[n] >= cut.scores[n] - 1e-4 for n in cut.scores), "max over windows"
