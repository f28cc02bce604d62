"""Torch-free prediction with an exported OnnxModel artifact (tokenizers + ONNX Runtime + numpy).

This is the serving path: importing it must never import torch, so the serving image stays
small. The graph in ``model.onnx`` already pools (the model's own pooling) and L2-normalises, so a document
embedding is one ``session.run`` and a cosine is a dot product.

**fp32 fallback.** Where the export found that int8 alone changes too many label sets (see
:mod:`labelmatch.export.onnx`), the artifact names ``model_fp32.onnx`` and a cosine ``margin``: a
document whose int8 cosine with some label lies within ``margin`` of that label's decision
boundary is embedded again by the fp32 graph, and those cosines are used. Only the uncertain
documents pay for fp32; label embeddings always come from full precision (torch at export, the
fp32 graph for request-time labels when it is loaded).

Example::

    clf = OnnxClassifier.load("runs/onnx")
    clf.predict(["VAT return filed late, penalty assessed"])[0].labels
    clf.predict(texts, labels={"customs": "Import duties and customs procedures."})
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.artifacts import artifact_digest, verify_artifact
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.data.hierarchy import HIERARCHY_FILE, load_hierarchy
from labelmatch.model.chunking import Chunking, chunked_cosines
from labelmatch.model.matching import LabelMatcher, Thresholds, embed_in_chunks
from labelmatch.runtime.engines import (
    DEFAULT_ENGINE,
    ENGINES,
    FP32_MODEL_FILE,
    MODEL_FILE,
    Engine,
    OpenVinoSession,
    engine,
)

log = logging.getLogger(__name__)
__all__ = ["FP32_MODEL_FILE", "MODEL_FILE", "OUTPUT_NAME", "TOKENIZER_FILE", "OnnxClassifier", "OnnxEncoder",
           "OrtConfig", "graph_feeds", "near_boundary", "served_engine", "served_model_version"]
TOKENIZER_FILE = "tokenizer/tokenizer.json"
OUTPUT_NAME = "sentence_embedding"


@dataclass
class OrtConfig:
    """ONNX Runtime session settings.

    Attributes:
        intra_op_threads: Threads inside one operator; 0 lets ONNX Runtime pick (one per core).
        inter_op_threads: Threads running independent operators in parallel.
        allow_spinning: Let idle ORT threads busy-wait for work. Off by default: spinning
            lowers latency by microseconds but burns whole cores between requests, which a
            shared node or a CPU-limited pod pays for.
        batch_size: Documents per ``session.run``. 1 by default, and keep it there for an int8
            graph: dynamic quantisation gives each activation tensor one scale, computed over
            the whole batch, so a document's int8 embedding would depend on the documents run
            with it (and on their padding). Measured on the demo model: batches of 32 vs one
            document moved cosines by up to 0.03 and probabilities by up to 0.11. With 1, a
            score is a function of the text alone (the server, ``labelmatch classify`` and the
            export's threshold tuning agree exactly), and on CPU it is no slower: 294 docs/s
            vs 227 at 32 on one thread (no padding).
        label_cache_size: Label descriptions embedded at request time that stay cached.
        disabled_optimizers: ONNX Runtime graph transformers not to run at session creation.
            By default ``SkipLayerNormFusion``: ONNX Runtime 1.32's CPU SkipLayerNormalization
            kernel took 0.25 ms per call on a 128 × 384 activation where the plain Add +
            LayerNormalization it replaces take 0.05 ms (12 calls: 19% of MiniLM-L6's int8 time
            at sequence 128, batch 1; measured with ORT's profiler, see ``docs/serving.md``). The
            export leaves the pair unfused for the same reason.
    """

    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    batch_size: int = 1
    label_cache_size: int = 4096
    disabled_optimizers: tuple[str, ...] = ("SkipLayerNormFusion",)

    def session_options(self) -> Any:
        """The ``onnxruntime.SessionOptions`` these settings describe."""
        import onnxruntime as ort

        if self.intra_op_threads < 0 or self.inter_op_threads < 1 or self.batch_size < 1:
            raise ConfigError(
                f"invalid ONNX Runtime settings: intra_op_threads={self.intra_op_threads} (>= 0), "
                f"inter_op_threads={self.inter_op_threads} (>= 1), batch_size={self.batch_size} (>= 1)"
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = self.inter_op_threads
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        spin = "1" if self.allow_spinning else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spin)
        options.add_session_config_entry("session.inter_op.allow_spinning", spin)
        return options

    def create_session(self, model_path: str | Path, options: Any = None) -> Any:
        """A CPU ``onnxruntime.InferenceSession`` with these settings.

        Args:
            model_path: The ``.onnx`` file.
            options: ``SessionOptions`` to use instead of :meth:`session_options` (e.g. with
                profiling on); the disabled optimizers apply either way.
        """
        import onnxruntime as ort

        return ort.InferenceSession(
            str(model_path), options or self.session_options(), providers=["CPUExecutionProvider"],
            disabled_optimizers=list(self.disabled_optimizers),
        )


class OnnxEncoder:
    """Tokenizer + ONNX session producing L2-normalised embeddings.

    Args:
        model_path: An ``.onnx`` file whose graph outputs ``sentence_embedding``.
        tokenizer_path: A Hugging Face fast-tokenizer ``tokenizer.json``.
        max_length: Texts are truncated to this many tokens (never rejected for length).
        config: Session settings (``intra_op_threads`` is OpenVINO's thread count too).
        runtime: ``onnxruntime`` or ``openvino`` (:mod:`labelmatch.runtime.engines`).
        precision: OpenVINO's inference precision hint (``bf16``); empty: its default.
        batch_invariant: Whether a text's embedding is the same whatever it is batched with: true
            of an fp32 graph, false of dynamic int8 (one activation scale per batch). Only then
            are label descriptions embedded in batches (:attr:`LABEL_BATCH_SIZE`).
    """

    #: Label descriptions per run where the graph is batch-invariant: 1.15x the descriptions per
    #: second of one per run on 5-40-word descriptions (``make bench-label-embedding``).
    LABEL_BATCH_SIZE = 32

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_length: int,
                 config: OrtConfig | None = None, runtime: str = "onnxruntime",
                 batch_invariant: bool = False, precision: str = ""):
        from tokenizers import Tokenizer

        self.config = config or OrtConfig()
        self.max_length = int(max_length)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self.tokenizer.enable_truncation(max_length=self.max_length)
        self.tokenizer.enable_padding(**_padding_of(Path(tokenizer_path), self.tokenizer))
        # A second instance, neither truncating nor padding, reads whole documents' offsets.
        self._whole = Tokenizer.from_file(str(tokenizer_path))
        self._whole.no_truncation()
        self._whole.no_padding()
        if runtime == "openvino":
            self.session: Any = OpenVinoSession(model_path, self.config.intra_op_threads, precision)
        else:
            self.session = self.config.create_session(model_path)
        self.runtime = runtime
        self.batch_invariant = batch_invariant
        self.model_path = Path(model_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    @classmethod
    def for_engine(cls, root: str | Path, engine: Engine, max_length: int,
                   config: OrtConfig | None = None) -> OnnxEncoder:
        """The encoder that runs ``engine`` (its graph file, runtime and precision) from the
        OnnxModel directory ``root``."""
        root = Path(root)
        return cls(root / engine.file, root / TOKENIZER_FILE, max_length, config, engine.runtime,
                   batch_invariant=engine.batch_invariant, precision=engine.precision)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Batch inputs of the graph (padded to the longest text, truncated to ``max_length``)."""
        return graph_feeds(self.tokenizer.encode_batch(list(texts)), self.input_names)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens, without special tokens or truncation (the same
        as the torch side's: both read the same ``tokenizer.json``)."""
        return self._whole.encode(text, add_special_tokens=False).offsets

    def embed(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """``(n, dim)`` float32 embeddings, batched by length to keep padding small.

        Args:
            texts: The texts.
            batch_size: Texts per run (default ``config.batch_size``, one as served).
        """
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        size = batch_size or self.config.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            (embedded,) = self.session.run([OUTPUT_NAME], self.tokenize([texts[i] for i in rows]))
            out[rows] = embedded
        return out


def graph_feeds(encodings: Sequence[Any], input_names: Sequence[str]) -> dict[str, np.ndarray]:
    """The graph's int64 inputs (``input_names`` of ids, attention mask, token types) from
    equal-length ``tokenizers`` encodings (padded, or a single one)."""
    field = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
    return {name: np.array([getattr(e, field[name]) for e in encodings], dtype=np.int64)
            for name in input_names}


def near_boundary(cos: np.ndarray, boundary: np.ndarray, margin: float) -> np.ndarray:
    """Rows of ``cos`` with some label's cosine within ``margin`` of its ``boundary`` (the rows
    the fp32 fallback re-embeds)."""
    return (np.abs(cos - boundary) < margin).any(axis=1)


def _padding_of(tokenizer_path: Path, tokenizer: Any) -> dict[str, Any]:
    """Padding settings from ``tokenizer_config.json`` beside ``tokenizer.json``."""
    config_path = tokenizer_path.parent / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    pad = config.get("pad_token") or "[PAD]"
    pad = pad.get("content", "[PAD]") if isinstance(pad, dict) else pad
    pad_id = tokenizer.token_to_id(pad)
    if pad_id is None:
        raise ArtifactError(f"{tokenizer_path}: pad token {pad!r} is not in the vocabulary")
    return {"pad_id": pad_id, "pad_token": pad}


class OnnxClassifier(LabelMatcher):
    """Label matching over an :class:`OnnxEncoder`: ``p = sigmoid(scale * cos + bias)``.

    Args:
        encoder: The document/label encoder.
        labels: Served ``{label: description}`` in order.
        label_embeddings: Their ``(n_labels, dim)`` embeddings (computed when ``None``).
        scale: Cosine scale.
        bias: Logit bias.
        thresholds: :class:`~labelmatch.model.matching.Thresholds` or the ``thresholds.json``
            mapping ``{"default": t, "labels": {label: t}}``.
        info: The artifact's ``labelmatch.json``.
        model_version: Shown in every response (the artifact digest by default).
        fallback: A full-precision encoder for documents near a decision boundary (and for
            embedding label descriptions), or ``None``.
        fallback_margin: Cosine distance to a label's boundary under which a document is
            re-embedded by ``fallback``.
        on_fallback: Called with the number of documents re-embedded by each call (metrics).
    """

    def __init__(self, encoder: OnnxEncoder, labels: dict[str, str], label_embeddings: np.ndarray | None,
                 scale: float, bias: float, thresholds: Thresholds | dict[str, Any],
                 info: dict[str, Any] | None = None, model_version: str = "unversioned",
                 fallback: OnnxEncoder | None = None, fallback_margin: float = 0.0,
                 on_fallback: Callable[[int], None] | None = None):
        if fallback_margin < 0:
            raise ConfigError(f"fallback_margin must be >= 0, got {fallback_margin}")
        if label_embeddings is not None and label_embeddings.shape != (len(labels), encoder.dim):
            raise ArtifactError(
                f"label embeddings have shape {label_embeddings.shape}, expected {(len(labels), encoder.dim)}"
            )
        self.encoder = encoder
        self.fallback = fallback
        self.fallback_margin = float(fallback_margin) if fallback is not None else 0.0
        self.on_fallback = on_fallback
        self.info = info or {}
        self.model_version = model_version
        #: The engine serving it (set by :meth:`load`; see :mod:`labelmatch.runtime.engines`).
        graph = Path(getattr(encoder, "model_path", "")).name
        self.engine = f"{getattr(encoder, 'runtime', 'onnxruntime')}:{graph}"
        super().__init__(labels, label_embeddings, scale, bias, thresholds,
                         Chunking.from_info({"max_length": encoder.max_length, **self.info}),
                         label_cache_size=encoder.config.label_cache_size)

    @classmethod
    def load(cls, path: str | Path, config: OrtConfig | None = None, model_file: str | None = None,
             verify: bool = True, model_version: str | None = None,
             engine_name: str | None = None) -> OnnxClassifier:
        """Load an OnnxModel artifact, verifying every file's digest first.

        Args:
            path: The artifact directory.
            config: ONNX Runtime settings.
            model_file: Serve this graph under ONNX Runtime (``model.onnx``, ``model_fp32.onnx``,
                ``model_int8_static.onnx``) instead of the engine the export picked.
            verify: Check the manifest (refuses a corrupted or missing file by name).
            model_version: The version responses name (default: ``labelmatch.json``'s, else the
                artifact digest; an artifact still being written has no manifest to digest).
            engine_name: Serve this engine (:data:`~labelmatch.runtime.engines.ENGINES`) instead
                of the one the export picked; it must be one the export measured.
        """
        root = Path(path)
        if verify:
            verify_artifact(root, "OnnxModel")
        info = _read_json(root, "labelmatch.json")
        chosen, plan = served_engine(info, model_file, engine_name)
        if not (root / chosen.file).is_file():
            raise ArtifactError(f"artifact {root}: no {chosen.file}")
        max_length = int(info["max_length"])
        encoder = OnnxEncoder.for_engine(root, chosen, max_length, config)
        fallback = None
        if plan:
            if not (root / plan["model"]).is_file():
                raise ArtifactError(f"artifact {root}: no {plan['model']} (its fp32 fallback graph)")
            fallback = OnnxEncoder(root / plan["model"], root / TOKENIZER_FILE, max_length, config,
                                   batch_invariant=True)
        version = model_version or served_model_version(root, info)
        labels = _read_json(root, "labels.json")
        classifier = cls(encoder, labels, np.load(root / "label_embeddings.npy"),
                         info["scale"], info["bias"], _read_json(root, "thresholds.json"), info, version,
                         fallback, float(plan["margin"]) if plan else 0.0)
        classifier.engine = chosen.name
        if (root / HIERARCHY_FILE).is_file():
            classifier.hierarchy = load_hierarchy(root / HIERARCHY_FILE, labels)
        return classifier

    @property
    def precise_encoder(self) -> OnnxEncoder:
        """The encoder for label descriptions: the fp32 fallback where loaded, else the main one."""
        return self.fallback or self.encoder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` unit vectors from the served graph (int8 where quantised)."""
        return self.encoder.embed(texts)

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens (no special tokens, no truncation)."""
        return self.encoder.offsets(text)

    def embed_labels(self, descriptions: Sequence[str]) -> np.ndarray:
        """Label descriptions through :attr:`precise_encoder` (progress for large sets), in
        length-sorted batches where that graph is batch-invariant (fp32)."""
        encoder = self.precise_encoder
        size = encoder.LABEL_BATCH_SIZE if encoder.batch_invariant else None
        return embed_in_chunks(lambda texts: encoder.embed(texts, size), descriptions)

    def refine(self, names: list[str], texts: Sequence[str], cos: np.ndarray,
               label_emb: np.ndarray) -> np.ndarray:
        """The fp32 fallback: documents with a cosine within ``fallback_margin`` of some label's
        boundary are embedded again (every window) by the fp32 graph."""
        if self.fallback is None or self.fallback_margin <= 0:
            return cos
        rows = np.flatnonzero(near_boundary(cos, self.boundary_cosines(names), self.fallback_margin))
        if len(rows):
            cos = cos.copy()
            cos[rows] = chunked_cosines([texts[i] for i in rows], self.fallback.embed, self.offsets,
                                        label_emb, self.chunking)
        if self.on_fallback is not None:
            self.on_fallback(len(rows))
        return cos


def served_engine(info: dict[str, Any], model_file: str | None = None,
                  engine_name: str | None = None) -> tuple[Engine, dict[str, Any] | None]:
    """The engine an artifact serves and its fp32-fallback plan (``{"model", "margin"}`` or ``None``).

    The export records every candidate it measured under ``labelmatch.json`` ``engines`` and the
    one it picked under ``engine``; an artifact written before that serves ``model.onnx`` with the
    ``onnx.fallback`` plan.

    Args:
        info: The artifact's ``labelmatch.json``.
        model_file: A graph file to serve under ONNX Runtime instead.
        engine_name: An engine to serve instead (one the export measured).
    """
    recorded = info.get("engines") or {
        DEFAULT_ENGINE: {"fallback": (info.get("onnx") or {}).get("fallback")},
        "ort-fp32": {"fallback": None},
    }
    if model_file is not None:
        matches = [n for n, e in ENGINES.items() if e.file == model_file and e.runtime == "onnxruntime"]
        if not matches:
            raise ConfigError(f"no engine serves {model_file!r}; graphs: "
                              f"{', '.join(sorted({e.file for e in ENGINES.values()}))}")
        engine_name = matches[0]
    name = engine_name or info.get("engine") or DEFAULT_ENGINE
    chosen = engine(name)
    if name not in recorded:
        raise ConfigError(f"engine {name!r} was not measured by this artifact's export; "
                          f"measured: {', '.join(recorded)}")
    if not chosen.available:
        installable = {n: e.get("cost_ms") for n, e in recorded.items()
                       if e.get("cost_ms") is not None and ENGINES[n].available}
        if engine_name is not None or not installable:
            raise ConfigError(f"engine {name!r} {chosen.unavailable_reason()}")
        name = min(installable, key=lambda n: installable[n])
        log.warning("the export picked %s, which %s: serving %s, the cheapest measured engine that runs "
                    "here", chosen.name, chosen.unavailable_reason(), name)
        chosen = ENGINES[name]
    plan = recorded[name].get("fallback")
    return chosen, ({"model": plan["model"], "margin": plan["margin"]} if plan else None)


def served_model_version(root: str | Path, info: dict[str, Any] | None = None) -> str:
    """The version a server names for the artifact at ``root``: ``labelmatch.json``'s
    ``model_version``, else the first 12 hex digits of the artifact digest."""
    info = info if info is not None else _read_json(Path(root), "labelmatch.json")
    return info.get("model_version") or artifact_digest(root)[:12]


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {root}: cannot read {name}: {exc}") from exc
