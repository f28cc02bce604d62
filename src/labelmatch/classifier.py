"""Prediction with a trained (or untrained, zero-shot) label-matching model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.chunking import Chunking, document_windows, max_over_windows
from labelmatch.encoder import Pooling, TextEncoder, base_pooling, load_base
from labelmatch.hierarchy import Hierarchy
from labelmatch.model_io import Thresholds, load_encoder_model, read_hierarchy


@dataclass
class Prediction:
    """One document's prediction.

    Attributes:
        labels: Names of the labels at or above their threshold, by decreasing score.
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


class Classifier:
    """A dual-encoder classifier ready to predict.

    Args:
        encoder: The text encoder (merged, inference only).
        labels: ``{label: description}`` in order.
        label_embeddings: ``(n_labels, dim)`` embeddings of ``labels`` (computed when ``None``).
        scale: Cosine scale.
        bias: Logit bias.
        thresholds: Decision thresholds.
        chunking: The long-document rule (:class:`~labelmatch.chunking.Chunking`; truncation
            at the encoder's maximum length when ``None``).
        info: The model's ``labelmatch.json`` (empty for a zero-shot classifier).

    Example::

        clf = Classifier.load("runs/model")
        clf.predict(["VAT return filed late, penalty assessed"])[0].labels
        clf.predict(texts, labels={"customs": "Import duties and customs procedures."})
    """

    def __init__(
        self,
        encoder: TextEncoder,
        labels: dict[str, str],
        label_embeddings: np.ndarray | None,
        scale: float,
        bias: float,
        thresholds: Thresholds,
        chunking: Chunking | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.encoder = encoder.eval()
        self.labels = dict(labels)
        self.scale = float(scale)
        self.bias = float(bias)
        self.thresholds = thresholds
        self.chunking = chunking or Chunking.for_model("truncate", encoder.max_length)
        #: Child → parent links; a predicted child brings its parent (``hierarchy.json``).
        self.hierarchy: Hierarchy | None = None
        self.info = info or {}
        self._cache: dict[str, np.ndarray] = {}
        if label_embeddings is None:
            label_embeddings = self._embed(list(labels.values()))
        for description, row in zip(labels.values(), label_embeddings, strict=True):
            self._cache[description] = row

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu") -> Classifier:
        """Load a Model artifact, verifying every file's digest first."""
        root = Path(path)
        model, tokenizer, info = load_encoder_model(root)
        import json

        labels = json.loads((root / "labels.json").read_text())
        embeddings = np.load(root / "label_embeddings.npy")
        thresholds = Thresholds.from_json(json.loads((root / "thresholds.json").read_text()))
        encoder = TextEncoder(model.to(device), tokenizer, int(info["max_length"]), Pooling.from_info(info))
        chunking = Chunking.from_info(info)
        classifier = cls(encoder, labels, embeddings, info["scale"], info["bias"], thresholds, chunking, info)
        classifier.hierarchy = read_hierarchy(root)
        return classifier

    @classmethod
    def zero_shot(
        cls,
        labels: dict[str, str],
        base_model: str = "bundled:minilm",
        scale: float = 20.0,
        boundary: float = 0.3,
        max_length: int = 256,
    ) -> Classifier:
        """An untrained classifier: the base encoder as is, ``bias = -scale * boundary``.

        ``boundary`` is the cosine at which a label's probability is 0.5.
        """
        model, tokenizer = load_base(base_model)
        pooling = base_pooling(base_model)
        encoder = TextEncoder(model, tokenizer, max_length, pooling)
        info = {"base_model": base_model, "max_length": max_length, "scale": scale, "bias": -scale * boundary,
                "pooling": pooling.mode, "normalize": pooling.normalize}
        return cls(encoder, labels, None, scale, -scale * boundary, Thresholds(0.5), None, info)

    def _embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        return self.encoder.embed(texts, batch_size=batch_size).numpy()

    def label_embeddings(self, labels: dict[str, str]) -> np.ndarray:
        """Embeddings of label descriptions, embedding only those not seen before (cached)."""
        missing = [d for d in dict.fromkeys(labels.values()) if d not in self._cache]
        if missing:
            for description, row in zip(missing, self._embed(missing), strict=True):
                self._cache[description] = row
        return np.stack([self._cache[d] for d in labels.values()])

    def resolve_labels(self, labels: dict[str, str] | None = None, replace: bool = False) -> dict[str, str]:
        """The label set of a request: the model's, extended (or replaced) by ``labels``."""
        if not labels:
            return dict(self.labels)
        return dict(labels) if replace else {**self.labels, **labels}

    def similarities(
        self,
        texts: Sequence[str],
        labels: dict[str, str] | None = None,
        replace: bool = False,
        batch_size: int = 64,
    ) -> tuple[list[str], np.ndarray]:
        """``(label names, cos)`` with ``cos`` of shape ``(n_docs, n_labels)`` (max over a long
        document's windows under the ``chunk`` rule)."""
        label_set = self.resolve_labels(labels, replace)
        label_emb = self.label_embeddings(label_set)
        return list(label_set), chunked_cosines(self.encoder, texts, label_emb, self.chunking, batch_size)

    def scores(
        self,
        texts: Sequence[str],
        labels: dict[str, str] | None = None,
        replace: bool = False,
        batch_size: int = 64,
    ) -> tuple[list[str], np.ndarray]:
        """``(label names, probabilities)`` of shape ``(n_docs, n_labels)``."""
        names, cos = self.similarities(texts, labels, replace, batch_size)
        return names, self.probabilities(cos)

    def label_probabilities(
        self, texts: Sequence[str], labels: dict[str, str] | None = None, replace: bool = False
    ) -> tuple[list[str], np.ndarray]:
        """``(label names, probabilities)``: the interface evaluation shares with the ONNX classifier."""
        return self.scores(texts, labels, replace)

    def thresholds_for(self, names: Sequence[str]) -> np.ndarray:
        """Threshold vector for ``names`` (labels without a tuned one get the default)."""
        return self.thresholds.for_labels(list(names))

    @property
    def default_threshold(self) -> float:
        """The threshold of labels without a tuned one."""
        return self.thresholds.default

    def probabilities(self, cos: np.ndarray) -> np.ndarray:
        """``sigmoid(scale * cos + bias)``, elementwise."""
        return 1.0 / (1.0 + np.exp(-(self.scale * cos + self.bias)))

    def predict(
        self,
        texts: Sequence[str],
        labels: dict[str, str] | None = None,
        replace: bool = False,
        batch_size: int = 64,
    ) -> list[Prediction]:
        """Predict label sets.

        Args:
            texts: Documents.
            labels: Extra label descriptions (or, with ``replace``, the whole label set); new
                descriptions are embedded once and cached. New labels use the default threshold.
            replace: Use ``labels`` instead of the model's labels.
            batch_size: Embedding batch size.
        """
        names, cos = self.similarities(texts, labels, replace, batch_size)
        probs = self.probabilities(cos)
        thresholds = self.thresholds.for_labels(names)
        out = []
        for row_p, row_c in zip(probs, cos, strict=True):
            chosen = [names[j] for j in np.argsort(-row_p) if row_p[j] >= thresholds[j]]
            if self.hierarchy is not None:
                chosen = self.hierarchy.enforce(chosen, names)
            out.append(
                Prediction(
                    chosen,
                    {n: round(float(p), 6) for n, p in zip(names, row_p, strict=True)},
                    {n: round(float(c), 6) for n, c in zip(names, row_c, strict=True)},
                )
            )
        return out


def chunked_cosines(
    encoder: TextEncoder,
    texts: Sequence[str],
    label_emb: np.ndarray,
    chunking: Chunking,
    batch_size: int = 64,
) -> np.ndarray:
    """``(n_docs, n_labels)`` cosines of ``texts`` with ``label_emb`` under the long-document rule.

    Shared by prediction, validation and threshold tuning during training, and the export's
    parity check, so every one of them reads long documents the same way.
    """
    windows, owner = document_windows(texts, encoder.offsets, chunking)
    if not windows:
        return np.zeros((0, len(label_emb)), dtype=np.float32)
    window_cos = encoder.embed(windows, batch_size=batch_size).numpy() @ label_emb.T
    return max_over_windows(window_cos, owner, len(texts))
