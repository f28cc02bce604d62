"""``labelmatch classify``: batch classification of JSONL/Parquet shards on Ray Data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from labelmatch.cli import app

_INPUT_HELP = "JSONL/Parquet file, directory or s3:// prefix of shards ({id, text} rows)."
_OUTPUT_HELP = "Directory or s3:// prefix: <shard>.parquet, rejects/<shard>.jsonl, _summary.json."
_LABELS_HELP = "labels.json to add to (or, with --replace-labels, replace) the model's labels."
_RAYJOB_HELP = ("Run on Kubernetes as a KubeRay RayJob (model, input and output on s3://); "
                "follow it, delete it, print the summary.")
_VALUES_HELP = ("RayJob settings file (YAML/JSON; the keys of labelmatch tune --rayjob-values); "
                "flags override it. Default shape: 4 CPU workers (4 CPU, 8Gi).")
_ADDRESS_HELP = "Ray cluster (ray://head:10001, or auto inside a RayJob); default: a local Ray on 127.0.0.1."


@app.command()
def classify(
    model: Annotated[str, typer.Option("--model", help="OnnxModel artifact (directory or s3:// URI).")],
    input: Annotated[str, typer.Option("--input", help=_INPUT_HELP)],
    output: Annotated[str, typer.Option("--output", help=_OUTPUT_HELP)],
    labels: Annotated[str | None, typer.Option("--labels", help=_LABELS_HELP)] = None,
    replace_labels: Annotated[bool, typer.Option("--replace-labels", help="Only --labels' labels.")] = False,
    concurrency: Annotated[int, typer.Option(help="Actors, each with one ONNX Runtime session.")] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Documents per actor call.")] = 256,
    ort_threads: Annotated[int, typer.Option("--ort-threads", help="ONNX Runtime threads per actor.")] = 1,
    similarities: Annotated[bool, typer.Option("--similarities", help="Also write the cosines.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Stop at the first unreadable row.")] = False,
    address: Annotated[str | None, typer.Option(envvar="RAY_ADDRESS", help=_ADDRESS_HELP)] = None,
    num_cpus: Annotated[int | None, typer.Option("--num-cpus", help="CPUs the local Ray may use.")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars.")] = True,
    rayjob: Annotated[bool, typer.Option("--rayjob", help=_RAYJOB_HELP)] = False,
    rayjob_values: Annotated[Path | None, typer.Option(help=_VALUES_HELP)] = None,
    namespace: Annotated[str | None, typer.Option(help="RayJob namespace.")] = None,
    image: Annotated[str | None, typer.Option(
        help="RayJob image (default: this version's step image in $LABELMATCH_IMAGE_REGISTRY).")] = None,
    workers: Annotated[int | None, typer.Option(help="RayJob worker pods.")] = None,
    env_secret: Annotated[str | None, typer.Option(help="Secret with the pods' S3 credentials.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --rayjob: print the manifest.")] = False,
) -> None:
    """Classify every document of INPUT into OUTPUT, one Parquet shard per input shard.

    Streams (memory bounded whatever the input size); started again with the same OUTPUT it
    skips finished shards. Rows that cannot be read go to rejects/ with file, line and reason.
    """
    from labelmatch.batch.run import BatchConfig, run_batch
    from labelmatch.data.dataset import load_labels
    from labelmatch.platform.artifact_store import local_input

    extra = None
    if labels:
        with local_input(labels) as path:
            extra = load_labels(path)
    config = BatchConfig(
        model=model, input=input, output=output, labels=extra,
        replace_labels=replace_labels, batch_size=batch_size, concurrency=concurrency,
        ort_threads=ort_threads, similarities=similarities, strict=strict, address=address or None,
        num_cpus=num_cpus, progress=progress,
    )
    if rayjob:
        summary = _on_rayjob(config, rayjob_values, dry_run, namespace=namespace, image=image,
                             workers=workers, env_secret=env_secret)
        if summary is None:
            return
    else:
        summary = run_batch(config)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "label_names"}, indent=2))


def _on_rayjob(config: Any, values_file: Path | None, dry_run: bool, **flags: Any) -> dict[str, Any] | None:
    import yaml

    from labelmatch.batch.rayjob import batch_rayjob, batch_spec, run_batch_rayjob

    spec = batch_spec(values_file, **flags)
    if dry_run:
        manifest, _ = batch_rayjob(config, spec, log=lambda line: typer.echo(line, err=True))
        typer.echo(yaml.safe_dump(manifest, sort_keys=False))
        return None
    return run_batch_rayjob(config, spec, on_status=typer.echo)
