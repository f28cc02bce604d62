"""The ``batch_classify`` component: classify an archive of documents with an OnnxModel on Ray Data."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components._image import IMAGE_STEP


@dsl.component(base_image=IMAGE_STEP, packages_to_install=[], install_kfp_package=False)
def batch_classify(
    onnx_model: Input[Model],
    report: Output[Artifact],
    metrics: Output[Metrics],
    input_uri: str,
    output_uri: str,
    labels_uri: str = "",
    replace_labels: bool = False,
    expected_digest: str = "",
    concurrency: int = 1,
    batch_size: int = 256,
    ort_threads: int = 1,
    similarities: bool = False,
    strict: bool = False,
    ray_address: str = "",
    ray_temp_dir: str = "",
    run_id: str = "",
) -> int:
    """Stream every JSONL/Parquet shard under ``input_uri`` through ONNX Runtime actors on Ray Data
    and write one Parquet shard per input shard under ``output_uri``.

    Calls :func:`labelmatch.stages.batch.run_batch_step`. Resumable: a retried or re-submitted
    run with the same ``output_uri`` skips the shards already written (each appears only when
    complete). Rows that cannot be read go to ``<output_uri>/rejects/`` with file, line and reason.

    Args:
        onnx_model: Input OnnxModel artifact (imported by URI); verified against its manifest.
        report: Output Report artifact: ``summary.json`` (rows, rejects, shards, docs/s, model and
            label-set digests, label names) and ``manifest.json``.
        metrics: Output KFP metrics: rows, rejects, docs_per_s.
        input_uri: ``s3://`` prefix (or file) of ``{id, text}`` JSONL or Parquet shards.
        output_uri: ``s3://`` prefix for the results.
        labels_uri: ``labels.json`` to add to the model's labels (``s3://`` or a path); empty: none.
        replace_labels: Score only the labels of ``labels_uri``.
        expected_digest: Refuse a model whose artifact digest differs.
        concurrency: Actors, each with one ONNX Runtime session (size the step's CPU for
            ``concurrency * ort_threads + 1`` on a local Ray).
        batch_size: Documents per actor call.
        ort_threads: ONNX Runtime threads per actor.
        similarities: Also write the cosines.
        strict: Fail at the first row that cannot be read.
        ray_address: A Ray cluster (``ray://head:10001``) to run the actors on; empty: a local Ray
            inside this step's pod, bound to 127.0.0.1.
        ray_temp_dir: Temp dir of the local Ray (empty: Ray's default).
        run_id: The pipeline run (recorded in the report).

    Returns:
        The number of documents classified in this run.
    """
    from labelmatch.stages.batch import BatchStepConfig, run_batch_step

    config = BatchStepConfig(
        input_uri=input_uri, output_uri=output_uri, labels_uri=labels_uri, replace_labels=replace_labels,
        expected_digest=expected_digest, concurrency=concurrency, batch_size=batch_size,
        ort_threads=ort_threads, similarities=similarities, strict=strict, ray_address=ray_address,
        ray_temp_dir=ray_temp_dir, run_id=run_id,
    )
    summary = run_batch_step(onnx_model.path, report.path, config, model_uri=onnx_model.uri)
    for key in ("rows", "rejects", "docs_per_s", "skipped_done"):
        metrics.log_metric(key, summary[key])
    report.metadata.update({"kind": "Report", "model_digest": summary["model_digest"],
                            "label_set_digest": summary["label_set_digest"], "output_uri": output_uri})
    return int(summary["rows"])
