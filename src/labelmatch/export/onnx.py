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
(:mod:`labelmatch.runtime.engines`, :mod:`labelmatch.export.candidates`).

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

import contextlib
import functools
import gc
import json
import logging
import shutil
from collections.abc import Callable, Iterator
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
from labelmatch.core.disk import require_free_space, scratch_beside
from labelmatch.core.errors import ConfigError, DataError, LabelmatchError
from labelmatch.core.isolated import run_isolated
from labelmatch.data.dataset import Dataset
from labelmatch.data.hierarchy import HIERARCHY_FILE
from labelmatch.evaluation.metrics import macro_f1, tune_thresholds
from labelmatch.export.candidates import (
    ffn_output_matmuls,
    graph_bytes,
    graph_inputs,
    needs_external_data,
    probe_engines,
    quantize_static_graph,
    remove_graph,
    uses_external_data,
)
from labelmatch.model.card import write_model_card
from labelmatch.model.chunking import Chunking, document_windows, max_over_windows
from labelmatch.model.io import read_model_info
from labelmatch.model.matching import Thresholds, boundary_cosines, label_probabilities
from labelmatch.monitoring.profile import build_profile
from labelmatch.runtime.engines import ENGINES, PROBE_TOGETHER_BYTES, STATIC_MODEL_FILE, Engine, cpu_summary
from labelmatch.runtime.onnx_classifier import (
    FP32_MODEL_FILE,
    MODEL_FILE,
    OUTPUT_NAME,
    TOKENIZER_FILE,
    OnnxClassifier,
    OnnxEncoder,
    OrtConfig,
    near_boundary,
)

log = logging.getLogger(__name__)

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
            (:func:`~labelmatch.runtime.engines.probe_costs`).
        probe_threads: Threads of every candidate in the parity run and the probe: set it to the
            serving pods' ``intra_op_threads`` so the probe times what they will run; 0: one per core.
        static_calibration_docs: Validation documents at most that calibrate the static int8 graph.
        probe_memory_bytes: The probe loads every candidate at once and times them in rotating
            turns while their graphs add up to at most this many bytes; above it (bge-m3: 2.3 GB
            for each fp32 graph) it loads one at a time, so the export holds one session.
        isolate_above_bytes: Above this many bytes of weights, each ONNX step (fusion, both
            quantisations, each graph's parity embeddings) runs in a spawned process of its own,
            so that what one step's libraries keep is freed before the next (bge-m3 exports).
        quantize_embeddings_below_bytes: The dynamic int8 graph quantises the embedding tables
            (``Gather``/``EmbedLayerNormalization``) only when the fp32 graph is smaller than this.
            ONNX Runtime quantises a table as one tensor with several full-size temporaries: bge-m3's
            1 GB word embeddings took that step from 6.5 to 8.2 GiB. A float lookup costs no speed;
            the int8 graph is larger (bge-m3: 1.3 GB instead of 0.57).
        agreement_gate_waived: Why the agreement gate is not enforced (empty: it is). For a model
            whose weights are random (:mod:`labelmatch.model.random_encoder`): its label sets mean
            nothing, so neither does their agreement with torch. Every figure is still measured
            and recorded; the reason goes into ``parity.json`` (``gate_waived``) and every engine
            counts as passing for the probe.
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
    probe_memory_bytes: int = PROBE_TOGETHER_BYTES
    isolate_above_bytes: int = 1_000_000_000
    quantize_embeddings_below_bytes: int = 1_000_000_000
    agreement_gate_waived: str = ""

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
    config = config or ExportConfig()
    source = Path(model_dir)
    verify_artifact(source, "Model")
    labels = json.loads((source / "labels.json").read_text())
    thresholds = json.loads((source / "thresholds.json").read_text())
    info = read_model_info(source)
    texts, targets, eval_labels = _parity_data(labels, dataset, config)
    max_length = int(info["max_length"])
    chunking = Chunking.from_info(info)
    # Above isolate_above_bytes of weights, the torch part and each ONNX step run in a process of
    # their own: the torch model is gone before ONNX Runtime loads a graph (bge-m3: 2.3 GB each),
    # and what one step's libraries keep (protobuf copies, allocator caches) is not carried on.
    weights = model_weight_bytes(source)
    isolate = weights > config.isolate_above_bytes
    require_free_space(out_dir, export_disk_bytes(weights), f"export of {source}")

    with scratch_beside(out_dir), atomic_artifact_dir(out_dir) as tmp:
        raw = tmp / "model_raw.onnx"
        torch_part = _call(isolate, _torch_part, source, raw, texts, labels, eval_labels, chunking, config)
        label_emb, reference, windows, model_config = torch_part
        candidates = [name for name in config.engines if ENGINES[name].available
                      and (config.keep_fp32 or ENGINES[name].file != FP32_MODEL_FILE)]
        # The static graph is built from the unfused one first, while no other graph is on disk:
        # its preprocessing and calibration copies are the export's largest (bge-m3: 2.3 GB each).
        static_quantization = None
        if any(ENGINES[name].file == STATIC_MODEL_FILE for name in candidates):
            calibration = windows[0][: max(1, len(windows[0]) // 2)][: config.static_calibration_docs]
            static_quantization = _call(isolate, quantize_static_graph, raw, tmp / STATIC_MODEL_FILE,
                                        calibration, tmp / TOKENIZER_FILE, max_length, model_config)
        fp32 = tmp / FP32_MODEL_FILE
        fusions = _call(isolate, _optimize, raw, fp32, model_config, config.optimize)
        remove_graph(raw)  # and the weight files the exporter wrote beside it
        quantized = _call(isolate, _quantize, fp32, tmp / MODEL_FILE, config, model_config)
        graph_sizes = {name: graph_bytes(tmp / ENGINES[name].file)
                       for name in {"ort-fp32", "ort-int8-dynamic", *candidates}}

        # One document per run, as served (see OrtConfig.batch_size), with the serving threads.
        ort_config = OrtConfig(intra_op_threads=config.probe_threads)

        load = functools.partial(_load_engine, tmp, max_length=max_length, config=ort_config)
        # Each graph embeds the parity windows on its own and is released before the next loads.
        judged = ["ort-fp32", "ort-int8-dynamic", *[n for n in candidates if n not in ("ort-fp32",
                                                                                         "ort-int8-dynamic")]]
        embedded = {name: _call(isolate, _embed_with, tmp, name, max_length, ort_config, windows[0])
                    for name in judged}
        scoring = _Scoring(float(info["scale"]), float(info["bias"]))
        parity, tuned = _parity(reference, embedded, windows[1], scoring, targets, eval_labels, thresholds,
                                config)
        parity["engines"] = {name: parity["engines"][name] for name in ENGINES if name in candidates}
        together = sum(graph_sizes[name] for name in candidates) <= config.probe_memory_bytes
        loaders = {name: functools.partial(load, ENGINES[name]) for name in ENGINES if name in candidates}
        parity["engine_probe"] = _pick_engine(loaders, parity["engines"], windows[0], config, together,
                                              tmp / TOKENIZER_FILE, max_length)
        parity["graph_bytes"] = {name: graph_sizes[name] for name in ENGINES if name in graph_sizes}
        parity["external_data"] = {name: uses_external_data(tmp / ENGINES[name].file)
                                   for name in parity["graph_bytes"]}
        parity["isolated_steps"] = isolate
        if config.agreement_gate_waived:
            parity["gate_waived"] = config.agreement_gate_waived
            log.warning("export of %s: the agreement gate is waived: %s", source,
                        config.agreement_gate_waived)
        else:
            check_parity(parity, config.agreement_gate, source)
        picked = parity["engine_probe"]["picked"]
        parity["served"] = {"engine": picked, "label_set_agreement": served_agreement(parity),
                            "fp32_fallback": parity["engines"][picked]["fallback"] is not None}
        if not config.keep_fp32:
            remove_graph(fp32)
        if not any(ENGINES[name].file == STATIC_MODEL_FILE for name in parity["engines"]):
            remove_graph(tmp / STATIC_MODEL_FILE)
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
                "inputs": graph_inputs(tmp / MODEL_FILE),
                "exporter": "torch.onnx.export(dynamo=False), eager attention",
                "opset": config.opset,
                "optimized": config.optimize,
                "fused_operators": fusions,
                "quantization": {"method": "dynamic", "weight_type": "int8",
                                 "per_channel": config.per_channel,
                                 "ffn_output_quantized": config.quantize_ffn_output, **quantized},
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
    with shape_inference_on_structure(optimizer_type):
        optimized = optimize_model(str(raw), model_type=optimizer_type, num_heads=heads, hidden_size=hidden,
                                   optimization_options=options)
    optimized.save_model_to_file(str(out), use_external_data_format=needs_external_data(raw))
    return {op: n for op, n in optimized.get_fused_operator_statistics().items() if n}


@contextlib.contextmanager
def shape_inference_on_structure(optimizer_type: str) -> Iterator[None]:
    """Let ONNX Runtime's transformer optimizer infer shapes on the graph without its weights.

    Its attention fusion asks for symbolic shape inference of the whole model once
    (``OnnxModel.infer_runtime_shape``), which copies the model and serialises it to ONNX's
    shape inference several times: on bge-m3 that step alone took the optimisation's peak from
    3.7 to 11.2 GiB. Shapes need the weights' dims, not their values, so within this context the
    inference runs on a copy whose large initializers carry only name, type and dims; the fusions
    still read the real weights. Measured on bge-m3 (random weights): the same fusions
    (24 Attention, 24 BiasGelu, 49 LayerNormalization).
    """
    from onnxruntime.transformers.optimizer import MODEL_TYPES

    model_class = MODEL_TYPES[optimizer_type][0]
    original = model_class.infer_runtime_shape

    def infer_runtime_shape(self: Any, dynamic_axis_mapping: dict | None = None, update: bool = False) -> Any:
        full = self.model
        self.model = structure_only(full)
        try:
            return original(self, dynamic_axis_mapping or {}, update)
        finally:
            self.model = full

    model_class.infer_runtime_shape = infer_runtime_shape
    try:
        yield
    finally:
        model_class.infer_runtime_shape = original


def structure_only(model: Any, max_bytes: int = 1 << 16) -> Any:
    """A copy of an ONNX ``ModelProto`` whose initializers above ``max_bytes`` keep name, type and
    dims only (marked as external data, so no reader takes them for empty tensors)."""
    import onnx

    out = onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                          producer_version=model.producer_version, domain=model.domain,
                          model_version=model.model_version)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    graph = model.graph
    out.graph.name = graph.name
    for name in ("node", "input", "output", "value_info"):
        getattr(out.graph, name).extend(getattr(graph, name))
    for tensor in graph.initializer:
        if len(tensor.raw_data) <= max_bytes:
            out.graph.initializer.append(tensor)
            continue
        stub = out.graph.initializer.add()
        stub.name, stub.data_type = tensor.name, tensor.data_type
        stub.dims.extend(tensor.dims)
        stub.data_location = onnx.TensorProto.EXTERNAL
        stub.external_data.add(key="location", value="structure-only")
    return out


#: Operators that look up an embedding table (quantised as one tensor by ONNX Runtime).
EMBEDDING_OPS = ("Gather", "EmbedLayerNormalization")


def _quantize(fp32: Path, out: Path, config: ExportConfig, model_config: Any) -> dict[str, Any]:
    """Dynamic int8 weight quantisation (activations quantised at run time, per tensor); returns
    what was quantised."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    exclude = [] if config.quantize_ffn_output else ffn_output_matmuls(fp32, model_config)
    embeddings = graph_bytes(fp32) < config.quantize_embeddings_below_bytes
    op_types = [op for op in IntegerOpsRegistry if embeddings or op not in EMBEDDING_OPS]
    quantize_dynamic(
        str(fp32), str(out), per_channel=config.per_channel, weight_type=QuantType.QInt8,
        nodes_to_exclude=exclude, use_external_data_format=needs_external_data(fp32),
        op_types_to_quantize=op_types,
        # Fused contrib ops (BiasGelu, SkipLayerNorm) defeat ONNX shape inference; their outputs
        # are float. Only weight matmuls are quantised: int8 attention scores (activation x
        # activation) cost accuracy for little speed.
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT, "MatMulConstBOnly": True},
    )
    return {"embeddings_quantized": embeddings}


def export_disk_bytes(weight_bytes: int) -> int:
    """The most an export holds on disk at once, its scratch files included, for a model with
    ``weight_bytes`` of fp32 encoder weights: three times the weights.

    Measured with ``df`` every second through ``labelmatch export`` of the 2.2 GB
    :func:`~labelmatch.model.random_encoder.cheap_large_shape` encoder: a peak of 6.26 GB (2.85×),
    the finished artifact's three graphs (its embedding table is too large to quantise); the
    unfused graph, its preprocessed copy and the calibration copy never add up to more.
    """
    return 3 * weight_bytes


def model_weight_bytes(model_dir: str | Path) -> int:
    """Bytes of a Model artifact's encoder weights: its merged ``encoder/``, or its base model's
    weight files plus its adapter (0 for a base model that is not a local directory)."""
    from labelmatch.model.encoder import resolve_base_model

    def size(folder: Path, *patterns: str) -> int:
        return sum(p.stat().st_size for pattern in patterns for p in folder.glob(pattern) if p.is_file())

    root = Path(model_dir)
    if (root / "encoder").is_dir():
        return size(root / "encoder", "*.safetensors", "*.bin")
    base = Path(resolve_base_model(read_model_info(root)["base_model"]))
    return size(root / "adapter", "*") + (size(base, "*.safetensors", "*.bin") if base.is_dir() else 0)


def _torch_part(source: Path, raw: Path, texts: list[str], labels: dict[str, str],
                eval_labels: dict[str, str], chunking: Chunking, config: ExportConfig,
                ) -> tuple[np.ndarray, _TorchReference, tuple[list[str], np.ndarray], Any]:
    """Everything torch does: load and merge the model, embed the labels and the parity windows,
    export the graph to ``raw`` and the tokenizer beside it.

    Returns:
        ``(label embeddings, torch reference, parity windows, the Hugging Face config)``.
    """
    from labelmatch.model.encoder import Pooling, TextEncoder
    from labelmatch.model.io import load_encoder_model

    hf_model, tokenizer, info = load_encoder_model(source, verify=False, merge=True)
    hf_model.eval()
    pooling = Pooling.from_info(info)
    torch_encoder = TextEncoder(hf_model, tokenizer, int(info["max_length"]), pooling)
    # The model's long-document rule: parity is measured on the windows the server will embed.
    windows = document_windows(texts, torch_encoder.offsets, chunking)
    label_emb = torch_encoder.embed(list(labels.values()), batch_size=config.batch_size).numpy()
    reference = _TorchReference(
        docs=torch_encoder.embed(windows[0], batch_size=config.batch_size).numpy(),
        labels=label_emb if eval_labels == labels
        else torch_encoder.embed(list(eval_labels.values()), batch_size=config.batch_size).numpy(),
    )
    tokenizer.save_pretrained(raw.parent / "tokenizer")
    _export_graph(hf_model, tokenizer, raw, config.opset, pooling)
    return label_emb, reference, windows, hf_model.config


@dataclass
class _TorchReference:
    """What torch computed before its model was freed: the parity windows' and the labels'
    embeddings (the labels the parity data refers to)."""

    docs: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class _Scoring:
    """The model's probability rule, ``sigmoid(scale * cos + bias)`` (as ``LabelMatcher`` scores)."""

    scale: float
    bias: float

    def probabilities(self, cos: np.ndarray) -> np.ndarray:
        return label_probabilities(cos, self.scale, self.bias)


def _load_engine(root: Path, engine: Engine, max_length: int, config: OrtConfig) -> OnnxEncoder:
    return OnnxEncoder.for_engine(root, engine, max_length, config)


def _embed_with(root: Path, name: str, max_length: int, config: OrtConfig, texts: list[str]) -> np.ndarray:
    """``texts`` embedded by engine ``name``'s graph in ``root``, one document per run as served;
    the graph is released before this returns, so the export holds one ONNX session at a time."""
    encoder = _load_engine(root, ENGINES[name], max_length, config)
    try:
        return encoder.embed(texts)
    finally:
        del encoder
        gc.collect()


def _call(isolate: bool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, in a fresh process when ``isolate`` (:func:`~labelmatch.core.isolated.run_isolated`):
    its memory is returned to the system when it ends, whatever its libraries cache."""
    return run_isolated(fn, *args) if isolate else fn(*args)


def _parity(reference: _TorchReference, embedded: dict[str, np.ndarray], owner: np.ndarray,
            scoring: _Scoring, targets: np.ndarray | None, eval_labels: dict[str, str],
            thresholds: dict[str, Any], config: ExportConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Compare torch with every graph, choose the thresholds that ship, and judge every serving
    engine with them.

    Every graph is scored against the *torch* label embeddings (the ones shipped), so the
    comparison isolates the document side. The parity windows are the documents cut by the
    model's long-document rule (``owner`` maps a window to its document; one window per document
    when it truncates); a document's cosine with a label is its maximum over its windows, as the
    server computes it, and the embedding cosines between torch and ONNX are per window. Two
    threshold sets are candidates: the model's, and the same rule
    (:func:`~labelmatch.evaluation.metrics.tune_thresholds`) re-tuned on the scores the model's
    thresholds would serve. Each candidate is judged as it would be served: its own fp32 fallback
    calibrated on its own decision boundaries, its served macro-F1 on this split. The re-tuned set
    ships only when it does at least as well as the model's on this split (the data it was chosen
    on): the shrunk per-label rule is no joint optimum, so re-tuning can lose.

    The thresholds are chosen on the dynamic int8 graph's served scores; the other engines are
    then judged at the shipped thresholds, each with its own fallback, under ``engines``. Each
    engine's windows are also compared with the fp32 graph's (``cosine_to_fp32``, per window).

    Args:
        reference: Torch's embeddings of the windows and the labels.
        embedded: Engine name → its embeddings of the windows (``ort-fp32`` and
            ``ort-int8-dynamic`` among them).
        owner: The document of each window.
        scoring: The model's probability rule.
        targets: ``(documents, labels)`` targets, or ``None`` (no re-tuning, no macro-F1).
        eval_labels: The labels the targets refer to.
        thresholds: The model's thresholds.
        config: Export settings.

    Returns:
        ``(parity summary, thresholds to ship)``; the summary's ``fp32``, ``int8`` and
        ``fallback`` describe the shipped thresholds, ``thresholds`` both candidates.
    """
    names = list(eval_labels)
    n_docs = int(owner.max()) + 1 if len(owner) else 0
    label_emb = reference.labels
    cosines = {"torch": max_over_windows(reference.docs @ label_emb.T, owner, n_docs)}
    doc_cosine: dict[str, np.ndarray] = {}
    keys = {"ort-fp32": "fp32", "ort-int8-dynamic": "int8"}
    for name, docs in embedded.items():
        key = keys.get(name, name)
        cosines[key] = max_over_windows(docs @ label_emb.T, owner, n_docs)
        doc_cosine[key] = (docs * reference.docs).sum(axis=1)
    summary: dict[str, Any] = {
        "documents": n_docs,
        "windows": len(owner),
        "source": f"dataset split {config.split!r}" if targets is not None else "label descriptions",
        "gate": config.agreement_gate,
        "label_embeddings": "torch (full precision), shared by every graph",
    }

    candidates = {"model": thresholds}
    judged = {"model": _judge_thresholds(scoring, names, thresholds, cosines, doc_cosine, targets, config)}
    if targets is not None:
        served_probs = scoring.probabilities(judged["model"]["served_cosines"])
        default, per_label = tune_thresholds(targets, served_probs)
        retuned = {n: float(t) for n, t in zip(names, per_label, strict=True)}
        candidates["retuned"] = {"default": default, "labels": {**thresholds.get("labels", {}), **retuned}}
        judged["retuned"] = _judge_thresholds(scoring, names, candidates["retuned"], cosines, doc_cosine,
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
    for name in embedded:
        if name in keys:
            continue
        own = _judge_thresholds(scoring, names, candidates[shipped],
                                {"torch": cosines["torch"], "fp32": cosines["fp32"], "int8": cosines[name]},
                                {"fp32": doc_cosine["fp32"], "int8": doc_cosine[name]}, targets, config)
        summary["engines"][name] = _engine_entry(own["int8"], own["fallback"], own.get("served_macro_f1"))
    fp32_docs = embedded["ort-fp32"]
    for name, docs in embedded.items():
        to_fp32 = (docs * fp32_docs).sum(axis=1)
        summary["engines"][name]["cosine_to_fp32"] = {
            "min": float(to_fp32.min()) if len(to_fp32) else None,
            "mean": float(to_fp32.mean()) if len(to_fp32) else None,
            "per_window": [round(float(c), 6) for c in to_fp32],
        }
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


def token_counts(tokenizer_file: Path, max_length: int, texts: list[str]) -> list[int]:
    """Tokens of each text as served (special tokens included, truncated at ``max_length``)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length=max_length)
    return [len(encoding.ids) for encoding in tokenizer.encode_batch(texts)]


def _pick_engine(loaders: dict[str, Any], engines: dict[str, dict[str, Any]], texts: list[str],
                 config: ExportConfig, together: bool, tokenizer_file: Path,
                 max_length: int) -> dict[str, Any]:
    """The probe over the candidates (``config.engine`` forces one, if it passes the gate; a
    waived gate lets every candidate pass)."""
    probe_texts = texts[: min(len(texts), 64)]
    if config.engine != "auto":
        loaders = {name: load for name, load in loaders.items() if name in (config.engine, "ort-fp32")}
    gate = 0.0 if config.agreement_gate_waived else config.agreement_gate
    lengths = token_counts(tokenizer_file, max_length, probe_texts)
    probe = probe_engines(loaders, engines, probe_texts, lengths, gate, config.probe_seconds, together)
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


def _judge_thresholds(run: _Scoring, names: list[str], thresholds: dict[str, Any],
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
