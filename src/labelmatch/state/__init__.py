"""Serving state shared by the replicas: versioned label sets and prediction records (SQL).

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "ServingState": "serving_state",
    "LabelSet": "serving_state",
    "PredictionRecord": "serving_state",
    "StateUnavailable": "serving_state",
    "ShadowRow": "serving_state",
    "migrate": "migrations",
    "ReplicaState": "replica",
    "StateConfig": "replica",
    "text_sha256": "replica",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
