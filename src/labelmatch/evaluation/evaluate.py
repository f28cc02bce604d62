"""Evaluating a model on a dataset split: metrics, thresholds, calibration and a report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from labelmatch.core.artifacts import (
    artifact_digest,
    atomic_artifact_dir,
    verify_artifact,
    write_json,
    write_manifest,
)
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.data.dataset import Dataset
from labelmatch.data.hierarchy import level_metrics
from labelmatch.evaluation.metrics import binarize, classification_metrics
from labelmatch.evaluation.report import markdown_report, plot_per_label_f1, plot_reliability, plot_thresholds


def load_as_served(path: str | Path) -> Any:
    """The classifier of a Model (torch) or OnnxModel (int8 with its fp32 fallback, the shipped
    thresholds: what the server runs) artifact, chosen by its manifest's kind (verified).

    torch is imported only for a Model: scoring an OnnxModel needs ONNX Runtime (or OpenVINO),
    tokenizers and numpy, which is why the pipeline's ``evaluate`` step runs in the torch-free
    step image.

    Raises:
        ArtifactError: the artifact is missing, of another kind or corrupted.
        ConfigError: a Model artifact where torch is not installed (the step image).
    """
    kind = verify_artifact(path, ("Model", "OnnxModel"))["kind"]
    if kind == "OnnxModel":
        from labelmatch.runtime.onnx_classifier import OnnxClassifier

        return OnnxClassifier.load(path)
    try:
        from labelmatch.model.classifier import Classifier
    except ModuleNotFoundError as exc:
        if exc.name not in ("torch", "transformers", "peft"):
            raise
        raise ConfigError(
            f"{path}: a Model artifact is scored with torch, which this environment lacks ({exc.name}); "
            "evaluate its exported OnnxModel, as served, or run in the train image (labelmatch[train])"
        ) from exc
    return Classifier.load(path)


def score_split(classifier: Any, dataset: Dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(targets, probabilities)`` of one split, in the dataset's label order."""
    part = dataset.split(split) if split != "all" else dataset
    if not part.documents:
        raise DataError("<dataset>", f"no documents in split {split!r}")
    _, probs = classifier.label_probabilities([d.text for d in part.documents], dataset.labels, replace=True)
    return part.label_matrix(), probs


def evaluate(classifier: Any, dataset: Dataset, split: str = "test") -> dict[str, Any]:
    """Metrics of ``classifier`` on one split of ``dataset`` with the classifier's thresholds.

    Args:
        classifier: A torch :class:`~labelmatch.model.classifier.Classifier` or an ONNX
            :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier` (as served).
        dataset: The labelled documents.
        split: ``train``, ``val``, ``test`` or ``all``.

    Returns:
        :func:`labelmatch.evaluation.metrics.classification_metrics` plus ``thresholds`` and ``split``, and
        for a model with a label hierarchy ``levels`` (per-level micro/macro-F1 and the share of
        documents whose raw decisions broke the hierarchy before it was enforced).
    """
    targets, probs = score_split(classifier, dataset, split)
    names = dataset.label_names
    thresholds = classifier.thresholds_for(names)
    decisions = binarize(probs, thresholds)
    hierarchy = getattr(classifier, "hierarchy", None)
    levels = None
    if hierarchy is not None:  # scored as served: every predicted child brings its parent
        levels = level_metrics(targets.astype(np.int64), decisions, names, hierarchy)
        decisions = hierarchy.enforce_matrix(decisions, names)
    metrics = classification_metrics(targets, decisions, probs, names)
    if levels is not None:
        metrics["levels"] = levels
    metrics["split"] = split
    metrics["thresholds"] = {n: float(t) for n, t in zip(names, thresholds, strict=True)}
    metrics["default_threshold"] = classifier.default_threshold
    return metrics


def write_report(
    metrics: dict[str, Any],
    out_dir: str | Path,
    title: str,
    lineage: dict[str, Any] | None = None,
    summary: dict[str, Any] | None = None,
    preface: str = "",
    extra_json: dict[str, Any] | None = None,
) -> Path:
    """Write an evaluation Report artifact into ``out_dir`` (atomically, with its manifest).

    Args:
        metrics: :func:`evaluate` output, written as ``metrics.json`` and rendered with its plots.
        out_dir: The Report artifact directory.
        title: Heading of the metrics section of ``report.md``.
        lineage: Recorded in the manifest (model and dataset digests, ...).
        summary: Recorded in the manifest's summary.
        preface: Markdown put before the metrics section (e.g. the deploy gate's decision).
        extra_json: More JSON files to write, ``{file name: content}``.
    """
    with atomic_artifact_dir(out_dir) as tmp:
        write_json(tmp / "metrics.json", metrics)
        for name, content in (extra_json or {}).items():
            write_json(tmp / name, content)
        images = {
            "Per-label F1": plot_per_label_f1(metrics, tmp / "per_label_f1.png").name,
            "Reliability diagram": plot_reliability(metrics, tmp / "reliability.png").name,
            "Thresholds": plot_thresholds(
                metrics["thresholds"], metrics["default_threshold"], tmp / "thresholds.png"
            ).name,
        }
        (tmp / "report.md").write_text(preface + markdown_report(metrics, title, images))
        write_manifest(tmp, "Report", lineage=lineage, extra=summary)
    return Path(out_dir)


def evaluate_model(
    model_dir: str | Path, dataset: Dataset, out_dir: str | Path, split: str = "test"
) -> dict[str, Any]:
    """Load a Model or OnnxModel artifact, evaluate it as served on ``split`` and write the Report
    artifact to ``out_dir``."""
    classifier = load_as_served(model_dir)
    metrics = evaluate(classifier, dataset, split)
    lineage = {"model": artifact_digest(model_dir), "model_path": str(model_dir)}
    summary = {"stage": "evaluate", "split": split, "macro_f1": metrics["macro_f1"]}
    title = f"Evaluation of {Path(model_dir).name} on the {split} split"
    write_report(metrics, out_dir, title, lineage, {**summary, "micro_f1": metrics["micro_f1"]})
    return metrics


def load_metrics(report_dir: str | Path) -> dict[str, Any]:
    """Read ``metrics.json`` back from a report directory."""
    return json.loads((Path(report_dir) / "metrics.json").read_text())
