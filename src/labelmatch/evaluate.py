"""Evaluating a model on a dataset split: metrics, thresholds, calibration and a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.artifacts import atomic_artifact_dir, write_json
from labelmatch.classifier import Classifier
from labelmatch.data import Dataset
from labelmatch.errors import DataError
from labelmatch.metrics import binarize, classification_metrics
from labelmatch.report import markdown_report, plot_per_label_f1, plot_reliability, plot_thresholds


def score_split(
    classifier: Classifier, dataset: Dataset, split: str, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, probabilities)`` of one split, in the dataset's label order."""
    part = dataset.split(split) if split != "all" else dataset
    if not part.documents:
        raise DataError("<dataset>", f"no documents in split {split!r}")
    _, probs = classifier.scores(
        [d.text for d in part.documents], dataset.labels, replace=True, batch_size=batch_size
    )
    return part.label_matrix(), probs


def evaluate(
    classifier: Classifier, dataset: Dataset, split: str = "test", batch_size: int = 64
) -> dict[str, Any]:
    """Metrics of ``classifier`` on one split of ``dataset`` with the classifier's thresholds.

    Returns:
        :func:`labelmatch.metrics.classification_metrics` plus ``thresholds`` and ``split``.
    """
    targets, probs = score_split(classifier, dataset, split, batch_size)
    names = dataset.label_names
    thresholds = classifier.thresholds.for_labels(names)
    metrics = classification_metrics(targets, binarize(probs, thresholds), probs, names)
    metrics["split"] = split
    metrics["thresholds"] = {n: float(t) for n, t in zip(names, thresholds, strict=True)}
    metrics["default_threshold"] = classifier.thresholds.default
    return metrics


def write_report(metrics: dict[str, Any], out_dir: str | Path, title: str) -> Path:
    """Write ``metrics.json``, ``report.md`` and its PNG plots into ``out_dir`` (atomically)."""
    with atomic_artifact_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        images = {
            "Per-label F1": plot_per_label_f1(metrics, tmp / "per_label_f1.png").name,
            "Reliability diagram": plot_reliability(metrics, tmp / "reliability.png").name,
            "Thresholds": plot_thresholds(
                metrics["thresholds"], metrics["default_threshold"], tmp / "thresholds.png"
            ).name,
        }
        (tmp / "report.md").write_text(markdown_report(metrics, title, images))
    return Path(out_dir)


def evaluate_model(
    model_dir: str | Path, dataset: Dataset, out_dir: str | Path, split: str = "test"
) -> dict[str, Any]:
    """Load a Model artifact, evaluate it on ``split`` and write the report to ``out_dir``."""
    classifier = Classifier.load(model_dir)
    metrics = evaluate(classifier, dataset, split)
    write_report(metrics, out_dir, f"Evaluation of {Path(model_dir).name} on the {split} split")
    return metrics


def load_metrics(report_dir: str | Path) -> dict[str, Any]:
    """Read ``metrics.json`` back from a report directory."""
    return json.loads((Path(report_dir) / "metrics.json").read_text())
