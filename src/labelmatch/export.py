"""Export a Model artifact to an int8 ONNX OnnxModel artifact, with parity gates.

Steps: merge the LoRA adapter into the base weights; export a wrapper whose graph does the
encoder, mean pooling and L2 normalisation (dynamic batch and sequence axes); fuse LayerNorm/GELU
with ONNX Runtime's transformer optimizer; quantise the weights to int8 *per channel* (dynamic
quantisation: per-tensor scales visibly change MiniLM's predictions); then compare torch and
ONNX on a validation set and refuse an export whose label sets drift.

Why ``torch.onnx.export(dynamo=True)`` + ``onnxruntime.quantization`` and not ``optimum``:
``optimum-onnx`` (the home of optimum's ONNX exporter since optimum 2) pins
``transformers<4.58`` and labelmatch trains with transformers 5, so it cannot be installed
beside it. The dynamo exporter is the maintained one in torch >= 2.9 (the TorchScript exporter,
``dynamo=False``, is deprecated) and exports MiniLM and XLM-R with symbolic batch/sequence dims.

``parity.json`` records: cosine between torch and ONNX document embeddings (min/mean) for fp32
and int8, label-set agreement with torch (same thresholds), macro-F1 of torch, of int8 with the
model's thresholds and of int8 with thresholds re-tuned on its own validation scores (the
thresholds shipped).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.artifacts import (
    artifact_digest,
    atomic_artifact_dir,
    verify_artifact,
    write_json,
    write_manifest,
)
from labelmatch.data import Dataset
from labelmatch.errors import ConfigError, DataError, LabelmatchError
from labelmatch.metrics import binarize, macro_f1, tune_global_threshold, tune_label_thresholds
from labelmatch.onnx_classifier import FP32_MODEL_FILE, MODEL_FILE, OUTPUT_NAME, OnnxClassifier, OrtConfig

#: Model types whose graphs ONNX Runtime's BERT fusions understand.
OPTIMIZER_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert"}
#: Protobuf cannot hold a single file above 2 GiB; larger encoders (bge-m3) use external data.
PROTOBUF_LIMIT = 1_800_000_000


class ParityError(LabelmatchError):
    """The exported model disagrees with torch beyond the configured gate."""


@dataclass
class ExportConfig:
    """How to export and what counts as faithful.

    Attributes:
        agreement_gate: Minimum share of validation documents whose int8 label set equals
            torch's (same thresholds); below it the export fails.
        per_channel: Per-channel int8 weight scales (per-tensor changes MiniLM's predictions).
        optimize: Run ONNX Runtime's transformer fusions before quantising.
        keep_fp32: Also ship ``model_fp32.onnx`` (the optimised graph that was quantised).
        opset: ONNX opset of the export.
        split: Dataset split used for parity and threshold re-tuning.
        max_parity_docs: At most this many validation documents (the first ones) are compared.
        batch_size: Documents per batch when embedding.
    """

    agreement_gate: float = 0.98
    per_channel: bool = True
    optimize: bool = True
    keep_fp32: bool = True
    opset: int = 18
    split: str = "val"
    max_parity_docs: int = 512
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0.0 <= self.agreement_gate <= 1.0:
            raise ConfigError(f"agreement_gate must be in [0, 1], got {self.agreement_gate}")
        if self.max_parity_docs < 1 or self.batch_size < 1:
            raise ConfigError("max_parity_docs and batch_size must be >= 1")


def export_onnx(model_dir: str | Path, out_dir: str | Path, config: ExportConfig | None = None,
                dataset: Dataset | None = None) -> dict[str, Any]:
    """Export ``model_dir`` (a Model artifact) to ``out_dir`` (an OnnxModel artifact, atomically).

    Args:
        model_dir: The Model artifact (LoRA adapter or merged encoder).
        out_dir: The OnnxModel artifact to write (replaced only on success).
        config: Export settings.
        dataset: Validation data for parity and threshold re-tuning. Without it, parity is
            measured on the label descriptions themselves and the model's thresholds are kept.

    Returns:
        The parity summary (the content of ``parity.json``).

    Raises:
        ParityError: when int8 label-set agreement with torch is below the gate.
    """
    from labelmatch.encoder import TextEncoder
    from labelmatch.model_io import load_encoder_model

    config = config or ExportConfig()
    source = Path(model_dir)
    verify_artifact(source, "Model")
    hf_model, tokenizer, info = load_encoder_model(source, verify=False, merge=True)
    hf_model.eval()
    labels = json.loads((source / "labels.json").read_text())
    thresholds = json.loads((source / "thresholds.json").read_text())
    texts, targets, eval_labels = _parity_data(labels, dataset, config)
    max_length = int(info["max_length"])
    torch_encoder = TextEncoder(hf_model, tokenizer, max_length)

    with atomic_artifact_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        raw = tmp / "model_raw.onnx"
        _export_graph(hf_model, tokenizer, raw, config.opset)
        fp32 = tmp / FP32_MODEL_FILE
        _optimize(raw, fp32, getattr(hf_model.config, "model_type", ""), config.optimize)
        _quantize(fp32, tmp / MODEL_FILE, config.per_channel)
        for leftover in tmp.glob("model_raw.onnx*"):
            leftover.unlink()

        ort_config = OrtConfig(batch_size=config.batch_size)
        onnx_info = {**info, "max_length": max_length}
        runs = {
            name: _onnx_classifier(tmp, name, labels, thresholds, onnx_info, ort_config)
            for name in (FP32_MODEL_FILE, MODEL_FILE)
        }
        parity, tuned = _parity(torch_encoder, runs, texts, targets, eval_labels, info, thresholds, config)
        check_parity(parity, config.agreement_gate, source)
        if not config.keep_fp32:
            fp32.unlink()
        int8 = runs[MODEL_FILE]
        np.save(tmp / "label_embeddings.npy", int8.encoder.embed(list(labels.values())))
        write_json(tmp / "labels.json", labels)
        write_json(tmp / "thresholds.json", tuned)
        write_json(tmp / "parity.json", parity)
        write_json(tmp / "labelmatch.json", {
            **info,
            "format": "labelmatch.onnx",
            "long_documents": "truncate",
            "source_model_digest": artifact_digest(source),
            "onnx": {
                "output": OUTPUT_NAME,
                "inputs": int8.encoder.input_names,
                "exporter": "torch.onnx.export(dynamo=True)",
                "opset": config.opset,
                "optimized": config.optimize,
                "quantization": {"method": "dynamic", "weight_type": "int8",
                                 "per_channel": config.per_channel},
                "fp32_kept": config.keep_fp32,
            },
            "export_config": asdict(config),
        })
        lineage = {"model": artifact_digest(source), "model_path": str(source)}
        summary = {"labels": len(labels), "label_set_agreement": parity["int8"]["label_set_agreement"]}
        write_manifest(tmp, "OnnxModel", lineage=lineage, extra=summary)
    return parity


def check_parity(parity: dict[str, Any], gate: float, source: str | Path) -> None:
    """Raise :class:`ParityError` when int8 label-set agreement with torch is below ``gate``."""
    int8 = parity["int8"]
    if int8["label_set_agreement"] < gate:
        raise ParityError(
            f"export of {source}: int8 label-set agreement with torch is {int8['label_set_agreement']:.4f} "
            f"on {parity['documents']} documents ({parity['source']}), below the gate {gate} "
            f"(int8 cosine min {int8['cosine_min']:.4f}, mean {int8['cosine_mean']:.4f}); lower the gate "
            "deliberately (--agreement-gate) or serve the fp32 graph"
        )


def _parity_data(labels: dict[str, str], dataset: Dataset | None,
                 config: ExportConfig) -> tuple[list[str], np.ndarray | None, dict[str, str]]:
    """Texts (and targets, and the label set they refer to) used for the parity check."""
    if dataset is None:
        return list(labels.values()), None, labels
    part = dataset.split(config.split) if any(d.split for d in dataset.documents) else dataset
    if not part.documents:
        raise DataError("<dataset>", f"no documents in split {config.split!r} to check export parity on")
    part = Dataset(part.documents[: config.max_parity_docs], dataset.labels)
    return [d.text for d in part.documents], part.label_matrix(), dataset.labels


def _export_graph(hf_model: Any, tokenizer: Any, path: Path, opset: int) -> None:
    """Export encoder + mean pooling + L2 norm with symbolic batch and sequence dimensions."""
    import torch

    from labelmatch.encoder import mean_pool

    known = ("input_ids", "attention_mask", "token_type_ids")
    input_names = [n for n in known if n in tokenizer.model_input_names]

    class EmbeddingGraph(torch.nn.Module):
        """The served computation: what ``TextEncoder.forward`` does, as one graph."""

        def __init__(self, model: torch.nn.Module):
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
            extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
            return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)

    sample = tokenizer(["a short text", "a somewhat longer text to give the sequence axis a size"],
                       padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in input_names)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch, 1: sequence} for n in input_names}
    n_bytes = sum(p.numel() * p.element_size() for p in hf_model.parameters())
    with torch.no_grad():
        torch.onnx.export(
            EmbeddingGraph(hf_model).eval(), args, str(path), dynamo=True, input_names=input_names,
            output_names=[OUTPUT_NAME], dynamic_shapes=dynamic, opset_version=opset,
            external_data=n_bytes > PROTOBUF_LIMIT,
        )


def _optimize(raw: Path, out: Path, model_type: str, enabled: bool) -> None:
    """Fuse LayerNorm/GELU (ORT transformer optimizer) where the architecture is known."""
    optimizer_type = OPTIMIZER_MODEL_TYPES.get(model_type)
    if not enabled or optimizer_type is None:
        shutil.copyfile(raw, out)
        return
    from onnxruntime.transformers.optimizer import optimize_model

    # num_heads/hidden_size 0: read from the graph.
    optimized = optimize_model(str(raw), model_type=optimizer_type, num_heads=0, hidden_size=0)
    optimized.save_model_to_file(str(out), use_external_data_format=raw.stat().st_size > PROTOBUF_LIMIT)


def _quantize(fp32: Path, out: Path, per_channel: bool) -> None:
    """Dynamic int8 weight quantisation (activations quantised at run time)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(fp32), str(out), per_channel=per_channel, weight_type=QuantType.QInt8,
        use_external_data_format=fp32.stat().st_size > PROTOBUF_LIMIT,
        # Fused contrib ops (BiasGelu, SkipLayerNorm) defeat ONNX shape inference; their outputs
        # are float. Only weight matmuls are quantised: int8 attention scores (activation x
        # activation) cost accuracy for little speed.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )


def _onnx_classifier(root: Path, model_file: str, labels: dict[str, str], thresholds: dict[str, Any],
                     info: dict[str, Any], config: OrtConfig) -> OnnxClassifier:
    from labelmatch.onnx_classifier import TOKENIZER_FILE, OnnxEncoder

    encoder = OnnxEncoder(root / model_file, root / TOKENIZER_FILE, int(info["max_length"]), config)
    return OnnxClassifier(encoder, labels, None, info["scale"], info["bias"], thresholds, info)


def _parity(torch_encoder: Any, runs: dict[str, OnnxClassifier], texts: list[str], targets: np.ndarray | None,
            eval_labels: dict[str, str], info: dict[str, Any], thresholds: dict[str, Any],
            config: ExportConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare torch with the fp32 and int8 graphs; re-tune thresholds on the int8 scores."""
    names = list(eval_labels)
    scale, bias = float(info["scale"]), float(info["bias"])
    default = thresholds.get("default", 0.5)
    per_label = thresholds.get("labels", {})
    label_thresholds = np.array([per_label.get(n, default) for n in names], dtype=np.float32)

    def probabilities(doc_emb: np.ndarray, label_emb: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.exp(-(scale * (doc_emb @ label_emb.T) + bias)))

    torch_docs = torch_encoder.embed(texts, batch_size=config.batch_size).numpy()
    torch_labels = torch_encoder.embed(list(eval_labels.values()), batch_size=config.batch_size).numpy()
    torch_pred = binarize(probabilities(torch_docs, torch_labels), label_thresholds)
    summary: dict[str, Any] = {
        "documents": len(texts),
        "source": f"dataset split {config.split!r}" if targets is not None else "label descriptions",
        "gate": config.agreement_gate,
    }
    if targets is not None:
        summary["torch_macro_f1"] = macro_f1(targets, torch_pred)
    tuned = dict(thresholds)
    for key, run in (("fp32", runs[FP32_MODEL_FILE]), ("int8", runs[MODEL_FILE])):
        docs = run.encoder.embed(texts)
        cosine = (docs * torch_docs).sum(axis=1)
        probs = probabilities(docs, run.encoder.embed(list(eval_labels.values())))
        pred = binarize(probs, label_thresholds)
        entry: dict[str, Any] = {
            "cosine_min": float(cosine.min()),
            "cosine_mean": float(cosine.mean()),
            "label_set_agreement": float((pred == torch_pred).all(axis=1).mean()),
            "label_decision_agreement": float((pred == torch_pred).mean()),
        }
        if targets is not None:
            entry["macro_f1"] = macro_f1(targets, pred)
            entry["macro_f1_delta"] = entry["macro_f1"] - summary["torch_macro_f1"]
        if key == "int8" and targets is not None:
            int8_default, _ = tune_global_threshold(targets, probs)
            int8_thresholds = tune_label_thresholds(targets, probs, int8_default)
            retuned = {n: float(t) for n, t in zip(names, int8_thresholds, strict=True)}
            tuned = {"default": int8_default, "labels": {**per_label, **retuned}}
            entry["macro_f1_retuned"] = macro_f1(targets, binarize(probs, int8_thresholds))
            entry["macro_f1_retuned_delta"] = entry["macro_f1_retuned"] - summary["torch_macro_f1"]
        summary[key] = entry
    summary["thresholds_retuned"] = targets is not None
    return summary, tuned
