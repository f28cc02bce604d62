"""Multi-label metrics and threshold tuning (scikit-learn underneath).

Only what scikit-learn does not offer is written here: per-label threshold search, expected
calibration error over all (document, label) pairs, and "most missed / most confused" tables.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

#: Candidate thresholds searched when tuning (probabilities): every 0.01 from 0.05 to 0.95, then
#: finer steps up to 0.999. The tail is for label sets whose scores crowd near 1 (a model scoring a
#: domain far from its training data: the general adapter trained with a news dataset, calibrated on
#: Reuters, needed 0.99; docs/training.md). Ties go to the lower
#: global threshold and to the label threshold closest to the global one, so the tail only wins
#: where it is strictly better (or where the global threshold is in it).
THRESHOLD_GRID = np.concatenate([np.round(np.arange(0.05, 0.96, 0.01), 2),
                                 [0.96, 0.97, 0.98, 0.985, 0.99, 0.993, 0.996, 0.998, 0.999]])


def binarize(scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """``scores >= thresholds`` as int, thresholds broadcast per label."""
    return (scores >= np.asarray(thresholds, dtype=scores.dtype)).astype(np.int64)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-F1 over labels that occur in ``y_true`` or ``y_pred`` (zero_division=0)."""
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def tune_global_threshold(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The single threshold maximising macro-F1; returns ``(threshold, macro_f1)``."""
    best = (0.5, -1.0)
    for threshold in THRESHOLD_GRID:
        value = macro_f1(y_true, binarize(scores, threshold))
        if value > best[1] + 1e-12:
            best = (float(threshold), value)
    return best


#: Pseudo-count of validation positives behind the global threshold in ``tune_label_thresholds``.
THRESHOLD_PRIOR_POSITIVES = 4.0


def tune_label_thresholds(
    y_true: np.ndarray,
    scores: np.ndarray,
    fallback: float,
    prior_positives: float = THRESHOLD_PRIOR_POSITIVES,
) -> np.ndarray:
    """Per-label thresholds from validation scores, shrunk towards ``fallback`` for rare labels.

    Each label's F1-maximising threshold ``t_j`` (ties prefer the value closest to ``fallback``)
    is blended with the global one by how much evidence backs it::

        threshold_j = (n_j * t_j + k * fallback) / (n_j + k)

    where ``n_j`` is the label's number of validation positives and ``k = prior_positives``. A
    label with one validation positive would otherwise get a threshold fitted to one document;
    labels without a positive keep ``fallback``. ``prior_positives=0`` gives the unshrunk
    per-label optimum. Why 4: on Reuters validation scores split in halves (tune on one, score the
    other, 10 seeds, four models), shrinkage with k = 4 beat both the unshrunk thresholds and
    "global below N positives" (+0.01-0.016 micro-F1); see ``bench/results/quality.md``.

    Args:
        y_true: ``(documents, labels)`` 0/1 validation targets.
        scores: ``(documents, labels)`` probabilities.
        fallback: The global threshold (e.g. from :func:`tune_global_threshold`).
        prior_positives: Shrinkage strength ``k`` (>= 0).

    Returns:
        ``(labels,)`` float32 thresholds.
    """
    if prior_positives < 0:
        raise ValueError(f"prior_positives must be >= 0, got {prior_positives}")
    y_true = y_true.astype(bool)
    thresholds = np.full(y_true.shape[1], fallback, dtype=np.float32)
    for j in range(y_true.shape[1]):
        positives = y_true[:, j]
        count = int(positives.sum())
        if count == 0:
            continue
        predicted = scores[:, j][:, None] >= THRESHOLD_GRID[None, :]
        tp = (predicted & positives[:, None]).sum(0)
        fp = (predicted & ~positives[:, None]).sum(0)
        fn = (~predicted & positives[:, None]).sum(0)
        f1 = 2 * tp / np.maximum(2 * tp + fp + fn, 1)
        best = np.flatnonzero(f1 >= f1.max() - 1e-12)
        optimum = THRESHOLD_GRID[best[np.argmin(np.abs(THRESHOLD_GRID[best] - fallback))]]
        thresholds[j] = (count * optimum + prior_positives * fallback) / (count + prior_positives)
    return thresholds


def tune_thresholds(y_true: np.ndarray, scores: np.ndarray) -> tuple[float, np.ndarray]:
    """The global threshold, then per-label thresholds shrunk towards it (the library's rule).

    Used wherever a model's thresholds are (re-)tuned on validation scores: after SFT, after
    GRPO, and on an exported graph's own scores.

    Args:
        y_true: ``(documents, labels)`` 0/1 validation targets.
        scores: ``(documents, labels)`` probabilities.

    Returns:
        ``(global threshold, (labels,) per-label thresholds)``.
    """
    default, _ = tune_global_threshold(y_true, scores)
    return default, tune_label_thresholds(y_true, scores, default)


def expected_calibration_error(
    y_true: np.ndarray, scores: np.ndarray, bins: int = 10
) -> tuple[float, dict[str, list[float]]]:
    """ECE over all (document, label) pairs, and the reliability-diagram points.

    Returns:
        ``(ece, {"confidence": [...], "accuracy": [...], "count": [...]})`` per non-empty bin.
    """
    flat_scores = scores.ravel()
    flat_true = y_true.ravel().astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(flat_scores, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    curve: dict[str, list[float]] = {"confidence": [], "accuracy": [], "count": []}
    for b in range(bins):
        in_bin = index == b
        n = int(in_bin.sum())
        if n == 0:
            continue
        confidence = float(flat_scores[in_bin].mean())
        accuracy = float(flat_true[in_bin].mean())
        ece += n / flat_scores.size * abs(confidence - accuracy)
        curve["confidence"].append(confidence)
        curve["accuracy"].append(accuracy)
        curve["count"].append(float(n))
    return float(ece), curve


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, label_names: list[str]
) -> dict[str, Any]:
    """The full metric set of an evaluation.

    Returns:
        A JSON-able dict: micro/macro/samples/weighted F1, precision and recall, exact-match
        ratio, per-label P/R/F1/support, ECE with reliability curve, most-missed labels and the
        most frequent (missed true label → wrongly predicted label) confusions.
    """
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    out: dict[str, Any] = {"documents": int(y_true.shape[0]), "labels": len(label_names)}
    for average in ("micro", "macro", "samples", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, average=average, zero_division=0)
        out[f"{average}_precision"], out[f"{average}_recall"], out[f"{average}_f1"] = (
            float(p),
            float(r),
            float(f),
        )
    out["exact_match"] = float(accuracy_score(y_true, y_pred))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, zero_division=0)
    out["per_label"] = {
        name: {"precision": float(p[j]), "recall": float(r[j]), "f1": float(f[j]), "support": int(s[j])}
        for j, name in enumerate(label_names)
    }
    out["ece"], out["reliability"] = expected_calibration_error(y_true, scores)
    missed = (y_true.astype(bool) & ~y_pred.astype(bool)).sum(0)
    support = np.maximum(y_true.sum(0), 1)
    order = np.argsort(-missed / support)
    out["most_missed"] = [
        {
            "label": label_names[j],
            "missed": int(missed[j]),
            "support": int(y_true[:, j].sum()),
            "miss_rate": float(missed[j] / support[j]),
        }
        for j in order[:10]
        if missed[j] > 0
    ]
    confusions: Counter[tuple[str, str]] = Counter()
    for row in range(y_true.shape[0]):
        false_neg = np.flatnonzero(y_true[row].astype(bool) & ~y_pred[row].astype(bool))
        false_pos = np.flatnonzero(~y_true[row].astype(bool) & y_pred[row].astype(bool))
        for a in false_neg:
            for b in false_pos:
                confusions[(label_names[a], label_names[b])] += 1
    out["top_confusions"] = [
        {"true": a, "predicted": b, "count": n} for (a, b), n in confusions.most_common(10)
    ]
    return out
