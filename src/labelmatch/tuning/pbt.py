"""Hyper-parameter search: Ray Tune Population Based Training (PBT) over SFT trials.

:func:`tune_sft` is the one-call API behind ``labelmatch tune`` and the pipeline's tuning step:
it loads a Dataset, runs PBT (or random search, the baseline) over
:func:`labelmatch.tuning.trainable.sft_trainable`, writes the best checkpoint (by validation
macro-F1, never by loss) as a Model artifact with the whole PBT history in its
``labelmatch.json`` (key ``pbt``), and writes a report (PNG + Markdown) next to it.

Where it runs: a local Ray started here (bound to 127.0.0.1, no dashboard unless asked), an
existing cluster (``address``: ``auto`` or ``ray://host:10001``), or — through
:mod:`labelmatch.tuning.rayjob` — a KubeRay RayJob whose entrypoint calls this function.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from labelmatch.core.errors import ConfigError
from labelmatch.data.dataset import Dataset
from labelmatch.platform.ray_local import ray_session
from labelmatch.training.config import TrainConfig
from labelmatch.tuning.search_space import MUTATED, ClipToBounds, SearchSpace

METRIC = "val_macro_f1"


@dataclass
class TuneConfig:
    """Settings of a tuning run, validated before any trial starts.

    Attributes:
        trials: Population size (PBT needs at least 2: the bottom copies the top).
        iterations: Training iterations per trial; one iteration is
            ``train_config.steps_per_iteration`` steps (or an epoch) followed by a validation.
        perturbation_interval: PBT exploits/explores every this many iterations.
        scheduler: ``pbt`` or ``random`` (random search: same initial population, no exploit;
            the baseline of ``make bench-tune``).
        quantile_fraction: Share of the population that copies (bottom) and is copied (top).
        resample_probability: Chance that explore redraws a value instead of scaling it by 0.8/1.2.
        synch: Synchronous PBT (all trials wait at each perturbation point); reproducible
            but idles resources, so off by default.
        search_space: Ranges of the tuned hyper-parameters (:class:`SearchSpace`).
        resources_per_trial: Ray resources of one trial, e.g. ``{"CPU": 1}`` locally,
            ``{"GPU": 1, "CPU": 4}`` on a cluster of 1-GPU workers.
        address: Existing Ray cluster (``auto``, ``ray://host:10001``); ``None`` starts a local Ray.
        num_cpus: CPUs of the local Ray (``None``: all).
        dashboard: Start the Ray dashboard with the local Ray (bound to 127.0.0.1).
        ray_temp_dir: Temp/session directory of the local Ray (``None``: Ray's default).
        storage_path: Where Tune writes trial results and checkpoints: a directory or
            ``s3://bucket/prefix`` (required for multi-node runs); ``None``: ``ray_results``
            beside the report directory.
        s3_endpoint: S3 endpoint override (MinIO), e.g. ``http://minio:9000``.
        name: Experiment name (a folder under ``storage_path``).
        resume: Continue the interrupted experiment at ``storage_path/name`` (``Tuner.restore``).
        max_failures: Retries of a crashed trial from its last checkpoint (-1: unlimited).
        keep_checkpoints: Checkpoints kept per trial (``None``: all). PBT restores a top trial's
            latest checkpoint into others; keeping too few makes such restores fail.
        seed: Seed of the initial population, the PBT decisions and the trainers.
        val_fraction: Validation share when the dataset has no ``val`` split.
        test_fraction: Test share when the dataset has no split at all.
        verbose: Ray Tune console verbosity (0–3).
        reuse_actors: Keep trial processes alive across PBT pauses and exploits (no re-import of
            torch and transformers per restart; the trainer itself is rebuilt from the checkpoint).
        train_config: Base :class:`TrainConfig` of every trial (tuned fields are overwritten).
    """

    trials: int = 4
    iterations: int = 8
    perturbation_interval: int = 1
    scheduler: Literal["pbt", "random"] = "pbt"
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    synch: bool = False
    search_space: SearchSpace = field(default_factory=SearchSpace)
    resources_per_trial: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    address: str | None = None
    num_cpus: int | None = None
    dashboard: bool = False
    ray_temp_dir: str | None = None
    storage_path: str | None = None
    s3_endpoint: str | None = None
    name: str = "labelmatch-tune"
    resume: bool = False
    max_failures: int = 1
    keep_checkpoints: int | None = None
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    verbose: int = 1
    reuse_actors: bool = True
    train_config: TrainConfig = field(default_factory=lambda: TrainConfig(steps_per_iteration=20))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid setting."""
        if self.scheduler not in ("pbt", "random"):
            raise ConfigError(f"TuneConfig.scheduler must be 'pbt' or 'random', got {self.scheduler!r}")
        if self.trials < (2 if self.scheduler == "pbt" else 1):
            raise ConfigError(
                f"PBT needs at least 2 trials (the bottom copies the top), got trials={self.trials}"
            )
        if self.iterations < 1 or self.perturbation_interval < 1:
            raise ConfigError("TuneConfig.iterations and perturbation_interval must be >= 1")
        if not 0.0 < self.quantile_fraction <= 0.5:
            raise ConfigError(
                f"TuneConfig.quantile_fraction must be in (0, 0.5], got {self.quantile_fraction}"
            )
        if not 0.0 <= self.resample_probability <= 1.0:
            raise ConfigError(
                f"TuneConfig.resample_probability must be in [0, 1], got {self.resample_probability}"
            )
        if not self.resources_per_trial or any(
            not isinstance(v, int | float) or v < 0 for v in self.resources_per_trial.values()
        ):
            raise ConfigError(
                f"TuneConfig.resources_per_trial must map resource names to numbers >= 0, "
                f"got {self.resources_per_trial!r}"
            )
        if self.max_failures < -1:
            raise ConfigError(f"TuneConfig.max_failures must be >= -1, got {self.max_failures}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 3:
            raise ConfigError(
                "TuneConfig.keep_checkpoints must be None (all) or >= 3: PBT restores "
                "checkpoints of other trials, deleting them early makes restores fail"
            )
        if self.address and self.address.startswith(("http://", "https://")):
            raise ConfigError(
                f"address {self.address} is a Ray Jobs API URL: submit the run with "
                "labelmatch.tuning.rayjob.submit_ray_job (labelmatch tune --address does)"
            )
        self.search_space.validate()
        self.train_config.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Any = "TuneConfig") -> TuneConfig:
        """Build from JSON-like values (``search_space`` and ``train_config`` as dicts), every
        value type-checked (:func:`labelmatch.core.settings.build_settings`).

        Args:
            values: Field values.
            source: Where they came from, for messages (a
                :class:`~labelmatch.core.settings.SettingsFile` names file and line).

        Raises:
            ConfigError: (DataError for a file) naming the field.
        """
        from labelmatch.core.settings import build_settings

        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known) if isinstance(values, dict) else []
        if unknown and isinstance(source, str):
            raise ConfigError(f"unknown TuneConfig field(s): {', '.join(unknown)}")
        space = values.get("search_space") if isinstance(values, dict) else None
        if isinstance(space, dict) and isinstance(source, str):  # its own message for an unknown name
            SearchSpace.check_names(space)
        return build_settings(cls, values, source)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in the model and the report)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["search_space"] = self.search_space.to_dict()
        values["train_config"] = self.train_config.to_dict()
        return values


@dataclass
class _InitialValue:
    """``tune.sample_from`` callable: a trial's starting value from the seeded population."""

    population: list[dict[str, Any]]
    key: str

    def __call__(self, config: dict[str, Any]) -> Any:
        return self.population[config["trial_index"]][self.key]


def trial_base_config(train_config: TrainConfig, dataset: Dataset, iterations: int) -> dict[str, Any]:
    """The ``TrainConfig`` every trial starts from, sized so ``iterations`` fit the schedule.

    Epochs are set so that the learning-rate schedule spans exactly the tuning budget (no
    ``min_steps`` lengthening it), and early stopping is off: a stalled trial is PBT's to replace,
    not to stop.
    """
    train_docs = len(dataset.split("train").documents)
    steps_per_epoch = train_config.steps_per_epoch(train_docs)
    per_iteration = train_config.steps_per_iteration or steps_per_epoch
    epochs = math.ceil(iterations * per_iteration / steps_per_epoch)
    return train_config.replace(
        steps_per_iteration=per_iteration, epochs=epochs, patience=iterations + 1, progress=False,
        min_steps=0,
    ).to_dict()


def run_tune(
    dataset: Dataset, config: TuneConfig, storage_path: str, callbacks: list[Any] | None = None
) -> Any:
    """Run (or resume) the experiment and return Ray Tune's ``ResultGrid``.

    Args:
        dataset: Split dataset (``train`` and ``val``).
        config: Tuning settings (validated).
        storage_path: Directory or ``s3://`` URI of the Tune experiment.
        callbacks: Ray Tune callbacks (e.g. ``MLflowLoggerCallback``); a resumed run keeps the
            callbacks it was started with (they are saved with the experiment).
    """
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from labelmatch.tuning.scheduler import ResumablePBT
    from labelmatch.tuning.storage import ray_storage
    from labelmatch.tuning.trainable import sft_trainable

    config.validate()
    base = trial_base_config(config.train_config, dataset, config.iterations)
    trainable = tune.with_resources(
        tune.with_parameters(sft_trainable, dataset=dataset, base_config=base, iterations=config.iterations),
        dict(config.resources_per_trial),
    )
    path, filesystem = ray_storage(storage_path, config.s3_endpoint)
    # With a filesystem object Ray expects the path inside it, without the s3:// scheme.
    experiment = f"{path.rstrip('/')}/{config.name}"
    random.seed(config.seed)  # PBT draws its exploit partners and explore steps from `random`
    if config.resume and tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            experiment, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
        return tuner.fit()
    space = config.search_space
    population = space.initial_population(config.trials, config.seed)
    param_space = {
        "trial_index": tune.grid_search(list(range(config.trials))),
        **{key: tune.sample_from(_InitialValue(population, key)) for key in (*MUTATED, "lora_rank")},
    }
    if config.scheduler == "pbt":
        scheduler = ResumablePBT(
            time_attr="training_iteration",
            perturbation_interval=config.perturbation_interval,
            hyperparam_mutations=space.mutations(),
            quantile_fraction=config.quantile_fraction,
            resample_probability=config.resample_probability,
            synch=config.synch,
            custom_explore_fn=ClipToBounds({name: tuple(getattr(space, name)) for name in MUTATED}),
        )
    else:
        scheduler = FIFOScheduler()
    tuner = tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=METRIC, mode="max", scheduler=scheduler, num_samples=1, reuse_actors=config.reuse_actors
        ),
        run_config=tune.RunConfig(
            name=config.name,
            storage_path=path,
            storage_filesystem=filesystem,
            verbose=config.verbose,
            callbacks=callbacks,
            checkpoint_config=tune.CheckpointConfig(num_to_keep=config.keep_checkpoints),
            failure_config=tune.FailureConfig(max_failures=config.max_failures),
        ),
    )
    return tuner.fit()


def best_checkpoint(results: Any) -> tuple[Any, dict[str, Any]]:
    """The checkpoint with the highest validation macro-F1 over every trial and iteration."""
    candidates = [(ckpt, metrics) for result in results for ckpt, metrics in (result.best_checkpoints or [])]
    if not candidates:
        errors = [str(r.error) for r in results if r.error]
        raise ConfigError(f"no trial produced a checkpoint{': ' + errors[0] if errors else ''}")
    return max(candidates, key=lambda c: (c[1][METRIC], -c[1]["iteration"]))


def tune_sft(
    dataset_dir: str | Path, out_model_dir: str | Path, report_dir: str | Path, config: TuneConfig
) -> dict:
    """Tune SFT hyper-parameters with PBT and write the best model and a report.

    Args:
        dataset_dir: Dataset directory (or ``.jsonl``); split here when it has no splits.
        out_model_dir: Model artifact of the best checkpoint (``labelmatch.json`` key ``pbt``
            holds the tuning summary and the whole PBT history).
        report_dir: Report artifact: ``report.md``, ``pbt_history.png``, ``pbt_history.json``,
            ``summary.json``.
        config: Tuning settings; validated before anything starts.

    Returns:
        Summary: ``best_trial``, ``best_iteration``, ``best_val_macro_f1``, ``best_lora_rank``,
        ``exploits``, ``trials``, ``trial_iterations``, ``wall_seconds``, ...
    """
    from labelmatch.core.artifacts import atomic_artifact_dir, write_json, write_manifest
    from labelmatch.data.dataset import assign_splits, check_training_splits, load_dataset
    from labelmatch.training.sft import SFTTrainer, dataset_lineage
    from labelmatch.tuning.history import build_history, markdown_summary, plot_history
    from labelmatch.tuning.trainable import read_record

    config.validate()
    dataset = load_dataset(dataset_dir)
    if any(d.split is None for d in dataset.documents) or not dataset.split("val").documents:
        dataset = assign_splits(dataset, config.val_fraction, config.test_fraction, config.seed)
    check_training_splits(dataset, dataset_dir, config.val_fraction, "val_fraction (tune --config)")
    storage = config.storage_path or str(Path(report_dir).resolve().parent / "ray_results")
    started = time.perf_counter()
    with ray_session(config.address, config.num_cpus, config.dashboard, config.ray_temp_dir):
        results = run_tune(dataset, config, storage)
        history = build_history(list(results))
        checkpoint, metrics = best_checkpoint(results)
        with checkpoint.as_directory() as directory:
            trainer = SFTTrainer.load_checkpoint(directory, dataset)
            record = read_record(directory)
    summary = {
        "scheduler": config.scheduler,
        "trials": config.trials,
        "iterations": config.iterations,
        "best_trial": record["trial_id"],
        "best_iteration": int(metrics["iteration"]),
        "best_val_macro_f1": float(metrics[METRIC]),
        "best_lora_rank": trainer.config.lora_rank,
        "best_hyperparameters": record["hyperparameters"],
        "best_lineage": record["lineage"],
        "exploits": len(history["exploits"]),
        "trial_iterations": sum(len(t["timeline"]) for t in history["trials"].values()),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "experiment": f"{storage.rstrip('/')}/{config.name}",
    }
    pbt_info = {"summary": summary, "config": config.to_dict(), "history": history}
    trainer.save_model(out_model_dir, extra_info={"pbt": pbt_info}, lineage=dataset_lineage(dataset_dir))
    with atomic_artifact_dir(report_dir) as tmp:
        plot_history(history, tmp / "pbt_history.png")
        write_json(tmp / "pbt_history.json", history)
        write_json(tmp / "summary.json", summary)
        (tmp / "report.md").write_text(markdown_summary(history, summary, {"PBT history": "pbt_history.png"}))
        write_manifest(tmp, "Report", lineage=dataset_lineage(dataset_dir), extra=summary)
    return summary
