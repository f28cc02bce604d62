"""Ray Tune PBT over SFT: search space, trainable, scheduler, storage, history, and RayJob submission.

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
The one-call API is :func:`tune_sft`.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "TuneConfig": "pbt",
    "tune_sft": "pbt",
    "run_tune": "pbt",
    "SearchSpace": "search_space",
    "ResumablePBT": "scheduler",
    "RayJobSpec": "rayjob",
    "run_tune_rayjob": "rayjob",
    "build_history": "history",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
