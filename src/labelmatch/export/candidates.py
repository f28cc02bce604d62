"""The export's serving candidates: the static int8 graph, and the probe that picks an engine.

What each candidate is and why there are several: :mod:`labelmatch.serving.engines`. This module
writes the one graph the plain export does not (``model_int8_static.onnx``) and measures the
candidates on the machine at hand.

**Static int8** (``onnxruntime.quantization.quantize_static``, QDQ format): int8 weights per
output channel; uint8 activations with scales calibrated (min/max) on validation texts, one
document per calibration run as served. It starts from the *unfused* exported graph: ONNX
Runtime's fused ``Attention``/``EmbedLayerNormalization`` are contrib operators that neither the
QDQ quantiser nor OpenVINO read. The feed-forward output matmuls stay fp32: with them quantised,
MiniLM's cosine to torch fell to 0.945 on average (label-set agreement 0.73 on 200 Bitext
validation texts); without, 0.991 (0.925; dynamic int8: 0.994 and 0.930).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.serving.engines import pick_engine, probe_costs, served_costs
from labelmatch.serving.onnx_classifier import graph_feeds

log = logging.getLogger(__name__)

#: Above this a graph is written with external data (protobuf's 2 GiB limit; bge-m3).
PROTOBUF_LIMIT = 1_800_000_000


class _CalibrationTexts:
    """``onnxruntime.quantization.CalibrationDataReader`` over texts, one document per run."""

    def __init__(self, texts: Sequence[str], tokenizer_file: Path, max_length: int, input_names: list[str]):
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.no_padding()
        self._feeds = iter([graph_feeds([tokenizer.encode(text)], input_names) for text in texts])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next calibration input, or ``None`` when done."""
        return next(self._feeds, None)


def ffn_output_matmuls(graph_path: Path, model_config: Any) -> list[str]:
    """Names of the feed-forward output matmuls: constant B of shape (intermediate, hidden)."""
    import onnx

    graph = onnx.load(str(graph_path), load_external_data=False).graph
    shape = [model_config.intermediate_size, model_config.hidden_size]
    weights = {t.name for t in graph.initializer if list(t.dims) == shape}
    return [n.name for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]


def quantize_static_graph(raw: Path, out: Path, texts: Sequence[str], tokenizer_file: Path, max_length: int,
                          model_config: Any) -> dict[str, Any]:
    """Write the static int8 QDQ graph of ``raw`` (the unfused export) to ``out``.

    Args:
        raw: The unfused fp32 graph.
        out: Where the QDQ graph goes.
        texts: Calibration texts (validation documents, or label descriptions without data).
        tokenizer_file: The artifact's ``tokenizer.json``.
        max_length: Tokens per text, as served.
        model_config: The Hugging Face config (sizes of the feed-forward matmuls).

    Returns:
        What was done (recorded in ``labelmatch.json``).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = raw.stat().st_size > PROTOBUF_LIMIT
    prepared = out.with_name(out.stem + "_prepared.onnx")
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True, save_as_external_data=external)
    try:
        inputs = [i.name for i in onnx.load(str(prepared), load_external_data=False).graph.input]
        excluded = ffn_output_matmuls(prepared, model_config)
        quantize_static(
            str(prepared), str(out), _CalibrationTexts(texts, tokenizer_file, max_length, inputs),
            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        for leftover in out.parent.glob(prepared.name + "*"):
            leftover.unlink()
    return {"method": "static", "format": "QDQ", "weight_type": "int8", "activation_type": "uint8",
            "per_channel": True, "calibration": "minmax", "calibration_documents": len(texts),
            "fp32_matmuls": len(excluded)}


def probe_engines(runs: dict[str, Any], judged: dict[str, dict[str, Any]], texts: Sequence[str],
                  gate: float, min_seconds: float) -> dict[str, Any]:
    """Time every candidate that passes the gate and pick the cheapest to serve.

    Args:
        runs: Engine name → its classifier (its ``encoder.embed`` runs one document per call).
        judged: Engine name → its parity entry (``served_agreement``, ``fallback``).
        texts: Probe texts (parity documents, as served: one per call).
        gate: The agreement gate.
        min_seconds: Timed seconds per candidate, at least (:func:`~labelmatch.serving.engines.probe_costs`).

    Returns:
        ``{"picked", "costs_ms", "probe_ms", "passed", "documents", "lengths", "seconds_each"}``;
        ``picked`` is ``None`` when no candidate passes; ``lengths`` are the probe documents'
        token counts (a server re-probing at load times inputs of the same lengths).
    """
    passed = [name for name in runs if judged[name]["served_agreement"] >= gate]
    timed = probe_costs({name: lambda text, run=runs[name]: run.encoder.embed([text])
                         for name in runs if name in passed or name == "ort-fp32"}, texts, min_seconds)
    costs = served_costs(timed, {name: judged[name].get("fallback") for name in passed})
    picked = pick_engine(costs) if costs else None
    log.info("engine probe: %s; picked %s", ", ".join(f"{n} {c:.2f} ms" for n, c in costs.items()), picked)
    tokenizer = next(iter(runs.values())).encoder.tokenizer
    lengths = [len(tokenizer.encode(text).ids) for text in texts]
    return {"picked": picked, "costs_ms": costs, "probe_ms": timed, "passed": passed,
            "documents": len(texts), "lengths": lengths, "seconds_each": min_seconds}
