"""The SFT trainer as a Ray Tune function trainable, with a lineage record in every checkpoint.

Every training iteration ends with ``ray.tune.report(metrics, checkpoint=...)``; the checkpoint
holds the trainer state (:meth:`SFTTrainer.save_checkpoint`: adapter, bias, optimizer, schedule
position, RNG, history) and ``pbt_record.json``, written by the trial that made it:
``{trial_id, iteration, lora_rank, hyperparameters, lineage, node_id, job_id, restored_from}``
(``node_id``: the Ray node that trained it; ``job_id``: the Ray job of the driver that ran the
trial; ``restored_from``: the checkpoint this run of the trial started from, e.g.
``s3://bucket/.../checkpoint_000001``, empty for a fresh start). When a trial starts from a
checkpoint whose record names *another* trial, PBT exploited: the trial appends
``{from_trial, into_trial, at_iteration, from_node, into_node, ...}`` to the lineage it
inherited, so the history of who copied whom, and between which nodes, can be read back from
the checkpoints themselves, not from log text. Every reported result carries ``node_id`` too.

LoRA rank on exploit: the rank travels with the checkpoint. A trial that sampled rank 4 and
clones a rank-16 trial continues as rank 16 (the weights, optimizer moments and the rank are one
unit; re-initialising or projecting the adapter would throw away what PBT meant to copy). The
effective rank is reported every iteration (``lora_rank``) next to the sampled one.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from labelmatch.data.dataset import Dataset
from labelmatch.training.config import TrainConfig
from labelmatch.tuning.search_space import MUTATED

RECORD_FILE = "pbt_record.json"


def read_record(directory: str | Path) -> dict[str, Any]:
    """The lineage record of a checkpoint directory (empty for a foreign checkpoint)."""
    path = Path(directory) / RECORD_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def checkpoint_uri(checkpoint: Any) -> str:
    """Where a Ray Tune checkpoint lives: ``s3://bucket/key`` on S3, else its local path."""
    filesystem = getattr(checkpoint, "filesystem", None)
    scheme = getattr(filesystem, "type_name", "local")
    return f"{scheme}://{checkpoint.path}" if scheme not in ("local", "") else str(checkpoint.path)


def _start(
    config: dict[str, Any], dataset: Dataset, base_config: dict[str, Any], trial_id: str, node_id: str
):
    """Build the trainer: fresh, or from the checkpoint Tune hands over (exploit, retry, resume).

    Returns ``(trainer, lineage, exploit event or None, URI of the checkpoint restored or "")``.
    """
    from ray import tune

    from labelmatch.training.sft import SFTTrainer

    overrides = {name: config[name] for name in MUTATED}
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        values = {
            **base_config,
            **overrides,
            "lora_rank": config["lora_rank"],
            "seed": base_config["seed"] + config["trial_index"],
            "progress": False,
        }
        return SFTTrainer(dataset, TrainConfig.from_dict(values)), [], None, ""
    with checkpoint.as_directory() as directory:
        trainer = SFTTrainer.load_checkpoint(directory, dataset, overrides)
        record = read_record(directory)
    lineage = list(record.get("lineage", []))
    event = None
    if record.get("trial_id") not in (None, trial_id):
        event = {
            "from_trial": record["trial_id"],
            "into_trial": trial_id,
            "at_iteration": record["iteration"],
            "from_node": record.get("node_id", ""),
            "into_node": node_id,
            "from_lora_rank": record["lora_rank"],
            "from_hyperparameters": record["hyperparameters"],
            "new_hyperparameters": {name: config[name] for name in MUTATED},
        }
        lineage.append(event)
    return trainer, lineage, event, checkpoint_uri(checkpoint)


def sft_trainable(
    config: dict[str, Any], dataset: Dataset, base_config: dict[str, Any], iterations: int
) -> None:
    """Ray Tune function trainable: ``iterations`` SFT iterations, one report + checkpoint each.

    Args:
        config: The trial's hyper-parameters (:data:`MUTATED`, ``lora_rank``, ``trial_index``).
            PBT's exploit replaces the whole config by the donor's (explored) one, so after an
            exploit ``lora_rank`` here is the donor's too; the checkpoint decides the rank.
        dataset: The split dataset (passed once through the object store by ``tune.with_parameters``).
        base_config: ``TrainConfig`` fields shared by every trial.
        iterations: Training iterations per trial (PBT's time axis).
    """
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    runtime = ray.get_runtime_context()
    node_id, job_id = runtime.get_node_id(), runtime.get_job_id()
    trainer, lineage, event, restored_from = _start(config, dataset, base_config, trial_id, node_id)
    while trainer.iteration < iterations:
        result = trainer.run_iteration()
        hyperparameters = {name: getattr(trainer.config, name) for name in MUTATED}
        record = {
            "trial_id": trial_id,
            "iteration": trainer.iteration,
            "lora_rank": trainer.config.lora_rank,
            "hyperparameters": hyperparameters,
            "val_macro_f1": result.val_macro_f1,
            "lineage": lineage,
            "node_id": node_id,
            "job_id": job_id,
            "restored_from": restored_from,
        }
        metrics = {
            **result.to_dict(),
            **hyperparameters,
            "lora_rank": trainer.config.lora_rank,
            "exploited_from": event["from_trial"] if event else "",
            "exploited_at": event["at_iteration"] if event else -1,
            "exploits_in_lineage": len(lineage),
            "node_id": node_id,
        }
        event = None
        with tempfile.TemporaryDirectory(prefix="labelmatch-ckpt-") as directory:
            trainer.save_checkpoint(directory)
            (Path(directory) / RECORD_FILE).write_text(json.dumps(record, indent=1))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))
