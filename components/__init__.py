"""KFP v2 components, one per pipeline stage, each a thin typed wrapper of one library call.

Every component is a *lightweight Python component* (``@dsl.component``) whose body imports
``labelmatch`` and calls one stage function. The same definition runs

* locally with ``kfp.local.SubprocessRunner(use_venv=False)``, in the current interpreter where
  ``labelmatch`` is installed (no Docker, no pip install), and
* in a cluster, in the image :mod:`components._image` gives it (``IMAGE_STEP``, no torch, for
  the CPU steps; ``IMAGE_TRAIN``, CUDA torch, for the steps that train or export), which has
  ``labelmatch`` installed.

(``target_image`` containerized components were not chosen: ``kfp.local`` runs only lightweight
components in a subprocess, and the component source is embedded in the compiled IR, so the
IR itself shows exactly what each step runs.)
"""

from components.batch_classify import batch_classify
from components.data_prep import data_prep
from components.deploy import deploy
from components.evaluate import evaluate
from components.export_onnx import export_onnx
from components.grpo import grpo
from components.monitor_drift import monitor_drift
from components.tune_sft import tune_sft

__all__ = [
    "batch_classify", "data_prep", "deploy", "evaluate", "export_onnx", "grpo", "monitor_drift", "tune_sft",
]
