"""The ``deploy`` component: serve an accepted OnnxModel (local model server or KServe)."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components._image import IMAGE_STEP


@dsl.component(base_image=IMAGE_STEP, packages_to_install=[], install_kfp_package=False)
def deploy(
    onnx_model: Input[Model],
    release: Output[Artifact],
    target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    expected_digest: str = "",
    run_id: str = "",
    restore_release: str = "",
    strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
) -> str:
    """Deploy the model and record the release.

    Calls :func:`labelmatch.stages.deploy.run_deploy_step`. ``local`` starts the labelmatch model
    server on 127.0.0.1, classifies a few documents over its KServe v1 API and stops it (and
    records the release when there is a release root); ``kserve`` points the InferenceService
    ``namespace/service`` at the artifact's store URI, waits for Ready and appends a release
    record under the release root.

    Args:
        onnx_model: Input OnnxModel artifact (from ``export_onnx``, or imported by URI for a
            rollback; an ``s3://`` import without a local copy is downloaded); verified against
            its manifest (and ``expected_digest``).
        release: Output Report artifact: ``release.json`` (+ ``predictions.json`` and
            ``server.log`` for ``local``) and ``manifest.json``.
        target: ``kserve`` (a cluster) or ``local`` (this machine, loopback only).
        service: InferenceService name.
        namespace: Its namespace.
        release_root: ``s3://bucket/prefix`` of the release records; empty:
            ``$LABELMATCH_STORE_ROOT`` (from the pipeline ConfigMap in a cluster).
        expected_digest: Refuse a model whose artifact digest differs (rollbacks pin it).
        run_id: The pipeline run (recorded in the release).
        restore_release: A release id whose whole served state (image, engine, label-set version,
            predictor settings) comes back with the model (a rollback; ``kserve`` only).
        strategy: How the model reaches its traffic (``kserve`` only for the last two): ``replace``
            (all at once, the default), ``canary`` (a share, watched on its live signals, then
            promoted or rolled back; ``canary.json`` in ``release``) or ``shadow`` (a copy of the
            live traffic for ``shadow_window_s``, answers logged, never returned;
            ``shadow_report.{json,md}``). Both read the serving state at ``$LABELMATCH_STATE_URL``
            (from the serving chart's state Secret).
        canary_rules: The canary's rules: an ``s3://`` URI of a JSON/YAML rules file, or a JSON
            object inline; empty: the defaults (docs/cluster.md, the canary walkthrough).
        shadow_window_s: Seconds the shadow gets a copy of the live traffic.

    Returns:
        The deployed model's artifact digest.
    """
    from labelmatch.stages.deploy import DeployStepConfig, run_deploy_step

    config = DeployStepConfig(
        target=target,
        service=service,
        namespace=namespace,
        release_root=release_root,
        expected_digest=expected_digest,
        run_id=run_id,
        restore_release=restore_release,
        strategy=strategy,
        canary_rules=canary_rules,
        shadow_window_s=shadow_window_s,
    )
    record = run_deploy_step(onnx_model.path, release.path, config, model_uri=onnx_model.uri)
    release.metadata.update({"kind": "Report", "target": target, "model_digest": record["model_digest"],
                             "strategy": strategy,
                             "decision": (record.get("delivery") or {}).get("decision", "")})
    return record["model_digest"]
