"""The names of labelmatch's container images: one registry setting, one repository per role.

Every image is ``<registry>/labelmatch-<role>:<version>``:

* the **registry** is ``$LABELMATCH_IMAGE_REGISTRY`` (default ``ghcr.io/labelmatch``), the same
  value ``images/build.sh`` tags with (``REGISTRY``) and the serving chart's ``image.registry``
  takes; a private mirror is one setting;
* the **role** is what the image is for (:data:`ROLES`);
* the **tag** is the package version, never anything else, so a compiled pipeline, the
  InferenceService it creates and the RayJobs it starts all run the library of one release.

Whoever names an image asks this module: the KFP components (``components/_image.py``, at compile
time), the deploy step's InferenceService (:mod:`labelmatch.platform.kserve`), the tune and batch
RayJobs. The registry is read when a name is asked for, not at import, so a process that sets the
variable late (a test, a pipeline step whose pod carries it) still gets it.
"""

from __future__ import annotations

import os

from labelmatch import __version__
from labelmatch.core.errors import ConfigError

#: The environment variable that names the registry (and path prefix) of every image.
REGISTRY_VAR = "LABELMATCH_IMAGE_REGISTRY"
#: The registry when the variable is unset or empty.
DEFAULT_REGISTRY = "ghcr.io/labelmatch"
#: Every image role and what it holds (``images/<role>/Dockerfile``).
ROLES = {
    "train": "CUDA torch: SFT, Ray Tune PBT (also the tune RayJob's pods), GRPO, ONNX export",
    "step": "CPU pipeline steps without torch: data_prep, evaluate, deploy, monitor_drift, batch_classify "
    "(also the batch RayJob's pods)",
    "serve": "the KServe predictor (labelmatch serve): ONNX Runtime, no torch",
    "base": "the labelmatch CLI for store, pipeline, release and feedback commands; no model runtime",
}

#: What the step image must be able to import without torch: the modules behind data_prep,
#: evaluate (an OnnxModel as served), deploy, monitor_drift and batch_classify (and the batch
#: RayJob's ``labelmatch classify``, the serving chart's ``labelmatch settle-canary`` CronJob), with
#: the third-party packages they load lazily. Checked in the built image by ``make images-check``
#: and on the host, with torch blocked, by the tests.
STEP_MODULES = (
    "labelmatch.data.prepare", "labelmatch.evaluation.gate", "labelmatch.evaluation.evaluate",
    "labelmatch.evaluation.report", "labelmatch.runtime.onnx_classifier", "labelmatch.runtime.engines",
    "labelmatch.serving.server", "labelmatch.stages.deploy", "labelmatch.platform.kserve",
    "labelmatch.platform.releases", "labelmatch.platform.kfp", "labelmatch.stages.monitor",
    "labelmatch.monitoring.run", "labelmatch.monitoring.trigger", "labelmatch.feedback.feedback_store",
    "labelmatch.state.serving_state", "labelmatch.stages.batch", "labelmatch.batch.run",
    "labelmatch.batch.rayjob", "labelmatch.platform.ray_local", "labelmatch.delivery.abandoned",
    "labelmatch.cli", "labelmatch.cli.cluster", "kfp.dsl.executor_main", "sklearn.metrics", "scipy.stats",
    "matplotlib.pyplot",
    "onnxruntime", "openvino", "tokenizers", "ray.data", "pyarrow.parquet", "kubernetes.client", "minio",
    "sqlalchemy", "psycopg", "yaml",
)


def image_registry() -> str:
    """The image registry: ``$LABELMATCH_IMAGE_REGISTRY`` without a trailing ``/``, else the default."""
    return os.environ.get(REGISTRY_VAR, "").strip().rstrip("/") or DEFAULT_REGISTRY


def image(role: str, registry: str | None = None, version: str = __version__) -> str:
    """The full image name of a role: ``<registry>/labelmatch-<role>:<version>``.

    Args:
        role: One of :data:`ROLES` (``train``, ``step``, ``serve``, ``base``).
        registry: The registry; ``None``: :func:`image_registry` (the environment, else the default).
        version: The tag; the package version unless a caller names an older release's image.

    Raises:
        ConfigError: ``role`` is not an image role.
    """
    if role not in ROLES:
        raise ConfigError(f"unknown image role {role!r}: one of {', '.join(ROLES)}")
    prefix = (registry if registry is not None else image_registry()).rstrip("/")
    return f"{prefix}/labelmatch-{role}:{version}"
