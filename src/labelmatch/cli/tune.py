"""``labelmatch tune``: Population Based Training over SFT trials — local Ray, a Ray cluster, or a RayJob."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from labelmatch.cli import app
from labelmatch.core.errors import ConfigError, LabelmatchError


def _json_option(value: str | None, what: str, hint: Any = Any) -> Any:
    """A JSON value given inline or as a path to a JSON/YAML file, checked against ``hint`` (a
    dataclass or a type annotation): a bad field is named with its file and line.

    Raises:
        ConfigError: Neither inline JSON nor a file, or (inline) a bad field.
        DataError: The file cannot be read, or a bad field in it.
    """
    from labelmatch.core.inputs import parse_json
    from labelmatch.core.settings import build_settings, check_value, read_settings

    if value is None:
        return None
    if value.lstrip().startswith(("{", "[")):
        source: Any = what
        body = parse_json(what, value)
    else:
        if not Path(value).is_file():
            raise ConfigError(f"{what}: {value} is neither inline JSON nor a file")
        source = read_settings(value)
        body = source.body
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        instance = build_settings(hint, body, source)  # these values alone: a file's fields named with lines
        return {key: getattr(instance, key) for key in body}
    return check_value(body, hint, (), source)


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def _toleration(item: str) -> dict[str, Any]:
    """``key[=value]:Effect`` (kubectl taint syntax) → a toleration."""
    head, _, effect = item.rpartition(":") if ":" in item else (item, "", "")
    key, sep, value = head.partition("=")
    toleration: dict[str, Any] = {"key": key, "operator": "Equal" if sep else "Exists"}
    if sep:
        toleration["value"] = value
    if effect:
        toleration["effect"] = effect
    return toleration


@app.command()
def tune(
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Dataset directory (docs.jsonl + labels.json) or s3:// URI; split here when unsplit.",
        ),
    ],
    out: Annotated[
        Path, typer.Option("--out", help="Model artifact of the best trial (replaced atomically).")
    ],
    report: Annotated[
        Path | None,
        typer.Option(
            "--report", help="Report directory (report.md, pbt_history.png/json); default: <out>-report."
        ),
    ] = None,
    trials: Annotated[int | None, typer.Option(help="Population size (PBT needs >= 2). [default: 4]")] = None,
    iterations: Annotated[
        int | None,
        typer.Option(
            help="Training iterations per trial (each: --steps-per-iteration steps + validation) [default: 8]"
        ),
    ] = None,
    perturbation_interval: Annotated[
        int | None, typer.Option(help="Exploit/explore every this many iterations. [default: 1]")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="pbt, or random (random search baseline, same initial population). [default: pbt]"),
    ] = None,
    quantile_fraction: Annotated[
        float | None,
        typer.Option(help="Share of trials that copy (bottom) / are copied (top). [default: 0.25]"),
    ] = None,
    synch: Annotated[
        bool, typer.Option("--synch", help="Synchronous PBT (reproducible; idles resources).")
    ] = False,
    search_space: Annotated[
        str | None,
        typer.Option(
            help="Search space as JSON or a JSON/YAML file, e.g. "
            '\'{"lr": [1e-4, 3e-3], "lora_ranks": [8, 16]}\'; '
            "keys: lr, weight_decay, warmup_ratio, contrastive_weight, scale (low, high pairs), lora_ranks."
        ),
    ] = None,
    config: Annotated[
        str | None,
        typer.Option(
            help="TuneConfig fields as JSON or a JSON/YAML file (train_config, search_space nested); "
            "flags given explicitly override it."
        ),
    ] = None,
    base_model: Annotated[
        str | None, typer.Option(help="Base encoder: bundled:minilm, a local HF directory, or a hub id.")
    ] = None,
    steps_per_iteration: Annotated[
        int | None, typer.Option(help="Optimisation steps per iteration (default 20).")
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Documents per step.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Tokens per text.")] = None,
    resources: Annotated[
        str | None,
        typer.Option(
            help='Ray resources per trial as JSON, e.g. \'{"GPU": 1, "CPU": 4}\' (default {"CPU": 1}).'
        ),
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            help="Existing Ray cluster: auto or ray://HOST:10001 (Ray Client), or http://HOST:8265 to submit "
            "the run through the Ray Jobs API."
        ),
    ] = None,
    num_cpus: Annotated[int | None, typer.Option(help="CPUs of the local Ray (default: all).")] = None,
    dashboard: Annotated[
        bool, typer.Option("--dashboard", help="Start the Ray dashboard with the local Ray (127.0.0.1 only).")
    ] = False,
    ray_temp_dir: Annotated[str | None, typer.Option(help="Temp/session directory of the local Ray.")] = None,
    storage_path: Annotated[
        str | None,
        typer.Option(
            help="Tune results and checkpoints: a directory or s3://bucket/prefix (needed on multi-node "
            "clusters) [default: ray_results beside --report]."
        ),
    ] = None,
    s3_endpoint: Annotated[
        str | None,
        typer.Option(
            help="S3 endpoint (MinIO), e.g. http://minio:9000; default $AWS_ENDPOINT_URL. "
            "Credentials: AWS_* env vars."
        ),
    ] = None,
    upload_to: Annotated[
        str | None,
        typer.Option(
            help="Also copy the model and report to this directory or s3:// URI (<upload-to>/model, /report)."
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="Experiment name (folder under --storage-path). [default: labelmatch-tune]"),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Resume the interrupted experiment <storage-path>/<name> (Tuner.restore)."
        ),
    ] = False,
    max_failures: Annotated[
        int | None,
        typer.Option(
            help="Retries of a crashed trial from its last checkpoint (-1: unlimited). [default: 1]"
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(help="Seed of the population, PBT decisions, trainers and the split. [default: 0]"),
    ] = None,
    rayjob: Annotated[
        bool,
        typer.Option(
            "--rayjob",
            help="Run on Kubernetes: create a KubeRay RayJob (needs --storage-path s3://...), follow it, "
            "fetch the model.",
        ),
    ] = False,
    rayjob_values: Annotated[
        Path | None,
        typer.Option(
            help="RayJob settings file (YAML/JSON): namespace, image, workers, gpus_per_worker, worker_cpu, "
            "worker_memory, head_cpu, head_memory, node_selector, tolerations, env, env_secret, "
            "service_account, ttl_seconds_after_finished, active_deadline_seconds; flags override it."
        ),
    ] = None,
    namespace: Annotated[str | None, typer.Option(help="RayJob namespace.")] = None,
    image: Annotated[str | None, typer.Option(
        help="RayJob image (default: this version's train image in $LABELMATCH_IMAGE_REGISTRY).")] = None,
    workers: Annotated[int | None, typer.Option(help="RayJob GPU worker pods.")] = None,
    gpus_per_worker: Annotated[int | None, typer.Option(help="GPUs per RayJob worker pod.")] = None,
    node_selector: Annotated[
        list[str] | None, typer.Option(help="Worker node selector KEY=VALUE (repeatable).")
    ] = None,
    toleration: Annotated[
        list[str] | None, typer.Option(help="Worker toleration KEY[=VALUE][:EFFECT] (repeatable).")
    ] = None,
    env_secret: Annotated[
        str | None, typer.Option(help="Secret with S3 credentials, mounted as env vars in the RayJob pods.")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="With --rayjob: print the RayJob manifest (YAML) and exit.")
    ] = False,
    verbose: Annotated[int | None, typer.Option(help="Ray Tune console verbosity 0-3. [default: 1]")] = None,
) -> None:
    """Tune SFT hyper-parameters with Ray Tune Population Based Training; write the best model and a report.

    Every setting is checked before anything starts: a reversed range, an unknown hyper-parameter
    or fewer than 2 trials for PBT fail at once with one line naming the problem.
    """
    from labelmatch.tuning.pbt import TuneConfig
    from labelmatch.tuning.search_space import SearchSpace

    values = _json_option(config, "--config", TuneConfig) or {}
    if not isinstance(values, dict):
        raise ConfigError("--config: expected an object of TuneConfig fields")
    values = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in values.items()}
    flags = {
        "trials": trials,
        "iterations": iterations,
        "perturbation_interval": perturbation_interval,
        "scheduler": scheduler,
        "quantile_fraction": quantile_fraction,
        "num_cpus": num_cpus,
        "ray_temp_dir": ray_temp_dir,
        "storage_path": storage_path,
        "s3_endpoint": s3_endpoint,
        "name": name,
        "max_failures": max_failures,
        "seed": seed,
        "verbose": verbose,
        "address": None if address and address.startswith(("http://", "https://")) else address,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    values.update(
        {k: True for k, on in {"synch": synch, "dashboard": dashboard, "resume": resume}.items() if on}
    )
    if search_space is not None:
        values["search_space"] = _json_option(search_space, "--search-space", SearchSpace)
    if resources is not None:
        values["resources_per_trial"] = _json_option(resources, "--resources", dict[str, float])
    train = dict(values.get("train_config") or {"steps_per_iteration": 20})
    train.update(
        {
            k: v
            for k, v in {
                "base_model": base_model,
                "steps_per_iteration": steps_per_iteration,
                "batch_size": batch_size,
                "max_length": max_length,
            }.items()
            if v is not None
        }
    )
    train["seed"] = values.get("seed", 0)
    values["train_config"] = train
    tune_config = TuneConfig.from_dict(values)
    report = report or out.with_name(out.name + "-report")
    if rayjob or (address and address.startswith(("http://", "https://"))):
        _run_on_cluster(
            tune_config,
            data,
            out,
            report,
            upload_to,
            address if not rayjob else None,
            dry_run,
            dict(
                rayjob_values=rayjob_values,
                namespace=namespace,
                image=image,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                node_selector=_pairs(node_selector, "--node-selector"),
                tolerations=[_toleration(t) for t in toleration or []],
                env_secret=env_secret,
            ),
        )
        return
    _run_here(tune_config, data, out, report, upload_to)


def _run_here(config: Any, data: str, out: Path, report: Path, upload_to: str | None) -> None:
    from labelmatch.platform.artifact_store import ArtifactStore, local_input
    from labelmatch.tuning.pbt import tune_sft

    with local_input(data) as local:
        summary = tune_sft(local, out, report, config)
    if upload_to:
        store = ArtifactStore.from_env()
        store.upload_artifact(out, f"{upload_to.rstrip('/')}/model", kind="Model")
        store.upload_artifact(report, f"{upload_to.rstrip('/')}/report", kind="Report")
    typer.echo(
        f"best trial {summary['best_trial']} (iteration {summary['best_iteration']}, LoRA rank "
        f"{summary['best_lora_rank']}): validation macro-F1 {summary['best_val_macro_f1']:.4f}; "
        f"{summary['exploits']} exploits over {summary['trial_iterations']} trial-iterations"
    )
    typer.echo(f"model written to {out}, report to {report / 'report.md'}")


def _run_on_cluster(
    config: Any,
    data: str,
    out: Path,
    report: Path,
    upload_to: str | None,
    jobs_address: str | None,
    dry_run: bool,
    rayjob_settings: dict[str, Any],
) -> None:
    import dataclasses
    import time

    from labelmatch.platform.artifact_store import ArtifactStore, is_s3_uri
    from labelmatch.tuning.rayjob import cluster_entrypoint

    if not is_s3_uri(config.storage_path):
        raise ConfigError(
            "a cluster run needs --storage-path s3://bucket/prefix (storage every Ray node can reach)"
        )
    work = f"{config.storage_path.rstrip('/')}/{config.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
    if jobs_address:
        from labelmatch.tuning.rayjob import submit_ray_job

        if not is_s3_uri(data):
            raise ConfigError(
                f"--data {data}: a Ray Jobs API run reads its data from s3:// (upload it first)"
            )
        upload_to = upload_to or f"{work}/outputs"
        entrypoint = cluster_entrypoint(config, data, upload_to)
        job_id, status = submit_ray_job(
            jobs_address, entrypoint, on_log=lambda text: typer.echo(text, nl=False)
        )
        typer.echo(f"Ray job {job_id}: {status}")
        if status != "SUCCEEDED":
            raise LabelmatchError(f"Ray job {job_id} ended {status}")
        store = ArtifactStore.from_env()
        store.download_artifact(f"{upload_to}/model", out, kind="Model")
        store.download_artifact(f"{upload_to}/report", report, kind="Report")
        typer.echo(f"model fetched to {out}, report to {report / 'report.md'}")
        return
    import yaml

    from labelmatch.platform.images import image as image_name
    from labelmatch.platform.kuberay import RayJobSpec, build_rayjob, rayjob_name
    from labelmatch.tuning.rayjob import TUNE_NAME_PREFIX, run_tune_rayjob

    values_file = rayjob_settings.pop("rayjob_values")
    spec_values = {k: v for k, v in rayjob_settings.items() if v not in (None, {}, [])}
    # A name of its own per run: two runs of the same experiment never collide.
    spec_values["name"] = rayjob_name(TUNE_NAME_PREFIX, config.name)
    # The pods run this release's train image unless the values file or --image names another.
    spec = RayJobSpec.from_values(values_file, {"image": image_name("train")}, **spec_values)
    if dry_run:
        cluster = dataclasses.replace(config, address="auto", storage_path=f"{work}/ray")
        manifest = build_rayjob(spec, cluster_entrypoint(cluster, data, f"{work}/outputs"))
        typer.echo(yaml.safe_dump(manifest, sort_keys=False))
        return
    summary = run_tune_rayjob(data, out, report, config, spec, work, on_status=typer.echo)
    typer.echo(f"best validation macro-F1 {summary['best_val_macro_f1']:.4f}; model fetched to {out}, "
               f"report to {report / 'report.md'}")
