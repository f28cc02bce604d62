"""Monitoring: sampled predictions against the model's reference profile, drift signals, alerts and
a retraining trigger (``labelmatch monitor``; docs/monitoring.md).

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "ReferenceProfile": "profile",
    "build_profile": "profile",
    "MonitorConfig": "monitor",
    "MonitorReport": "monitor",
    "evaluate_window": "monitor",
    "write_report": "monitor",
    "mmd_permutation_test": "statistics",
    "psi": "statistics",
    "RetrainPlan": "trigger",
    "plan_retrain": "trigger",
    "producing_run": "trigger",
    "submit_retrain": "trigger",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
