"""The ``tune_sft`` component: Population Based Training of LoRA SFT on Ray, best Model out."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output

from components._image import IMAGE


@dsl.component(base_image=IMAGE, packages_to_install=[], install_kfp_package=False)
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
    ray_address: str = "",
    num_cpus: int = 0,
    ray_temp_dir: str = "",
    seed: int = 0,
) -> float:
    """Tune SFT hyper-parameters with Ray Tune PBT and write the best trial's model.

    Calls :func:`labelmatch.tune.tune_sft`. Trials run on the Ray cluster at ``ray_address``
    (KubeRay in a cluster) or, when empty, on a local Ray bound to 127.0.0.1.

    Args:
        dataset: Input Dataset artifact (from ``data_prep``), with train/val/test splits;
            verified against its manifest first.
        model: Output Model artifact of the best checkpoint (LoRA adapter, label embeddings,
            thresholds tuned on validation, ``labelmatch.json`` with the PBT history).
        metrics: Output KFP metrics: ``best_val_macro_f1``, ``exploits``, ``trials``.
        report: Output Report artifact: ``report.md``, ``pbt_history.png``/``.json``, ``summary.json``.
        report_page: Output Markdown page (the report with its plot inlined) for the KFP UI.
        base_model: Encoder: ``bundled:minilm``, a local Hugging Face directory or a hub id.
        trials: Population size (the search space is sampled once per trial).
        iterations: Training iterations per trial (each ``steps_per_iteration`` steps + validation).
        steps_per_iteration: Optimisation steps between PBT decisions.
        batch_size: Documents per step.
        max_length: Tokens per text.
        gpus_per_trial: GPUs each trial requests from Ray (0 on CPU).
        cpus_per_trial: CPUs each trial requests from Ray.
        ray_address: Existing Ray cluster (``ray://head:10001``, ``auto``); empty: local Ray.
        num_cpus: CPUs of a local Ray (0: all of the machine).
        ray_temp_dir: Session directory of a local Ray (empty: Ray's default); keep it short,
            Ray's socket paths must fit in 107 characters.
        seed: Seed of the population, the PBT decisions and the trainers.

    Returns:
        The best validation macro-F1.
    """
    from labelmatch.artifacts import verify_artifact
    from labelmatch.config import TrainConfig
    from labelmatch.report import write_report_page
    from labelmatch.tune import TuneConfig, tune_sft

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
        address=ray_address or None,
        num_cpus=num_cpus or None,
        ray_temp_dir=ray_temp_dir or None,
        seed=seed,
        verbose=0,
        train_config=train,
    )
    summary = tune_sft(dataset.path, model.path, report.path, config)
    for name in ("best_val_macro_f1", "exploits", "trials"):
        metrics.log_metric(name, summary[name])
    model.metadata.update({"kind": "Model", "best_val_macro_f1": summary["best_val_macro_f1"]})
    write_report_page(report.path, report_page.path)
    return float(summary["best_val_macro_f1"])
