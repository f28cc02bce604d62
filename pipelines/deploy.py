"""The deploy-only pipeline: deploy a model artifact given by URI (used by rollbacks).

``labelmatch.platform.rollback`` re-runs *this pipeline of an earlier version* with the
``model_uri``/``model_digest``/``service``/``namespace``/``target``/``release_root``/
``restore_release`` of an earlier release, so those parameter names are a contract
(:data:`labelmatch.platform.kserve.DEPLOY_PARAMETERS`); every other parameter has a default.
"""

from kfp import dsl, kubernetes

from components import deploy
from pipelines.platform import (
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_S3_SECRET,
    DEFAULT_STATE_SECRET,
    NETWORK_RETRIES,
    STATE_URL_KEY,
    Cluster,
    configure_step,
)

DEPLOY_PIPELINE = "labelmatch-deploy"


@dsl.pipeline(name=DEPLOY_PIPELINE, description="Deploy an OnnxModel artifact by URI (rollback, re-deploy).")
def deploy_pipeline(
    model_uri: str,
    model_digest: str = "",
    service: str = "labelmatch",
    namespace: str = "default",
    target: str = "kserve",
    release_root: str = "",
    restore_release: str = "",
    strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
    state_secret: str = DEFAULT_STATE_SECRET,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    deploy_cpu: str = "1",
    deploy_memory: str = "2Gi",
):
    """Import the OnnxModel at ``model_uri`` and deploy it.

    Args:
        model_uri: The OnnxModel artifact (``s3://``/``minio://`` in a cluster, a path locally).
        model_digest: Refuse the artifact unless its digest is this (a rollback pins it).
        service: InferenceService name.
        namespace: Its namespace.
        target: ``kserve`` or ``local``.
        release_root: ``s3://bucket/prefix`` of the release records (empty:
            ``LABELMATCH_STORE_ROOT`` from the pipeline ConfigMap).
        restore_release: The release a rollback restores whole (its image, engine, label-set
            version and predictor settings, not only its model); empty: a plain deploy.
        strategy: ``replace`` (all traffic at once, the default), ``canary`` or ``shadow``
            (``kserve`` only; docs/cluster.md, the canary walkthrough).
        canary_rules: The canary's rules file (``s3://`` URI) or a JSON object; empty: the defaults.
        shadow_window_s: Seconds a shadow gets a copy of the live traffic.
        state_secret: Secret holding the serving state's URL under key ``url`` (canary and
            shadow; optional).
        s3_secret: Secret holding the S3 credentials.
        pipeline_config: ConfigMap holding the S3 endpoint, region and store root.
        deploy_cpu: CPU of the deploy step (request = limit).
        deploy_memory: Memory of the deploy step.
    """
    model = dsl.importer(
        artifact_uri=model_uri, artifact_class=dsl.Model, reimport=False, metadata={"kind": "OnnxModel"}
    )
    deployed = deploy(
        onnx_model=model.output,
        target=target,
        service=service,
        namespace=namespace,
        release_root=release_root,
        expected_digest=model_digest,
        restore_release=restore_release,
        strategy=strategy,
        canary_rules=canary_rules,
        shadow_window_s=shadow_window_s,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)  # a side effect: always run
    configure_step(deployed, "deploy", Cluster(s3_secret, pipeline_config), deploy_cpu, deploy_memory,
                   retries=NETWORK_RETRIES)
    kubernetes.use_secret_as_env(deployed, state_secret, {STATE_URL_KEY: "LABELMATCH_STATE_URL"},
                                 optional=True)
