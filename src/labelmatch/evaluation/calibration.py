"""Decision thresholds for labels a model was not trained on, from a few labelled documents.

A model's ``thresholds.json`` is tuned on its training labels' validation documents, and its
``default`` is what every label added later gets. That threshold does not carry over well: on
labels it never saw, a fine-tuned encoder scores wrong-but-related labels higher than on the labels
it trained on, so the best threshold for new labels is higher. ``bench/bench_transfer.py``
measures it: trained on Bitext's intents and scored on CLINC150's banking and card intents, the
threshold tuned for the training labels was 0.58-0.67 against 0.83-0.85 tuned on the new labels'
validation queries; thresholds tuned there raised test macro-F1 from 0.687 to 0.768 over 3 seeds
(``bench/results/transfer.md``).

:func:`calibrate_thresholds` tunes thresholds for a label set on labelled documents with the
library's rule (:func:`labelmatch.evaluation.metrics.tune_thresholds`: one global threshold, then
per-label thresholds shrunk towards it by how many positives back them) and merges them into the
model's own, so the trained labels keep theirs. The result is a ``thresholds.json`` for the
server's ``--thresholds`` (a ConfigMap) or the label-set admin API, next to the new descriptions.

A label with no positive document among them cannot be tuned: the search would give it the
lowest threshold of the grid (0.05) whenever no label has a positive, and it would fire on nearly
every document. Such a label keeps the label set's global threshold (the model's own threshold for
it when no label of the set has a positive), raised above its highest score on the documents given
(all of them negatives for it), so it fires on none of them; :meth:`Calibration.warning` names them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from labelmatch.core.inputs import summarise_names
from labelmatch.data.dataset import Dataset
from labelmatch.evaluation.evaluate import score_split
from labelmatch.evaluation.metrics import binarize, macro_f1, tune_thresholds
from labelmatch.model.matching import Thresholds

#: How far above a label's highest score on its negatives an untuned threshold sits.
THRESHOLD_STEP = 0.01


@dataclass
class Calibration:
    """Thresholds tuned for a label set, and what they change on the documents they came from.

    Attributes:
        thresholds: The model's thresholds with the label set's merged in (see
            :func:`calibrate_thresholds`).
        global_threshold: The label set's global threshold (every label's starting point).
        documents: Documents scored.
        positives: ``{label: positives}`` among them.
        macro_f1_before: Macro-F1 over labels with positives at the model's thresholds.
        macro_f1_after: The same at the calibrated thresholds (on the same documents: in-sample,
            an optimistic figure; the bench measures it on held-out test documents).
    """

    thresholds: Thresholds
    global_threshold: float
    documents: int
    positives: dict[str, int]
    macro_f1_before: float
    macro_f1_after: float

    @property
    def without_positives(self) -> list[str]:
        """The labels no document is positive for (their thresholds are not tuned, see the module)."""
        return [name for name, count in self.positives.items() if count == 0]

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (without the thresholds themselves)."""
        return {
            "global_threshold": self.global_threshold,
            "documents": self.documents,
            "labels": len(self.positives),
            "labels_without_positives": sorted(self.without_positives),
            "macro_f1_before": round(self.macro_f1_before, 4),
            "macro_f1_after_in_sample": round(self.macro_f1_after, 4),
        }

    def warning(self) -> str | None:
        """One line naming the labels without a positive document (a few, and how many), or ``None``."""
        missing = self.without_positives
        if not missing:
            return None
        rule = ("the label set's global threshold" if len(missing) < len(self.positives)
                else "the model's threshold (no label has a positive document, so there is no global one)")
        return (f"{len(missing):,} of {len(self.positives):,} labels have no positive document, so their "
                f"thresholds are not tuned: {summarise_names(missing)}; they keep {rule}, raised above their "
                f"highest score on these documents; add labelled documents for them and calibrate again")


def calibrate_thresholds(classifier: Any, dataset: Dataset, replace_default: bool = False) -> Calibration:
    """Tune thresholds for ``dataset``'s labels on all of its documents, merged into the model's.

    The documents are scored against ``dataset.labels`` alone (as a request with
    ``replace_labels`` would be), so the labels compete only with each other.

    Args:
        classifier: A :class:`~labelmatch.model.classifier.Classifier` or
            :class:`~labelmatch.runtime.onnx_classifier.OnnxClassifier` (as served).
        dataset: Labelled documents (every split) and the label set's descriptions.
        replace_default: Also make the label set's global threshold the model's ``default`` (the
            threshold of labels added at request time with no threshold of their own).

    Returns:
        A :class:`Calibration`: every label of ``dataset`` gets its own threshold (a label without
        a positive document: the global one, or the model's when no label has a positive, raised
        above its highest score on the documents); the model's other per-label thresholds are
        kept.
    """
    targets, probs = score_split(classifier, dataset, "all")
    names = list(dataset.labels)
    current = classifier.thresholds
    present = targets.sum(0) > 0
    if present.any():
        global_threshold, per_label = tune_thresholds(targets, probs)
        fallback = np.full(len(names), global_threshold, dtype=np.float32)
    else:  # nothing to tune on: the search's answer (its lowest candidate) would mean nothing
        global_threshold, replace_default = current.default, False
        per_label = fallback = current.for_labels(names)
    # A label without a positive fires on none of the documents, all negatives for it.
    highest = probs.max(0) if len(probs) else np.zeros(len(names), dtype=np.float32)
    untuned = np.minimum(np.maximum(fallback, highest + THRESHOLD_STEP), 1.0)
    per_label = np.where(present, per_label, untuned)
    before = binarize(probs, current.for_labels(names))
    after = binarize(probs, per_label)
    merged = Thresholds(
        float(global_threshold) if replace_default else current.default,
        {**current.labels, **{name: round(float(t), 4) for name, t in zip(names, per_label, strict=True)}},
    )
    return Calibration(
        thresholds=merged,
        global_threshold=float(global_threshold),
        documents=len(dataset.documents),
        positives={name: int(n) for name, n in zip(names, targets.sum(0), strict=True)},
        macro_f1_before=macro_f1(targets[:, present], before[:, present]) if present.any() else 0.0,
        macro_f1_after=macro_f1(targets[:, present], after[:, present]) if present.any() else 0.0,
    )
