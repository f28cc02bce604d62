"""Export a Model artifact to an int8 ONNX OnnxModel artifact, with parity gates.

Steps: merge the LoRA adapter into the base weights; export a wrapper whose graph does the
encoder, the model's own pooling (mean, CLS or last token, from ``labelmatch.json``) and L2
normalisation (dynamic batch and sequence axes); fuse it with ONNX Runtime's transformer
optimizer (EmbedLayerNormalization, Attention, BiasGelu; residual Add + LayerNormalization
deliberately left unfused, see ``OrtConfig.disabled_optimizers``); quantise
the weights to int8 *per channel* (dynamic quantisation: per-tensor scales visibly change
MiniLM's predictions); then compare torch and ONNX on a validation set and refuse an export
whose label sets drift. Besides that dynamic int8 graph, the export builds the other serving
engines (a static int8 QDQ graph, for ONNX Runtime and OpenVINO, and the fp32 graph), judges each
against torch at the shipped thresholds, times them and ships the fastest that passes the gate
(:mod:`labelmatch.serving.engines`, :mod:`labelmatch.export.candidates`).

Why ``torch.onnx.export(dynamo=False)`` + ``onnxruntime.quantization`` and not ``optimum``:
``optimum-onnx`` (the home of optimum's ONNX exporter since optimum 2) pins
``transformers<4.58`` and labelmatch trains with transformers 5, so it cannot be installed
beside it. The TorchScript exporter is used, with eager attention, because it is the graph ONNX
Runtime's BERT fusions recognise: from the dynamo exporter's graph (and from SDPA attention,
whose transformers-5 mask has IsNaN/Where nodes) only BiasGelu is fused; from this one all of
EmbedLayerNormalization, 6 Attention and 6 BiasGelu are (and 12 SkipLayerNormalization would
be), and the fused Attention is quantised as one ``QAttention``. Either way all 36 weight
matmuls of MiniLM-L6 were quantised (``MatMulInteger`` + ``DynamicQuantizeLinear``, per output
channel, B a constant).

Measured on the zero-shot bundled MiniLM over the 90 Reuters-21578 labels (300 test documents,
max length 256; p = sigmoid(20·cos - 6); label-set agreement = whole label set equal to torch's;
speed = ORT int8 vs torch fp32, sequence 128, batch 1, one thread each, shared AVX2 CPU without
VNNI, so ratios move by ±0.2 between runs):

===================================================  ===========  ===========  =========  ========
variant                                              cos min      cos mean     label set  speed-up
===================================================  ===========  ===========  =========  ========
before: dynamo, BiasGelu only, per channel           0.985        0.9926       0.59       1.64×
dynamo, per tensor                                   0.919        0.9518       0.42       -
dynamo, per channel, reduce_range (7-bit weights)    0.985        0.9926       0.65       -
dynamo, per channel, uint8 weights (no saturation)   0.985        0.9940       0.63       -
dynamo, SmoothQuant-style scales (alpha 0.5)         0.939        0.9661       0.47       -
dynamo, FFN output (or QKV/out/FFN-in) left fp32     0.992        0.9958       0.68       -
**default: TorchScript + full fusion, per channel**  0.984        0.9926       0.59-0.62  1.6-2.2×
full fusion, FFN output left fp32                    0.991        0.9962       0.72       1.42×
full fusion, reduce_range                            0.985        0.9928       0.62       1.79×
int8 weights with float activations (upper bound)    0.999        0.9995       0.85       none
===================================================  ===========  ===========  =========  ========

The error comes from the per-tensor uint8 quantisation of activations (dynamic quantisation has
no per-token scales), spread over all layers: leaving any one layer or role in fp32 helps little.
Even a perfect int8 *weight* quantisation misses 0.98 per-document agreement on this model: 10%
of the documents have some label whose torch cosine lies within 0.0005 of the 0.3 threshold (25%
within 0.002), and weight rounding alone moves cosines by 0.0017 at the median. Per-decision
agreement (``label_decision_agreement``) is 0.991. A trained model fares better but not enough:
a LoRA model trained on 2,000 Reuters documents agrees on 0.865 of 300 test documents' label
sets with int8 label embeddings, 0.903 with torch's (shipped since), at 0.9986 per decision.

Hence the **fp32 fallback** (``ExportConfig.fp32_fallback``): documents whose int8 cosine with
some label lies within a calibrated margin of that label's decision boundary are re-embedded by
the fp32 graph. On that trained model a margin calibrated on 300 documents re-embedded about a
third of 300 other documents and gave 0.993 label-set agreement on them. The margin is chosen
on one half of the parity documents and the gate reads the other half (:func:`calibrate_fallback`).

``parity.json`` records: cosine between torch and ONNX document embeddings (min/mean) for fp32
and int8, label-set agreement with torch (same thresholds, torch label embeddings), macro-F1 of
torch and of int8 with the model's thresholds; the fallback plan where there is one (margin,
holdout agreement, share re-embedded); and, under ``thresholds``, both threshold candidates
judged as served: the model's and the ones re-tuned on the served scores, each with its own
fallback calibrated on its own decision boundaries and its served macro-F1. The re-tuned ones
ship only when they score at least as well on the split they were tuned on; ``fp32``/``int8``/
``fallback`` at the top describe the thresholds that ship.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from labelmatch.core.artifacts import (
    artifact_digest,
    atomic_artifact_dir,
    verify_artifact,
    write_json,
    write_manifest,
)
from labelmatch.core.errors import ConfigError, DataError, LabelmatchError
from labelmatch.data.dataset import Dataset
from labelmatch.data.hierarchy import HIERARCHY_FILE
from labelmatch.evaluation.metrics import macro_f1, tune_thresholds
from labelmatch.export.candidates import (
    PROTOBUF_LIMIT,
    ffn_output_matmuls,
    probe_engines,
    quantize_static_graph,
)
from labelmatch.model.card import write_model_card
from labelmatch.model.chunking import Chunking, document_windows, max_over_windows
from labelmatch.model.matching import Thresholds, boundary_cosines
from labelmatch.monitoring.profile import build_profile
from labelmatch.serving.engines import ENGINES, STATIC_MODEL_FILE, Engine, cpu_summary
from labelmatch.serving.onnx_classifier import (
    FP32_MODEL_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    OnnxClassifier,
    OrtConfig,
    near_boundary,
)

#: Model types whose graphs ONNX Runtime's BERT fusions understand.
OPTIMIZER_MODEL_TYPES = {"bert": "bert", "roberta": "bert", "xlm-roberta": "bert", "distilbert": "bert"}


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
        quantize_ffn_output: Quantise the feed-forward output matmuls (their post-GELU inputs
            quantise worst). Off: MiniLM's label-set agreement 0.62 → 0.72, speed-up 1.6× → 1.4×.
        keep_fp32: Also ship ``model_fp32.onnx`` (the optimised graph that was quantised).
        fp32_fallback: ``auto``: when int8 alone misses the gate, ship ``model_fp32.onnx`` as a
            fallback for documents near a decision boundary (needs ``keep_fp32``); ``always``:
            plan it whatever int8 scores; ``off``: never. The margin is calibrated on the first
            half of the parity documents and the agreement the gate reads is measured on the
            second half.
        fallback_target: Label-set agreement the fallback margin is calibrated to reach on the
            calibration half: the smallest margin that leaves at most ``1 - target`` of those
            documents with a wrong int8 decision outside it (times ``fallback_safety``). ``None``:
            halfway between the gate and 1 (0.99 for the default gate), headroom for the holdout
            half the gate reads. 1.0 re-embeds every document as close as the farthest wrong
            decision, the most expensive choice (trained Reuters model, 150 calibration
            documents: 20% of the holdout re-embedded at 1.0, 19% at 0.99, agreement 1.0 both).
        fallback_safety: Factor on the calibrated distance (>= 1).
        opset: ONNX opset of the export (17: the opset ORT's BERT fusions were verified at).
        split: Dataset split used for parity and threshold re-tuning.
        max_parity_docs: At most this many validation documents (the first ones) are compared.
        batch_size: Documents per batch when embedding.
        engines: Serving candidates to build, judge and probe (:data:`ENGINES`; those this machine
            cannot run are skipped).
        engine: ``auto``: ship the cheapest candidate that passes the gate, by the probe; or a
            candidate's name (it must pass the gate).
        probe_seconds: Timed seconds per candidate in the probe, at least
            (:func:`~labelmatch.serving.engines.probe_costs`).
        probe_threads: Threads of every candidate in the parity run and the probe: set it to the
            serving pods' ``intra_op_threads`` so the probe times what they will run; 0: one per core.
        static_calibration_docs: Validation documents at most that calibrate the static int8 graph.
    """

    agreement_gate: float = 0.98
    per_channel: bool = True
    optimize: bool = True
    quantize_ffn_output: bool = True
    keep_fp32: bool = True
    fp32_fallback: Literal["auto", "always", "off"] = "auto"
    fallback_target: float | None = None
    fallback_safety: float = 1.2
    opset: int = 17
    split: str = "val"
    max_parity_docs: int = 512
    batch_size: int = 32
    engines: tuple[str, ...] = tuple(ENGINES)
    engine: str = "auto"
    probe_seconds: float = 1.0
    probe_threads: int = 0
    static_calibration_docs: int = 128

    def __post_init__(self) -> None:
        self.engines = tuple(self.engines)
        unknown = [name for name in self.engines if name not in ENGINES]
        if unknown or not self.engines:
            raise ConfigError(f"engines {unknown or '(none)'}: choose from {', '.join(ENGINES)}")
        if self.engine != "auto" and self.engine not in self.engines:
            raise ConfigError(f"engine {self.engine!r} must be 'auto' or one of engines "
                              f"({', '.join(self.engines)})")
        if self.probe_seconds <= 0 or self.static_calibration_docs < 1 or self.probe_threads < 0:
            raise ConfigError("probe_seconds must be > 0, static_calibration_docs >= 1 and "
                              "probe_threads >= 0")
        if not 0.0 <= self.agreement_gate <= 1.0:
            raise ConfigError(f"agreement_gate must be in [0, 1], got {self.agreement_gate}")
        if self.max_parity_docs < 1 or self.batch_size < 1:
            raise ConfigError("max_parity_docs and batch_size must be >= 1")
        if self.fp32_fallback not in ("auto", "always", "off"):
            raise ConfigError(f"fp32_fallback must be auto, always or off, got {self.fp32_fallback!r}")
        if self.fp32_fallback == "always" and not self.keep_fp32:
            raise ConfigError("fp32_fallback='always' needs keep_fp32 (the fallback is model_fp32.onnx)")
        if self.fallback_safety < 1.0:
            raise ConfigError(f"fallback_safety must be >= 1, got {self.fallback_safety}")
        if self.fallback_target is not None and not 0.0 < self.fallback_target <= 1.0:
            raise ConfigError(f"fallback_target must be in (0, 1], got {self.fallback_target}")

    @property
    def fallback_agreement_target(self) -> float:
        """The calibration half's agreement target of the fallback margin (see ``fallback_target``)."""
        if self.fallback_target is not None:
            return self.fallback_target
        return 1.0 - (1.0 - self.agreement_gate) / 2


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
    from labelmatch.model.encoder import Pooling, TextEncoder
    from labelmatch.model.io import load_encoder_model

    config = config or ExportConfig()
    source = Path(model_dir)
    verify_artifact(source, "Model")
    hf_model, tokenizer, info = load_encoder_model(source, verify=False, merge=True)
    hf_model.eval()
    labels = json.loads((source / "labels.json").read_text())
    thresholds = json.loads((source / "thresholds.json").read_text())
    texts, targets, eval_labels = _parity_data(labels, dataset, config)
    max_length = int(info["max_length"])
    pooling = Pooling.from_info(info)
    torch_encoder = TextEncoder(hf_model, tokenizer, max_length, pooling)
    # The model's long-document rule: parity is measured on the windows the server will embed.
    chunking = Chunking.from_info(info)
    windows = document_windows(texts, torch_encoder.offsets, chunking)

    with atomic_artifact_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp / "tokenizer")
        raw = tmp / "model_raw.onnx"
        _export_graph(hf_model, tokenizer, raw, config.opset, pooling)
        fp32 = tmp / FP32_MODEL_FILE
        fusions = _optimize(raw, fp32, hf_model.config, config.optimize)
        _quantize(fp32, tmp / MODEL_FILE, config, hf_model.config)
        candidates = [name for name in config.engines if ENGINES[name].available
                      and (config.keep_fp32 or ENGINES[name].file != FP32_MODEL_FILE)]
        static_quantization = None
        if any(ENGINES[name].file == STATIC_MODEL_FILE for name in candidates):
            calibration = windows[0][: max(1, len(windows[0]) // 2)][: config.static_calibration_docs]
            static_quantization = quantize_static_graph(raw, tmp / STATIC_MODEL_FILE, calibration,
                                                        tmp / TOKENIZER_FILE, max_length, hf_model.config)
        for leftover in tmp.glob("model_raw.onnx*"):
            leftover.unlink()

        # One document per run, as served (see OrtConfig.batch_size), with the serving threads.
        ort_config = OrtConfig(intra_op_threads=config.probe_threads)
        onnx_info = {**info, "max_length": max_length}
        # Full-precision label embeddings: shipped, and given to every graph's classifier.
        label_emb = torch_encoder.embed(list(labels.values()), batch_size=config.batch_size).numpy()
        runs = {
            ENGINES[name].file: _onnx_classifier(tmp, ENGINES[name], labels, label_emb, thresholds, onnx_info,
                                                 ort_config)
            for name in ("ort-fp32", "ort-int8-dynamic")
        }
        extra = {name: _onnx_classifier(tmp, ENGINES[name], labels, label_emb, thresholds, onnx_info,
                                        ort_config)
                 for name in candidates if name not in ("ort-fp32", "ort-int8-dynamic")}
        parity, tuned = _parity(torch_encoder, runs, windows, targets, eval_labels, thresholds, config, extra)
        engine_runs = {"ort-int8-dynamic": runs[MODEL_FILE], "ort-fp32": runs[FP32_MODEL_FILE], **extra}
        engine_runs = {name: engine_runs[name] for name in ENGINES if name in candidates}
        parity["engines"] = {name: parity["engines"][name] for name in ENGINES if name in candidates}
        parity["engine_probe"] = _pick_engine(engine_runs, parity["engines"], windows[0], config)
        check_parity(parity, config.agreement_gate, source)
        picked = parity["engine_probe"]["picked"]
        parity["served"] = {"engine": picked, "label_set_agreement": served_agreement(parity),
                            "fp32_fallback": parity["engines"][picked]["fallback"] is not None}
        if not config.keep_fp32:
            fp32.unlink()
        if not any(ENGINES[name].file == STATIC_MODEL_FILE for name in parity["engines"]):
            (tmp / STATIC_MODEL_FILE).unlink(missing_ok=True)
        int8 = runs[MODEL_FILE]
        np.save(tmp / "label_embeddings.npy", label_emb.astype(np.float32))
        fallback = parity["engines"][picked]["fallback"]
        write_json(tmp / "labels.json", labels)
        write_json(tmp / "thresholds.json", tuned)
        if (source / HIERARCHY_FILE).is_file():
            shutil.copyfile(source / HIERARCHY_FILE, tmp / HIERARCHY_FILE)
        write_json(tmp / "parity.json", parity)
        write_json(tmp / "labelmatch.json", {
            **info,
            "format": "labelmatch.onnx",
            "long_documents": chunking.mode,
            "chunk_stride": chunking.stride,
            "source_model_digest": artifact_digest(source),
            "engine": picked,
            "engines": {
                name: {"file": ENGINES[name].file, "runtime": ENGINES[name].runtime,
                       "served_agreement": entry["served_agreement"],
                       "cost_ms": parity["engine_probe"]["costs_ms"].get(name),
                       "fallback": {"model": FP32_MODEL_FILE, "margin": entry["fallback"]["margin"]}
                       if entry["fallback"] else None}
                for name, entry in parity["engines"].items()
            },
            "onnx": {
                "output": OUTPUT_NAME,
                "inputs": int8.encoder.input_names,
                "exporter": "torch.onnx.export(dynamo=False), eager attention",
                "opset": config.opset,
                "optimized": config.optimize,
                "fused_operators": fusions,
                "quantization": {"method": "dynamic", "weight_type": "int8",
                                 "per_channel": config.per_channel,
                                 "ffn_output_quantized": config.quantize_ffn_output},
                "static_quantization": static_quantization,
                "fp32_kept": config.keep_fp32,
                "fallback": {"model": FP32_MODEL_FILE, "margin": fallback["margin"]} if fallback else None,
            },
            "export_config": asdict(config),
        })
        if dataset is not None:  # monitoring's reference: the validation split as this artifact serves it
            served = OnnxClassifier.load(tmp, ort_config, verify=False, model_version="export")
            build_profile(served, texts).save(tmp)
        write_model_card(tmp, "OnnxModel")
        lineage = {"model": artifact_digest(source), "model_path": str(source)}
        summary = {"labels": len(labels), "label_set_agreement": served_agreement(parity),
                   "fp32_fallback": fallback is not None}
        write_manifest(tmp, "OnnxModel", lineage=lineage, extra=summary)
    return parity


def served_agreement(parity: dict[str, Any]) -> float:
    """Label-set agreement of what will be served: the picked engine's, with its fp32 fallback
    where it has one (the best candidate's when none was picked); for a summary written before
    engines were measured, dynamic int8's."""
    engines = parity.get("engines")
    if engines:
        picked = (parity.get("engine_probe") or {}).get("picked")
        return engines[picked]["served_agreement"] if picked else max(
            e["served_agreement"] for e in engines.values())
    fallback = parity.get("fallback")
    return fallback["label_set_agreement"] if fallback else parity["int8"]["label_set_agreement"]


def check_parity(parity: dict[str, Any], gate: float, source: str | Path) -> None:
    """Raise :class:`ParityError` when the served label-set agreement with torch is below ``gate``."""
    agreement = served_agreement(parity)
    if agreement >= gate:
        return
    int8 = parity["int8"]
    engines = parity.get("engines")
    if engines:
        how = "every serving engine (" + ", ".join(
            f"{name} {entry['served_agreement']:.4f}" for name, entry in engines.items()) + ")"
    else:
        fallback = parity.get("fallback")
        how = (f"int8 with fp32 fallback (margin {fallback['margin']:.4f}, "
               f"{fallback['fallback_fraction']:.0%} of documents re-embedded) on the "
               f"{fallback['holdout_documents']} holdout documents"
               if fallback else f"int8 on {parity['documents']} documents")
    raise ParityError(
        f"export of {source}: label-set agreement with torch is {agreement:.4f} for {how} "
        f"({parity['source']}), below the gate {gate} (int8 alone {int8['label_set_agreement']:.4f}, "
        f"cosine min {int8['cosine_min']:.4f}, mean {int8['cosine_mean']:.4f}); lower the gate "
        "deliberately (--agreement-gate), keep the fp32 graph for the fallback, or serve fp32"
    )


def calibrate_fallback(int8_cos: np.ndarray, fp32_cos: np.ndarray, torch_pred: np.ndarray,
                       boundary: np.ndarray, safety: float, target: float = 1.0) -> dict[str, Any]:
    """Pick the fp32-fallback margin on one half of the documents and measure it on the other.

    A decision is uncertain under int8 when the int8 cosine lies near the label's boundary; a
    document is re-embedded in fp32 when any of its labels lies within the margin. To be put
    right, a document with wrong int8 decisions needs a margin beyond the farthest of them. The
    margin is the smallest that puts right all but ``1 - target`` of the first half's documents
    (``target`` 1.0: all of them, i.e. the farthest wrong decision), times ``safety``.

    Args:
        int8_cos: ``(n, labels)`` cosines from the int8 graph.
        fp32_cos: The same from the fp32 graph.
        torch_pred: ``(n, labels)`` torch decisions (the reference).
        boundary: ``(labels,)`` decision boundaries in cosine units.
        safety: Factor on the calibrated distance (>= 1).
        target: Label-set agreement to reach on the calibration half, in (0, 1].

    Returns:
        ``margin`` and, on the holdout half, ``label_set_agreement`` and ``fallback_fraction``
        (also on the calibration half, for reference).
    """
    n = len(int8_cos)
    half = n // 2 if n >= 2 else n
    calibration, holdout = slice(0, half), slice(half, n) if n >= 2 else slice(0, n)
    distance = np.abs(int8_cos - boundary)
    wrong = (int8_cos >= boundary) != torch_pred
    # Per document: the margin that re-embeds it (0 when every int8 decision is right).
    needed = np.sort(np.where(wrong, distance, 0.0).max(axis=1)[calibration])[::-1]
    left_wrong = int(np.floor((1.0 - target) * len(needed) + 1e-9))  # documents allowed to stay wrong
    base = float(needed[left_wrong]) if left_wrong < len(needed) else 0.0
    # near_boundary is strict (<): step past the calibrated distance itself.
    margin = float(np.nextafter(base * safety, np.inf)) if base > 0 else 0.0
    near = near_boundary(int8_cos, boundary, margin)
    agree = ((np.where(near[:, None], fp32_cos, int8_cos) >= boundary) == torch_pred).all(axis=1)
    return {
        "margin": margin,
        "safety": safety,
        "target": target,
        "calibration_documents": half,
        "holdout_documents": len(agree[holdout]),
        "label_set_agreement": float(agree[holdout].mean()),
        "fallback_fraction": float(near[holdout].mean()),
        "label_set_agreement_calibration": float(agree[calibration].mean()),
        "fallback_fraction_calibration": float(near[calibration].mean()),
    }


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


def _export_graph(hf_model: Any, tokenizer: Any, path: Path, opset: int, pooling: Any) -> None:
    """Export encoder + pooling (the model's own) + L2 norm with symbolic batch and sequence dimensions.

    TorchScript exporter and eager attention: the graph ONNX Runtime's fusions recognise (see the
    module docstring). Eager and SDPA attention compute the same function.
    """
    import torch

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
            return torch.nn.functional.normalize(pooling.pool(hidden, attention_mask), dim=-1)

    sample = tokenizer(["a short text", "a somewhat longer text to give the sequence axis a size"],
                       padding=True, return_tensors="pt")
    args = tuple(sample[n] for n in input_names)
    dynamic = {n: {0: "batch", 1: "sequence"} for n in input_names}
    attention = hf_model.config._attn_implementation
    hf_model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            # Above 2 GiB (bge-m3) the TorchScript exporter writes external data by itself.
            torch.onnx.export(
                EmbeddingGraph(hf_model).eval(), args, str(path), dynamo=False, input_names=input_names,
                output_names=[OUTPUT_NAME], dynamic_axes={**dynamic, OUTPUT_NAME: {0: "batch"}},
                opset_version=opset,
            )
    finally:
        hf_model.set_attn_implementation(attention)


def _optimize(raw: Path, out: Path, model_config: Any, enabled: bool) -> dict[str, int]:
    """Fuse embeddings/attention/LayerNorm/GELU where the architecture is known; returns the fusions."""
    optimizer_type = OPTIMIZER_MODEL_TYPES.get(getattr(model_config, "model_type", ""))
    if not enabled or optimizer_type is None:
        shutil.copyfile(raw, out)
        return {}
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    heads, hidden = model_config.num_attention_heads, model_config.hidden_size
    options = FusionOptions(optimizer_type)
    # Residual Add + LayerNormalization stay unfused: ORT's CPU SkipLayerNormalization kernel is
    # 5x slower than the pair (OrtConfig.disabled_optimizers keeps the session from re-fusing it).
    options.enable_skip_layer_norm = False
    optimized = optimize_model(str(raw), model_type=optimizer_type, num_heads=heads, hidden_size=hidden,
                               optimization_options=options)
    optimized.save_model_to_file(str(out), use_external_data_format=raw.stat().st_size > PROTOBUF_LIMIT)
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


def _quantize(fp32: Path, out: Path, config: ExportConfig, model_config: Any) -> None:
    """Dynamic int8 weight quantisation (activations quantised at run time, per tensor)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    exclude = [] if config.quantize_ffn_output else ffn_output_matmuls(fp32, model_config)
    quantize_dynamic(
        str(fp32), str(out), per_channel=config.per_channel, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude, use_external_data_format=fp32.stat().st_size > PROTOBUF_LIMIT,
        # Fused contrib ops (BiasGelu, SkipLayerNorm) defeat ONNX shape inference; their outputs
        # are float. Only weight matmuls are quantised: int8 attention scores (activation x
        # activation) cost accuracy for little speed.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )


def _onnx_classifier(root: Path, engine: Engine, labels: dict[str, str], label_emb: np.ndarray,
                     thresholds: dict[str, Any], info: dict[str, Any], config: OrtConfig) -> OnnxClassifier:
    from labelmatch.serving.onnx_classifier import OnnxEncoder

    encoder = OnnxEncoder.for_engine(root, engine, int(info["max_length"]), config)
    return OnnxClassifier(encoder, labels, label_emb, info["scale"], info["bias"], thresholds, info)


def _parity(torch_encoder: Any, runs: dict[str, OnnxClassifier], windows: tuple[list[str], np.ndarray],
            targets: np.ndarray | None, eval_labels: dict[str, str], thresholds: dict[str, Any],
            config: ExportConfig, extra: dict[str, OnnxClassifier] | None = None,
            ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare torch with the fp32 and int8 graphs, choose the thresholds that ship, and judge
    every serving engine with them.

    Every graph is scored against the *torch* label embeddings (the ones shipped), so the
    comparison isolates the document side. ``windows`` are the parity documents cut by the
    model's long-document rule (one window per document when it truncates); a document's cosine
    with a label is its maximum over its windows, as the server computes it, and the embedding
    cosines between torch and ONNX are per window. Two threshold sets are candidates: the model's, and
    the same rule (:func:`~labelmatch.evaluation.metrics.tune_thresholds`) re-tuned on the scores the model's
    thresholds would serve. Each candidate is judged as it would be served: its own fp32
    fallback calibrated on its own decision boundaries, its served macro-F1 on this split. The
    re-tuned set ships only when it does at least as well as the model's on this split (the
    data it was chosen on): the shrunk per-label rule is no joint optimum, so re-tuning can lose.

    The thresholds are chosen on the dynamic int8 graph's served scores (``runs``); the other
    engines (``extra``, by engine name) are then judged at the shipped thresholds, each with its
    own fallback, under ``engines`` (with ``ort-int8-dynamic`` and ``ort-fp32``).

    Returns:
        ``(parity summary, thresholds to ship)``; the summary's ``fp32``, ``int8`` and
        ``fallback`` describe the shipped thresholds, ``thresholds`` both candidates.
    """
    names = list(eval_labels)
    served_run = runs[MODEL_FILE]  # built with the model's scale, bias and thresholds
    texts, owner = windows
    n_docs = int(owner.max()) + 1 if len(owner) else 0
    torch_docs = torch_encoder.embed(texts, batch_size=config.batch_size).numpy()
    label_emb = torch_encoder.embed(list(eval_labels.values()), batch_size=config.batch_size).numpy()
    cosines = {"torch": max_over_windows(torch_docs @ label_emb.T, owner, n_docs)}
    doc_cosine: dict[str, np.ndarray] = {}
    graphs = {"fp32": runs[FP32_MODEL_FILE], "int8": runs[MODEL_FILE], **(extra or {})}
    for key, run in graphs.items():
        docs = run.encoder.embed(texts)
        cosines[key] = max_over_windows(docs @ label_emb.T, owner, n_docs)
        doc_cosine[key] = (docs * torch_docs).sum(axis=1)
    summary: dict[str, Any] = {
        "documents": n_docs,
        "windows": len(texts),
        "source": f"dataset split {config.split!r}" if targets is not None else "label descriptions",
        "gate": config.agreement_gate,
        "label_embeddings": "torch (full precision), shared by every graph",
    }

    candidates = {"model": thresholds}
    judged = {"model": _judge_thresholds(served_run, names, thresholds, cosines, doc_cosine, targets, config)}
    if targets is not None:
        served_probs = served_run.probabilities(judged["model"]["served_cosines"])
        default, per_label = tune_thresholds(targets, served_probs)
        retuned = {n: float(t) for n, t in zip(names, per_label, strict=True)}
        candidates["retuned"] = {"default": default, "labels": {**thresholds.get("labels", {}), **retuned}}
        judged["retuned"] = _judge_thresholds(served_run, names, candidates["retuned"], cosines, doc_cosine,
                                              targets, config)
    shipped = choose_thresholds({k: v.get("served_macro_f1") for k, v in judged.items()})
    chosen = judged[shipped]
    summary.update({k: chosen[k] for k in ("fp32", "int8", "fallback")})
    if targets is not None:
        summary["torch_macro_f1"] = chosen["torch_macro_f1"]
    summary["thresholds"] = {
        "shipped": shipped,
        "rule": "re-tuned on the served scores; shipped only when its served macro-F1 on this split is "
                "at least the model thresholds'",
        "candidates": {
            key: {k: v for k, v in entry.items() if k not in ("served_cosines",)}
            for key, entry in judged.items()
        },
    }
    summary["thresholds_retuned"] = shipped == "retuned"
    summary["engines"] = {
        "ort-int8-dynamic": _engine_entry(chosen["int8"], chosen["fallback"], chosen.get("served_macro_f1")),
        "ort-fp32": _engine_entry(chosen["fp32"], None, chosen["fp32"].get("macro_f1")),
    }
    for name in extra or {}:
        own = _judge_thresholds(served_run, names, candidates[shipped],
                                {"torch": cosines["torch"], "fp32": cosines["fp32"], "int8": cosines[name]},
                                {"fp32": doc_cosine["fp32"], "int8": doc_cosine[name]}, targets, config)
        summary["engines"][name] = _engine_entry(own["int8"], own["fallback"], own.get("served_macro_f1"))
    return summary, candidates[shipped]


def _engine_entry(alone: dict[str, Any], fallback: dict[str, Any] | None,
                  served_macro_f1: float | None) -> dict[str, Any]:
    """One engine's parity: its graph alone, its fallback plan, and what is served."""
    return {
        **{k: alone[k] for k in ("cosine_min", "cosine_mean", "label_set_agreement")},
        "fallback": fallback,
        "served_agreement": fallback["label_set_agreement"] if fallback else alone["label_set_agreement"],
        "served_macro_f1": served_macro_f1,
    }


def _pick_engine(runs: dict[str, OnnxClassifier], engines: dict[str, dict[str, Any]], texts: list[str],
                 config: ExportConfig) -> dict[str, Any]:
    """The probe over the candidates (``config.engine`` forces one, if it passes the gate)."""
    probe_texts = texts[: min(len(texts), 64)]
    if config.engine != "auto":
        runs = {name: run for name, run in runs.items() if name in (config.engine, "ort-fp32")}
    probe = probe_engines(runs, engines, probe_texts, config.agreement_gate, config.probe_seconds)
    if config.engine != "auto":
        probe["picked"] = config.engine if config.engine in probe["passed"] else None
        probe["forced"] = True
    probe["machine"] = cpu_summary()
    probe["intra_op_threads"] = config.probe_threads
    return probe


def choose_thresholds(served_macro_f1: dict[str, float | None]) -> str:
    """``"retuned"`` when its served macro-F1 is at least the model thresholds', else ``"model"``.

    Args:
        served_macro_f1: Served macro-F1 on the tuning split per candidate (``"model"`` and,
            where there were targets to re-tune on, ``"retuned"``).
    """
    retuned = served_macro_f1.get("retuned")
    model = served_macro_f1.get("model")
    if retuned is None or model is None:
        return "model"
    return "retuned" if retuned >= model - 1e-12 else "model"


def _judge_thresholds(run: OnnxClassifier, names: list[str], thresholds: dict[str, Any],
                      cosines: dict[str, np.ndarray], doc_cosine: dict[str, np.ndarray],
                      targets: np.ndarray | None, config: ExportConfig) -> dict[str, Any]:
    """Agreement with torch, the fp32-fallback plan and macro-F1 of one threshold set, as served.

    The fallback (where wanted) is calibrated on this threshold set's own decision boundaries,
    against torch's decisions at the same thresholds.
    """
    label_thresholds = Thresholds.from_json(thresholds).for_labels(names)
    boundary = boundary_cosines(label_thresholds, run.scale, run.bias)

    def decide(cos: np.ndarray) -> np.ndarray:  # as the server decides: probability >= threshold
        return run.probabilities(cos).astype(np.float32) >= label_thresholds

    torch_pred = decide(cosines["torch"])
    out: dict[str, Any] = {"thresholds": {"default": float(thresholds.get("default", 0.5))}}
    if targets is not None:
        out["torch_macro_f1"] = macro_f1(targets, torch_pred.astype(np.int64))
    for key in ("fp32", "int8"):
        pred = decide(cosines[key])
        entry: dict[str, Any] = {
            "cosine_min": float(doc_cosine[key].min()),
            "cosine_mean": float(doc_cosine[key].mean()),
            "label_set_agreement": float((pred == torch_pred).all(axis=1).mean()),
            "label_decision_agreement": float((pred == torch_pred).mean()),
        }
        if targets is not None:
            entry["macro_f1"] = macro_f1(targets, pred.astype(np.int64))
            entry["macro_f1_delta"] = entry["macro_f1"] - out["torch_macro_f1"]
        out[key] = entry

    served = cosines["int8"]
    out["fallback"] = None
    int8_short = out["int8"]["label_set_agreement"] < config.agreement_gate
    wanted = config.fp32_fallback == "always" or (config.fp32_fallback == "auto" and int8_short)
    if wanted and config.keep_fp32:
        plan = calibrate_fallback(cosines["int8"], cosines["fp32"], torch_pred, boundary,
                                  config.fallback_safety, config.fallback_agreement_target)
        out["fallback"] = {"model": FP32_MODEL_FILE, **plan}
        near = near_boundary(cosines["int8"], boundary, plan["margin"])
        served = np.where(near[:, None], cosines["fp32"], cosines["int8"])
    out["served_cosines"] = served
    if targets is not None:
        out["served_macro_f1"] = macro_f1(targets, decide(served).astype(np.int64))
    return out
