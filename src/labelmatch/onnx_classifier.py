"""Torch-free prediction with an exported OnnxModel artifact (tokenizers + ONNX Runtime + numpy).

This is the serving path: importing it must never import torch, so the serving image stays
small. The graph in ``model.onnx`` already pools (the model's own pooling) and L2-normalises, so a document
embedding is one ``session.run`` and a cosine is a dot product.

**fp32 fallback.** Where the export found that int8 alone changes too many label sets (see
:mod:`labelmatch.export`), the artifact names ``model_fp32.onnx`` and a cosine ``margin``: a
document whose int8 cosine with some label lies within ``margin`` of that label's decision
boundary is embedded again by the fp32 graph, and those cosines are used. Only the uncertain
documents pay for fp32; label embeddings always come from full precision (torch at export, the
fp32 graph for request-time labels when it is loaded).

Example::

    clf = OnnxClassifier.load("runs/onnx")
    clf.predict(["VAT return filed late, penalty assessed"])[0]["labels"]
    clf.predict(texts, labels={"customs": "Import duties and customs procedures."})
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.artifacts import artifact_digest, verify_artifact
from labelmatch.chunking import Chunking, document_windows, max_over_windows
from labelmatch.errors import ArtifactError, ConfigError
from labelmatch.hierarchy import HIERARCHY_FILE, Hierarchy, load_hierarchy

MODEL_FILE = "model.onnx"
FP32_MODEL_FILE = "model_fp32.onnx"
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
        batch_size: Documents per ``session.run``.
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
    batch_size: int = 32
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
        config: Session settings.
    """

    def __init__(self, model_path: str | Path, tokenizer_path: str | Path, max_length: int,
                 config: OrtConfig | None = None):
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
        self.session = self.config.create_session(model_path)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.dim = int(self.session.get_outputs()[0].shape[-1])

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """Batch inputs of the graph (padded to the longest text, truncated to ``max_length``)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        arrays = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
        }
        return {name: arrays[name] for name in self.input_names}

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens, without special tokens or truncation (the same
        as the torch side's: both read the same ``tokenizer.json``)."""
        return self._whole.encode(text, add_special_tokens=False).offsets

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` float32 embeddings, batched by length to keep padding small."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        size = self.config.batch_size
        for start in range(0, len(order), size):
            rows = order[start : start + size]
            (embedded,) = self.session.run([OUTPUT_NAME], self.tokenize([texts[i] for i in rows]))
            out[rows] = embedded
        return out


def near_boundary(cos: np.ndarray, boundary: np.ndarray, margin: float) -> np.ndarray:
    """Rows of ``cos`` with some label's cosine within ``margin`` of its ``boundary`` (the rows
    the fp32 fallback re-embeds)."""
    return (np.abs(cos - boundary) < margin).any(axis=1)


def threshold_vector(thresholds: dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """``(labels,)`` float32 thresholds of ``names`` from a ``thresholds.json`` mapping
    (``{"default": t, "labels": {label: t}}``; labels it does not name get the default)."""
    default = float(thresholds.get("default", 0.5))
    per_label = thresholds.get("labels", {})
    return np.array([float(per_label.get(n, default)) for n in names], dtype=np.float32)


def boundary_cosines(thresholds: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """Decision boundaries in cosine units: ``(logit(threshold) - bias) / scale`` per label."""
    t = np.clip(np.asarray(thresholds, dtype=np.float64), 1e-6, 1 - 1e-6)
    return ((np.log(t / (1 - t)) - bias) / scale).astype(np.float32)


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


class OnnxClassifier:
    """Label matching over an :class:`OnnxEncoder`: ``p = sigmoid(scale * cos + bias)``.

    Args:
        encoder: The document/label encoder.
        labels: Served ``{label: description}`` in order.
        label_embeddings: Their ``(n_labels, dim)`` embeddings (computed when ``None``).
        scale: Cosine scale.
        bias: Logit bias.
        thresholds: ``{"default": t, "labels": {label: t}}`` (``thresholds.json``).
        info: The artifact's ``labelmatch.json``.
        model_version: Shown in every response (the artifact digest by default).
        fallback: A full-precision encoder for documents near a decision boundary (and for
            embedding label descriptions), or ``None``.
        fallback_margin: Cosine distance to a label's boundary under which a document is
            re-embedded by ``fallback``.
        on_fallback: Called with the number of documents re-embedded by each call (metrics).
    """

    def __init__(self, encoder: OnnxEncoder, labels: dict[str, str], label_embeddings: np.ndarray | None,
                 scale: float, bias: float, thresholds: dict[str, Any], info: dict[str, Any] | None = None,
                 model_version: str = "unversioned", fallback: OnnxEncoder | None = None,
                 fallback_margin: float = 0.0, on_fallback: Callable[[int], None] | None = None):
        if fallback_margin < 0:
            raise ConfigError(f"fallback_margin must be >= 0, got {fallback_margin}")
        self.encoder = encoder
        self.fallback = fallback
        self.fallback_margin = float(fallback_margin) if fallback is not None else 0.0
        self.on_fallback = on_fallback
        self.scale = float(scale)
        self.bias = float(bias)
        self.info = info or {}
        self.chunking = Chunking.from_info({"max_length": encoder.max_length, **self.info})
        #: Child → parent links; a predicted child brings its parent (``hierarchy.json``).
        self.hierarchy: Hierarchy | None = None
        self.model_version = model_version
        self._lock = threading.Lock()
        self._request_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.set_labels(labels, thresholds, label_embeddings)

    @classmethod
    def load(cls, path: str | Path, config: OrtConfig | None = None, model_file: str = MODEL_FILE,
             verify: bool = True) -> OnnxClassifier:
        """Load an OnnxModel artifact, verifying every file's digest first.

        Args:
            path: The artifact directory.
            config: ONNX Runtime settings.
            model_file: ``model.onnx`` (int8) or ``model_fp32.onnx`` where it was kept.
            verify: Check the manifest (refuses a corrupted or missing file by name).
        """
        root = Path(path)
        if verify:
            verify_artifact(root, "OnnxModel")
        info = _read_json(root, "labelmatch.json")
        if not (root / model_file).is_file():
            raise ArtifactError(f"artifact {root}: no {model_file}")
        max_length = int(info["max_length"])
        encoder = OnnxEncoder(root / model_file, root / TOKENIZER_FILE, max_length, config)
        plan = (info.get("onnx") or {}).get("fallback") if model_file == MODEL_FILE else None
        fallback = None
        if plan:
            if not (root / plan["model"]).is_file():
                raise ArtifactError(f"artifact {root}: no {plan['model']} (its fp32 fallback graph)")
            fallback = OnnxEncoder(root / plan["model"], root / TOKENIZER_FILE, max_length, config)
        version = info.get("model_version") or artifact_digest(root)[:12]
        labels = _read_json(root, "labels.json")
        classifier = cls(encoder, labels, np.load(root / "label_embeddings.npy"),
                         info["scale"], info["bias"], _read_json(root, "thresholds.json"), info, version,
                         fallback, float(plan["margin"]) if plan else 0.0)
        if (root / HIERARCHY_FILE).is_file():
            classifier.hierarchy = load_hierarchy(root / HIERARCHY_FILE, labels)
        return classifier

    def set_labels(self, labels: dict[str, str], thresholds: dict[str, Any],
                   label_embeddings: np.ndarray | None = None) -> None:
        """Replace the served label set (and its thresholds) in one step."""
        if not labels:
            raise ConfigError("the served label set cannot be empty")
        embeddings = label_embeddings
        if embeddings is None:
            embeddings = self.precise_encoder.embed(list(labels.values()))
        expected = (len(labels), self.encoder.dim)
        if embeddings.shape != expected:
            raise ArtifactError(f"label embeddings have shape {embeddings.shape}, expected {expected}")
        served = dict(zip(labels.values(), embeddings.astype(np.float32), strict=True))
        with self._lock:
            self.labels = dict(labels)
            self.default_threshold = float(thresholds.get("default", 0.5))
            self.label_thresholds = {k: float(v) for k, v in thresholds.get("labels", {}).items()}
            self._served = served

    def label_embeddings(self, labels: dict[str, str]) -> np.ndarray:
        """Embeddings of label descriptions; unseen ones are embedded once and cached (LRU).

        One lock covers lookup and embedding: new descriptions are rare after warm-up, and it
        keeps two requests from embedding the same description twice.
        """
        with self._lock:
            served, cache = self._served, self._request_cache
            missing = [d for d in dict.fromkeys(labels.values()) if d not in served and d not in cache]
            cache.update(zip(missing, self.precise_encoder.embed(missing), strict=True))
            rows = []
            for description in labels.values():
                if description in served:
                    rows.append(served[description])
                else:
                    cache.move_to_end(description)
                    rows.append(cache[description])
            while len(cache) > self.encoder.config.label_cache_size:
                cache.popitem(last=False)
        return np.stack(rows)

    @property
    def precise_encoder(self) -> OnnxEncoder:
        """The encoder for label descriptions: the fp32 fallback where loaded, else the main one."""
        return self.fallback or self.encoder

    def boundary_cosines(self, names: Sequence[str]) -> np.ndarray:
        """Each label's decision boundary in cosine units (see :func:`boundary_cosines`)."""
        return boundary_cosines(self.thresholds_for(names), self.scale, self.bias)

    def resolve_labels(self, labels: dict[str, str] | None = None, replace: bool = False) -> dict[str, str]:
        """The label set of a request: the served one, extended (or replaced) by ``labels``."""
        if not labels:
            return dict(self.labels)
        return dict(labels) if replace else {**self.labels, **labels}

    def thresholds_for(self, names: Sequence[str]) -> np.ndarray:
        """Threshold vector for ``names`` (request-time labels get the default)."""
        default = self.default_threshold
        return np.array([self.label_thresholds.get(n, default) for n in names], dtype=np.float32)

    def scores(self, texts: Sequence[str], labels: dict[str, str] | None = None,
               replace: bool = False) -> tuple[list[str], np.ndarray, np.ndarray]:
        """``(label names, cosines, probabilities)``, both arrays ``(n_docs, n_labels)``."""
        label_set = self.resolve_labels(labels, replace)
        names = list(label_set)
        label_emb = self.label_embeddings(label_set)
        windows, owner = document_windows(texts, self.encoder.offsets, self.chunking)
        window_cos = self.encoder.embed(windows) @ label_emb.T
        cos = max_over_windows(window_cos, owner, len(texts))
        if self.fallback is not None and self.fallback_margin > 0 and len(texts):
            rows = np.flatnonzero(near_boundary(cos, self.boundary_cosines(names), self.fallback_margin))
            if len(rows):
                again = np.flatnonzero(np.isin(owner, rows))  # every window of those documents
                window_cos[again] = self.fallback.embed([windows[i] for i in again]) @ label_emb.T
                cos = max_over_windows(window_cos, owner, len(texts))
            if self.on_fallback is not None:
                self.on_fallback(len(rows))
        return names, cos.astype(np.float32), self.probabilities(cos).astype(np.float32)

    def label_probabilities(
        self, texts: Sequence[str], labels: dict[str, str] | None = None, replace: bool = False
    ) -> tuple[list[str], np.ndarray]:
        """``(label names, probabilities)`` as served (int8, fp32 fallback, the long-document rule)."""
        names, _, probs = self.scores(texts, labels, replace)
        return names, probs

    def probabilities(self, cos: np.ndarray) -> np.ndarray:
        """``sigmoid(scale * cos + bias)``, elementwise."""
        return 1.0 / (1.0 + np.exp(-(self.scale * cos + self.bias)))

    def predict(self, texts: Sequence[str], labels: dict[str, str] | None = None, replace: bool = False,
                with_similarities: bool = False) -> list[dict[str, Any]]:
        """One ``{"labels", "scores"[, "similarities"]}`` per text (the Prediction contract).

        Args:
            texts: Documents (truncated to the model's max length).
            labels: Extra label descriptions (or, with ``replace``, the whole label set).
            replace: Use ``labels`` instead of the served labels.
            with_similarities: Also return the cosines.
        """
        names, cos, probs = self.scores(texts, labels, replace)
        thresholds = self.thresholds_for(names)
        out = []
        for row_p, row_c in zip(probs, cos, strict=True):
            chosen = [names[j] for j in np.argsort(-row_p, kind="stable") if row_p[j] >= thresholds[j]]
            if self.hierarchy is not None:
                chosen = self.hierarchy.enforce(chosen, names)
            prediction: dict[str, Any] = {
                "labels": chosen,
                "scores": {n: round(float(p), 6) for n, p in zip(names, row_p, strict=True)},
            }
            if with_similarities:
                prediction["similarities"] = {
                    n: round(float(c), 6) for n, c in zip(names, row_c, strict=True)
                }
            out.append(prediction)
        return out


def _read_json(root: Path, name: str) -> Any:
    try:
        return json.loads((root / name).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"artifact {root}: cannot read {name}: {exc}") from exc
