"""The deploy-only pipeline: deploy a model artifact given by URI (used by rollbacks).

``labelmatch.rollback`` re-runs *this pipeline of an earlier version* with the
``model_uri``/``model_digest``/``service``/``namespace`` of an earlier release, so those
parameter names are a contract (:data:`labelmatch.deploy.DEPLOY_PARAMETERS`).
"""

from kfp import dsl

from components import deploy

DEPLOY_PIPELINE = "labelmatch-deploy"


@dsl.pipeline(name=DEPLOY_PIPELINE, description="Deploy an OnnxModel artifact by URI (rollback, re-deploy).")
def deploy_pipeline(
    model_uri: str,
    model_digest: str = "",
    service: str = "labelmatch",
    namespace: str = "default",
    target: str = "kserve",
    release_root: str = "",
):
    """Import the OnnxModel at ``model_uri`` and deploy it.

    Args:
        model_uri: The OnnxModel artifact (``s3://``/``minio://`` in a cluster, a path locally).
        model_digest: Refuse the artifact unless its digest is this (a rollback pins it).
        service: InferenceService name.
        namespace: Its namespace.
        target: ``kserve`` or ``local``.
        release_root: ``s3://bucket/prefix`` of the release records.
    """
    model = dsl.importer(
        artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False, metadata={"kind": "OnnxModel"}
    )
    deploy(
        onnx_model=model.output,
        target=target,
        service=service,
        namespace=namespace,
        release_root=release_root,
        expected_digest=model_digest,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)  # a side effect: always run
