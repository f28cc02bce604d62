"""The prediction core both classifiers share: label matching over whatever turns text into vectors.

``p = sigmoid(scale · cos(document, label description) + bias)``; a label is predicted when
``p`` reaches its threshold. Everything but the embedding itself lives here, once: the served
label set and its thresholds (:class:`Thresholds`), request-time labels (embedded once, cached),
the long-document rule (:mod:`labelmatch.model.chunking`), the label hierarchy, probabilities,
decision boundaries and the Prediction contract. The torch
:class:`~labelmatch.model.classifier.Classifier` and the ONNX
:class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier` differ only in :meth:`LabelMatcher.embed`
(and the ONNX one in re-embedding uncertain documents in fp32, :meth:`LabelMatcher.refine`).

This module imports neither torch nor transformers (the serving path uses it).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.data.hierarchy import Hierarchy
from labelmatch.model.chunking import Chunking, chunked_cosines

#: Most labels one request or label set may have (``LABELMATCH_MAX_LABELS``): every label is one
#: embedding (384 floats for MiniLM, 1,024 for bge-m3) and one column of every score matrix, and
#: embedding descriptions runs at roughly 500 (torch) per second on 2 cores.
MAX_LABELS = int(os.environ.get("LABELMATCH_MAX_LABELS", "100000"))
#: Label descriptions embedded per progress step; a bar is shown above this many.
LABEL_CHUNK = 1024


def embed_in_chunks(embed: Callable[[Sequence[str]], np.ndarray], texts: Sequence[str],
                    desc: str = "label descriptions") -> np.ndarray:
    """``embed(texts)`` in chunks of :data:`LABEL_CHUNK`, with a progress bar when there are more."""
    if len(texts) <= LABEL_CHUNK:
        return embed(texts)
    from tqdm.auto import tqdm

    parts = []
    with tqdm(total=len(texts), desc=desc, unit="label") as bar:
        for start in range(0, len(texts), LABEL_CHUNK):
            parts.append(embed(texts[start : start + LABEL_CHUNK]))
            bar.update(len(parts[-1]))
    return np.concatenate(parts)


def check_label_count(n: int, limit: int | None = None) -> None:
    """Refuse more than ``limit`` (default :data:`MAX_LABELS`) labels in one line."""
    limit = MAX_LABELS if limit is None else limit
    if n > limit:
        raise ConfigError(f"{n} labels exceed the maximum of {limit} per label set "
                          "(LABELMATCH_MAX_LABELS raises it; docs/serving.md)")


@dataclass
class Thresholds:
    """Decision thresholds on label probabilities (``thresholds.json``).

    Attributes:
        default: Used for labels without a tuned threshold (e.g. labels added at request time).
        labels: ``{label: threshold}`` tuned per label on validation scores.
    """

    default: float = 0.5
    labels: dict[str, float] = field(default_factory=dict)

    def for_labels(self, names: Sequence[str]) -> np.ndarray:
        """Threshold vector in the order of ``names``."""
        return np.array([self.labels.get(n, self.default) for n in names], dtype=np.float32)

    def to_json(self) -> dict[str, Any]:
        """JSON form of ``thresholds.json``."""
        return {"default": self.default, "labels": self.labels}

    @classmethod
    def from_json(cls, obj: dict[str, Any] | Thresholds, source: Any = "thresholds") -> Thresholds:
        """Parse ``thresholds.json`` (a :class:`Thresholds` passes through).

        Only ``default`` and ``labels`` are accepted, and every threshold must be a number in
        [0, 1] (a string, ``true`` or ``null`` is refused, not converted).

        Args:
            obj: The parsed JSON.
            source: Where it came from, for messages (a
                :class:`~labelmatch.core.settings.SettingsFile` names file and line).

        Raises:
            ConfigError: (DataError for a file) naming the field, e.g. ``labels.vat``.
        """
        if isinstance(obj, Thresholds):
            return obj
        from labelmatch.core.settings import build_settings, settings_error

        thresholds = build_settings(cls, obj, source)
        values = [(("default",), thresholds.default)]
        values += [(("labels", k), v) for k, v in thresholds.labels.items()]
        for where, value in values:
            if not 0.0 <= value <= 1.0:
                raise settings_error(source, where, f"expected a threshold in [0, 1], got {value}")
        return thresholds

    @classmethod
    def from_file(cls, path: str | Path) -> Thresholds:
        """Read a ``thresholds.json`` (:meth:`from_json`); a bad field is named with its line.

        Raises:
            DataError: ``thresholds.json:4: field 'labels.vat': expected a number, got a string '0.5'``.
        """
        from labelmatch.core.settings import read_settings

        settings = read_settings(path)
        return cls.from_json(settings.body, settings)


@dataclass
class Prediction:
    """One document's prediction (the Prediction contract).

    Attributes:
        labels: Names of the labels at or above their threshold, by decreasing score (and the
            parents their hierarchy implies).
        scores: ``{label: probability}``.
        similarities: ``{label: cosine}``.
    """

    labels: list[str]
    scores: dict[str, float]
    similarities: dict[str, float]

    def to_json(self, with_similarities: bool = False) -> dict[str, Any]:
        """JSON form."""
        out: dict[str, Any] = {"labels": self.labels, "scores": self.scores}
        if with_similarities:
            out["similarities"] = self.similarities
        return out


def label_probabilities(cos: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """Each label's probability from its cosine: ``sigmoid(scale * cos + bias)``, elementwise."""
    return 1.0 / (1.0 + np.exp(-(scale * cos + bias)))


def boundary_cosines(thresholds: np.ndarray, scale: float, bias: float) -> np.ndarray:
    """Decision boundaries in cosine units: ``(logit(threshold) - bias) / scale`` per label."""
    t = np.clip(np.asarray(thresholds, dtype=np.float64), 1e-6, 1 - 1e-6)
    return ((np.log(t / (1 - t)) - bias) / scale).astype(np.float32)


class LabelMatcher:
    """Label matching over :meth:`embed`; subclasses say how text becomes unit vectors.

    Args:
        labels: Served ``{label: description}`` in order.
        label_embeddings: Their ``(n_labels, dim)`` embeddings (computed when ``None``).
        scale: Cosine scale.
        bias: Logit bias.
        thresholds: Decision thresholds (:class:`Thresholds` or the ``thresholds.json`` mapping).
        chunking: The long-document rule (truncation when ``None``).
        hierarchy: Child → parent links; a predicted child brings its parent.
        label_cache_size: Request-time label descriptions kept embedded.
    """

    def __init__(
        self,
        labels: dict[str, str],
        label_embeddings: np.ndarray | None,
        scale: float,
        bias: float,
        thresholds: Thresholds | dict[str, Any],
        chunking: Chunking | None = None,
        hierarchy: Hierarchy | None = None,
        label_cache_size: int = 4096,
    ):
        self.scale = float(scale)
        self.bias = float(bias)
        self.chunking = chunking or Chunking()
        self.hierarchy = hierarchy
        self.label_cache_size = label_cache_size
        self._lock = threading.Lock()
        self._request_cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.set_labels(labels, thresholds, label_embeddings)

    # -- what subclasses provide ---------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """``(n, dim)`` float32 unit vectors of ``texts`` (each read up to the model's length)."""
        raise NotImplementedError

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character offsets of ``text``'s tokens (no special tokens, no truncation)."""
        raise NotImplementedError

    def embed_labels(self, descriptions: Sequence[str]) -> np.ndarray:
        """Embeddings of label descriptions (the most precise encoder available), with progress
        for large sets."""
        return embed_in_chunks(self.embed, descriptions)

    def refine(self, names: list[str], texts: Sequence[str], cos: np.ndarray,
               label_emb: np.ndarray) -> np.ndarray:
        """A hook to improve the ``(n_docs, n_labels)`` cosines after the first pass (default: none)."""
        return cos

    # -- the label set -------------------------------------------------------------------------
    def set_labels(self, labels: dict[str, str], thresholds: Thresholds | dict[str, Any],
                   label_embeddings: np.ndarray | None = None) -> None:
        """Replace the served label set (and its thresholds) in one step."""
        if not labels:
            raise ConfigError("the served label set cannot be empty")
        check_label_count(len(labels))
        embeddings = label_embeddings
        if embeddings is None:
            embeddings = self.embed_labels(list(labels.values()))
        if embeddings.shape[0] != len(labels):
            raise ArtifactError(f"{embeddings.shape[0]} label embeddings for {len(labels)} labels")
        served = dict(zip(labels.values(), np.asarray(embeddings, dtype=np.float32), strict=True))
        with self._lock:
            self.labels = dict(labels)
            self.thresholds = Thresholds.from_json(thresholds)
            self._served = served

    @property
    def default_threshold(self) -> float:
        """The threshold of labels without a tuned one."""
        return self.thresholds.default

    @property
    def label_thresholds(self) -> dict[str, float]:
        """``{label: threshold}`` of the labels with a tuned one."""
        return self.thresholds.labels

    def resolve_labels(self, labels: dict[str, str] | None = None, replace: bool = False) -> dict[str, str]:
        """The label set of a request: the served one, extended (or replaced) by ``labels``."""
        if not labels:
            return dict(self.labels)
        resolved = dict(labels) if replace else {**self.labels, **labels}
        check_label_count(len(resolved))
        return resolved

    def label_embeddings(self, labels: dict[str, str]) -> np.ndarray:
        """Embeddings of label descriptions; unseen ones are embedded once and cached (LRU).

        One lock covers lookup and embedding: new descriptions are rare after warm-up, and it
        keeps two requests from embedding the same description twice.
        """
        with self._lock:
            served, cache = self._served, self._request_cache
            missing = [d for d in dict.fromkeys(labels.values()) if d not in served and d not in cache]
            if missing:
                cache.update(zip(missing, self.embed_labels(missing), strict=True))
            rows = []
            for description in labels.values():
                if description in served:
                    rows.append(served[description])
                else:
                    cache.move_to_end(description)
                    rows.append(cache[description])
            while len(cache) > self.label_cache_size:
                cache.popitem(last=False)
        return np.stack(rows)

    def thresholds_for(self, names: Sequence[str]) -> np.ndarray:
        """Threshold vector for ``names`` (request-time labels get the default)."""
        return self.thresholds.for_labels(names)

    def boundary_cosines(self, names: Sequence[str]) -> np.ndarray:
        """Each label's decision boundary in cosine units (see :func:`boundary_cosines`)."""
        return boundary_cosines(self.thresholds_for(names), self.scale, self.bias)

    # -- scoring -------------------------------------------------------------------------------
    def probabilities(self, cos: np.ndarray) -> np.ndarray:
        """``sigmoid(scale * cos + bias)``, elementwise (:func:`label_probabilities`)."""
        return label_probabilities(cos, self.scale, self.bias)

    def similarities(self, texts: Sequence[str], labels: dict[str, str] | None = None,
                     replace: bool = False) -> tuple[list[str], np.ndarray]:
        """``(label names, cos)``, ``cos`` of shape ``(n_docs, n_labels)``: under the ``chunk``
        rule each document's maximum over its windows."""
        label_set = self.resolve_labels(labels, replace)
        names = list(label_set)
        label_emb = self.label_embeddings(label_set)
        cos = chunked_cosines(texts, self.embed, self.offsets, label_emb, self.chunking)
        if len(texts):
            cos = self.refine(names, texts, cos, label_emb)
        return names, cos.astype(np.float32)

    def scores(self, texts: Sequence[str], labels: dict[str, str] | None = None,
               replace: bool = False) -> tuple[list[str], np.ndarray]:
        """``(label names, probabilities)`` of shape ``(n_docs, n_labels)``."""
        names, cos = self.similarities(texts, labels, replace)
        return names, self.probabilities(cos).astype(np.float32)

    def label_probabilities(self, texts: Sequence[str], labels: dict[str, str] | None = None,
                            replace: bool = False) -> tuple[list[str], np.ndarray]:
        """``(label names, probabilities)`` as predicted (what evaluation scores)."""
        return self.scores(texts, labels, replace)

    def predict(self, texts: Sequence[str], labels: dict[str, str] | None = None,
                replace: bool = False) -> list[Prediction]:
        """Predict label sets.

        Args:
            texts: Documents (long ones read by the model's long-document rule).
            labels: Extra label descriptions (or, with ``replace``, the whole label set); new
                descriptions are embedded once and cached. New labels use the default threshold.
            replace: Use ``labels`` instead of the served labels.
        """
        names, cos = self.similarities(texts, labels, replace)
        probs = self.probabilities(cos)
        return [
            Prediction(
                chosen,
                {n: round(float(p), 6) for n, p in zip(names, row_p, strict=True)},
                {n: round(float(c), 6) for n, c in zip(names, row_c, strict=True)},
            )
            for chosen, row_p, row_c in zip(self.decide(names, probs), probs, cos, strict=True)
        ]

    def decide(self, names: list[str], probs: np.ndarray) -> list[list[str]]:
        """Each row's predicted labels: at or above their threshold, by decreasing probability,
        with the parents the hierarchy implies."""
        thresholds = self.thresholds_for(names)
        out = []
        for row in probs:
            chosen = [names[j] for j in np.argsort(-row, kind="stable") if row[j] >= thresholds[j]]
            if self.hierarchy is not None:
                chosen = self.hierarchy.enforce(chosen, names)
            out.append(chosen)
        return out
