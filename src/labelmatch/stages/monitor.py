"""The ``monitor_drift`` pipeline step: one monitoring window of a served model, as a Report artifact.

Reads the prediction log from the serving state named by ``LABELMATCH_STATE_URL`` (the serving
chart's state Secret), compares it with the model's reference profile, stores the report for the
servers' gauges, and, when asked and a rule fires, creates the retraining run through the KFP API
with ``labelmatch retrain`` (:func:`submit_outside_kfp_runtime` says why in a child process): the
training pipeline version that produced the model, starting from the parameters of the run that
deployed ``service``'s model (its release record), in the step's own namespace (a multi-user
KFP's profile namespace), with the token at ``KF_PIPELINES_SA_TOKEN_PATH`` or the KFP SDK's in-pod
token path when one is mounted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.artifacts import atomic_artifact_dir, verify_artifact, write_manifest
from labelmatch.core.errors import ConfigError, LabelmatchError
from labelmatch.core.inputs import parse_json


@dataclass
class MonitorStepConfig:
    """One scheduled monitoring run.

    Attributes:
        since: Window start (``24h``, an ISO time, a Unix time).
        until: Window end (empty: now).
        limit: Only the newest this many logged predictions (0: all in the window).
        rules: Drift rules as a JSON object string (``{}``: the defaults).
        publish: Store the report in the serving state (the servers' gauges).
        trigger: Create a retraining run when a rule fires.
        data_uri: The retraining run's training data.
        feedback_uri: Its FeedbackExport (empty: none).
        serving_model_uri: The gate's baseline (default: the monitored model's URI).
        pipeline_version: The training pipeline version (empty: the one that made the model).
        kfp_host: The KFP API (in-cluster address).
        run_id: This pipeline run (recorded in the report).
        service: The InferenceService serving the model: its release records name the run whose
            parameters the retraining run starts from (empty: the pipeline's defaults, noted).
        release_root: ``s3://`` root of the release records (empty: ``$LABELMATCH_STORE_ROOT``).
    """

    since: str = "24h"
    until: str = ""
    limit: int = 0
    rules: str = "{}"
    publish: bool = True
    trigger: bool = False
    data_uri: str = ""
    feedback_uri: str = ""
    serving_model_uri: str = ""
    pipeline_version: str = ""
    kfp_host: str = ""
    run_id: str = ""
    service: str = ""
    release_root: str = ""


def submit_outside_kfp_runtime(plan: Any, host: str, config: MonitorStepConfig) -> str:
    """Create the retraining run with ``labelmatch retrain`` in a child process; returns its id.

    Inside a KFP step the SDK runs with ``_KFP_RUNTIME=true``, under which ``kfp.client`` cannot be
    imported (its compiler imports half-initialised ``kfp.dsl`` modules); the child process runs
    without that variable, and it is the very command users type. It reads the release records of
    ``config.service`` and the producing run's parameters from the server itself; its notes (what
    was carried over, dropped or not found) are copied to this step's log.

    Args:
        plan: The plan made here without a server (:func:`labelmatch.monitoring.trigger.plan_retrain`):
            the version, run name and this trigger's own parameters.
        host: The KFP API.
        config: The step's settings (service, release root).

    Raises:
        LabelmatchError: The run was not created (the command's last error line).
    """
    from labelmatch.platform.kube import pod_namespace

    env = {key: value for key, value in os.environ.items() if key != "_KFP_RUNTIME"}
    # In a pod, its own namespace: a multi-user KFP's profile namespace (a single-user one ignores it).
    namespace = env.get("LABELMATCH_KFP_NAMESPACE") or pod_namespace(default="")
    given = {key: value for key, value in plan.parameters.items()
             if key in ("data_uri", "feedback_uri", "serving_model_uri")}
    command = [sys.executable, "-m", "labelmatch", "retrain", "--host", host,
               "--pipeline-version", plan.version, "--run-name", plan.run_name,
               *(f"--{key.replace('_', '-')}={value}" for key, value in sorted(given.items())),
               *([f"--service={config.service}"] if config.service else []),
               *([f"--root={config.release_root}"] if config.release_root else []),
               *([f"--namespace={namespace}"] if namespace else [])]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    for line in done.stderr.splitlines():
        if line.startswith("note: "):
            print(line, file=sys.stderr)
    match = re.search(r"^run (\S+) created", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        lines = (done.stderr or done.stdout).strip().splitlines()
        reason = lines[-1] if lines else f"exit {done.returncode}"
        raise LabelmatchError(f"retraining run not created: {reason}")
    return match.group(1)


def run_monitor_step(model_dir: str | Path, out_dir: str | Path, config: MonitorStepConfig,
                     model_uri: str = "") -> dict[str, Any]:
    """Monitor the served OnnxModel at ``model_dir``; write the Report artifact to ``out_dir``.

    Returns:
        ``report.json``'s content plus ``retraining_run`` (the run id, or empty).

    Raises:
        ConfigError: No ``LABELMATCH_STATE_URL``; a trigger without ``data_uri`` or ``kfp_host``.
        DataError: ``rules`` is not a valid rules object.
    """
    from labelmatch.monitoring.monitor import MonitorConfig
    from labelmatch.monitoring.run import MonitorRun, parse_time, run_monitor
    from labelmatch.monitoring.trigger import plan_retrain

    state_url = os.environ.get("LABELMATCH_STATE_URL")
    if not state_url:
        raise ConfigError("LABELMATCH_STATE_URL is not set: mount the serving state's Secret (state_secret)")
    if config.trigger and not (config.kfp_host and config.data_uri):
        raise ConfigError("trigger needs kfp_host (the KFP API address) and data_uri (the new training data)")
    verify_artifact(model_dir, "OnnxModel")
    body = parse_json("rules", config.rules or "{}")
    rules = MonitorConfig.from_mapping(body, "rules", config.rules)
    with atomic_artifact_dir(out_dir) as tmp:
        report, info = run_monitor(MonitorRun(
            model_dir=Path(model_dir), state_url=state_url, since=parse_time(config.since),
            until=parse_time(config.until) if config.until else None, limit=config.limit or None,
            feedback_url=os.environ.get("LABELMATCH_FEEDBACK_URL"), rules=rules, out_dir=tmp,
            publish=config.publish,
        ))
        run_id = ""
        if config.trigger and report.drift:  # the server checks the version's inputs when it creates the run
            plan = plan_retrain(report, info, None, config.data_uri, config.feedback_uri,
                                config.serving_model_uri or model_uri, config.pipeline_version or None)
            run_id = submit_outside_kfp_runtime(plan, config.kfp_host, config)
        lineage = {"model_version": report.model_version, "run_id": config.run_id}
        write_manifest(tmp, "Report", lineage=lineage,
                       extra={"stage": "monitor_drift", "drift": report.drift, "retraining_run": run_id})
    return {**report.to_json(), "retraining_run": run_id}
