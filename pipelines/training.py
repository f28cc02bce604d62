"""The training pipeline: ``data_prep → tune_sft → grpo (with feedback) → evaluate → gate → export → deploy``.

``kfp.local`` in kfp 2.17.0 runs ``dsl.If``/``dsl.Else`` and nested pipelines but not
``dsl.OneOf`` (it fails with "Expected 1 artifact in ArtifactSelectorSpec"), so the candidate
is not merged from the two branches; instead each branch calls the same ``release`` sub-pipeline
(evaluate → ``dsl.If(deploy)`` → export → deploy) with its own candidate.
"""

from kfp import dsl
from kfp.dsl import Dataset, Input, Model

from components import data_prep, deploy, evaluate, export_onnx, grpo, tune_sft

TRAINING_PIPELINE = "labelmatch-training"


@dsl.pipeline(
    name="labelmatch-release", description="Evaluate a candidate, gate it, and ship it when it passes."
)
def release(
    candidate: Input[Model],
    dataset: Input[Dataset],
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    export_agreement_gate: float = 0.98,
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
):
    """Evaluate ``candidate`` against the serving model; when the gate passes, export and deploy it."""
    evaluation = evaluate(
        model=candidate,
        dataset=dataset,
        serving_model_uri=serving_model_uri,
        min_improvement=min_improvement,
        max_label_regression=max_label_regression,
    )
    # The serving model behind serving_model_uri changes without the URI changing: never reuse a verdict.
    evaluation.set_caching_options(False)
    with dsl.If(evaluation.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 (a KFP condition)
        exported = export_onnx(model=candidate, dataset=dataset, agreement_gate=export_agreement_gate)
        deploy(
            onnx_model=exported.outputs["onnx_model"],
            target=deploy_target,
            service=service,
            namespace=namespace,
            release_root=release_root,
            run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER,
        ).set_caching_options(False)  # a side effect: always run


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
    ray_address: str = "",
    ray_num_cpus: int = 0,
    ray_temp_dir: str = "",
    feedback_uri: str = "",
    grpo_epochs: int = 3,
    grpo_steps: int = 0,
    serving_model_uri: str = "",
    min_improvement: float = 0.02,
    max_label_regression: float = 0.05,
    export_agreement_gate: float = 0.98,
    deploy_target: str = "kserve",
    service: str = "labelmatch",
    namespace: str = "default",
    release_root: str = "",
    seed: int = 0,
):
    """The labelmatch training pipeline.

    Args:
        data_uri: Input documents: a directory with ``docs.jsonl`` (+ ``labels.json``) or a
            ``.jsonl`` file (normalised or pair format).
        labels_uri: ``labels.json``; empty: the one beside the data.
        base_model: Encoder (``bundled:minilm``, a directory, a hub id such as ``BAAI/bge-m3``).
        redact_pii: Redact PII in ``data_prep``.
        trials: PBT population size (how many points of the search space are explored).
        iterations: Training iterations per trial.
        steps_per_iteration: Steps between PBT decisions.
        batch_size: Documents per training step.
        max_length: Tokens per text.
        gpus_per_trial: GPUs per tuning trial.
        cpus_per_trial: CPUs per tuning trial.
        ray_address: Ray cluster for tuning; empty: a local Ray on 127.0.0.1.
        ray_num_cpus: CPUs of a local Ray (0: all).
        ray_temp_dir: Session directory of a local Ray (empty: Ray's default).
        feedback_uri: A FeedbackExport artifact; when given, GRPO refines the tuned model.
        grpo_epochs: GRPO passes over the feedback.
        grpo_steps: Exact GRPO steps (0: from ``grpo_epochs``).
        serving_model_uri: The Model artifact serving now (gate baseline); empty: none.
        min_improvement: Macro-F1 gain the candidate needs over the serving model.
        max_label_regression: Largest allowed per-label F1 drop.
        export_agreement_gate: Least share of validation documents whose served ONNX label set
            (int8, or int8 with its fp32 fallback near decision boundaries) must equal torch's for
            the export to pass.
        deploy_target: ``kserve`` (InferenceService + release record) or ``local`` (model server
            on 127.0.0.1, smoke-tested, stopped).
        service: InferenceService name.
        namespace: Its namespace.
        release_root: ``s3://bucket/prefix`` of the release records (``kserve``).
        seed: Seed of split, tuning and GRPO.
    """
    prep = data_prep(data_uri=data_uri, labels_uri=labels_uri, redact_pii=redact_pii, seed=seed)
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
        ray_address=ray_address,
        num_cpus=ray_num_cpus,
        ray_temp_dir=ray_temp_dir,
        seed=seed,
    )
    release_settings = {
        "dataset": prep.outputs["dataset"],
        "serving_model_uri": serving_model_uri,
        "min_improvement": min_improvement,
        "max_label_regression": max_label_regression,
        "export_agreement_gate": export_agreement_gate,
        "deploy_target": deploy_target,
        "service": service,
        "namespace": namespace,
        "release_root": release_root,
    }
    with dsl.If(feedback_uri != "", name="with-feedback"):
        feedback = dsl.importer(
            artifact_uri=feedback_uri,
            artifact_class=dsl.Artifact,
            reimport=False,
            metadata={"kind": "FeedbackExport"},
        )
        improved = grpo(
            sft_model=tuned.outputs["model"],
            feedback=feedback.output,
            dataset=prep.outputs["dataset"],
            epochs=grpo_epochs,
            steps=grpo_steps,
            seed=seed,
        )
        release(candidate=improved.outputs["model"], **release_settings)
    with dsl.Else(name="without-feedback"):
        release(candidate=tuned.outputs["model"], **release_settings)
