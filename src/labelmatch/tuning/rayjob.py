"""Run ``labelmatch tune`` on a cluster: a KubeRay RayJob, or a job on an existing Ray cluster.

The RayJob itself (manifest, creation, following, deletion) is generic:
:mod:`labelmatch.platform.kuberay`. Here:

* :func:`cluster_entrypoint` is the command the RayJob runs: ``labelmatch tune --address auto``
  against the cluster KubeRay creates for the job.
* :func:`submit_ray_job` submits the same entrypoint to a running Ray cluster through the Ray
  Jobs API (``JobSubmissionClient``) and streams its logs.
* :func:`run_tune_rayjob` is the whole round trip the pipeline's tune step (and
  ``labelmatch tune --rayjob``) makes: upload the Dataset artifact to the store, create the
  RayJob, stream its status, delete it whatever happened, download and verify the best Model
  and the report.

The cluster run writes checkpoints and experiment state to shared storage (``s3://`` on MinIO)
and uploads the best model and the report there (``--upload-to``, manifest last); the
submitting side downloads them, verified.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelmatch.core.errors import ConfigError
from labelmatch.platform.kuberay import (
    RayJobSpec,
    WaitPolicy,
    build_rayjob,
    rayjob_owner,
    run_rayjob,
    within_deadline,
)

if TYPE_CHECKING:
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.tuning.pbt import TuneConfig

#: The start of a tune RayJob's name (:func:`~labelmatch.platform.kuberay.rayjob_name`).
TUNE_NAME_PREFIX = "lm-tune"


def submit_ray_job(
    address: str,
    entrypoint: str,
    runtime_env: dict[str, Any] | None = None,
    on_log: Callable[[str], None] | None = None,
    poll_seconds: float = 2.0,
) -> tuple[str, str]:
    """Submit ``entrypoint`` to a Ray cluster's Jobs API and wait, streaming the logs.

    Args:
        address: Jobs API (dashboard) URL, e.g. ``http://raycluster-head:8265``.
        entrypoint: Shell command run on the cluster (``labelmatch tune ... --address auto``).
        runtime_env: Ray runtime environment (``env_vars`` such as ``AWS_ENDPOINT_URL``).
        on_log: Called with each new chunk of the job's logs.
        poll_seconds: Seconds between status reads.

    Returns:
        ``(job id, final status)``: ``SUCCEEDED``, ``FAILED`` or ``STOPPED``.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    jobs = JobSubmissionClient(address)
    job_id = jobs.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    shown = 0
    while True:
        status = jobs.get_job_status(job_id)
        logs = jobs.get_job_logs(job_id)
        if on_log is not None and len(logs) > shown:
            on_log(logs[shown:])
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status.value)
        time.sleep(poll_seconds)


def cluster_entrypoint(config: TuneConfig, data_uri: str, upload_to: str) -> str:
    """The ``labelmatch tune`` command a Ray cluster runs: these settings, the cluster's own Ray
    (``--address auto``), and the best model and report uploaded to ``upload_to`` at the end."""
    values = config.to_dict()
    values.update(address="auto", num_cpus=None, dashboard=False, ray_temp_dir=None)
    args = [
        "labelmatch", "tune", "--data", data_uri,
        "--out", "/tmp/labelmatch/model", "--report", "/tmp/labelmatch/report",
        "--upload-to", upload_to, "--config", json.dumps(values),
    ]
    return shlex.join(args)


def run_tune_rayjob(
    data: str | Path,
    out_model_dir: str | Path,
    report_dir: str | Path,
    config: TuneConfig,
    spec: RayJobSpec,
    work_uri: str,
    store: ArtifactStore | None = None,
    api_client: Any = None,
    on_status: Callable[[str], None] | None = print,
    wait: WaitPolicy | None = None,
    keep: bool = False,
    ends_by: float | None = None,
) -> dict[str, Any]:
    """Tune on a KubeRay RayJob and bring the best Model and the report back here.

    1. The dataset (a local Dataset artifact, or an ``s3://`` URI left as it is) is uploaded
       to ``<work_uri>/dataset``.
    2. A RayJob runs :func:`cluster_entrypoint` with Tune's storage at ``<work_uri>/ray``
       (checkpoints and experiment state every Ray node can reach: PBT exploits restore other
       trials' checkpoints from there) and the outputs at ``<work_uri>/outputs``. It is owned by
       this process's pod when that is known and in the same namespace
       (:func:`~labelmatch.platform.kuberay.rayjob_owner`), and with ``ends_by`` its
       ``activeDeadlineSeconds`` and the wait end before that time
       (:func:`~labelmatch.platform.kuberay.within_deadline`).
    3. Its status is followed until it finishes (``on_status`` gets one line per change, retry
       and deletion); the RayJob is deleted afterwards, also when it failed, the API kept failing
       or this process got SIGTERM/SIGINT (:func:`~labelmatch.platform.kuberay.run_rayjob`),
       unless ``keep``.
    4. ``outputs/model`` and ``outputs/report`` are downloaded and verified into
       ``out_model_dir`` and ``report_dir``.

    Args:
        data: Dataset artifact directory or ``s3://`` URI of one.
        out_model_dir: The best Model artifact (written atomically).
        report_dir: The tuning Report artifact.
        config: Tuning settings (``address`` and ``storage_path`` are set here).
        spec: The RayJob's shape (:class:`RayJobSpec`).
        work_uri: ``s3://bucket/prefix`` for this run's dataset copy, Tune storage and outputs.
        store: The artifact store (default: from the environment).
        api_client: Kubernetes API client (default: in-cluster service account or kubeconfig).
        on_status: Called with a line for each RayJob status change.
        wait: Polling, timeout, grace period of a stalled RayJob, API retries (default
            :class:`~labelmatch.platform.kuberay.WaitPolicy`).
        keep: Leave the finished RayJob in place (for debugging).
        ends_by: ``time.monotonic()`` by which the RayJob must be over (the step's deadline less
            a margin); ``None``: no deadline beyond ``spec.active_deadline_seconds``.

    Returns:
        The tuning summary (the report's ``summary.json``).

    Raises:
        ConfigError: ``work_uri`` is not ``s3://``.
        LabelmatchError: the RayJob failed, did not finish in time, or no time was left for it.
    """
    from labelmatch.platform.artifact_store import ArtifactStore, S3Uri, is_s3_uri

    if not is_s3_uri(work_uri):
        raise ConfigError(
            f"work_uri {work_uri!r}: a RayJob needs s3:// storage that every Ray node can reach"
        )
    store = store or ArtifactStore.from_env()
    work = str(S3Uri.parse(work_uri))
    data_uri = str(data) if is_s3_uri(data) else f"{work}/dataset"
    if not is_s3_uri(data):
        store.upload_artifact(data, data_uri, kind="Dataset")
    cluster_config = dataclasses.replace(config, address="auto", storage_path=f"{work}/ray")
    spec, wait = within_deadline(spec, wait or WaitPolicy(), ends_by)
    owner = rayjob_owner(spec.namespace, on_status)
    entrypoint = cluster_entrypoint(cluster_config, data_uri, f"{work}/outputs")
    manifest = build_rayjob(spec, entrypoint, owner=owner)
    run_rayjob(manifest, api_client, on_status, wait, keep)
    store.download_artifact(f"{work}/outputs/model", out_model_dir, kind="Model")
    store.download_artifact(f"{work}/outputs/report", report_dir, kind="Report")
    return json.loads((Path(report_dir) / "summary.json").read_text())
