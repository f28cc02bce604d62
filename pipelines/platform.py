"""The Kubernetes settings of every pipeline step, compiled into the IR through ``kfp-kubernetes``.

What a step's pod gets (the IR's ``platforms.kubernetes`` section and the executor's
``resources``; ``kfp.local`` ignores both, a KFP backend >= 2.5 applies them):

* **S3 access**: ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from one Secret, and
  ``LABELMATCH_S3_ENDPOINT`` / ``LABELMATCH_S3_REGION`` / ``LABELMATCH_STORE_ROOT`` from one
  ConfigMap; both names are pipeline parameters (defaults: the Secret the docs create and the
  ConfigMap ``charts/labelmatch-pipelines`` installs).
* **CPU and memory**: request = limit, per step, from pipeline parameters (strings in Kubernetes
  quantity syntax), so a platform team sizes each step at submission without recompiling.
* **GPUs** where a step trains (``grpo``): accelerator type and count (strings: the KFP driver
  skips the limit when either is empty, so ``gpu_count=""`` runs the step on CPU), node selector
  and tolerations of the GPU pool, all parameters.
* **Retries** with back-off on steps that talk to networks (the store, the Kubernetes API).
* **Timeouts** (``activeDeadlineSeconds``), pod labels (``app.kubernetes.io/part-of: labelmatch``,
  ``labelmatch.io/stage``) and the image's non-root user.
* **The pod's own name and UID** (downward API) where a step creates objects that must not
  outlive it (``tune_sft``'s RayJob takes an ``ownerReference`` to the pod): :func:`expose_pod`.
* **The image registry** the IR was compiled with, as ``LABELMATCH_IMAGE_REGISTRY``: whatever
  image a step names at run time (the InferenceService ``deploy`` creates, a RayJob's pods) comes
  from the same registry as the step's own image (:mod:`labelmatch.platform.images`).

Why parameters and not values baked in at compile time: one compiled IR (one version) serves
every namespace and cluster; what differs between them is given when a run is submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kfp import kubernetes

from labelmatch.platform.images import REGISTRY_VAR, image_registry
from labelmatch.platform.kube import POD_NAME_VAR, POD_UID_VAR

#: Secret keys (= environment variable names) of the S3 credentials.
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
#: ConfigMap keys (= environment variable names) of the store's location.
STORE_CONFIG_KEYS = ("LABELMATCH_S3_ENDPOINT", "LABELMATCH_S3_REGION", "LABELMATCH_STORE_ROOT")
#: The image's user (images/*/Dockerfile).
RUN_AS_USER = 10001
#: Retries of a step that talks to the store or the Kubernetes API, and the first back-off.
NETWORK_RETRIES = 2
NETWORK_BACKOFF = "30s"

#: Defaults of the cluster-wide pipeline parameters.
DEFAULT_S3_SECRET = "labelmatch-s3-credentials"
DEFAULT_PIPELINE_CONFIG = "labelmatch-pipeline-config"
#: The serving chart's state Secret and its key (``state.existingSecret`` / ``state.urlKey``).
DEFAULT_STATE_SECRET = "labelmatch-state"
STATE_URL_KEY = "url"
DEFAULT_GPU_TYPE = "nvidia.com/gpu"
#: The production GPU pool: NVIDIA A10 nodes (GPU feature discovery's product label) tainted
#: ``nvidia.com/gpu:NoSchedule``.
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.product": "NVIDIA-A10"}
DEFAULT_GPU_TOLERATIONS = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


@dataclass(frozen=True)
class Cluster:
    """The pipeline parameters every step's pod settings read (channels inside a pipeline).

    Attributes:
        s3_secret: Secret with the S3 credentials.
        pipeline_config: ConfigMap with the store's endpoint, region and root.
    """

    s3_secret: Any
    pipeline_config: Any


@dataclass(frozen=True)
class Gpus:
    """GPU settings of a training step (channels inside a pipeline).

    Attributes:
        count: Accelerator count as a string (``""``: no GPU).
        type: Accelerator resource name, e.g. ``nvidia.com/gpu`` (``""``: no GPU).
        node_selector: Node selector of the GPU pool (a dict parameter).
        tolerations: Tolerations of its taints (a list parameter).
    """

    count: Any
    type: Any
    node_selector: Any
    tolerations: Any


def configure_step(
    task: Any,
    stage: str,
    cluster: Cluster,
    cpu: Any,
    memory: Any,
    retries: int = 0,
    timeout_s: int | None = None,
    gpus: Gpus | None = None,
) -> Any:
    """Give ``task`` its pod settings (see the module docstring) and return it.

    Args:
        task: The pipeline task.
        stage: Stage name for the ``labelmatch.io/stage`` pod label.
        cluster: The Secret and ConfigMap parameters.
        cpu: CPU request = limit (Kubernetes quantity, a string parameter).
        memory: Memory request = limit.
        retries: Retries on failure (with back-off), for steps that talk to networks.
        timeout_s: ``activeDeadlineSeconds`` of the pod.
        gpus: Accelerators, node selector and tolerations, for training steps.
    """
    task.set_cpu_request(cpu).set_cpu_limit(cpu).set_memory_request(memory).set_memory_limit(memory)
    task.set_env_variable(REGISTRY_VAR, image_registry())
    kubernetes.use_secret_as_env(task, cluster.s3_secret, {key: key for key in S3_SECRET_KEYS})
    kubernetes.use_config_map_as_env(task, cluster.pipeline_config, {key: key for key in STORE_CONFIG_KEYS})
    kubernetes.add_pod_label(task, "app.kubernetes.io/part-of", "labelmatch")
    kubernetes.add_pod_label(task, "labelmatch.io/stage", stage)
    kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_group=RUN_AS_USER,
                                    run_as_non_root=True)
    if retries:
        task.set_retry(num_retries=retries, backoff_duration=NETWORK_BACKOFF, backoff_factor=2.0)
    if timeout_s:
        kubernetes.set_timeout(task, timeout_s)
    if gpus is not None:
        task.set_accelerator_type(gpus.type).set_accelerator_limit(gpus.count)
        kubernetes.add_node_selector_json(task, gpus.node_selector)
        kubernetes.add_toleration_json(task, gpus.tolerations)
    return task


def expose_pod(task: Any) -> Any:
    """Give ``task`` its pod's name and UID as ``POD_NAME`` and ``POD_UID`` (downward API:
    ``metadata.name``, ``metadata.uid``), so what it creates can name the pod as its owner."""
    kubernetes.use_field_path_as_env(task, POD_NAME_VAR, "metadata.name")
    kubernetes.use_field_path_as_env(task, POD_UID_VAR, "metadata.uid")
    return task
