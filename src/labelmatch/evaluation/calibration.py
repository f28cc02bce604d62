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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labelmatch.data.dataset import Dataset
from labelmatch.evaluation.evaluate import score_split
from labelmatch.evaluation.metrics import binarize, macro_f1, tune_thresholds
from labelmatch.model.matching import Thresholds


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

    def summary(self) -> dict[str, Any]:
        """JSON-ready figures (without the thresholds themselves)."""
        return {
            "global_threshold": self.global_threshold,
            "documents": self.documents,
            "labels": len(self.positives),
            "labels_without_positives": sorted(k for k, v in self.positives.items() if v == 0),
            "macro_f1_before": round(self.macro_f1_before, 4),
            "macro_f1_after_in_sample": round(self.macro_f1_after, 4),
        }


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
        A :class:`Calibration`: every label of ``dataset`` gets its own threshold (labels without
        a positive document get the global one); the model's other per-label thresholds are kept.
    """
    targets, probs = score_split(classifier, dataset, "all")
    global_threshold, per_label = tune_thresholds(targets, probs)
    names = list(dataset.labels)
    current = classifier.thresholds
    before = binarize(probs, current.for_labels(names))
    after = binarize(probs, per_label)
    present = targets.sum(0) > 0
    merged = Thresholds(
        global_threshold if replace_default else current.default,
        {**current.labels, **{name: round(float(t), 4) for name, t in zip(names, per_label, strict=True)}},
    )
    return Calibration(
        thresholds=merged,
        global_threshold=float(global_threshold),
        documents=len(dataset.documents),
        positives={name: int(n) for name, n in zip(names, targets.sum(0), strict=True)},
        macro_f1_before=macro_f1(targets[:, present], before[:, present]),
        macro_f1_after=macro_f1(targets[:, present], after[:, present]),
    )
