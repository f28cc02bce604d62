"""Retraining when drift fires: a run of the training pipeline version that produced the served model.

The plan is made from the monitored artifact's own ``labelmatch.json`` (``labelmatch_version`` is
the pipeline version that trained it: pipelines are versioned with the package) and the monitor
report, checked against the version's declared inputs on the server, and submitted through the
same :class:`~labelmatch.platform.kfp.PipelineRegistry` as ``labelmatch pipeline run`` (or
``kfp.local`` via ``pipelines.local.LocalPipelineRegistry``, which has the same two methods).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labelmatch.core.errors import ConfigError
from labelmatch.monitoring.monitor import MonitorReport
from labelmatch.platform.kfp import TRAINING_PIPELINE, RunInfo
from labelmatch.platform.rollback import PipelineRunner


@dataclass(frozen=True)
class RetrainPlan:
    """The run a drift trigger submits.

    Attributes:
        pipeline: The training pipeline's name.
        version: Its version (the one that produced the monitored model unless overridden).
        parameters: Run parameters (strings, as on the command line).
        run_name: Display name, naming the model and the rules that fired.
        reasons: The rules that fired.
        checked: Whether the version and parameters were checked against a pipeline server.
    """

    pipeline: str
    version: str
    parameters: dict[str, str]
    run_name: str
    reasons: list[str]
    checked: bool = True

    def describe(self) -> str:
        """What would be submitted, one parameter per line (for ``--dry-run``)."""
        lines = [f"would submit: pipeline {self.pipeline} version {self.version}",
                 f"  run name: {self.run_name}"]
        lines += [f"  --param {key}={value}" for key, value in sorted(self.parameters.items())]
        if not self.checked:
            lines.append("  (not checked against a pipeline server: no --host)")
        return "\n".join(lines)


def plan_retrain(report: MonitorReport, model_info: dict[str, Any], registry: PipelineRunner | None,
                 data_uri: str, feedback_uri: str = "", serving_model_uri: str = "",
                 version: str | None = None, pipeline: str = TRAINING_PIPELINE,
                 extra: dict[str, str] | None = None) -> RetrainPlan:
    """Choose the pipeline version and parameters of the retraining run.

    Args:
        report: The monitor report (its fired rules name the run).
        model_info: The monitored artifact's ``labelmatch.json``.
        registry: The pipeline server (or compiled IR run locally); ``None``: the plan is made
            without checking the version's inputs (a dry run without a server).
        data_uri: The new training data (``data_uri`` of the training pipeline).
        feedback_uri: A FeedbackExport artifact (GRPO refines the model with it); empty: none.
        serving_model_uri: The model serving now (the gate's baseline); empty: the release log's.
        version: Pipeline version; default: the one that produced the monitored model.
        pipeline: The training pipeline's name.
        extra: Further parameters (``key: value`` strings).

    Raises:
        ConfigError: No version to run, the version is not on the server, or a parameter it
            does not declare / a required one it lacks.
    """
    version = version or model_info.get("labelmatch_version")
    if not version:
        raise ConfigError("the model does not record the labelmatch (pipeline) version that trained it; "
                          "pass --pipeline-version")
    if not data_uri:
        raise ConfigError("a retraining run needs --data-uri (the new training data)")
    parameters = {"data_uri": data_uri, **(extra or {})}
    if feedback_uri:
        parameters["feedback_uri"] = feedback_uri
    if serving_model_uri:
        parameters["serving_model_uri"] = serving_model_uri
    if registry is not None:
        found = registry.find_version(pipeline, version)
        found.typed_parameters(parameters)  # refuses a parameter the version does not declare, or a bad value
        missing = [name for name in found.required if name not in parameters]
        if missing:
            raise ConfigError(f"pipeline {pipeline} {version} requires {', '.join(missing)}; "
                              "pass them with --param")
    reasons = list(report.fired)
    run_name = f"retrain {report.model_version}: drift ({', '.join(reasons) or 'manual'})"
    return RetrainPlan(pipeline, version, parameters, run_name, reasons, checked=registry is not None)


def submit_retrain(plan: RetrainPlan, registry: PipelineRunner,
                   service_account: str | None = None) -> RunInfo:
    """Create the planned run (the same call as ``labelmatch pipeline run``)."""
    options = {"service_account": service_account} if service_account else {}
    return registry.create_run(plan.pipeline, plan.version, plan.parameters, run_name=plan.run_name,
                               **options)


__all__ = ["RetrainPlan", "plan_retrain", "submit_retrain"]
