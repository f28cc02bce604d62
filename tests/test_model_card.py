"""Every Model and OnnxModel carries a model card whose figures are the artifact's own."""

from __future__ import annotations

import json
import re

from labelmatch.core.artifacts import read_manifest


def _rows(card: str, header: str) -> dict[str, list[str]]:
    """Rows of the Markdown table right under ``## header``, by first cell."""
    section = card.split(f"## {header}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_model_card_states_the_models_own_figures(trained_model):
    card = (trained_model / "README.md").read_text()
    assert "README.md" in read_manifest(trained_model)["files"], "the card's digest is verified too"
    info = json.loads((trained_model / "labelmatch.json").read_text())
    labels = json.loads((trained_model / "labels.json").read_text())
    thresholds = json.loads((trained_model / "thresholds.json").read_text())
    model = _rows(card, "Model")
    assert model["base encoder"] == [info["base_model"]]
    assert model["max length (tokens)"] == [str(info["max_length"])]
    assert float(model["cosine scale"][0]) == round(info["scale"], 4)
    assert float(model["logit bias"][0]) == round(info["bias"], 4)
    assert float(model["default threshold"][0]) == round(thresholds["default"], 4)
    assert _rows(card, "Training data")["train documents"] == [str(info["data"]["train documents"])]
    assert int(_rows(card, "Hyper-parameters")["lora_rank"][0]) == info["config"]["lora_rank"]
    metric = _rows(card, "Metrics")["val_macro_f1_tuned_thresholds"][0]
    assert float(metric) == round(info["metrics"]["val_macro_f1_tuned_thresholds"], 4)
    rows = _rows(card, "Labels")
    assert list(rows) == list(labels)
    for name, (threshold, f1, description) in rows.items():
        assert float(threshold) == round(thresholds["labels"][name], 4)
        assert float(f1) == round(info["metrics"]["val_per_label"][name]["f1"], 4)
        assert description == labels[name]
    assert "## Intended use" in card and "## Limits" in card


def test_onnx_model_card_adds_the_export_parity(onnx_model):
    root, parity = onnx_model
    card = (root / "README.md").read_text()
    assert card.startswith("# labelmatch ONNX int8 model")
    assert "README.md" in read_manifest(root)["files"]
    rows = _rows(card, "Export parity (validation split)")
    served = parity["fallback"] or parity["int8"]
    agreement = rows["label-set agreement with torch, as served"][0]
    assert float(agreement) == round(served["label_set_agreement"], 4)
    assert rows["thresholds shipped"] == [parity["thresholds"]["shipped"]]
    assert re.search(r"^\| base encoder \| bundled:minilm \|$", card, re.M)
