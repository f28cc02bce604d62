"""``labelmatch monitor | retrain``: drift of served predictions against the model's reference profile,
and the retraining run (with the settings of the run that produced the served model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from labelmatch.cli import app
from labelmatch.cli.cluster import (
    HostOpt,
    NamespaceOpt,
    RootOpt,
    ServiceAccountOpt,
    TokenFileOpt,
    TokenOpt,
    _parse_params,
)

_STATE_HELP = ("SQLAlchemy URL of the serving state holding the prediction log (default: the SQLite file "
               "a local server keeps beside the model, <model>-state/serving.db).")
_SINCE_HELP = "Window start: a duration back from now (90m, 24h, 7d), an ISO-8601 time or a Unix time."
_TRIGGER_HELP = ("When a drift rule fires, submit a run of the training pipeline version that produced the "
                 "model (with --data-uri and --feedback-uri) through the KFP API at --host.")
_SERVICE_HELP = ("The InferenceService serving the model: its latest release record names the KFP run that "
                 "deployed it, whose parameters the retraining run starts from (docs/monitoring.md).")
_PARAM_HELP = "Run parameter key=value (repeatable); overrides the producing run's."


@app.command()
def monitor(
    model: Annotated[str, typer.Option("--model", help="The served OnnxModel artifact (directory or s3://).")],
    state_url: Annotated[str | None, typer.Option("--state-url", envvar="LABELMATCH_STATE_URL",
                                                  help=_STATE_HELP)] = None,
    since: Annotated[str, typer.Option(help=_SINCE_HELP)] = "24h",
    until: Annotated[str | None, typer.Option(help="Window end (same forms; default: now).")] = None,
    limit: Annotated[int | None, typer.Option(help="Only the newest N logged predictions.")] = None,
    rules: Annotated[Path | None, typer.Option("--config", help="Drift rules file (JSON/YAML, "
                                               "docs/monitoring.md).")] = None,
    out: Annotated[Path, typer.Option(help="Report directory (report.json, .md, .png).")] = Path(
        "runs/monitor"),
    feedback_url: Annotated[str | None, typer.Option(envvar="LABELMATCH_FEEDBACK_URL",
                                                     help="Feedback store (default: the state URL).")] = None,
    publish: Annotated[bool, typer.Option(help="Store the report (every replica's gauges).")] = True,
    trigger: Annotated[bool, typer.Option("--trigger", help=_TRIGGER_HELP)] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --trigger: print the run only.")] = False,
    data_uri: Annotated[str, typer.Option(help="New training data of the retraining run.")] = "",
    feedback_uri: Annotated[str, typer.Option(help="FeedbackExport artifact for the run's GRPO step.")] = "",
    serving_model_uri: Annotated[str, typer.Option(help="The serving model's URI (the gate's baseline); "
                                                   "default: --model when it is s3://.")] = "",
    pipeline_version: Annotated[str | None, typer.Option(
        help="Training pipeline version (default: the one that produced the model).")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help=_PARAM_HELP)] = None,
    service: Annotated[str, typer.Option(help=_SERVICE_HELP)] = "",
    root: RootOpt = "s3://labelmatch",
    host: HostOpt = "",
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
    service_account: ServiceAccountOpt = None,
) -> None:
    """Compare a window of logged predictions with the model's reference profile; report drift.

    Writes report.json/.md/.png under --out, stores the report in the serving state (the servers'
    labelmatch_drift_* gauges), and with --trigger submits a retraining run when a rule fires.
    """
    from labelmatch.core.errors import ConfigError
    from labelmatch.monitoring.monitor import MonitorConfig
    from labelmatch.monitoring.run import MonitorRun, parse_time, run_monitor
    from labelmatch.platform.artifact_store import is_s3_uri, local_artifact

    if dry_run and not trigger:
        raise ConfigError("--dry-run only applies with --trigger")
    if trigger and not data_uri:
        raise ConfigError("--trigger needs --data-uri (the retraining run's training data)")
    if trigger and not dry_run and not host:
        raise ConfigError("--trigger needs the KFP API: --host or KF_PIPELINES_ENDPOINT (or --dry-run)")
    if state_url is None:
        if is_s3_uri(model):
            raise ConfigError("--state-url is needed with an s3:// model (the serving state's URL)")
        state_dir = Path(model.rstrip("/") + "-state")
        state_url = f"sqlite:///{state_dir / 'serving.db'}"
    config = MonitorConfig.from_file(rules) if rules else MonitorConfig()
    with local_artifact(model, "OnnxModel") as model_dir:
        report, info = run_monitor(MonitorRun(
            model_dir=model_dir, state_url=state_url, since=parse_time(since),
            until=parse_time(until) if until else None, limit=limit, feedback_url=feedback_url,
            rules=config, out_dir=out, publish=publish,
        ))
    verdict = f"DRIFT ({', '.join(report.fired)})" if report.drift else "no drift"
    typer.echo(f"model {report.model_version}: {report.window['documents']} logged predictions: {verdict}")
    for name, signal in report.signals.items():
        p_value = "" if signal["p_value"] is None else f" p={signal['p_value']:.4g}"
        typer.echo(f"  {name:<15}{' FIRED' if signal['fired'] else '      '}{p_value}")
    typer.echo(f"report: {out / 'report.md'}")
    if not trigger:
        return
    if not report.drift:
        typer.echo("no rule fired: no retraining run")
        return
    _retrain(RetrainCommand(
        host=host, token=token, token_file=token_file, namespace=kfp_namespace,
        service_account=service_account, dry_run=dry_run, data_uri=data_uri, feedback_uri=feedback_uri,
        serving_model_uri=serving_model_uri or (model if is_s3_uri(model) else ""),
        version=pipeline_version, extra=_parse_params(param), service=service, root=root,
    ), report, info)


@dataclass(frozen=True)
class RetrainCommand:
    """What ``labelmatch monitor --trigger`` and ``labelmatch retrain`` were asked for.

    Attributes:
        host: KFP API endpoint ("": none, the plan is only printed).
        token: Bearer token of a multi-user KFP.
        token_file: File holding that token.
        namespace: Profile namespace of a multi-user KFP.
        service_account: Service account of the run's pods (default: the producing run's).
        dry_run: Print the plan only.
        data_uri: The run's training data.
        feedback_uri: Its FeedbackExport ("": none).
        serving_model_uri: The gate's baseline ("": the release log's).
        version: Training pipeline version (None: the model's, else the producing run's).
        extra: ``--param`` overrides.
        service: The InferenceService whose releases name the producing run ("": none).
        root: ``s3://`` root of the release records.
        run_name: Display name (None: from the report).
    """

    host: str
    token: str | None
    token_file: Path | None
    namespace: str | None
    service_account: str | None
    dry_run: bool
    data_uri: str
    feedback_uri: str
    serving_model_uri: str
    version: str | None
    extra: dict[str, str]
    service: str
    root: str
    run_name: str | None = None


def _retrain(command: RetrainCommand, report: Any = None, info: dict[str, Any] | None = None) -> None:
    """Find the run that produced the served model, plan the retraining run against the pipeline
    server and submit it (or print it); notes go to stderr."""
    from labelmatch.cli.cluster import _registry, _remote_errors
    from labelmatch.monitoring.trigger import plan_retrain, producing_run, submit_retrain

    with _remote_errors(f"retraining run on {command.host or 'no server'}"):
        registry = (_registry(command.host, command.token, command.token_file, command.namespace)
                    if command.host else None)
        base, notes = None, []
        if not command.service:
            notes.append("no --service: the run that produced the served model is not looked up; the "
                         "retraining run starts from the pipeline's defaults and --param")
        elif registry is None:
            notes.append("no --host: the parameters of the run that produced the served model cannot be read")
        else:
            from labelmatch.platform.artifact_store import ArtifactStore
            from labelmatch.platform.releases import ReleaseLog

            base, notes = producing_run(ReleaseLog(ArtifactStore.from_env(), command.root), command.service,
                                        registry)
        plan = plan_retrain(report, info, registry, command.data_uri, command.feedback_uri,
                            command.serving_model_uri, command.version, extra=command.extra, base=base,
                            notes=notes, run_name=command.run_name)
        for note in plan.notes:
            typer.echo(f"note: {note}", err=True)
        if command.dry_run or registry is None:
            typer.echo(plan.describe())
            return
        run = submit_retrain(plan, registry, command.service_account)
    typer.echo(f"run {run.run_id} created: {run.name}")


@app.command()
def retrain(
    data_uri: Annotated[str, typer.Option(help="New training data of the retraining run.")],
    service: Annotated[str, typer.Option(help=_SERVICE_HELP)] = "",
    root: RootOpt = "s3://labelmatch",
    feedback_uri: Annotated[str, typer.Option(help="FeedbackExport artifact for the run's GRPO step.")] = "",
    serving_model_uri: Annotated[str, typer.Option(help="The serving model's URI (the gate's baseline); "
                                                   "default: the release log's.")] = "",
    pipeline_version: Annotated[str | None, typer.Option(
        help="Training pipeline version (default: the producing run's).")] = None,
    run_name: Annotated[str | None, typer.Option(help="Run display name.")] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help=_PARAM_HELP)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the run only.")] = False,
    host: HostOpt = "",
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
    service_account: ServiceAccountOpt = None,
) -> None:
    """Submit a run of the training pipeline with the parameters of the run that produced --service's model.

    What `labelmatch monitor --trigger` submits when drift fires (and the monitor pipeline's step
    runs), without a drift window: the new --data-uri/--feedback-uri/--serving-model-uri replace the
    producing run's, --param overrides any parameter.
    """
    from labelmatch.core.errors import ConfigError

    if not dry_run and not host:
        raise ConfigError("retrain needs the KFP API: --host or KF_PIPELINES_ENDPOINT (or --dry-run)")
    _retrain(RetrainCommand(
        host=host, token=token, token_file=token_file, namespace=kfp_namespace,
        service_account=service_account, dry_run=dry_run, data_uri=data_uri, feedback_uri=feedback_uri,
        serving_model_uri=serving_model_uri,
        version=pipeline_version, extra=_parse_params(param), service=service, root=root, run_name=run_name,
    ))


@app.command("shadow-report")
def shadow_report_command(
    model_version: Annotated[str, typer.Option(
        "--model-version", help="The serving model's version (GET /v2/models/<name>/labels).")],
    state_url: Annotated[str, typer.Option("--state-url", envvar="LABELMATCH_STATE_URL",
                                           help="SQLAlchemy URL of the serving state (its shadow log).")],
    since: Annotated[str, typer.Option(help=_SINCE_HELP)] = "24h",
    until: Annotated[str | None, typer.Option(help="Window end (same forms; default: now).")] = None,
    out: Annotated[Path, typer.Option(help="Report directory (shadow_report.json, .md).")] = Path(
        "runs/shadow"),
) -> None:
    """The shadow comparison report of a window: label-set agreement, score shift and latency."""
    import time

    from labelmatch.delivery.shadow import render_markdown, shadow_report, write_shadow_report
    from labelmatch.monitoring.run import parse_time

    start = parse_time(since)
    end = parse_time(until) if until else time.time()
    report = shadow_report(state_url, model_version, start, end)
    write_shadow_report(report, out)
    typer.echo(render_markdown(report))
