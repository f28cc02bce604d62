"""Retraining when drift fires: a run of the training pipeline with the settings of the run that
produced the served model.

The served service's release records (:class:`~labelmatch.platform.releases.ReleaseLog`) name the
KFP run that deployed its model; :func:`producing_run` reads that run's parameters back from the
pipeline server, and :func:`plan_retrain` starts from them: the retraining run keeps the
production encoder, tune backend, namespace, resources and service account instead of falling back
to the pipeline's defaults (``bundled:minilm``, ``tune_backend=local``). What names one run's
inputs (:data:`PER_RUN_PARAMETERS`: its data, feedback, gate baseline and Tune state) is never
inherited: the trigger's ``data_uri``, ``feedback_uri`` and ``serving_model_uri`` replace them, and
``--param key=value`` overrides any parameter. A parameter the target version does not declare
(the producing run was an older version) is dropped with a note; every fallback (no release, no
run, no server to ask) is a note too, which the commands print on stderr.

The version is the monitored artifact's own ``labelmatch_version`` (pipelines are versioned with
the package) unless given, else the producing run's. The plan is checked against the version's
declared inputs on the server and submitted through the same
:class:`~labelmatch.platform.kfp.PipelineRegistry` as ``labelmatch pipeline run`` (or ``kfp.local``
via ``pipelines.local.LocalPipelineRegistry``, which has the same methods).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from labelmatch.core.errors import ConfigError
from labelmatch.monitoring.monitor import MonitorReport
from labelmatch.platform.kfp import TRAINING_PIPELINE, RunInfo, parameter_string
from labelmatch.platform.releases import ReleaseLog
from labelmatch.platform.rollback import PipelineRunner

#: Parameters naming one run's own inputs: its training data, feedback export, gate baseline and
#: Tune checkpoint storage (a second run there would resume the first one's experiment).
PER_RUN_PARAMETERS = ("data_uri", "feedback_uri", "serving_model_uri", "tune_storage_uri")
#: Where a plan's parameter came from (:attr:`RetrainPlan.sources`), besides ``run <id>``.
FROM_TRIGGER, FROM_PARAM = "trigger", "--param"


class RetrainRunner(PipelineRunner, Protocol):
    """What a retraining trigger needs of a pipeline server: a rollback's two calls, and the runs."""

    def find_run(self, run_id: str) -> RunInfo:
        """The run ``run_id``: its pipeline, version, parameters and service account.

        Raises:
            ConfigError: No such run.
        """


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
        sources: Where each parameter came from: ``run <id>`` (the producing run),
            :data:`FROM_TRIGGER` or :data:`FROM_PARAM`.
        service_account: Service account of the run's pods: the producing run's ("": the server's).
        notes: What was dropped or could not be found (printed on stderr).
    """

    pipeline: str
    version: str
    parameters: dict[str, str]
    run_name: str
    reasons: list[str]
    checked: bool = True
    sources: dict[str, str] = field(default_factory=dict)
    service_account: str = ""
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """What would be submitted, one parameter per line with its origin (for ``--dry-run``)."""
        lines = [f"would submit: pipeline {self.pipeline} version {self.version}",
                 f"  run name: {self.run_name}"]
        if self.service_account:
            lines.append(f"  service account: {self.service_account}")
        width = max((len(key) + len(value) for key, value in self.parameters.items()), default=0)
        for key, value in sorted(self.parameters.items()):
            source = self.sources.get(key, FROM_PARAM)
            lines.append(f"  --param {f'{key}={value}':<{width + 1}}  # {source}")
        if not self.checked:
            lines.append("  (not checked against a pipeline server: no --host)")
        return "\n".join(lines)


def producing_run(releases: ReleaseLog, service: str, registry: RetrainRunner,
                  pipeline: str = TRAINING_PIPELINE) -> tuple[RunInfo | None, list[str]]:
    """The ``pipeline`` run that produced the model ``service`` serves now, from its release records.

    The latest release that took the traffic names the served model (its digest; a rolled-back
    canary or a shadow is passed over). Walking back through the releases of
    that digest, the newest whose run is a ``pipeline`` run is the one (a rollback's release names
    a deploy-pipeline run, which re-deployed an earlier training run's model).

    Returns:
        ``(run, notes)``; ``run`` is None when there is none, and the notes say why.

    Raises:
        kfp_server_api.ApiException: The server refused to show a run (not a missing one).
    """
    records = releases.list(service)
    if not records:
        return None, [f"service {service!r} has no release record under {releases.root}/releases/: "
                      "the retraining run starts from the pipeline's defaults"]
    # A rolled-back canary or a shadow never took the traffic: the release before it still serves.
    serving = [record for record in records if record.serving]
    served, notes = (serving or records)[-1], []
    for record in reversed(records):
        if record.model_digest != served.model_digest or not record.run_id:
            continue
        try:
            run = registry.find_run(record.run_id)
        except ConfigError as exc:
            notes.append(f"release {record.release_id}: {exc}")
            continue
        if run.pipeline and run.pipeline != pipeline:
            notes.append(f"release {record.release_id}: run {run.run_id} ran {run.pipeline}, not {pipeline}; "
                         "looking further back")
            continue
        notes.append(f"parameters from run {run.run_id} ({run.pipeline or 'pipeline unknown'} "
                     f"{run.version or '?'}), which deployed release {record.release_id} of {service!r}")
        return run, notes
    notes.append(f"no {pipeline} run among the releases of {service!r} that deployed the served model "
                 f"(digest {served.model_digest[:12]}…): the retraining run starts from the pipeline's "
                 "defaults")
    return None, notes


def plan_retrain(report: MonitorReport | None, model_info: dict[str, Any] | None,
                 registry: PipelineRunner | None, data_uri: str, feedback_uri: str = "",
                 serving_model_uri: str = "", version: str | None = None,
                 pipeline: str = TRAINING_PIPELINE, extra: dict[str, str] | None = None,
                 base: RunInfo | None = None, notes: Sequence[str] = (),
                 run_name: str | None = None) -> RetrainPlan:
    """Choose the pipeline version and parameters of the retraining run.

    Parameters, later ones winning: the producing run's (``base``, without
    :data:`PER_RUN_PARAMETERS`), then ``data_uri``/``feedback_uri``/``serving_model_uri``, then
    ``extra``.

    Args:
        report: The monitor report (its fired rules name the run); None: a manual retrain.
        model_info: The monitored artifact's ``labelmatch.json`` (its ``labelmatch_version``), or None.
        registry: The pipeline server (or compiled IR run locally); ``None``: the plan is made
            without checking the version's inputs (a dry run without a server).
        data_uri: The new training data (``data_uri`` of the training pipeline).
        feedback_uri: A FeedbackExport artifact (GRPO refines the model with it); empty: none.
        serving_model_uri: The model serving now (the gate's baseline); empty: the release log's.
        version: Pipeline version; default: the one that produced the monitored model, else the
            producing run's.
        pipeline: The training pipeline's name.
        extra: Further parameters (``key: value`` strings); they override every other source.
        base: The run that produced the served model (:func:`producing_run`).
        notes: Notes so far (from :func:`producing_run`); the plan's notes add to them.
        run_name: Display name (default: from the model version and the rules that fired).

    Raises:
        ConfigError: No version to run, the version is not on the server, or a parameter in
            ``extra`` it does not declare / a required one it lacks.
    """
    version = version or (model_info or {}).get("labelmatch_version") or (base.version if base else None)
    if not version:
        raise ConfigError("the model does not record the labelmatch (pipeline) version that trained it; "
                          "pass --pipeline-version")
    if not data_uri:
        raise ConfigError("a retraining run needs --data-uri (the new training data)")
    notes = list(notes)
    parameters: dict[str, str] = {}
    sources: dict[str, str] = {}
    if base is not None:
        origin = f"run {base.run_id}"
        for key, value in base.parameters.items():
            if value is None:
                continue
            if key in PER_RUN_PARAMETERS:
                if value != "":
                    notes.append(f"{key} of {origin} not carried over: it names that run's own input")
                continue
            parameters[key], sources[key] = parameter_string(value), origin
    given = {"data_uri": data_uri, "feedback_uri": feedback_uri, "serving_model_uri": serving_model_uri}
    for key, value in given.items():
        if value:
            parameters[key], sources[key] = value, FROM_TRIGGER
    for key, value in (extra or {}).items():
        parameters[key], sources[key] = value, FROM_PARAM
    if registry is not None:
        found = registry.find_version(pipeline, version)
        for key in sorted(parameters):
            if key not in found.parameters and sources[key] not in (FROM_TRIGGER, FROM_PARAM):
                notes.append(f"parameter {key} of {sources[key]} dropped: not an input of {pipeline} "
                             f"{version} (the run was an older version)")
                del parameters[key], sources[key]
        found.typed_parameters(parameters)  # refuses a parameter the version does not declare, or a bad value
        missing = [name for name in found.required if name not in parameters]
        if missing:
            raise ConfigError(f"pipeline {pipeline} {version} requires {', '.join(missing)}; "
                              "pass them with --param")
    reasons = list(report.fired) if report is not None else []
    if run_name is None:
        model = report.model_version if report is not None else "the served model"
        run_name = f"retrain {model}: drift ({', '.join(reasons) or 'manual'})"
    return RetrainPlan(pipeline, version, parameters, run_name, reasons, checked=registry is not None,
                       sources=sources, service_account=base.service_account if base else "",
                       notes=tuple(notes))


def submit_retrain(plan: RetrainPlan, registry: PipelineRunner,
                   service_account: str | None = None) -> RunInfo:
    """Create the planned run (the same call as ``labelmatch pipeline run``).

    Args:
        plan: The plan.
        registry: The pipeline server.
        service_account: Service account of the run's pods; default: the plan's (the producing
            run's), else the server's.
    """
    account = service_account or plan.service_account
    options = {"service_account": account} if account else {}
    return registry.create_run(plan.pipeline, plan.version, plan.parameters, run_name=plan.run_name,
                               **options)


__all__ = ["PER_RUN_PARAMETERS", "RetrainPlan", "RetrainRunner", "plan_retrain", "producing_run",
           "submit_retrain"]
