"""The one place that gives every labelmatch component its container image, at compile time.

Like ``_image.py`` in google-cloud-pipeline-components, the tag is pinned to the package
version, so a compiled pipeline (``pipelines/compiled/<name>-<version>.yaml``) always runs the
library code of the same release it was compiled from. The names come from
:func:`labelmatch.platform.images.image` (registry + repository per role + version): change the
registry with ``LABELMATCH_IMAGE_REGISTRY`` at compile time (e.g. a private mirror); never the tag.

Two images run pipeline steps; each component picks one by what it imports at run time:

* :data:`IMAGE_TRAIN` (``labelmatch-train``, CUDA torch, ``train,tune,export,batch,monitor,openvino,
  pipelines`` extras): the steps that run torch — ``tune_sft`` (SFT trials; its RayJob's pods too),
  ``grpo`` (the GPU step) and ``export_onnx`` (loads the torch Model, exports and judges ONNX
  against it).
* :data:`IMAGE_STEP` (``labelmatch-step``, no torch at all, ``step`` extra): ``data_prep``
  (validation, PII redaction, split, a matplotlib report), ``evaluate`` (the pipeline gates the
  exported **OnnxModel as served** — ONNX Runtime or OpenVINO, tokenizers, scikit-learn metrics —
  and the baseline it compares with is the OnnxModel a release record names; a torch Model
  handed to it fails with a message naming the train image), ``deploy`` (store, KServe API,
  release log), ``monitor_drift`` (serving state, SciPy, the KFP client for the trigger) and
  ``batch_classify`` (Ray Data over ONNX Runtime).

Components are compiled with ``install_kfp_package=False`` and ``packages_to_install=[]``, so
nothing is pip-installed when a step starts (no network needed, nothing unpinned sneaks in): both
images carry ``kfp`` (the ``pipelines`` extra).
"""

from __future__ import annotations

from labelmatch.platform.images import image

#: Steps that need no torch (CPU only): data_prep, evaluate, deploy, monitor_drift, batch_classify.
IMAGE_STEP = image("step")
#: Steps that run torch (GPU where there is one): tune_sft, grpo, export_onnx.
IMAGE_TRAIN = image("train")
