"""The ``batch_classify`` pipeline step: classify an archive with an OnnxModel on Ray Data and
write the run's summary as a Report artifact.

The predictions themselves go to ``output_uri`` (a store prefix the user names: millions of rows
are no KFP artifact to copy between steps); the Report records where, how many, and with which
model and label set. A retried step resumes: finished shards under ``output_uri`` are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labelmatch.core.artifacts import (
    artifact_digest,
    atomic_artifact_dir,
    verify_artifact,
    write_json,
    write_manifest,
)
from labelmatch.core.errors import ArtifactError, ConfigError
from labelmatch.platform.artifact_store import as_s3_uri, is_s3_uri, local_input


@dataclass
class BatchStepConfig:
    """What the step classifies and how.

    Attributes:
        input_uri: JSONL/Parquet shards (``s3://`` prefix in a cluster).
        output_uri: Where the result shards go (``s3://`` prefix in a cluster).
        labels_uri: Extra (or, with ``replace_labels``, the only) ``labels.json``; empty: none.
        replace_labels: Score only the labels of ``labels_uri``.
        expected_digest: Refuse the model unless its artifact digest is this.
        concurrency: Ray Data actors.
        batch_size: Documents per actor call.
        ort_threads: ONNX Runtime threads per actor.
        similarities: Also write cosines.
        strict: Fail at the first row that cannot be read.
        ray_address: An existing Ray cluster (``ray://head:10001``); empty: a local Ray in the pod.
        ray_temp_dir: Temp dir of the local Ray (empty: Ray's default).
        run_id: The pipeline run (recorded in the Report).
    """

    input_uri: str
    output_uri: str
    labels_uri: str = ""
    replace_labels: bool = False
    expected_digest: str = ""
    concurrency: int = 1
    batch_size: int = 256
    ort_threads: int = 1
    similarities: bool = False
    strict: bool = False
    ray_address: str = ""
    ray_temp_dir: str = ""
    run_id: str = ""


def model_for_actors(model_dir: str | Path, model_uri: str, ray_address: str) -> str:
    """Where the actors load the model from: the step's local copy on a local Ray, the store URI
    on a Ray cluster (whose nodes cannot read this pod's disk).

    Raises:
        ConfigError: A Ray cluster was named but the model has no store URI.
    """
    if not ray_address:
        return str(model_dir) if Path(model_dir).is_dir() else as_s3_uri(model_uri)
    if not is_s3_uri(model_uri):
        raise ConfigError(f"a Ray cluster ({ray_address}) reads the model from the store, "
                          f"but its URI is {model_uri!r}")
    return as_s3_uri(model_uri)


def run_batch_step(model_dir: str | Path, out_dir: str | Path, config: BatchStepConfig,
                   model_uri: str = "") -> dict[str, Any]:
    """Classify ``config.input_uri`` with the OnnxModel and write the Report to ``out_dir``.

    Args:
        model_dir: KFP's local copy of the OnnxModel (may be absent for an imported ``s3://`` URI).
        out_dir: The Report artifact: ``summary.json`` and ``manifest.json``.
        config: The run.
        model_uri: The model's store URI (``s3://``/``minio://``) or path.

    Returns:
        The run summary (:func:`labelmatch.batch.run.run_batch`).

    Raises:
        ArtifactError: The model is of the wrong kind, corrupted or not the expected digest.
    """
    from labelmatch.batch.run import BatchConfig, run_batch
    from labelmatch.data.dataset import load_labels

    if Path(model_dir).is_dir():
        verify_artifact(model_dir, "OnnxModel")
        digest = artifact_digest(model_dir)
    elif is_s3_uri(model_uri):
        from labelmatch.platform.artifact_store import ArtifactStore

        digest = ArtifactStore.from_env().verify_remote(as_s3_uri(model_uri), "OnnxModel")
    else:
        raise ArtifactError(f"{model_dir}: no OnnxModel artifact there")
    if config.expected_digest and digest != config.expected_digest:
        raise ArtifactError(f"{model_uri or model_dir}: digest {digest[:12]}… is not the expected "
                            f"{config.expected_digest[:12]}…; refusing to classify with it")
    labels = None
    if config.labels_uri:
        with local_input(config.labels_uri) as path:
            labels = load_labels(path if path.is_file() else path / "labels.json")
    summary = run_batch(BatchConfig(
        model=model_for_actors(model_dir, model_uri, config.ray_address), input=config.input_uri,
        output=config.output_uri, labels=labels, replace_labels=config.replace_labels,
        batch_size=config.batch_size, concurrency=config.concurrency, ort_threads=config.ort_threads,
        similarities=config.similarities, strict=config.strict, address=config.ray_address or None,
        ray_temp_dir=config.ray_temp_dir or None, progress=False,
    ))
    with atomic_artifact_dir(out_dir) as tmp:
        write_json(tmp / "summary.json", {**summary, "input_uri": config.input_uri,
                                          "output_uri": config.output_uri, "run_id": config.run_id})
        write_manifest(tmp, "Report", lineage={"model": summary["model_digest"], "run_id": config.run_id},
                       extra={"stage": "batch_classify", "rows": summary["rows"],
                              "rejects": summary["rejects"]})
    return summary
