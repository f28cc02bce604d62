"""The export's serving candidates: the static int8 graph, and the probe that picks an engine.

What each candidate is and why there are several: :mod:`labelmatch.runtime.engines`. This module
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.runtime.engines import pick_engine, probe_encoders, served_costs
from labelmatch.runtime.onnx_classifier import graph_feeds

log = logging.getLogger(__name__)

#: Above this a graph is written with external data (protobuf's 2 GiB limit; bge-m3).
PROTOBUF_LIMIT = 1_800_000_000


def graph_bytes(path: Path) -> int:
    """Bytes of an ONNX graph with its weights: the ``.onnx`` file plus every external data file
    its tensors name (the TorchScript exporter writes a 433 KB ``.onnx`` and 2.27 GB beside it for
    bge-m3, so the file's own size says nothing about the model's)."""
    return path.stat().st_size + sum((path.parent / name).stat().st_size for name in _external_files(path))


def _external_files(path: Path) -> set[str]:
    """The external data files an ONNX graph's tensors name: initializers and the tensors of node
    attributes (the TorchScript exporter stores large ``Constant`` values as external data too)."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo
    from onnx.external_data_helper import uses_external_data as external

    graph = onnx.load(str(path), load_external_data=False).graph
    tensors = list(graph.initializer)
    for node in graph.node:
        for attribute in node.attribute:
            tensors += ([attribute.t] if attribute.HasField("t") else []) + list(attribute.tensors)
    return {ExternalDataInfo(tensor).location for tensor in tensors if external(tensor)}


def uses_external_data(path: Path) -> bool:
    """Whether the graph at ``path`` keeps (some of) its tensors in external data files."""
    return path.is_file() and bool(_external_files(path))


def graph_inputs(path: Path) -> list[str]:
    """The input names of an ONNX graph (its weights are not read)."""
    import onnx

    return [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]


def remove_graph(path: Path) -> None:
    """Delete an ONNX graph and the external data files it names (nothing when it is absent)."""
    if not path.is_file():
        return
    for name in _external_files(path):
        (path.parent / name).unlink(missing_ok=True)
    path.unlink()


def needs_external_data(path: Path) -> bool:
    """Whether a graph derived from ``path`` must be saved with external data (above
    :data:`PROTOBUF_LIMIT`, counting the weights wherever they are stored)."""
    return graph_bytes(path) > PROTOBUF_LIMIT


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
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    external = needs_external_data(raw)
    prepared = out.with_name(out.stem + "_prepared.onnx")
    # One external data file (the default writes one per tensor, some named by a random uuid).
    quant_pre_process(str(raw), str(prepared), skip_symbolic_shape=True, save_as_external_data=external,
                      all_tensors_to_one_file=True, external_data_location=prepared.name + ".data")
    try:
        inputs = graph_inputs(prepared)
        excluded = ffn_output_matmuls(prepared, model_config)
        quantize_static(
            str(prepared), str(out), _CalibrationTexts(texts, tokenizer_file, max_length, inputs),
            quant_format=QuantFormat.QDQ, per_channel=True, weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8, op_types_to_quantize=["MatMul"], nodes_to_exclude=excluded,
            calibrate_method=CalibrationMethod.MinMax, use_external_data_format=external,
            extra_options={"MatMulConstBOnly": True},
        )
    finally:
        remove_graph(prepared)
    return {"method": "static", "format": "QDQ", "weight_type": "int8", "activation_type": "uint8",
            "per_channel": True, "calibration": "minmax", "calibration_documents": len(texts),
            "fp32_matmuls": len(excluded)}


def probe_engines(loaders: dict[str, Callable[[], Any]], judged: dict[str, dict[str, Any]],
                  texts: Sequence[str], lengths: list[int], gate: float, min_seconds: float,
                  together: bool = True) -> dict[str, Any]:
    """Time every candidate that passes the gate and pick the cheapest to serve.

    Args:
        loaders: Engine name → a function that loads its encoder (``embed`` runs one document per call).
        judged: Engine name → its parity entry (``served_agreement``, ``fallback``).
        texts: Probe texts (parity documents, as served: one per call).
        lengths: Their token counts as served (recorded: a server re-probing at load times inputs
            of the same lengths).
        gate: The agreement gate.
        min_seconds: Timed seconds per candidate, at least (:func:`~labelmatch.runtime.engines.probe_costs`).
        together: All loaded at once, timed in rotating turns; ``False``: one at a time
            (:func:`~labelmatch.runtime.engines.probe_encoders`).

    Returns:
        ``{"picked", "costs_ms", "probe_ms", "passed", "documents", "lengths", "seconds_each",
        "mode"}``; ``picked`` is ``None`` when no candidate passes; ``lengths`` are the probe
        documents' token counts (a server re-probing at load times inputs of the same lengths).
    """
    passed = [name for name in loaders if judged[name]["served_agreement"] >= gate]
    names = [name for name in loaders if name in passed or name == "ort-fp32"]
    timed = probe_encoders({name: loaders[name] for name in names}, texts, min_seconds, together)
    costs = served_costs(timed, {name: judged[name].get("fallback") for name in passed})
    picked = pick_engine(costs) if costs else None
    log.info("engine probe: %s; picked %s", ", ".join(f"{n} {c:.2f} ms" for n, c in costs.items()), picked)
    return {"picked": picked, "costs_ms": costs, "probe_ms": timed, "passed": passed,
            "documents": len(texts), "lengths": lengths, "seconds_each": min_seconds,
            "mode": "rotating turns, all loaded" if together else "one candidate loaded at a time"}
