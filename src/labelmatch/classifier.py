"""Prediction with a trained (or untrained, zero-shot) label-matching model."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.encoder import TextEncoder, load_base
from labelmatch.model_io import Thresholds, load_encoder_model


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
        long_documents: ``truncate`` or ``chunk`` (max-pool scores over overlapping windows).
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
        long_documents: str = "truncate",
        info: dict[str, Any] | None = None,
    ):
        self.encoder = encoder.eval()
        self.labels = dict(labels)
        self.scale = float(scale)
        self.bias = float(bias)
        self.thresholds = thresholds
        self.long_documents = long_documents
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
        encoder = TextEncoder(model.to(device), tokenizer, int(info["max_length"]))
        long_docs = info.get("config", {}).get("long_documents", "truncate")
        return cls(encoder, labels, embeddings, info["scale"], info["bias"], thresholds, long_docs, info)

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
        encoder = TextEncoder(model, tokenizer, max_length)
        info = {"base_model": base_model, "max_length": max_length, "scale": scale, "bias": -scale * boundary}
        return cls(encoder, labels, None, scale, -scale * boundary, Thresholds(0.5), "truncate", info)

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

    def document_embeddings(self, texts: Sequence[str], batch_size: int = 64) -> list[np.ndarray]:
        """Per document, a ``(n_windows, dim)`` matrix: one row (truncate) or one per chunk."""
        if self.long_documents != "chunk":
            return list(self._embed(texts, batch_size)[:, None, :])
        windows, owner = [], []
        tokenizer = self.encoder.tokenizer
        body = self.encoder.max_length - 2
        stride = max(body // 2, 1)
        for i, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            starts = range(0, max(len(ids) - body, 0) + 1, stride) if len(ids) > body else [0]
            for start in starts:
                windows.append(tokenizer.decode(ids[start : start + body]))
                owner.append(i)
            if len(ids) > body and (len(ids) - body) % stride:
                windows.append(tokenizer.decode(ids[-body:]))
                owner.append(i)
        embedded = self._embed(windows, batch_size)
        owner_arr = np.array(owner)
        return [embedded[owner_arr == i] for i in range(len(texts))]

    def similarities(
        self,
        texts: Sequence[str],
        labels: dict[str, str] | None = None,
        replace: bool = False,
        batch_size: int = 64,
    ) -> tuple[list[str], np.ndarray]:
        """``(label names, cos)`` with ``cos`` of shape ``(n_docs, n_labels)`` (max over chunks)."""
        label_set = self.resolve_labels(labels, replace)
        label_emb = self.label_embeddings(label_set)
        docs = self.document_embeddings(texts, batch_size)
        cos = (
            np.stack([(d @ label_emb.T).max(axis=0) for d in docs]) if docs else np.zeros((0, len(label_set)))
        )
        return list(label_set), cos.astype(np.float32)

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
            out.append(
                Prediction(
                    chosen,
                    {n: round(float(p), 6) for n, p in zip(names, row_p, strict=True)},
                    {n: round(float(c), 6) for n, c in zip(names, row_c, strict=True)},
                )
            )
        return out
