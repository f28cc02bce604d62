"""The reference profile: what the exported model predicts on its own validation split.

Built by the ONNX export (:func:`labelmatch.export.onnx.export_onnx`) from the artifact *as it
will be served* (int8 graph, its fp32 fallback, the tuned thresholds, one document per ONNX
Runtime run), so a monitoring window of served predictions and the reference differ only by the
documents. Two files in the OnnxModel artifact:

* ``reference_profile.json``: documents, per-label predicted counts and rates, each label's score
  histogram, every document's max score (for the KS test), the low-confidence share, and the
  mean document embedding with its spread (cosine of each document to the centroid).
* ``reference_features.npy``: each validation document as its vector of cosines to (up to
  :data:`MAX_FEATURE_LABELS` of) the model's labels, float16: the sample the embedding-drift
  test (MMD) compares windows with.

Why cosines to labels rather than raw embeddings: the served prediction already carries them
(a label's score is ``sigmoid(scale · cos + bias)``, so ``cos`` is recovered exactly), so every
logged prediction has its vector under either text-retention policy, at no inference cost; it
is the document embedding projected on the directions the classifier decides with.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.errors import ArtifactError

PROFILE_FILE = "reference_profile.json"
FEATURES_FILE = "reference_features.npy"
#: Labels whose cosines make a document's drift vector (a seeded subset above this many).
MAX_FEATURE_LABELS = 256
#: Fixed probability bins of the per-label score histograms.
SCORE_EDGES = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
#: Scores are served rounded to 6 decimals; clip before taking the logit.
_CLIP = 1e-6


def feature_labels(labels: Sequence[str], limit: int = MAX_FEATURE_LABELS, seed: int = 0) -> list[str]:
    """The labels whose cosines form the drift vector: all of them, or a seeded subset of ``limit``."""
    names = list(labels)
    if len(names) <= limit:
        return names
    keep = np.sort(np.random.default_rng(seed).choice(len(names), limit, replace=False))
    return [names[i] for i in keep]


def cosines_from_scores(scores: Sequence[Mapping[str, float]], labels: Sequence[str], scale: float,
                        bias: float) -> np.ndarray:
    """``(n, len(labels))`` cosines recovered from served probabilities: ``(logit(p) - bias) / scale``.

    Raises:
        KeyError: A score dict lacks one of ``labels`` (a request that replaced the label set).
    """
    p = np.array([[row[name] for name in labels] for row in scores], dtype=np.float64)
    p = p.reshape(-1, len(labels))
    p = np.clip(p, _CLIP, 1 - _CLIP)
    return ((np.log(p / (1 - p)) - bias) / scale).astype(np.float32)


@dataclass
class ReferenceProfile:
    """The served model's predictions on its validation split (see the module docstring).

    Attributes:
        documents: Validation documents profiled.
        labels: Every served label, in order.
        scale: The model's cosine scale.
        bias: The model's logit bias.
        low_confidence_below: A document is *low-confidence* when its highest score is below
            this (the model's default threshold).
        label_counts: Documents predicted with each label.
        max_scores: Each document's highest score.
        score_histograms: ``{label: counts}`` over :data:`SCORE_EDGES` (feature labels only).
        feature_labels: Labels whose cosines form the drift vectors (``reference_features.npy``).
        embedding: ``{"mean": [...], "mean_cosine_to_centroid": c, "std_cosine_to_centroid": s}``.
        features: ``(documents, len(feature_labels))`` cosines (not in the JSON file).
    """

    documents: int
    labels: list[str]
    scale: float
    bias: float
    low_confidence_below: float
    label_counts: dict[str, int]
    max_scores: list[float]
    score_histograms: dict[str, list[int]]
    feature_labels: list[str]
    embedding: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32), repr=False)

    @property
    def label_rates(self) -> dict[str, float]:
        """Share of documents predicted with each label."""
        return {name: count / max(self.documents, 1) for name, count in self.label_counts.items()}

    @property
    def low_confidence_share(self) -> float:
        """Share of documents whose highest score is below :attr:`low_confidence_below`."""
        scores = np.asarray(self.max_scores)
        return float((scores < self.low_confidence_below).mean()) if len(scores) else 0.0

    def save(self, directory: str | Path) -> None:
        """Write ``reference_profile.json`` and ``reference_features.npy`` into ``directory``."""
        root = Path(directory)
        body = {key: value for key, value in asdict(self).items() if key != "features"}
        body = {"format": "labelmatch.reference_profile/1", "score_edges": list(SCORE_EDGES),
                "features_file": FEATURES_FILE, **body,
                "label_rates": self.label_rates, "low_confidence_share": self.low_confidence_share}
        (root / PROFILE_FILE).write_text(json.dumps(body, indent=1) + "\n")
        np.save(root / FEATURES_FILE, self.features.astype(np.float16))

    @classmethod
    def load(cls, directory: str | Path) -> ReferenceProfile:
        """Read the profile of an OnnxModel artifact.

        Raises:
            ArtifactError: The artifact has no profile (exported without validation data, or
                by an older labelmatch) or it cannot be read.
        """
        root = Path(directory)
        path = root / PROFILE_FILE
        if not path.is_file():
            raise ArtifactError(f"artifact {root}: no {PROFILE_FILE}; export the model with validation data "
                                "(labelmatch export --data ...) to monitor it")
        try:
            body = json.loads(path.read_text())
            features = np.load(root / body.get("features_file", FEATURES_FILE)).astype(np.float32)
            fields = {name: body[name] for name in cls.__dataclass_fields__ if name != "features"}
        except (OSError, ValueError, KeyError) as exc:
            raise ArtifactError(f"artifact {root}: cannot read {PROFILE_FILE}: {exc}") from exc
        return cls(**fields, features=features)


def build_profile(classifier: Any, texts: Sequence[str], max_feature_labels: int = MAX_FEATURE_LABELS,
                  seed: int = 0) -> ReferenceProfile:
    """Profile ``classifier`` (a served :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier`)
    on ``texts`` (its validation documents) exactly as the server predicts them.

    Args:
        classifier: The classifier as served (its labels, thresholds and fallback).
        texts: Validation documents.
        max_feature_labels: Most labels in a drift vector.
        seed: Seed of the feature-label subset.
    """
    if not texts:
        raise ValueError("a reference profile needs at least one validation document")
    predictions = classifier.predict(list(texts))
    labels = list(classifier.labels)
    scores = [p.scores for p in predictions]
    counts = {name: 0 for name in labels}
    for prediction in predictions:
        for name in prediction.labels:
            if name in counts:
                counts[name] += 1
    features = feature_labels(labels, max_feature_labels, seed)
    matrix = np.array([[row[name] for name in features] for row in scores], dtype=np.float64)
    histograms = {name: np.histogram(matrix[:, j], bins=SCORE_EDGES)[0].astype(int).tolist()
                  for j, name in enumerate(features)}
    embeddings = np.asarray(classifier.embed(list(texts)), dtype=np.float64)
    centroid = embeddings.mean(0)
    norm = float(np.linalg.norm(centroid)) or 1.0
    to_centroid = embeddings @ (centroid / norm)
    return ReferenceProfile(
        documents=len(texts), labels=labels, scale=float(classifier.scale), bias=float(classifier.bias),
        low_confidence_below=float(classifier.default_threshold), label_counts=counts,
        max_scores=[round(max(row.values()), 6) if row else 0.0 for row in scores],
        score_histograms=histograms, feature_labels=features,
        embedding={"mean": [round(float(v), 6) for v in centroid],
                   "mean_cosine_to_centroid": float(to_centroid.mean()),
                   "std_cosine_to_centroid": float(to_centroid.std())},
        features=cosines_from_scores(scores, features, classifier.scale, classifier.bias),
    )


__all__ = ["FEATURES_FILE", "MAX_FEATURE_LABELS", "PROFILE_FILE", "ReferenceProfile", "build_profile",
           "cosines_from_scores", "feature_labels"]
