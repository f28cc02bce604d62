"""The batch pipeline: classify an archive with a released OnnxModel on Ray Data.

One step (``batch_classify``) over the model imported by URI: submit it with the ``model_uri``
(and ``model_digest``) of a release record, an input prefix and an output prefix. The step is
retried on failure, which is safe: a retry skips the shards already written.
"""

from kfp import dsl

from components import batch_classify
from pipelines.platform import (
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_S3_SECRET,
    NETWORK_RETRIES,
    Cluster,
    configure_step,
)

BATCH_PIPELINE = "labelmatch-batch"
#: ``activeDeadlineSeconds`` of the step (a compile-time constant in kfp-kubernetes): a day; a
#: longer archive is classified by re-submitting, which resumes.
BATCH_TIMEOUT_S = 24 * 3600


@dsl.pipeline(name=BATCH_PIPELINE, description="Classify JSONL/Parquet shards with an OnnxModel on Ray Data.")
def batch_pipeline(
    model_uri: str,
    input_uri: str,
    output_uri: str,
    model_digest: str = "",
    labels_uri: str = "",
    replace_labels: bool = False,
    concurrency: int = 1,
    batch_size: int = 256,
    ort_threads: int = 1,
    similarities: bool = False,
    strict: bool = False,
    ray_address: str = "",
    ray_temp_dir: str = "",
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    batch_cpu: str = "2",
    batch_memory: str = "8Gi",
):
    """Import the OnnxModel at ``model_uri`` and classify every shard under ``input_uri``.

    Args:
        model_uri: The OnnxModel artifact (``s3://`` in a cluster, a path locally).
        input_uri: ``s3://`` prefix (or file) of ``{id, text}`` JSONL or Parquet shards.
        output_uri: ``s3://`` prefix of the results (``<shard>.parquet``, ``rejects/``,
            ``_summary.json``); re-submitting with the same prefix resumes.
        model_digest: Refuse the artifact unless its digest is this (pin a release).
        labels_uri: ``labels.json`` to add to the model's labels; empty: the model's.
        replace_labels: Score only the labels of ``labels_uri``.
        concurrency: Ray Data actors (one ONNX Runtime session each).
        batch_size: Documents per actor call.
        ort_threads: ONNX Runtime threads per actor.
        similarities: Also write the cosines.
        strict: Fail at the first row that cannot be read.
        ray_address: A Ray cluster (``ray://head:10001``); empty: a local Ray inside the step's
            pod (then ``batch_cpu`` must cover ``concurrency * ort_threads``).
        ray_temp_dir: Temp dir of the local Ray (empty: Ray's default).
        s3_secret: Secret holding the S3 credentials.
        pipeline_config: ConfigMap holding the S3 endpoint, region and store root.
        batch_cpu: CPU of the step (request = limit).
        batch_memory: Memory of the step (bge-m3, one actor: 2.4 GB measured, 5.9 GB with the int8 and
            fp32 fallback graphs fully resident; ``make bench-production-shape``).
    """
    model = dsl.importer(
        artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False, metadata={"kind": "OnnxModel"}
    )
    classified = batch_classify(
        onnx_model=model.output,
        input_uri=input_uri,
        output_uri=output_uri,
        labels_uri=labels_uri,
        replace_labels=replace_labels,
        expected_digest=model_digest,
        concurrency=concurrency,
        batch_size=batch_size,
        ort_threads=ort_threads,
        similarities=similarities,
        strict=strict,
        ray_address=ray_address,
        ray_temp_dir=ray_temp_dir,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)  # writes outside KFP's artifacts: always run (resume skips work)
    configure_step(classified, "batch", Cluster(s3_secret, pipeline_config), batch_cpu, batch_memory,
                   retries=NETWORK_RETRIES, timeout_s=BATCH_TIMEOUT_S)
