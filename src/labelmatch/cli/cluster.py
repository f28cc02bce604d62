"""``labelmatch pipeline | store | deploy | releases | rollback``: the cluster path.

S3 settings and credentials come from the environment or a mounted Secret (see
:mod:`labelmatch.platform.artifact_store`); they are never printed. KFP and Kubernetes errors are turned into
one-line ``error:`` messages.

Every command that talks to KFP takes the same connection options: ``--host``
(``KF_PIPELINES_ENDPOINT``), ``--namespace`` (``LABELMATCH_KFP_NAMESPACE``: the profile namespace
of a multi-user KFP) and a token for a multi-user KFP, ``--token`` (``LABELMATCH_KFP_TOKEN``) or
``--token-file`` (``KF_PIPELINES_SA_TOKEN_PATH``, re-read before every request). Without either, a
token at the KFP SDK's in-pod path (``/var/run/secrets/kubeflow/pipelines/token``) is used when one
is mounted there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from labelmatch import __version__
from labelmatch.cli import app
from labelmatch.core.errors import ConfigError, LabelmatchError

if TYPE_CHECKING:
    from labelmatch.platform.kfp import PipelineRegistry

pipeline_app = typer.Typer(help="Versioned KFP pipelines: upload, list versions, run.", no_args_is_help=True)
store_app = typer.Typer(
    help="Artifacts in MinIO/S3: push, pull, list, mirror base encoders.", no_args_is_help=True
)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(store_app, name="store")

HostOpt = Annotated[
    str,
    typer.Option(
        "--host", envvar="KF_PIPELINES_ENDPOINT", help="KFP API endpoint, e.g. http://localhost:8888."
    ),
]
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        envvar="KF_PIPELINES_SA_TOKEN_PATH",
        help="File with a bearer token for a multi-user KFP (e.g. a projected service-account token with "
        "audience pipelines.kubeflow.org), read before every request.",
    ),
]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="LABELMATCH_KFP_TOKEN",
        help="Bearer token for a multi-user KFP, e.g. $(kubectl -n NS create token default-editor "
        "--audience pipelines.kubeflow.org); never printed. Wins over --token-file.",
        show_default=False,
    ),
]
NamespaceOpt = Annotated[
    str | None,
    typer.Option(
        "--namespace",
        "--kfp-namespace",
        envvar="LABELMATCH_KFP_NAMESPACE",
        help="Profile namespace of a multi-user KFP: experiments, runs and uploaded pipelines go there, and "
        "the runs' pods start there, next to the S3 Secret, pipeline ConfigMap and runner ServiceAccount. "
        "Unset for a single-user KFP (its runs start in KFP's own namespace).",
    ),
]
RootOpt = Annotated[
    str,
    typer.Option(
        "--root",
        envvar="LABELMATCH_STORE_ROOT",
        help="s3://bucket/prefix of the labelmatch store (releases/, encoders/).",
    ),
]
ServiceAccountOpt = Annotated[
    str | None,
    typer.Option(
        "--service-account",
        envvar="LABELMATCH_PIPELINE_SERVICE_ACCOUNT",
        help="Service account of the run's pods (charts/labelmatch-pipelines creates "
        "labelmatch-pipeline-runner with the permissions the steps need); default: KFP's.",
    ),
]
KindOpt = Annotated[
    str | None, typer.Option("--kind", help="Expected artifact kind (Model, OnnxModel, Dataset, ...).")
]


#: What to check when a multi-user KFP refuses a request, by HTTP status.
_AUTH_HINTS = {
    401: "; a multi-user KFP needs a token: --token / LABELMATCH_KFP_TOKEN or --token-file",
    403: "; the token's user has no access to that namespace (--namespace / LABELMATCH_KFP_NAMESPACE: "
         "a profile namespace it may use)",
}


@contextlib.contextmanager
def _remote_errors(what: str) -> Iterator[None]:
    """Turn KFP / HTTP client exceptions into one-line :class:`LabelmatchError`s."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    try:
        yield
    except ApiException as exc:
        try:
            message = json.loads(exc.body or "{}").get("message") or exc.reason
        except (ValueError, AttributeError):
            message = exc.reason
        hint = _AUTH_HINTS.get(exc.status, "")
        if exc.status == 400 and "empty namespace" in str(message):
            hint = "; pass the profile namespace: --namespace or LABELMATCH_KFP_NAMESPACE"
        raise LabelmatchError(f"{what}: KFP API answered {exc.status}: {message}{hint}") from None
    except urllib3.exceptions.HTTPError as exc:
        raise LabelmatchError(f"{what}: cannot reach the server ({type(exc).__name__})") from None


def _registry(host: str, token: str | None, token_file: Path | None, namespace: str | None,
              shared_pipelines: bool = False) -> PipelineRegistry:
    """The KFP server at ``host`` with the connection options of the command line (module docstring)."""
    from kfp.client import KF_PIPELINES_SA_TOKEN_PATH

    from labelmatch.platform.kfp import PipelineRegistry

    if token_file is None and not token and Path(KF_PIPELINES_SA_TOKEN_PATH).is_file():
        token_file = Path(KF_PIPELINES_SA_TOKEN_PATH)
    return PipelineRegistry(host, token=token or None, namespace=namespace or None, token_file=token_file,
                            shared_pipelines=shared_pipelines)


def _parse_params(items: list[str] | None) -> dict[str, str]:
    params = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected key=value")
        params[key] = value
    return params


@pipeline_app.command("upload")
def pipeline_upload(
    host: HostOpt,
    package: Annotated[
        list[Path] | None,
        typer.Option(
            "--package", help="Compiled IR file(s); default: every pipeline of --version in --compiled-dir."
        ),
    ] = None,
    compiled_dir: Annotated[Path, typer.Option(help="Where `make compile` writes the IR.")] = Path(
        "pipelines/compiled"
    ),
    version: Annotated[
        str, typer.Option(help="Version name on the server (= package version).")
    ] = __version__,
    shared: Annotated[
        bool,
        typer.Option("--shared", help="Multi-user KFP: upload shared pipelines (every profile can run them) "
                     "instead of pipelines in --namespace."),
    ] = False,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
) -> None:
    """Upload compiled pipelines as the KFP pipeline version named by the package version."""
    from labelmatch.platform.kfp import compiled_packages

    packages = package or compiled_packages(compiled_dir, version)
    with _remote_errors(f"upload to {host}"):
        registry = _registry(host, token, token_file, kfp_namespace, shared_pipelines=shared)
        for path in packages:
            uploaded = registry.upload(path, version)
            typer.echo(f"{uploaded.pipeline} {uploaded.version}: version id {uploaded.version_id}")


@pipeline_app.command("versions")
def pipeline_versions(
    host: HostOpt,
    pipeline: Annotated[
        list[str] | None,
        typer.Option("--pipeline", help="Pipeline name(s); default: the training and deploy pipelines."),
    ] = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
) -> None:
    """List the versions of labelmatch pipelines on the server (in --namespace, else shared)."""
    from labelmatch.platform.kfp import DEPLOY_PIPELINE, TRAINING_PIPELINE

    with _remote_errors(f"list versions on {host}"):
        registry = _registry(host, token, token_file, kfp_namespace)
        for name in pipeline or [TRAINING_PIPELINE, DEPLOY_PIPELINE]:
            versions = registry.versions(name)
            if not versions:
                typer.echo(f"{name}: not on the server")
            for item in versions:
                typer.echo(f"{name}\t{item.version}\t{item.version_id}\t{item.created_at}")


@pipeline_app.command("default")
def pipeline_default(
    host: HostOpt,
    version: Annotated[
        str | None, typer.Option(help="Version to pin as the default; omitted: show the pinned one.")
    ] = None,
    clear: Annotated[
        bool, typer.Option("--clear", help="Unpin: runs without --version take the latest version again.")
    ] = False,
    pipeline: Annotated[
        list[str] | None,
        typer.Option("--pipeline", help="Pipeline name(s) (repeatable); default: labelmatch-training."),
    ] = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
) -> None:
    """Pin the version `pipeline run` takes without --version (a tag on the KFP pipeline, KFP >= 2.17)."""
    from labelmatch.platform.kfp import LATEST, TRAINING_PIPELINE

    if version and clear:
        raise ConfigError("pass --version V to pin or --clear to unpin, not both")
    with _remote_errors(f"default version on {host}"):
        registry = _registry(host, token, token_file, kfp_namespace)
        for name in pipeline or [TRAINING_PIPELINE]:
            if version or clear:
                registry.pin_default_version(name, version)
            target, how = registry.resolve_version(name)
            if how == LATEST:
                typer.echo(f"{name}: no default pinned; runs without --version take the latest, "
                           f"{target.version}")
            else:
                typer.echo(f"{name}: default version {target.version} (pinned)")


@pipeline_app.command("run")
def pipeline_run(
    host: HostOpt,
    version: Annotated[
        str | None,
        typer.Option(help="Pipeline version to run; default: the pinned default (labelmatch pipeline "
                     "default), else the latest version, as KFP itself picks."),
    ] = None,
    pipeline: Annotated[str, typer.Option(help="Pipeline name.")] = "labelmatch-training",
    param: Annotated[
        list[str] | None, typer.Option("--param", help="Pipeline parameter key=value (repeatable).")
    ] = None,
    run_name: Annotated[str | None, typer.Option(help="Run display name.")] = None,
    experiment: Annotated[str, typer.Option(help="Experiment to file the run under.")] = "labelmatch",
    cache: Annotated[
        bool,
        typer.Option("--cache/--no-cache", help="--no-cache: no step reuses KFP's cached results (a fresh "
                     "run). --cache: each step as compiled; steps with a mutable input never cache."),
    ] = True,
    no_cache_step: Annotated[
        list[str] | None,
        typer.Option("--no-cache-step", help="A step (task name, e.g. tune-sft, export-onnx) that must not "
                     "reuse a cached result in this run (repeatable)."),
    ] = None,
    service_account: ServiceAccountOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
) -> None:
    """Create a run of one version of a pipeline (in --namespace on a multi-user KFP)."""
    from labelmatch.platform.kfp_cache import CachePolicy

    policy = CachePolicy.from_options(cache, no_cache_step)
    with _remote_errors(f"run on {host}"):
        registry = _registry(host, token, token_file, kfp_namespace)
        registry.check_run_namespace()
        target, how = registry.resolve_version(pipeline, version)
        run = registry.create_run(pipeline, target.version, _parse_params(param), run_name, experiment,
                                  service_account, cache=policy)
    typer.echo(f"run {run.run_id} created: {run.name} ({pipeline} {run.version}, {how}; "
               f"cache {policy.describe()})")


@store_app.command("push")
def store_push(
    source: Annotated[Path, typer.Argument(help="Local artifact directory (with manifest.json).")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix to upload to.")],
    kind: KindOpt = None,
) -> None:
    """Upload an artifact (files first, manifest.json last; verified before sending)."""
    from labelmatch.platform.artifact_store import ArtifactStore

    digest = ArtifactStore.from_env().upload_artifact(source, uri, kind)
    typer.echo(f"{uri}: digest {digest}")


@store_app.command("put")
def store_put(
    source: Annotated[Path, typer.Argument(help="A file, or a directory (e.g. docs.jsonl + labels.json).")],
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix to copy it under (a pipeline's data_uri).")],
) -> None:
    """Upload plain files (a pipeline's input data), not an artifact: no manifest is written."""
    from labelmatch.platform.artifact_store import ArtifactStore

    for written in ArtifactStore.from_env().upload_tree(source, uri):
        typer.echo(written)


@store_app.command("pull")
def store_pull(
    uri: Annotated[str, typer.Argument(help="s3://bucket/prefix of the artifact.")],
    dest: Annotated[Path, typer.Argument(help="Local directory (replaced atomically).")],
    kind: KindOpt = None,
) -> None:
    """Download an artifact and verify every file against its manifest."""
    from labelmatch.core.artifacts import manifest_digest
    from labelmatch.platform.artifact_store import ArtifactStore

    manifest = ArtifactStore.from_env().download_artifact(uri, dest, kind)
    typer.echo(f"{dest}: {manifest['kind']} digest {manifest_digest(manifest)}")


@store_app.command("ls")
def store_ls(
    uri: Annotated[str, typer.Argument(help="s3://bucket[/prefix] to list artifacts under.")],
) -> None:
    """List the complete artifacts (those with a manifest) under a prefix."""
    from labelmatch.platform.artifact_store import ArtifactStore

    for info in ArtifactStore.from_env().list_artifacts(uri):
        typer.echo(f"{info.uri}\t{info.kind}\t{info.digest[:16]}\t{info.files} files\t{info.created_at}")


@store_app.command("push-encoder")
def store_push_encoder(
    model_dir: Annotated[Path, typer.Argument(help="Local Hugging Face model directory (e.g. bge-m3).")],
    name: Annotated[str, typer.Argument(help="Registry name, e.g. bge-m3.")],
    root: RootOpt = "s3://labelmatch",
) -> None:
    """Mirror a base encoder into the store; train with --base-model <root>/encoders/<name>."""
    from labelmatch.platform.artifact_store import ArtifactStore, S3Uri

    uri = str(S3Uri.parse(root).child(f"encoders/{name}"))
    digest = ArtifactStore.from_env().push_encoder(model_dir, uri)
    typer.echo(f"{uri}: digest {digest}")


@app.command()
def deploy(
    model_uri: Annotated[
        str, typer.Option("--model-uri", help="s3:// URI of the OnnxModel (or Model) artifact.")
    ],
    service: Annotated[str, typer.Option(help="InferenceService name.")],
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    root: RootOpt = "s3://labelmatch",
    service_account: Annotated[
        str, typer.Option(help="Service account with the S3 credentials Secret.")
    ] = "labelmatch-serving",
    image: Annotated[
        str | None,
        typer.Option(help="Predictor image (default: this version's serve image in the image registry)."),
    ] = None,
    expected_digest: Annotated[
        str | None, typer.Option(help="Refuse the model unless its digest is this.")
    ] = None,
    pipeline_version: Annotated[
        str, typer.Option(help="Pipeline version recorded in the release.")
    ] = __version__,
    run_id: Annotated[str, typer.Option(help="KFP run id recorded in the release.")] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for Ready.")] = 600.0,
    crd: Annotated[
        Path | None, typer.Option(help="InferenceService CRD file to validate against first.")
    ] = None,
    verify_served: Annotated[bool, typer.Option(
        help="Ask the model server (the InferenceService's cluster address) what it serves before recording "
             "the release; off outside the cluster network (the record then has no engine or label-set "
             "version).")] = True,
    strategy: Annotated[str, typer.Option(
        help="replace: all the traffic once rolled out (the default); canary: a share of the traffic, "
             "watched on its live signals, then promoted or rolled back (--rules); shadow: a copy of the "
             "live traffic for --shadow-window, answers logged and compared, never returned.")] = "replace",
    rules: Annotated[str | None, typer.Option(
        help="The canary's rules: a JSON/YAML file, an s3:// URI of one, or a JSON object "
             "(docs/cluster.md, the canary walkthrough); default: the defaults.")] = None,
    state_url: Annotated[str | None, typer.Option(
        "--state-url", envvar="LABELMATCH_STATE_URL",
        help="The serving state's SQLAlchemy URL: the canary's drift and feedback rules and its metric, the "
             "shadow's target and log.")] = None,
    shadow_window: Annotated[float, typer.Option(
        help="Seconds the shadow gets a copy of the live traffic.")] = 600.0,
) -> None:
    """Create or patch the KServe InferenceService, wait for its rollout, append a release record.

    With ``--strategy canary`` the new model first takes a share of the traffic and is promoted or
    rolled back on its own live signals; with ``--strategy shadow`` it only gets a copy of the
    traffic and a comparison report is written.
    """
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.images import image as image_name
    from labelmatch.platform.kserve import DeployConfig, deploy_model

    if strategy not in ("replace", "canary", "shadow"):
        raise ConfigError(f"--strategy must be replace, canary or shadow, got {strategy!r}")
    if rules and strategy != "canary":
        raise ConfigError("--rules is for --strategy canary")
    canary_rules = None
    if strategy == "canary" and not (rules or "").startswith("s3://"):
        from labelmatch.delivery.rules import load_rules

        canary_rules = load_rules(rules)  # a bad rules file stops here, before anything is read or changed
    store = ArtifactStore.from_env()

    config = DeployConfig(
        service=service,
        namespace=namespace,
        image=image or image_name("serve"),
        service_account=service_account,
        timeout_s=timeout,
        crd_path=str(crd) if crd else None,
        verify_served=verify_served,
    )
    if strategy == "canary":
        from labelmatch.delivery.kserve import deploy_canary
        from labelmatch.delivery.rules import load_rules

        canary_rules = canary_rules or load_rules(rules, store)  # an s3:// rules file, before any change
        record, decision = deploy_canary(config, model_uri, store, root, canary_rules, pipeline_version,
                                         run_id, expected_digest, state_url=state_url)
        typer.echo(f"{namespace}/{service}: canary of {model_uri} {decision.decision.replace('_', ' ')} "
                   f"({decision.reason}); release {record.release_id}")
        return
    if strategy == "shadow":
        from labelmatch.delivery.kserve import deploy_shadow
        from labelmatch.delivery.shadow import render_markdown

        record, report = deploy_shadow(config, model_uri, store, root, shadow_window, state_url or "",
                                       pipeline_version, run_id, expected_digest)
        typer.echo(render_markdown(report))
        typer.echo(f"release {record.release_id} (shadow; the report is in its release record)")
        return
    record = deploy_model(config, model_uri, store, root, pipeline_version, run_id, expected_digest)
    typer.echo(
        f"{namespace}/{service} Ready with {model_uri} (digest {record.model_digest[:16]}); "
        f"release {record.release_id}"
    )


@app.command("settle-canary")
def settle_canary(
    service: Annotated[str, typer.Option(help="InferenceService name.")],
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "default",
    state_url: Annotated[str | None, typer.Option(
        "--state-url", envvar="LABELMATCH_STATE_URL",
        help="The serving state's SQLAlchemy URL (where canary deploys store their started canaries).")] \
        = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for each step of a rollback.")] = 600.0,
) -> None:
    """Roll back a canary whose deploy step died, once its deadline has passed (a CronJob's command).

    A canary deploy stores when its own step must have decided the canary; past that, nobody is
    watching it. A canary still within its deadline, or none, is left alone (exit status 0).
    """
    from labelmatch.delivery.abandoned import settle_abandoned_canary
    from labelmatch.platform.kserve import DeployConfig

    if not state_url:
        raise ConfigError("settle-canary needs --state-url (or LABELMATCH_STATE_URL): the serving state "
                          "holds the started canaries")
    config = DeployConfig(service=service, namespace=namespace, image="", timeout_s=timeout)
    done = settle_abandoned_canary(None, config, state_url, overdue_only=True)
    what = {None: "no undecided canary", "started": "its canary is still within its deadline",
            "rolled_back": "the abandoned canary was rolled back",
            "superseded": "the undecided canary was superseded by a later release"}[done]
    typer.echo(f"{namespace}/{service}: {what}")


@app.command()
def releases(
    service: Annotated[str, typer.Option(help="InferenceService name.")],
    root: RootOpt = "s3://labelmatch",
) -> None:
    """List a service's release records, oldest first (``served`` no: a rolled-back canary, a shadow)."""
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog

    typer.echo("time\trelease\tpipeline_version\tmodel_uri\tmodel_digest\trun_id\tstrategy\tserved")
    for record in ReleaseLog(ArtifactStore.from_env(), root).list(service):
        decision = (record.delivery or {}).get("decision", "")
        strategy = f"{record.strategy} ({decision})" if decision else record.strategy
        typer.echo(
            f"{record.time}\t{record.release_id}\t{record.pipeline_version}\t{record.model_uri}\t"
            f"{record.model_digest[:16]}\t{record.run_id}\t{strategy}\t{'yes' if record.serving else 'no'}"
        )


@app.command()
def rollback(
    service: Annotated[str, typer.Option(help="InferenceService name.")],
    to: Annotated[str, typer.Option("--to", help="Release id, or a pipeline version (its latest release).")],
    host: HostOpt,
    root: RootOpt = "s3://labelmatch",
    pipeline: Annotated[str, typer.Option(help="Name of the deploy-only pipeline.")] = "labelmatch-deploy",
    service_account: ServiceAccountOpt = None,
    token: TokenOpt = None,
    token_file: TokenFileOpt = None,
    kfp_namespace: NamespaceOpt = None,
) -> None:
    """Re-run the deploy pipeline of an earlier version with that release's model (digest-checked)."""
    from labelmatch.platform.artifact_store import ArtifactStore
    from labelmatch.platform.releases import ReleaseLog
    from labelmatch.platform.rollback import rollback as run_rollback

    store = ArtifactStore.from_env()
    with _remote_errors(f"rollback through {host}"):
        registry = _registry(host, token, token_file, kfp_namespace)
        plan, run = run_rollback(
            service, to, ReleaseLog(store, root), store, registry, pipeline, service_account=service_account
        )
    typer.echo(
        f"run {run.run_id}: {pipeline} {plan.version.version} deploys {plan.release.model_uri} "
        f"(digest {plan.release.model_digest[:16]}, release {plan.release.release_id})"
    )
