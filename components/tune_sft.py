"""The ``tune_sft`` component: Population Based Training of LoRA SFT on Ray, best Model out."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import IMAGE_TRAIN


@dsl.component(base_image=IMAGE_TRAIN, packages_to_install=[], install_kfp_package=False)
def tune_sft(
    dataset: Input[Dataset],
    model: Output[Model],
    metrics: Output[Metrics],
    report: Output[Artifact],
    report_page: Output[Markdown],
    base_model: str = "bundled:minilm",
    trials: int = 4,
    iterations: int = 8,
    steps_per_iteration: int = 20,
    batch_size: int = 16,
    max_length: int = 128,
    gpus_per_trial: float = 0.0,
    cpus_per_trial: float = 1.0,
    backend: str = "local",
    storage_uri: str = "",
    ray_address: str = "",
    num_cpus: int = 0,
    ray_temp_dir: str = "",
    rayjob_image: str = "",
    rayjob_namespace: str = "",
    rayjob_workers: int = 4,
    rayjob_gpus_per_worker: int = 1,
    rayjob_worker_cpu: str = "6",
    rayjob_worker_memory: str = "24Gi",
    rayjob_gpu_type: str = "nvidia.com/gpu",
    rayjob_node_selector: dict = {},  # noqa: B006 (a KFP default, never mutated)
    rayjob_tolerations: list = [],  # noqa: B006
    rayjob_s3_secret: str = "",
    rayjob_config_map: str = "",
    run_id: str = "",
    deadline_s: int = 0,
    seed: int = 0,
) -> float:
    """Tune SFT hyper-parameters with Ray Tune PBT and write the best trial's model.

    Calls :func:`labelmatch.stages.tune.run_tune_step`: trials run on a Ray started in this step
    (``local``, bound to 127.0.0.1), on the Ray cluster at ``ray_address`` (``ray``), or on a
    KubeRay RayJob this step creates, follows (status lines in this log) and deletes
    (``rayjob``), with checkpoints in the store. The RayJob is named for this run, owned by this
    pod when ``POD_NAME``/``POD_UID`` are set (the pipeline sets them), ends inside
    ``deadline_s``, and is deleted on SIGTERM.

    Args:
        dataset: Input Dataset artifact (from ``data_prep``), with train/val/test splits;
            verified against its manifest first.
        model: Output Model artifact of the best checkpoint (LoRA adapter, label embeddings,
            thresholds tuned on validation, ``labelmatch.json`` with the PBT history).
        metrics: Output KFP metrics: ``best_val_macro_f1``, ``exploits``, ``trials``.
        report: Output Report artifact: ``report.md``, ``pbt_history.png``/``.json``, ``summary.json``.
        report_page: Output Markdown page (the report with its plot inlined) for the KFP UI.
        base_model: Encoder: ``bundled:minilm``, a local Hugging Face directory, an ``s3://``
            Encoder artifact or a hub id.
        trials: Population size (the search space is sampled once per trial).
        iterations: Training iterations per trial (each ``steps_per_iteration`` steps + validation).
        steps_per_iteration: Optimisation steps between PBT decisions.
        batch_size: Documents per step.
        max_length: Tokens per text.
        gpus_per_trial: GPUs each trial requests from Ray; 0: with the ``rayjob`` backend, one
            worker's GPUs (``rayjob_gpus_per_worker``, one trial per GPU worker; derived by
            :func:`labelmatch.stages.tune.rayjob_trial_resources`), none otherwise (CPU).
        cpus_per_trial: CPUs each trial requests from Ray.
        backend: ``local``, ``ray`` or ``rayjob``.
        storage_uri: Tune storage; ``s3://`` for ``ray``/``rayjob`` (empty:
            ``<LABELMATCH_STORE_ROOT>/tune/<run_id>``).
        ray_address: The Ray cluster of the ``ray`` backend (``ray://head:10001``).
        num_cpus: CPUs of a local Ray (0: all of the machine).
        ray_temp_dir: Session directory of a local Ray (empty: Ray's default); keep it short,
            Ray's socket paths must fit in 107 characters.
        rayjob_image: Image of the RayJob's pods (labelmatch with the ``tune`` extra); the
            training pipeline passes its own release's train image.
        rayjob_namespace: Namespace of the RayJob (empty: this step's namespace).
        rayjob_workers: Worker pods.
        rayjob_gpus_per_worker: GPUs per worker pod.
        rayjob_worker_cpu: CPU request = limit per worker pod.
        rayjob_worker_memory: Memory request = limit per worker pod.
        rayjob_gpu_type: GPU resource name of the workers.
        rayjob_node_selector: Node selector of the worker pods (the GPU pool).
        rayjob_tolerations: Tolerations of the worker pods.
        rayjob_s3_secret: Secret with the S3 credentials, as environment of every RayJob pod.
        rayjob_config_map: ConfigMap with the S3 endpoint and store root, as environment too.
        run_id: The pipeline run (names the RayJob and the storage folder).
        deadline_s: This step pod's ``activeDeadlineSeconds`` (the pipeline passes its own): the
            RayJob and the wait for it end 30 minutes before it. 0: no deadline.
        seed: Seed of the population, the PBT decisions and the trainers.

    Returns:
        The best validation macro-F1.
    """
    from labelmatch.core.artifacts import verify_artifact
    from labelmatch.evaluation.report import write_report_page
    from labelmatch.stages.tune import TuneStepConfig, run_tune_step
    from labelmatch.training.config import TrainConfig
    from labelmatch.tuning.pbt import TuneConfig

    verify_artifact(dataset.path, "Dataset")
    resources = {"CPU": cpus_per_trial, **({"GPU": gpus_per_trial} if gpus_per_trial > 0 else {})}
    train = TrainConfig(
        base_model=base_model,
        steps_per_iteration=steps_per_iteration,
        batch_size=batch_size,
        max_length=max_length,
        seed=seed,
        progress=False,
    )
    config = TuneConfig(
        trials=trials,
        iterations=iterations,
        resources_per_trial=resources,
        num_cpus=num_cpus or None,
        ray_temp_dir=ray_temp_dir or None,
        seed=seed,
        verbose=0,
        train_config=train,
    )
    step = TuneStepConfig.from_parameters(
        backend=backend,
        ray_address=ray_address,
        storage_uri=storage_uri,
        run_id=run_id,
        deadline_s=deadline_s,
        rayjob_image=rayjob_image,
        rayjob_namespace=rayjob_namespace,
        rayjob_workers=rayjob_workers,
        rayjob_gpus_per_worker=rayjob_gpus_per_worker,
        rayjob_worker_cpu=rayjob_worker_cpu,
        rayjob_worker_memory=rayjob_worker_memory,
        rayjob_gpu_type=rayjob_gpu_type,
        rayjob_node_selector=rayjob_node_selector,
        rayjob_tolerations=rayjob_tolerations,
        rayjob_s3_secret=rayjob_s3_secret,
        rayjob_config_map=rayjob_config_map,
    )
    summary = run_tune_step(dataset.path, model.path, report.path, config, step)
    for name in ("best_val_macro_f1", "exploits", "trials"):
        metrics.log_metric(name, summary[name])
    model.metadata.update({"kind": "Model", "best_val_macro_f1": summary["best_val_macro_f1"]})
    write_report_page(report.path, report_page.path)
    return float(summary["best_val_macro_f1"])
