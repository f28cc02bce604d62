"""The monitoring pipeline: one drift window of a served model; schedule it as a recurring run.

One step (``monitor_drift``) over the served OnnxModel imported by URI (a release record's
``model_uri``). It reads the prediction log from the serving state (the serving chart's state
Secret, mounted as ``LABELMATCH_STATE_URL``), writes a Report artifact, stores the report for
the servers' ``labelmatch_drift_*`` gauges and, with ``trigger``, creates a run of the training
pipeline version that produced the model when a drift rule fires, with the parameters of the run
that deployed ``service``'s model (its release record; docs/monitoring.md). A daily recurring run::

    labelmatch pipeline upload --host $KFP
    # then, in the KFP UI or SDK: a recurring run of labelmatch-monitor <version>, cron "0 6 * * *",
    # with model_uri, since=24h, trigger=true, data_uri=s3://.../latest, service=labelmatch-serving
"""

from kfp import dsl, kubernetes

from components import monitor_drift
from pipelines.platform import (
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_S3_SECRET,
    DEFAULT_STATE_SECRET,
    NETWORK_RETRIES,
    STATE_URL_KEY,
    Cluster,
    configure_step,
)

MONITOR_PIPELINE = "labelmatch-monitor"
#: ``activeDeadlineSeconds`` of the step: a window is read and tested in minutes.
MONITOR_TIMEOUT_S = 3600


@dsl.pipeline(name=MONITOR_PIPELINE, description="Drift of a served model's predictions; retrain on drift.")
def monitor_pipeline(
    model_uri: str,
    since: str = "24h",
    until: str = "",
    limit: int = 0,
    rules: str = "{}",
    publish: bool = True,
    trigger: bool = False,
    data_uri: str = "",
    feedback_uri: str = "",
    pipeline_version: str = "",
    service: str = "",
    release_root: str = "",
    kfp_host: str = "http://ml-pipeline.kubeflow.svc.cluster.local:8888",
    state_secret: str = DEFAULT_STATE_SECRET,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    monitor_cpu: str = "1",
    monitor_memory: str = "2Gi",
):
    """Monitor the served model at ``model_uri`` over one window of its prediction log.

    Args:
        model_uri: The served OnnxModel artifact (``s3://`` in a cluster, a path locally).
        since: Window start (``24h``, ``7d``, an ISO time).
        until: Window end (empty: now).
        limit: Only the newest this many logged predictions (0: all in the window).
        rules: Drift rules as a JSON object (docs/monitoring.md); ``{}``: the defaults.
        publish: Store the report in the serving state (every replica's gauges).
        trigger: Create a run of the training pipeline when a rule fires.
        data_uri: Training data of the retraining run.
        feedback_uri: FeedbackExport artifact of the retraining run (empty: none).
        pipeline_version: Training pipeline version (empty: the one that produced the model).
        service: The InferenceService serving the model: the retraining run starts from the
            parameters of the training run its release records name (empty: the pipeline's defaults).
        release_root: ``s3://`` root of the release records (empty: the ConfigMap's store root).
        kfp_host: The KFP API the trigger calls.
        state_secret: Secret holding the serving state's SQLAlchemy URL under key ``url``.
        s3_secret: Secret holding the S3 credentials.
        pipeline_config: ConfigMap holding the S3 endpoint, region and store root.
        monitor_cpu: CPU of the step (request = limit).
        monitor_memory: Memory of the step.
    """
    model = dsl.importer(
        artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False, metadata={"kind": "OnnxModel"}
    )
    step = monitor_drift(
        onnx_model=model.output,
        since=since,
        until=until,
        limit=limit,
        rules=rules,
        publish=publish,
        trigger=trigger,
        data_uri=data_uri,
        feedback_uri=feedback_uri,
        serving_model_uri=model_uri,
        pipeline_version=pipeline_version,
        kfp_host=kfp_host,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        service=service,
        release_root=release_root,
    ).set_caching_options(False)  # a window of live data: never reuse an earlier answer
    configure_step(step, "monitor", Cluster(s3_secret, pipeline_config), monitor_cpu, monitor_memory,
                   retries=NETWORK_RETRIES, timeout_s=MONITOR_TIMEOUT_S)
    kubernetes.use_secret_as_env(step, state_secret, {STATE_URL_KEY: "LABELMATCH_STATE_URL"})
