"""The ``monitor_drift`` component: a served model's logged predictions against its reference profile."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components._image import IMAGE_STEP


@dsl.component(base_image=IMAGE_STEP, packages_to_install=[], install_kfp_package=False)
def monitor_drift(
    onnx_model: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    since: str = "24h",
    until: str = "",
    limit: int = 0,
    rules: str = "{}",
    publish: bool = True,
    trigger: bool = False,
    data_uri: str = "",
    feedback_uri: str = "",
    serving_model_uri: str = "",
    pipeline_version: str = "",
    kfp_host: str = "",
    run_id: str = "",
    service: str = "",
    release_root: str = "",
) -> bool:
    """Compare a window of the prediction log with the model's reference profile (drift signals).

    Calls :func:`labelmatch.stages.monitor.run_monitor_step`. The serving state's URL comes from
    ``LABELMATCH_STATE_URL`` (the pipeline mounts the serving chart's state Secret).

    Args:
        onnx_model: Input OnnxModel artifact: the served model (imported by URI).
        report: Output Report artifact: ``report.json``, ``report.md``, ``report.png``.
        metrics: Output KFP metrics: documents, drift (0/1), each signal's p-value.
        since: Window start (``24h``, ``7d``, an ISO time).
        until: Window end (empty: now).
        limit: Only the newest this many logged predictions (0: all).
        rules: Drift rules as a JSON object (docs/monitoring.md); ``{}``: the defaults.
        publish: Store the report in the serving state (every replica's gauges).
        trigger: Create a run of the training pipeline when a rule fires.
        data_uri: Training data of that run.
        feedback_uri: FeedbackExport artifact of that run (empty: none).
        serving_model_uri: The gate's baseline (empty: the monitored model's URI).
        pipeline_version: Training pipeline version (empty: the one that produced the model).
        kfp_host: The KFP API, e.g. ``http://ml-pipeline.kubeflow.svc.cluster.local:8888``.
        run_id: The pipeline run (recorded in the report).
        service: The InferenceService serving the model: the retraining run starts from the
            parameters of the run its release records name (empty: the pipeline's defaults).
        release_root: ``s3://`` root of the release records (empty: ``$LABELMATCH_STORE_ROOT``).

    Returns:
        Whether a drift rule fired.
    """
    from labelmatch.stages.monitor import MonitorStepConfig, run_monitor_step

    config = MonitorStepConfig(
        since=since, until=until, limit=limit, rules=rules, publish=publish, trigger=trigger,
        data_uri=data_uri, feedback_uri=feedback_uri, serving_model_uri=serving_model_uri,
        pipeline_version=pipeline_version, kfp_host=kfp_host, run_id=run_id, service=service,
        release_root=release_root,
    )
    result = run_monitor_step(onnx_model.path, report.path, config, model_uri=onnx_model.uri)
    metrics.log_metric("documents", result["window"]["documents"])
    metrics.log_metric("drift", int(result["drift"]))
    for name, signal in result["signals"].items():
        if signal["p_value"] is not None:
            metrics.log_metric(f"p_{name}", signal["p_value"])
    report.metadata.update({"kind": "Report", "drift": result["drift"], "fired": ",".join(result["fired"]),
                            "retraining_run": result["retraining_run"]})
    return bool(result["drift"])
