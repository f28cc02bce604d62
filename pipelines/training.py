"""The training pipeline: ``data_prep → tune_sft → grpo (with feedback) → evaluate → gate → export → deploy``.

``kfp.local`` in kfp 2.17.0 runs ``dsl.If``/``dsl.Else`` and nested pipelines but not
``dsl.OneOf`` (it fails with "Expected 1 artifact in ArtifactSelectorSpec"), so the candidate
is not merged from the two branches; instead each branch calls the same ``release`` sub-pipeline
(export → evaluate the exported model as served → ``dsl.If(gate)`` → ``ship``: deploy) with its
own candidate. The gate judges exactly the artifact that ships: the int8 OnnxModel with its fp32
fallback and shipped thresholds, against the model serving now (given, or the latest release).

Every task that sits under a ``dsl.If`` is wrapped in a sub-pipeline (``ship``,
``improve_and_release``): the kfp 2.17.0 compiler does not declare the parameters a task's
CPU/memory/accelerator placeholders read among the inputs of the condition's DAG, so a step with
parameterised resources directly under a condition cannot resolve them (kfp.local fails with
"Parent pipeline input argument 'pipelinechannel--grpo_cpu' not found", and so would the KFP
driver). Inside a sub-pipeline they are that pipeline's own inputs.
``tests/test_pipelines.py`` checks every DAG of the IR for such dangling references.

Every step carries its Kubernetes settings (:mod:`pipelines.platform`): S3 access from one Secret
and one ConfigMap, CPU/memory per step, GPUs for GRPO, retries where a step talks to a network.
``data_prep`` is never cached: its input is a URI whose content can change without the URI
changing; every later step is keyed on the artifacts it receives, so a new Dataset re-runs them.
"""

from kfp import dsl, kubernetes
from kfp.dsl import Dataset, Input, Model

from components import data_prep, deploy, evaluate, export_onnx, grpo, tune_sft
from components._image import IMAGE_TRAIN
from pipelines.platform import (
    DEFAULT_GPU_NODE_SELECTOR,
    DEFAULT_GPU_TOLERATIONS,
    DEFAULT_GPU_TYPE,
    DEFAULT_PIPELINE_CONFIG,
    DEFAULT_S3_SECRET,
    DEFAULT_STATE_SECRET,
    NETWORK_RETRIES,
    STATE_URL_KEY,
    Cluster,
    Gpus,
    configure_step,
    expose_pod,
)

TRAINING_PIPELINE = "labelmatch-training"
#: Longest a training step (tune, GRPO) may run before Kubernetes stops its pod. The tune step
#: gets it as ``deadline_s`` and ends its RayJob 30 minutes before.
TUNE_TIMEOUT_S = 24 * 3600


@dsl.pipeline(name="labelmatch-ship", description="Deploy an accepted OnnxModel and record the release.")
def ship(
    onnx_model: Input[Model],
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    deploy_strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
    state_secret: str = DEFAULT_STATE_SECRET,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    deploy_cpu: str = "1",
    deploy_memory: str = "2Gi",
):
    """Deploy ``onnx_model`` (the artifact the gate accepted, unchanged)."""
    deployed = deploy(
        onnx_model=onnx_model,
        target=deploy_target,
        service=service,
        namespace=namespace,
        release_root=release_root,
        strategy=deploy_strategy,
        canary_rules=canary_rules,
        shadow_window_s=shadow_window_s,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
    ).set_caching_options(False)  # a side effect: always run
    configure_step(deployed, "deploy", Cluster(s3_secret, pipeline_config), deploy_cpu, deploy_memory,
                   retries=NETWORK_RETRIES)
    # canary/shadow read and write the serving state; a replace deploy needs none (optional).
    kubernetes.use_secret_as_env(deployed, state_secret, {STATE_URL_KEY: "LABELMATCH_STATE_URL"},
                                 optional=True)


@dsl.pipeline(
    name="labelmatch-release", description="Export a candidate, gate it as served, ship it when it passes."
)
def release(
    candidate: Input[Model],
    dataset: Input[Dataset],
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    max_micro_regression: float = 0.01,
    export_agreement_gate: float = 0.98,
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    deploy_strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
    state_secret: str = DEFAULT_STATE_SECRET,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    evaluate_cpu: str = "2",
    evaluate_memory: str = "8Gi",
    export_cpu: str = "4",
    export_memory: str = "16Gi",
    deploy_cpu: str = "1",
    deploy_memory: str = "2Gi",
):
    """Export ``candidate``; gate the exported model, as served, against what serves now; ship it."""
    cluster = Cluster(s3_secret, pipeline_config)
    exported = export_onnx(model=candidate, dataset=dataset, agreement_gate=export_agreement_gate)
    configure_step(exported, "export", cluster, export_cpu, export_memory)
    evaluation = evaluate(
        model=exported.outputs["onnx_model"],
        dataset=dataset,
        serving_model_uri=serving_model_uri,
        min_improvement=min_improvement,
        max_label_regression=max_label_regression,
        max_micro_regression=max_micro_regression,
        service=service,
        release_root=release_root,
    )
    # The serving model behind serving_model_uri changes without the URI changing: never reuse a verdict.
    evaluation.set_caching_options(False)
    configure_step(evaluation, "evaluate", cluster, evaluate_cpu, evaluate_memory, retries=NETWORK_RETRIES)
    with dsl.If(evaluation.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
        ship(
            onnx_model=exported.outputs["onnx_model"],
            deploy_target=deploy_target,
            service=service,
            namespace=namespace,
            release_root=release_root,
            deploy_strategy=deploy_strategy,
            canary_rules=canary_rules,
            shadow_window_s=shadow_window_s,
            state_secret=state_secret,
            s3_secret=s3_secret,
            pipeline_config=pipeline_config,
            deploy_cpu=deploy_cpu,
            deploy_memory=deploy_memory,
        )


@dsl.pipeline(
    name="labelmatch-improve", description="GRPO on user feedback, then evaluate, gate and ship the result."
)
def improve_and_release(
    sft_model: Input[Model],
    dataset: Input[Dataset],
    feedback_uri: str,
    grpo_epochs: int = 3,
    grpo_steps: int = 0,
    grpo_max_principal_share: float = 0.25,
    grpo_replay_kl_weight: float = 1.0,
    grpo_replay_bce_weight: float = 0.5,
    seed: int = 0,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    gpu_type: str = DEFAULT_GPU_TYPE,
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
    grpo_gpus: str = "1",
    grpo_cpu: str = "4",
    grpo_memory: str = "24Gi",
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    max_micro_regression: float = 0.01,
    export_agreement_gate: float = 0.98,
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    deploy_strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
    state_secret: str = DEFAULT_STATE_SECRET,
    evaluate_cpu: str = "2",
    evaluate_memory: str = "8Gi",
    export_cpu: str = "4",
    export_memory: str = "16Gi",
    deploy_cpu: str = "1",
    deploy_memory: str = "2Gi",
):
    """Refine ``sft_model`` with GRPO on the feedback at ``feedback_uri``, then release the result."""
    feedback = dsl.importer(
        artifact_uri=feedback_uri,
        artifact_class=dsl.Artifact,
        reimport=False,
        metadata={"kind": "FeedbackExport"},
    )
    improved = grpo(
        sft_model=sft_model,
        feedback=feedback.output,
        dataset=dataset,
        epochs=grpo_epochs,
        steps=grpo_steps,
        max_principal_share=grpo_max_principal_share,
        replay_kl_weight=grpo_replay_kl_weight,
        replay_bce_weight=grpo_replay_bce_weight,
        seed=seed,
    )
    # feedback_uri names a FeedbackExport that `labelmatch feedback export --out` replaces in place, and
    # the importer (reimport=False) hands every run that names the URI the same artifact, so KFP's
    # cache key would not change with the feedback: never serve a cached GRPO model.
    improved.set_caching_options(False)
    gpus = Gpus(grpo_gpus, gpu_type, gpu_node_selector, gpu_tolerations)
    configure_step(improved, "grpo", Cluster(s3_secret, pipeline_config), grpo_cpu, grpo_memory,
                   timeout_s=TUNE_TIMEOUT_S, gpus=gpus)
    release(
        candidate=improved.outputs["model"],
        dataset=dataset,
        serving_model_uri=serving_model_uri,
        min_improvement=min_improvement,
        max_label_regression=max_label_regression,
        max_micro_regression=max_micro_regression,
        export_agreement_gate=export_agreement_gate,
        deploy_target=deploy_target,
        service=service,
        namespace=namespace,
        release_root=release_root,
        deploy_strategy=deploy_strategy,
        canary_rules=canary_rules,
        shadow_window_s=shadow_window_s,
        state_secret=state_secret,
        s3_secret=s3_secret,
        pipeline_config=pipeline_config,
        evaluate_cpu=evaluate_cpu,
        evaluate_memory=evaluate_memory,
        export_cpu=export_cpu,
        export_memory=export_memory,
        deploy_cpu=deploy_cpu,
        deploy_memory=deploy_memory,
    )


@dsl.pipeline(
    name=TRAINING_PIPELINE,
    description="Train, tune, improve from feedback, evaluate, gate and deploy a labelmatch classifier.",
)
def training_pipeline(
    data_uri: str,
    labels_uri: str = "",
    base_model: str = "bundled:minilm",
    redact_pii: bool = True,
    trials: int = 4,
    iterations: int = 8,
    steps_per_iteration: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: float = 1.0,
    tune_backend: str = "local",
    tune_storage_uri: str = "",
    ray_address: str = "",
    ray_num_cpus: int = 0,
    ray_temp_dir: str = "",
    rayjob_image: str = IMAGE_TRAIN,
    rayjob_namespace: str = "",
    rayjob_workers: int = 4,
    rayjob_gpus_per_worker: int = 1,
    rayjob_worker_cpu: str = "6",
    rayjob_worker_memory: str = "24Gi",
    feedback_uri: str = "",
    grpo_epochs: int = 3,
    grpo_steps: int = 0,
    grpo_max_principal_share: float = 0.25,
    grpo_replay_kl_weight: float = 1.0,
    grpo_replay_bce_weight: float = 0.5,
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    max_micro_regression: float = 0.01,
    export_agreement_gate: float = 0.98,
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    deploy_strategy: str = "replace",
    canary_rules: str = "",
    shadow_window_s: float = 600.0,
    state_secret: str = DEFAULT_STATE_SECRET,
    seed: int = 0,
    s3_secret: str = DEFAULT_S3_SECRET,
    pipeline_config: str = DEFAULT_PIPELINE_CONFIG,
    gpu_type: str = DEFAULT_GPU_TYPE,
    gpu_node_selector: dict = DEFAULT_GPU_NODE_SELECTOR,
    gpu_tolerations: list = DEFAULT_GPU_TOLERATIONS,
    grpo_gpus: str = "1",
    prep_cpu: str = "1",
    prep_memory: str = "4Gi",
    tune_cpu: str = "2",
    tune_memory: str = "12Gi",
    grpo_cpu: str = "4",
    grpo_memory: str = "24Gi",
    evaluate_cpu: str = "2",
    evaluate_memory: str = "8Gi",
    export_cpu: str = "4",
    export_memory: str = "16Gi",
    deploy_cpu: str = "1",
    deploy_memory: str = "2Gi",
):
    """The labelmatch training pipeline.

    Args:
        data_uri: Input documents: a directory (or ``s3://bucket/prefix``) with ``docs.jsonl``
            (+ ``labels.json``), or one ``.jsonl`` file (or its ``s3://`` key), in the normalised
            or pair format.
        labels_uri: ``labels.json`` (path or ``s3://``); empty: the one beside the data.
        base_model: Encoder (``bundled:minilm``, a directory, ``s3://`` Encoder artifact, a hub id).
        redact_pii: Redact PII in ``data_prep``.
        trials: PBT population size (how many points of the search space are explored).
        iterations: Training iterations per trial.
        steps_per_iteration: Steps between PBT decisions.
        batch_size: Documents per training step.
        max_length: Tokens per text.
        gpus_per_trial: GPUs per tuning trial; 0: with the ``rayjob`` backend, one worker's GPUs
            (``rayjob_gpus_per_worker``: one trial per GPU worker), none with the other backends.
        cpus_per_trial: CPUs per tuning trial.
        tune_backend: Where trials run: ``local`` (a Ray inside the step; kfp.local and the
            demo), ``ray`` (the cluster at ``ray_address``), ``rayjob`` (a KubeRay RayJob the step
            creates, follows and deletes: the production path).
        tune_storage_uri: Tune checkpoints and experiment state; ``s3://`` for ``ray`` and
            ``rayjob`` (empty: ``<LABELMATCH_STORE_ROOT>/tune/<run id>``).
        ray_address: Ray cluster of the ``ray`` backend (``ray://head:10001``).
        ray_num_cpus: CPUs of a local Ray (0: all).
        ray_temp_dir: Session directory of a local Ray (empty: Ray's default).
        rayjob_image: Image of the RayJob's head and workers (default: this release's train image).
        rayjob_namespace: Namespace of the RayJob (empty: the step's own).
        rayjob_workers: GPU worker pods of the RayJob.
        rayjob_gpus_per_worker: GPUs per worker pod.
        rayjob_worker_cpu: CPU request = limit per worker pod.
        rayjob_worker_memory: Memory request = limit per worker pod.
        feedback_uri: A FeedbackExport artifact; when given, GRPO refines the tuned model.
        grpo_epochs: GRPO passes over the feedback.
        grpo_steps: Exact GRPO steps (0: from ``grpo_epochs``).
        grpo_max_principal_share: Largest share of a GRPO run's feedback weight one principal may
            carry (1.0: no cap); against one principal flooding the feedback.
        grpo_replay_kl_weight: GRPO's KL to the SFT model on replayed training documents (0: off).
        grpo_replay_bce_weight: GRPO's BCE on replayed training documents with their labels (0: off).
        serving_model_uri: The artifact serving now (gate baseline, scored as served); empty: the
            latest release of ``service`` in the release log, or none.
        min_improvement: Macro-F1 gain the candidate needs over the serving model.
        max_label_regression: Largest allowed per-label F1 drop.
        max_micro_regression: Largest allowed micro-F1 drop against the serving model (0.01: one point).
        export_agreement_gate: Least share of validation documents whose served ONNX label set
            (int8, or int8 with its fp32 fallback near decision boundaries) must equal torch's for
            the export to pass.
        deploy_target: ``kserve`` (InferenceService + release record) or ``local`` (model server
            on 127.0.0.1, smoke-tested, stopped).
        service: InferenceService name.
        namespace: Its namespace.
        release_root: ``s3://bucket/prefix`` of the release records (empty:
            ``LABELMATCH_STORE_ROOT`` from the pipeline ConfigMap).
        deploy_strategy: ``replace`` (all traffic at once; the default until a platform team opts
            in), ``canary`` (a share, watched on its live signals, promoted or rolled back) or
            ``shadow`` (a copy of live traffic, answers logged); docs/cluster.md.
        canary_rules: The canary's rules file (``s3://`` URI) or a JSON object; empty: the defaults.
        shadow_window_s: Seconds a shadow gets a copy of the live traffic.
        state_secret: Secret holding the serving state's SQLAlchemy URL under key ``url`` (the
            serving chart's; canary and shadow deploys read and write it; optional).
        seed: Seed of split, tuning and GRPO.
        s3_secret: Secret holding ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` (every step,
            and the RayJob's pods).
        pipeline_config: ConfigMap holding ``LABELMATCH_S3_ENDPOINT``, ``LABELMATCH_S3_REGION``,
            ``LABELMATCH_STORE_ROOT`` (``charts/labelmatch-pipelines`` creates it).
        gpu_type: Accelerator resource of GPU steps and RayJob workers (empty: GRPO on CPU).
        gpu_node_selector: Node selector of the GPU pool (GRPO and RayJob workers).
        gpu_tolerations: Tolerations of the GPU pool's taints.
        grpo_gpus: GPUs of the GRPO step (empty: CPU).
        prep_cpu: CPU of ``data_prep`` (request = limit).
        prep_memory: Memory of ``data_prep``.
        tune_cpu: CPU of the tune step (with ``rayjob`` it only submits and waits).
        tune_memory: Memory of the tune step. With the ``local`` backend its trials run in the pod:
            bge-m3 measured 3.9 GB per trial (``make bench-production-shape``), 8.8 GB for 2.
        grpo_cpu: CPU of GRPO.
        grpo_memory: Memory of GRPO.
        evaluate_cpu: CPU of ``evaluate``.
        evaluate_memory: Memory of ``evaluate``.
        export_cpu: CPU of ``export_onnx``.
        export_memory: Memory of ``export_onnx`` (bge-m3 needs about 16 GiB).
        deploy_cpu: CPU of ``deploy``.
        deploy_memory: Memory of ``deploy``.
    """
    cluster = Cluster(s3_secret, pipeline_config)
    prep = data_prep(data_uri=data_uri, labels_uri=labels_uri, redact_pii=redact_pii, seed=seed)
    # The URI's content can change while the URI stays: never serve a cached Dataset.
    prep.set_caching_options(False)
    configure_step(prep, "data_prep", cluster, prep_cpu, prep_memory, retries=NETWORK_RETRIES)
    tuned = tune_sft(
        dataset=prep.outputs["dataset"],
        base_model=base_model,
        trials=trials,
        iterations=iterations,
        steps_per_iteration=steps_per_iteration,
        batch_size=batch_size,
        max_length=max_length,
        gpus_per_trial=gpus_per_trial,
        cpus_per_trial=cpus_per_trial,
        backend=tune_backend,
        storage_uri=tune_storage_uri,
        ray_address=ray_address,
        num_cpus=ray_num_cpus,
        ray_temp_dir=ray_temp_dir,
        rayjob_image=rayjob_image,
        rayjob_namespace=rayjob_namespace,
        rayjob_workers=rayjob_workers,
        rayjob_gpus_per_worker=rayjob_gpus_per_worker,
        rayjob_worker_cpu=rayjob_worker_cpu,
        rayjob_worker_memory=rayjob_worker_memory,
        rayjob_gpu_type=gpu_type,
        rayjob_node_selector=gpu_node_selector,
        rayjob_tolerations=gpu_tolerations,
        rayjob_s3_secret=s3_secret,
        rayjob_config_map=pipeline_config,
        run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        deadline_s=TUNE_TIMEOUT_S,
        seed=seed,
    )
    configure_step(tuned, "tune_sft", cluster, tune_cpu, tune_memory, timeout_s=TUNE_TIMEOUT_S)
    expose_pod(tuned)  # the RayJob's ownerReference
    release_settings = {
        "dataset": prep.outputs["dataset"],
        "serving_model_uri": serving_model_uri,
        "min_improvement": min_improvement,
        "max_label_regression": max_label_regression,
        "max_micro_regression": max_micro_regression,
        "export_agreement_gate": export_agreement_gate,
        "deploy_target": deploy_target,
        "service": service,
        "namespace": namespace,
        "release_root": release_root,
        "deploy_strategy": deploy_strategy,
        "canary_rules": canary_rules,
        "shadow_window_s": shadow_window_s,
        "state_secret": state_secret,
        "s3_secret": s3_secret,
        "pipeline_config": pipeline_config,
        "evaluate_cpu": evaluate_cpu,
        "evaluate_memory": evaluate_memory,
        "export_cpu": export_cpu,
        "export_memory": export_memory,
        "deploy_cpu": deploy_cpu,
        "deploy_memory": deploy_memory,
    }
    with dsl.If(feedback_uri != "", name="with-feedback"):
        improve_and_release(
            sft_model=tuned.outputs["model"],
            feedback_uri=feedback_uri,
            grpo_epochs=grpo_epochs,
            grpo_steps=grpo_steps,
            grpo_max_principal_share=grpo_max_principal_share,
            grpo_replay_kl_weight=grpo_replay_kl_weight,
            grpo_replay_bce_weight=grpo_replay_bce_weight,
            seed=seed,
            gpu_type=gpu_type,
            gpu_node_selector=gpu_node_selector,
            gpu_tolerations=gpu_tolerations,
            grpo_gpus=grpo_gpus,
            grpo_cpu=grpo_cpu,
            grpo_memory=grpo_memory,
            **release_settings,
        )
    with dsl.Else(name="without-feedback"):
        release(candidate=tuned.outputs["model"], **release_settings)
