"""Serving engines: which graph of an OnnxModel runs under which runtime, and the probe that picks one.

int8 speed depends on the CPU more than on anything we control: the same graph ran 3.3x faster
than torch fp32 on an AMD EPYC with AVX-512 VNNI and 1.4x on an Intel Xeon without it. So the
export ships several candidates, measures each one's label-set agreement with torch (with its own
fp32 fallback where it needs one, see :mod:`labelmatch.export.onnx`), and a short measured probe
picks the fastest candidate that passes the agreement gate. The pick, and every candidate's
figures, are recorded in the artifact (``labelmatch.json`` ``engine``, ``parity.json``
``engines``). A server on another CPU re-runs the probe at start with ``--engine probe``
(:mod:`labelmatch.serving.load_probe`).

The candidates (:data:`ENGINES`):

``ort-int8-dynamic``
    ``model.onnx``: ONNX Runtime's fused transformer graph, int8 weights per channel, activations
    quantised at run time per tensor (``MatMulInteger``).
``ort-int8-static``
    ``model_int8_static.onnx``: the unfused graph in QDQ form, int8 weights per channel,
    activation scales calibrated on validation texts (the feed-forward output matmuls, whose
    post-GELU inputs quantise worst, stay fp32). ONNX Runtime turns the QDQ pairs into int8
    kernels when it loads the graph.
``openvino-int8-static``
    The same QDQ graph under OpenVINO (the CPU backend sentence-transformers recommends), when
    the ``openvino`` package is installed (the ``openvino`` extra).
``openvino-bf16``
    ``model_fp32.onnx`` under OpenVINO with bfloat16 inference precision, on CPUs whose OpenVINO
    reports native bf16 (AMX or AVX-512 BF16; elsewhere the candidate is not available). On an
    Intel Xeon with AMX its embeddings were at cosine 0.99998 of fp32 (dynamic int8: 0.991), so it
    needed no fallback, and on full 128-token documents with one thread it was the fastest
    engine (the probe decides on the documents at hand, docs/serving.md).
``ort-fp32``
    ``model_fp32.onnx``: the fused fp32 graph; no fallback needed.

A probe's cost of an int8 candidate is its own time per document plus its fallback share times
the fp32 graph's, what serving it would cost on average.
"""

from __future__ import annotations

import functools
import gc
import importlib.util
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.errors import ConfigError

MODEL_FILE = "model.onnx"
FP32_MODEL_FILE = "model_fp32.onnx"
STATIC_MODEL_FILE = "model_int8_static.onnx"
RUNTIMES = ("onnxruntime", "openvino")


@dataclass(frozen=True)
class Engine:
    """One serving candidate.

    Attributes:
        name: Its name (``ort-int8-dynamic``, ...).
        file: The graph file in the artifact.
        runtime: ``onnxruntime`` or ``openvino``.
        int8: Whether its graph is quantised (it may then have an fp32 fallback).
        precision: OpenVINO's inference precision hint (``bf16``); empty: the runtime's default.
    """

    name: str
    file: str
    runtime: str
    int8: bool
    precision: str = ""

    @property
    def available(self) -> bool:
        """Whether its runtime is installed here (and the CPU computes its precision natively)."""
        return not self.unavailable_reason()

    def unavailable_reason(self) -> str:
        """Why it cannot run here (empty when it can)."""
        if not runtime_available(self.runtime):
            return (f"needs the {self.runtime!r} package, which is not installed "
                    "(pip install 'labelmatch[openvino]')")
        if self.precision and not precision_supported(self.precision):
            return f"needs a CPU that computes {self.precision} natively (OpenVINO reports none here)"
        return ""

    @property
    def batch_invariant(self) -> bool:
        """Whether a text's embedding is the same whatever it is batched with (full fp32 only:
        dynamic int8 takes one activation scale per batch, and reduced precision may block
        matrix products differently per shape)."""
        return not self.int8 and not self.precision


ENGINES: dict[str, Engine] = {
    e.name: e
    for e in (
        Engine("ort-int8-dynamic", MODEL_FILE, "onnxruntime", True),
        Engine("ort-int8-static", STATIC_MODEL_FILE, "onnxruntime", True),
        Engine("openvino-int8-static", STATIC_MODEL_FILE, "openvino", True),
        Engine("openvino-bf16", FP32_MODEL_FILE, "openvino", False, "bf16"),
        Engine("ort-fp32", FP32_MODEL_FILE, "onnxruntime", False),
    )
}
#: What an artifact written before engines were recorded serves.
DEFAULT_ENGINE = "ort-int8-dynamic"


def engine(name: str) -> Engine:
    """The engine called ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; known: {', '.join(ENGINES)}")
    return ENGINES[name]


def cpu_summary() -> dict[str, Any]:
    """The CPU at hand: model name, cores, and the flags int8 speed depends on (VNNI/AMX above all)."""
    model, flags = "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": model, "cores": os.cpu_count(),
            "int8_dot_product": [f for f in ("avx512_vnni", "avx_vnni", "amx_int8") if f in flags],
            "bf16": [f for f in ("avx512_bf16", "amx_bf16") if f in flags],
            "avx2": "avx2" in flags, "avx512f": "avx512f" in flags}


def runtime_available(runtime: str) -> bool:
    """Whether ``runtime``'s Python package can be imported here."""
    if runtime not in RUNTIMES:
        raise ConfigError(f"unknown runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return importlib.util.find_spec(runtime) is not None


@functools.cache
def precision_supported(precision: str) -> bool:
    """Whether OpenVINO computes ``precision`` (``bf16``) natively on this CPU (it reports it
    among the CPU plugin's optimisation capabilities); false without OpenVINO."""
    if not runtime_available("openvino"):
        return False
    import openvino as ov

    return precision.upper() in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


class _Port:
    """What :class:`OpenVinoSession` reports of an input or output (the ORT ``NodeArg`` fields used)."""

    def __init__(self, name: str, shape: list[Any]):
        self.name = name
        self.shape = shape


class OpenVinoSession:
    """An OpenVINO compiled model behind the part of ``onnxruntime.InferenceSession`` the encoder uses.

    Args:
        model_path: The ``.onnx`` file. OpenVINO reads ONNX Runtime's fused fp32 operators
            (``Attention``, ``BiasGelu``, ``EmbedLayerNormalization``) but not its fused int8 ones,
            hence the unfused QDQ graph for static int8.
        threads: Inference threads; 0 lets OpenVINO pick.
        precision: Inference precision hint (``bf16``, ``f32``); empty: OpenVINO's default.
    """

    def __init__(self, model_path: str | Path, threads: int = 0, precision: str = ""):
        import openvino as ov

        properties: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if threads:
            properties["INFERENCE_NUM_THREADS"] = threads
        if precision:
            properties["INFERENCE_PRECISION_HINT"] = precision
        self.compiled = ov.Core().compile_model(str(model_path), "CPU", properties)
        self.request = self.compiled.create_infer_request()

    def get_inputs(self) -> list[_Port]:
        """The graph's inputs (names in order)."""
        return [_Port(port.get_any_name(), []) for port in self.compiled.inputs]

    def get_outputs(self) -> list[_Port]:
        """The graph's outputs (the last dimension of each is static)."""
        return [_Port(port.get_any_name(), [d.get_length() if d.is_static else None
                                             for d in port.get_partial_shape()])
                for port in self.compiled.outputs]

    def run(self, output_names: Sequence[str] | None, feeds: dict[str, Any]) -> list[Any]:
        """Outputs by name (all when ``None``), as ``InferenceSession.run`` returns them."""
        results = self.request.infer(feeds)
        outputs = self.compiled.outputs
        wanted = output_names or [port.get_any_name() for port in outputs]
        by_name = {port.get_any_name(): results[port] for port in outputs}
        return [by_name[name].copy() for name in wanted]


def probe_costs(calls: dict[str, Callable[[Any], Any]], inputs: Sequence[Any], min_seconds: float = 1.0,
                min_rounds: int = 3) -> dict[str, float]:
    """Milliseconds per input of each candidate, one input per call as served.

    Every candidate first runs every input once, untimed: OpenVINO's CPU plugin compiles kernels
    for each new input shape (a first pass over Reuters documents of varying length cost
    ``openvino-bf16`` 20 ms a document, the second 12), and a server sees the same lengths again
    and again. Then the candidates take turns, a whole pass over ``inputs`` each, in an order that
    rotates every round, until every candidate has had ``min_rounds`` passes and about
    ``min_seconds`` of time; a candidate's figure is the median of its passes, so a slow spell
    of a shared machine moves every candidate alike instead of whichever was timed during it.

    Args:
        calls: Candidate name → a function that runs one input.
        inputs: The probe inputs (documents as served).
        min_seconds: Timed seconds per candidate, at least.
        min_rounds: Timed passes per candidate, at least.

    Returns:
        Candidate name → median milliseconds per input.
    """
    if not inputs:
        raise ConfigError("an engine probe needs at least one input")
    if not calls:
        return {}
    for call in calls.values():
        for item in inputs:
            call(item)
    names = list(calls)
    passes: dict[str, list[float]] = {name: [] for name in names}
    spent = dict.fromkeys(names, 0.0)
    rounds = 0
    while rounds < min_rounds or min(spent.values()) < min_seconds:
        for name in names[rounds % len(names):] + names[: rounds % len(names)]:
            started = time.perf_counter()
            for item in inputs:
                calls[name](item)
            seconds = time.perf_counter() - started
            spent[name] += seconds
            passes[name].append(seconds * 1000 / len(inputs))
        rounds += 1
    return {name: statistics.median(values) for name, values in passes.items()}


def probe_encoders(loaders: dict[str, Callable[[], Any]], texts: Sequence[str], min_seconds: float = 1.0,
                   together: bool = True) -> dict[str, float]:
    """:func:`probe_costs` of encoders (``embed([text])`` per call) that ``loaders`` load.

    Args:
        loaders: Candidate name → a function that loads its encoder.
        texts: The probe documents.
        min_seconds: Timed seconds per candidate, at least.
        together: Load every candidate at once and time them in rotating turns (a slow spell of
            a shared machine moves all alike). ``False``: one at a time, each released before the
            next loads, so memory holds one graph (bge-m3: 2.2 GB for each fp32 graph).

    Returns:
        Candidate name → median milliseconds per document.
    """
    def call(encoder: Any) -> Callable[[Any], Any]:
        return lambda text: encoder.embed([text])

    if together:
        encoders = {name: load() for name, load in loaders.items()}
        return probe_costs({name: call(encoder) for name, encoder in encoders.items()}, texts, min_seconds)
    timed: dict[str, float] = {}
    for name, load in loaders.items():
        encoder = load()
        timed.update(probe_costs({name: call(encoder)}, texts, min_seconds))
        del encoder
        gc.collect()
    return timed


def graph_file_bytes(root: str | Path, file: str) -> int:
    """Bytes of an artifact's graph ``file`` and its external data (``<file>.data``, as the export
    writes it); 0 when the graph is absent."""
    path = Path(root) / file
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size if path.is_file() else 0) + (data.stat().st_size if data.is_file() else 0)


#: Above this many bytes of graphs, a probe loads its candidates one at a time.
PROBE_TOGETHER_BYTES = 3_000_000_000


def served_cost_ms(own_ms: float, fallback_fraction: float, fp32_ms: float) -> float:
    """What serving an engine costs per document on average: its own time plus the share of
    documents its fp32 fallback re-embeds times the fp32 graph's time."""
    return own_ms + fallback_fraction * fp32_ms


def served_costs(timed: dict[str, float], fallbacks: dict[str, dict[str, Any] | None]) -> dict[str, float]:
    """Each candidate's cost as served (:func:`served_cost_ms`), its fallback paid at ``ort-fp32``'s time.

    Args:
        timed: Engine name → probed milliseconds per document (``ort-fp32`` among them where a
            candidate has a fallback).
        fallbacks: Candidate name → its fallback plan (with ``fallback_fraction``), or ``None``.
    """
    fp32_ms = timed.get("ort-fp32", 0.0)
    return {name: served_cost_ms(timed[name], plan["fallback_fraction"] if plan else 0.0, fp32_ms)
            for name, plan in fallbacks.items()}


def pick_engine(costs: dict[str, float]) -> str:
    """The cheapest candidate (ties: the first in :data:`ENGINES` order)."""
    if not costs:
        raise ConfigError("no engine candidate to pick from")
    order = list(ENGINES)
    return min(costs, key=lambda name: (costs[name], order.index(name) if name in order else len(order)))
