"""The library call behind each KFP component that is more than one function (tune, deploy, batch).

Public names import lazily (:mod:`labelmatch.core.lazy`): importing the package costs nothing.
"""

from labelmatch.core.lazy import lazy_exports

_EXPORTS = {
    "TuneStepConfig": "tune",
    "run_tune_step": "tune",
    "DeployStepConfig": "deploy",
    "run_deploy_step": "deploy",
    "BatchStepConfig": "batch",
    "run_batch_step": "batch",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
