"""The model card: a ``README.md`` in every Model and OnnxModel artifact, written from its own files.

Like SetFit's generated cards, the card is rendered only from what the artifact itself holds
(``labelmatch.json``, ``labels.json``, ``thresholds.json``, ``parity.json`` for an OnnxModel), so
it can never disagree with the model it describes; ``tests/test_model_card.py`` reads the figures
back. It is written before the manifest, so its digest is checked like every other file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CARD_FILE = "README.md"

_INTENDED_USE = """\
## Intended use

Multi-label classification of documents against natural-language label descriptions: a label's
probability is `sigmoid(scale · cos(document, description) + bias)`, and a label is predicted when
the probability reaches its threshold. New labels can be added at request time as descriptions
(no retraining); they use the default threshold.

## Limits

- Quality on labels the model was not trained on rests on the descriptions and on how far they are
  from the training labels; measure it on your own labels before relying on it
  (`bench/bench_transfer.py` shows how).
- Thresholds were tuned on the validation split listed below; a different document distribution
  needs them re-tuned (`labelmatch evaluate`).
- Texts longer than the maximum length are {long_documents}.
- The training data's biases carry over; PII was {pii} before training.
"""


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("setting", "value")) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return lines + [f"| {key} | {_fmt(value)} |" for key, value in rows]


def render_model_card(
    info: dict[str, Any],
    labels: dict[str, str],
    thresholds: dict[str, Any],
    kind: str = "Model",
    parity: dict[str, Any] | None = None,
    profile: dict[str, Any] | None = None,
) -> str:
    """The card's Markdown.

    Args:
        info: The artifact's ``labelmatch.json``.
        labels: ``labels.json``.
        thresholds: ``thresholds.json`` (``{"default", "labels"}``).
        kind: ``Model`` or ``OnnxModel``.
        parity: ``parity.json`` of an OnnxModel.
        profile: ``reference_profile.json`` of an OnnxModel (the monitoring reference).
    """
    config = info.get("config") or {}
    metrics = info.get("metrics") or {}
    data = info.get("data") or {}
    per_label = metrics.get("val_per_label") or {}
    title = "ONNX int8 model" if kind == "OnnxModel" else "Model"
    lines = [
        f"# labelmatch {title}: {len(labels)} labels on {info['base_model']}",
        "",
        "A dual encoder that matches documents to label descriptions (not a classification head).",
        "",
        "## Model",
        "",
        *_table([
            ("base encoder", info["base_model"]),
            ("pooling", f"{info.get('pooling', 'mean')}, L2-normalised: {info.get('normalize', True)}"),
            ("layout", info.get("layout", "encoder")),
            ("max length (tokens)", info["max_length"]),
            ("long documents", info.get("long_documents", config.get("long_documents", "truncate"))),
            ("cosine scale", info["scale"]),
            ("logit bias", info["bias"]),
            ("default threshold", thresholds.get("default", 0.5)),
            ("labelmatch version", info.get("labelmatch_version", "")),
        ]),
        "",
    ]
    if data:
        lines += ["## Training data", "", *_table(sorted(data.items()), ("split / item", "count")), ""]
    if config:
        keys = ("epochs", "batch_size", "lr", "lora_rank", "lora_alpha", "lora_dropout", "encoder_dropout",
                "lora_target_modules", "scale",
                "contrastive_weight", "margin", "max_length", "label_refresh_steps", "seed")
        lines += ["## Hyper-parameters", "", *_table([(k, config[k]) for k in keys if k in config]), ""]
    if metrics:
        flat = [(k, v) for k, v in sorted(metrics.items()) if isinstance(v, int | float)]
        lines += ["## Metrics", "", *_table(flat, ("metric", "value")), ""]
    if parity:
        old = parity.get("fallback") or parity.get("int8") or {}  # written before engines were measured
        served = parity.get("served") or {"engine": "ort-int8-dynamic", "fp32_fallback": bool(parity.get(
            "fallback")), "label_set_agreement": old.get("label_set_agreement")}
        engines = parity.get("engines") or {}
        choice = parity.get("thresholds", {})
        lines += ["## Export parity (validation split)", "", *_table([
            ("documents compared", parity.get("documents")),
            ("serving engine (picked by the export's probe)", served["engine"]),
            ("label-set agreement with torch, as served", served["label_set_agreement"]),
            ("int8 alone: label-set agreement", (parity.get("int8") or {}).get("label_set_agreement")),
            ("fp32 fallback", "yes" if served["fp32_fallback"] else "no"),
            ("thresholds shipped", choice.get("shipped", "model")),
        ]), ""]
        if engines:
            costs = (parity.get("engine_probe") or {}).get("costs_ms", {})
            lines += ["Serving engines measured at export (agreement with torch as served; cost: ms per "
                      "document with its fp32 fallback, one document per call, on the exporting CPU):", "",
                      "| engine | agreement | cost ms |", "|---|---|---|",
                      *[f"| {name} | {entry['served_agreement']:.4f} | "
                        f"{f'{costs[name]:.2f}' if name in costs else 'below the gate'} |"
                        for name, entry in engines.items()], ""]
    if profile:
        lines += ["## Monitoring reference (validation split, as served)", "", *_table([
            ("documents", profile.get("documents")),
            ("low-confidence share (highest score below the default threshold)",
             profile.get("low_confidence_share")),
            ("labels in the drift vectors", len(profile.get("feature_labels", []))),
            ("mean cosine to the embedding centroid", (profile.get("embedding") or {}).get(
                "mean_cosine_to_centroid")),
        ]), "", "`labelmatch monitor` compares served traffic with it (docs/monitoring.md).", ""]
    label_thresholds = thresholds.get("labels", {})
    lines += [
        "## Labels",
        "",
        "| label | threshold | validation F1 | description |",
        "|---|---|---|---|",
    ]
    for name, description in labels.items():
        f1 = per_label.get(name, {}).get("f1")
        lines.append(
            f"| {name} | {_fmt(float(label_thresholds.get(name, thresholds.get('default', 0.5))))} | "
            f"{_fmt(f1) if f1 is not None else '-'} | {description.replace('|', '/')} |"
        )
    long_docs = info.get("long_documents", config.get("long_documents", "truncate"))
    pii = "redacted" if info.get("pii_redacted", True) else "not redacted"
    lines += ["", _INTENDED_USE.format(long_documents="split into windows" if long_docs == "chunk"
                                       else "truncated", pii=pii)]
    return "\n".join(lines)


def write_model_card(artifact_dir: str | Path, kind: str = "Model") -> Path:
    """Render the card from the artifact's own files and write ``README.md`` beside them."""
    root = Path(artifact_dir)
    info = json.loads((root / "labelmatch.json").read_text())
    labels = json.loads((root / "labels.json").read_text())
    thresholds = json.loads((root / "thresholds.json").read_text())
    parity_path = root / "parity.json"
    parity = json.loads(parity_path.read_text()) if parity_path.is_file() else None
    profile_path = root / "reference_profile.json"
    profile = json.loads(profile_path.read_text()) if profile_path.is_file() else None
    path = root / CARD_FILE
    path.write_text(render_model_card(info, labels, thresholds, kind, parity, profile))
    return path
