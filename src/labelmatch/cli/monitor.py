"""``labelmatch monitor``: drift of served predictions against the model's reference profile."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from labelmatch.cli import app
from labelmatch.cli.cluster import HostOpt, NamespaceOpt, ServiceAccountOpt, TokenFileOpt, _parse_params

_STATE_HELP = ("SQLAlchemy URL of the serving state holding the prediction log (default: the SQLite file "
               "a local server keeps beside the model, <model>-state/serving.db).")
_SINCE_HELP = "Window start: a duration back from now (90m, 24h, 7d), an ISO-8601 time or a Unix time."
_TRIGGER_HELP = ("When a drift rule fires, submit a run of the training pipeline version that produced the "
                 "model (with --data-uri and --feedback-uri) through the KFP API at --host.")


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
    param: Annotated[list[str] | None, typer.Option("--param", help="Run parameter key=value.")] = None,
    host: HostOpt = "",
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
    _retrain(report, info, host, token_file, kfp_namespace, service_account, dry_run, data_uri, feedback_uri,
             serving_model_uri or (model if is_s3_uri(model) else ""), pipeline_version, _parse_params(param))


def _retrain(report: Any, info: dict[str, Any], host: str, token_file: Path | None, kfp_namespace: str | None,
             service_account: str | None, dry_run: bool, data_uri: str, feedback_uri: str,
             serving_model_uri: str, pipeline_version: str | None, extra: dict[str, str]) -> None:
    """Plan the retraining run against the pipeline server and submit it (or print it)."""
    from labelmatch.cli.cluster import _registry, _remote_errors
    from labelmatch.monitoring.trigger import plan_retrain, submit_retrain

    with _remote_errors(f"retraining run on {host or 'no server'}"):
        registry = _registry(host, token_file, kfp_namespace) if host else None
        plan = plan_retrain(report, info, registry, data_uri, feedback_uri, serving_model_uri,
                            pipeline_version, extra=extra)
        if dry_run or registry is None:
            typer.echo(plan.describe())
            return
        run = submit_retrain(plan, registry, service_account)
    typer.echo(f"run {run.run_id} created: {run.name}")
