"""Metrics, threshold tuning, evaluation reports and the deploy gate.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "macro_f1": "metrics",
    "tune_thresholds": "metrics",
    "classification_metrics": "metrics",
    "evaluate_model": "evaluate",
    "load_metrics": "evaluate",
    "GateConfig": "gate",
    "GateDecision": "gate",
    "evaluate_candidate": "gate",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
