"""Supervised fine-tuning (SFT) of the dual encoder with LoRA.

:class:`SFTTrainer` is written to be driven in *iterations* (a fixed number of steps or one
epoch, each ending with a validation) so that Ray Tune can run it as a function trainable, and
to save and restore everything a paused trial needs (adapter, bias, optimizer, schedule position,
RNG states, history). :func:`train_sft` is the one-call API behind ``labelmatch train``.

Label embeddings during training (``label_refresh_steps``): by default (``0``) every label
description is embedded live, with gradient, every step, so the label side learns from negatives
as well as positives. With hundreds of labels that can dominate the step's cost, so ``N > 0``
keeps a cache of all label embeddings (no gradient) and re-embeds live only the labels positive
in the batch; every label is still scored every step (negatives from the cache), and the cache is
refreshed every ``N`` steps and row-wise whenever a label is embedded live. On Reuters (90 labels,
7,770 documents, 2 epochs) the cache with ``N = 20`` cost 0.055 micro- and 0.100 macro-F1 for
0.64x the training time (``make bench-quality``), hence the exact default.

Above ``sampled_above`` labels (``label_strategy="auto"``) a step scores only the batch's
positive labels, the hard negatives most similar to its documents (by a no-gradient cache of every
label embedding, refreshed from the trained encoder) and a few random ones, all live with
gradient, so a step's memory and time no longer grow with the label count (10,000 labels: 2.8 GB,
where every-label steps died at 8.6 GB; docs/training.md has the measured threshold).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_recall_fscore_support

from labelmatch.core.artifacts import artifact_digest, atomic_artifact_dir, read_manifest
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.data.dataset import Dataset, without_positives_warning
from labelmatch.evaluation.metrics import binarize, macro_f1, tune_global_threshold, tune_thresholds
from labelmatch.model.chunking import Chunking, chunked_cosines
from labelmatch.model.dual_encoder import DualEncoder
from labelmatch.model.encoder import (
    TextEncoder,
    add_lora,
    base_pooling,
    load_base,
    resolve_base_model,
    set_encoder_dropout,
    weights_digest,
)
from labelmatch.model.general_adapter import resolve_base_adapter, start_from
from labelmatch.model.io import save_model
from labelmatch.model.losses import LossWeights, label_match_loss, positive_weights
from labelmatch.model.matching import Thresholds
from labelmatch.training.batches import next_batch
from labelmatch.training.config import SAMPLED_REFRESH_STEPS, TrainConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "trainer_state.pt"
#: Hyper-parameters that may change when a checkpoint is restored (PBT explore).
MUTABLE = ("lr", "weight_decay", "warmup_ratio", "contrastive_weight", "scale", "margin", "bias_lr")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def lr_multiplier(step: int, total_steps: int, warmup_ratio: float, schedule: str) -> float:
    """Linear warm-up then linear or cosine decay to 0, as a pure function of the step.

    Written here rather than using a ``LambdaLR``: Population Based Training changes
    ``lr`` and ``warmup_ratio`` of a running trial, and a stateless schedule recomputed from
    the step applies such a change exactly and checkpoints as one integer.
    """
    warmup = int(total_steps * warmup_ratio)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def planned_steps(train_docs: int, config: TrainConfig) -> tuple[int, int]:
    """``(total steps, steps per iteration)`` of a training on ``train_docs`` documents.

    ``epochs`` passes, or ``min_steps`` where those are fewer (few documents), but no more than
    ``max_lengthened_epochs`` passes from lengthening; a lengthened run keeps ``epochs``
    iterations (validations), each ``total / epochs`` steps, unless ``steps_per_iteration`` is set.
    """
    per_epoch = config.steps_per_epoch(train_docs)
    floor = config.min_steps
    if config.max_lengthened_epochs is not None:
        floor = min(floor, math.ceil(per_epoch * config.max_lengthened_epochs))
    total = max(per_epoch * config.epochs, floor)
    if config.steps_per_iteration:
        return total, config.steps_per_iteration
    return total, per_epoch if total == per_epoch * config.epochs else math.ceil(total / config.epochs)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class IterationResult:
    """What one training iteration reports.

    Attributes:
        iteration: 1-based iteration number.
        step: Optimisation steps done so far.
        epoch: Fractional epochs done so far.
        train_loss: Mean loss over the iteration's steps (and its parts).
        val_macro_f1: Validation macro-F1 at the best global threshold.
        val_threshold: That threshold.
        val_micro_f1: Validation micro-F1 at that threshold (reported; it does not pick epochs).
        improved: Whether this is the best validation macro-F1 so far.
        seconds: Wall time of the iteration.
    """

    iteration: int
    step: int
    epoch: float
    train_loss: dict[str, float]
    val_macro_f1: float
    val_threshold: float
    improved: bool
    seconds: float
    val_micro_f1: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-able form (what a tuner reports)."""
        return {
            "iteration": self.iteration,
            "step": self.step,
            "epoch": round(self.epoch, 4),
            **{f"train_{k}": v for k, v in self.train_loss.items()},
            "val_macro_f1": self.val_macro_f1,
            "val_threshold": self.val_threshold,
            "val_micro_f1": self.val_micro_f1,
            "improved": self.improved,
            "seconds": round(self.seconds, 3),
        }


class SFTTrainer:
    """Trains a LoRA dual encoder on a split dataset.

    Args:
        dataset: Dataset with ``train`` and ``val`` splits.
        config: Hyper-parameters.

    Example::

        trainer = SFTTrainer(dataset, TrainConfig(epochs=2))
        while not trainer.finished:
            print(trainer.run_iteration().val_macro_f1)
        trainer.restore_best()
    """

    def __init__(self, dataset: Dataset, config: TrainConfig):
        self.config = config
        self.dataset = dataset
        self.train_set = dataset.split("train")
        self.val_set = dataset.split("val")
        if not self.train_set.documents:
            raise DataError("<dataset>", "no documents in the 'train' split")
        if not self.val_set.documents:
            raise DataError(
                "<dataset>", "no documents in the 'val' split (needed for early stopping and thresholds)"
            )
        self.label_names = dataset.label_names
        self.label_texts = list(dataset.labels.values())
        warning = without_positives_warning(dataset)
        if warning:
            log.warning("%s", warning)
        self.device = resolve_device(config.device)
        seed_everything(config.seed)
        base, self.tokenizer = load_base(config.base_model)
        if config.encoder_dropout is not None:
            set_encoder_dropout(base, config.encoder_dropout)
        peft_model = add_lora(
            base, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_target_modules
        )
        self.base_adapter = resolve_base_adapter(config.base_adapter, config.base_model)
        if self.base_adapter is not None and not start_from(peft_model, self.base_adapter,
                                                            required=config.base_adapter != "auto"):
            log.info("base_adapter auto: the general adapter's LoRA shape differs from this training's; "
                     "starting from a fresh adapter")
            self.base_adapter = None
        self.pooling = base_pooling(config.base_model)
        self.chunking = Chunking.for_model(
            config.long_documents, config.predict_max_length, config.chunk_stride
        )
        encoder = TextEncoder(peft_model, self.tokenizer, config.max_length, self.pooling)
        self.model = DualEncoder(encoder, config.scale, 0.0).to(self.device)
        self.targets = torch.from_numpy(self.train_set.label_matrix())
        soft, mask = self.train_set.soft_matrix()
        self.soft, self.soft_mask = torch.from_numpy(soft), torch.from_numpy(mask)
        self.pos_weight = positive_weights(self.targets, config.pos_weight_max)
        self.val_targets = self.val_set.label_matrix()
        self.steps_per_epoch = config.steps_per_epoch(len(self.train_set.documents))
        self.total_steps, self.steps_per_iteration = planned_steps(
            len(self.train_set.documents), config)
        self.optimizer = self._make_optimizer()
        self.step = 0
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best_f1 = -1.0
        self.best_state: dict[str, Any] | None = None
        self.stale = 0
        self.generator = torch.Generator().manual_seed(config.seed)
        self._order: list[int] = []
        self._lengths = self._token_lengths() if config.group_by_length else None
        self._label_cache: torch.Tensor | None = None
        self._cached_at = 0
        self.label_strategy = config.strategy_for(len(self.label_texts))
        if self.label_strategy == "sampled":
            log.info("%d labels: each step scores its positives, %d hard and %d random negatives "
                     "(label_strategy=sampled)", len(self.label_texts), config.hard_negatives,
                     config.random_negatives)
        self._init_bias()

    # -- set-up -----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad and n != "bias"]
        return torch.optim.AdamW(
            [
                {
                    "params": lora,
                    "lr": self.config.lr,
                    "weight_decay": self.config.weight_decay,
                    "name": "lora",
                },
                {"params": [self.model.bias], "lr": self.config.bias_lr, "weight_decay": 0.0, "name": "bias"},
            ]
        )

    def _init_bias(self) -> None:
        """Start the bias at the cosine that best separates positives from negatives zero-shot.

        A calibrated start (instead of 0, where every label has p > 0.5) makes the first steps
        useful and the zero-shot model already usable at threshold 0.5.
        """
        docs = self.train_set.documents[:256]
        doc_emb = self.model.encoder.embed([d.text for d in docs], self.config.eval_batch_size)
        label_emb = self.model.encoder.embed(self.label_texts, self.config.eval_batch_size,
                                             progress=self.config.progress and len(self.label_texts) > 1000)
        if self.label_strategy == "sampled":  # the first cache of hard negatives: nothing trained yet
            self._label_cache, self._cached_at = label_emb.to(self.device), 0
        cos = (doc_emb @ label_emb.T).numpy()
        targets = self.targets[: len(docs)].numpy()
        probe = 1.0 / (1.0 + np.exp(-(cos - 0.5) * 10))  # monotone in cos: thresholds map back
        boundary, _ = tune_global_threshold(targets, probe)
        boundary_cos = 0.5 + math.log(boundary / (1 - boundary)) / 10
        with torch.no_grad():
            self.model.bias.fill_(-self.config.scale * boundary_cos)

    # -- training ---------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        """True when all epochs are done or early stopping triggered."""
        return self.step >= self.total_steps or self.stale >= self.config.patience

    def _token_lengths(self) -> list[int]:
        """Each training document's token count as training reads it (for length grouping)."""
        encoded = self.tokenizer([d.text for d in self.train_set.documents], truncation=True,
                                 max_length=self.config.max_length)
        return [len(ids) for ids in encoded["input_ids"]]

    def _next_batch(self) -> list[int]:
        batch, self._order = next_batch(self._order, len(self.train_set.documents), self.config.batch_size,
                                        self.generator, self._lengths, self.config.length_group_batches)
        return batch

    def _label_matrix(self, batch: list[int]) -> torch.Tensor:
        """All label embeddings for one step: live rows for the batch's positives, cached rest."""
        refresh = self.config.label_refresh_steps
        encoder = self.model.encoder
        if refresh <= 0:
            return encoder.encode(self.label_texts)
        if self._label_cache is None or self.step % refresh == 0:
            self._label_cache = encoder.embed(self.label_texts, self.config.eval_batch_size).to(self.device)
        live = torch.nonzero(self.targets[batch].sum(0) + self.soft_mask[batch].sum(0)).flatten()
        if live.numel() == 0:
            return self._label_cache
        live_emb = encoder.encode([self.label_texts[j] for j in live.tolist()])
        live = live.to(self.device)
        self._label_cache[live] = live_emb.detach()
        return self._label_cache.index_copy(0, live, live_emb)

    def _refresh_steps(self) -> int:
        return self.config.label_refresh_steps or SAMPLED_REFRESH_STEPS

    def _sampled_labels(self, batch: list[int], doc_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(live embeddings, their label columns)`` of one ``sampled`` step: the batch's positives,
        the hard negatives most similar to its documents by the cache, and random negatives."""
        encoder, config = self.model.encoder, self.config
        if self._label_cache is None or self.step - self._cached_at >= self._refresh_steps():
            self._label_cache = encoder.embed(self.label_texts, config.eval_batch_size,
                                              progress=config.progress).to(self.device)
            self._cached_at = self.step
        positive = (self.targets[batch].sum(0) + self.soft_mask[batch].sum(0)) > 0
        chosen = positive.clone()
        if config.hard_negatives:
            with torch.no_grad():
                best = (doc_emb.detach() @ self._label_cache.T).max(0).values.cpu()
            best[chosen] = -math.inf
            k = min(config.hard_negatives, int((~chosen).sum()))
            chosen[torch.topk(best, k).indices] = True
        if config.random_negatives:
            rest = torch.nonzero(~chosen).flatten()
            pick = torch.randperm(rest.numel(), generator=self.generator)[: config.random_negatives]
            chosen[rest[pick]] = True
        columns = torch.nonzero(chosen).flatten()
        live = encoder.encode([self.label_texts[j] for j in columns.tolist()])
        self._label_cache[columns.to(self.device)] = live.detach()
        return live, columns

    def _step_labels(self, batch: list[int], doc_emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(label embeddings, their label columns)`` one step scores its batch against."""
        if self.label_strategy == "sampled":
            return self._sampled_labels(batch, doc_emb)
        return self._label_matrix(batch), torch.arange(len(self.label_texts))

    def _apply_hyperparameters(self) -> None:
        factor = lr_multiplier(self.step, self.total_steps, self.config.warmup_ratio, self.config.schedule)
        for group in self.optimizer.param_groups:
            if group["name"] == "lora":
                group["lr"] = self.config.lr * factor
                group["weight_decay"] = self.config.weight_decay
            else:
                group["lr"] = self.config.bias_lr * factor

    def train_step(self) -> dict[str, float]:
        """One optimisation step; returns the loss and its parts."""
        self.model.train()
        batch = self._next_batch()
        encoder = self.model.encoder
        doc_emb = encoder(encoder.tokenize([self.train_set.documents[i].text for i in batch]))
        rows = torch.tensor(batch)
        label_emb, columns = self._step_labels(batch, doc_emb)
        cos, logits = self.model.logits(doc_emb, label_emb)
        weights = LossWeights(
            self.config.hard_weight,
            self.config.soft_weight,
            self.config.contrastive_weight,
            self.config.margin,
            self.config.ranking_weight,
            self.config.ranking_scale,
        )
        parts = label_match_loss(
            cos,
            logits,
            self.targets[rows][:, columns].to(self.device),
            weights,
            pos_weight=self.pos_weight[columns].to(self.device),
            soft=self.soft[rows][:, columns].to(self.device),
            soft_mask=self.soft_mask[rows][:, columns].to(self.device),
        )
        self._apply_hyperparameters()
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        return {k: float(v.detach()) for k, v in parts.items()}

    @contextlib.contextmanager
    def _reading_predict_length(self) -> Iterator[TextEncoder]:
        """The encoder, reading ``config.predict_max_length`` tokens per text inside the block."""
        encoder = self.model.encoder
        train_length, encoder.max_length = encoder.max_length, self.config.predict_max_length
        try:
            yield encoder
        finally:
            encoder.max_length = train_length

    def validation_scores(self) -> np.ndarray:
        """Probabilities of every label for every validation document.

        Texts are read as the saved model will read them: ``config.predict_max_length`` tokens,
        and long documents by the model's rule (``config.long_documents``: truncated, or the
        maximum over windows), so thresholds are tuned on the scores the model will serve.
        """
        size = self.config.eval_batch_size
        with self._reading_predict_length() as enc:
            many = self.config.progress and len(self.label_texts) > 1000
            label_emb = enc.embed(self.label_texts, size, progress=many).numpy()
            texts = [d.text for d in self.val_set.documents]
            cos = chunked_cosines(texts, lambda batch: enc.embed(batch, size).numpy(), enc.offsets, label_emb,
                                  self.chunking)
        logits = self.model.scale * cos + float(self.model.bias.item())
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)

    def run_iteration(self) -> IterationResult:
        """Train ``steps_per_iteration`` steps (or until the end), then validate.

        The validation metric is macro-F1 at the best *global* threshold on the validation
        scores: it does not depend on where the bias happens to sit, and a single threshold
        over-fits far less than per-label ones.
        """
        from tqdm.auto import tqdm

        started = time.perf_counter()
        steps = min(self.steps_per_iteration, self.total_steps - self.step)
        sums: dict[str, float] = {}
        bar = tqdm(
            range(steps),
            desc=f"iteration {self.iteration + 1}",
            disable=not self.config.progress,
            leave=False,
        )
        for _ in bar:
            parts = self.train_step()
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{parts['loss']:.4f}")
        scores = self.validation_scores()
        threshold, f1 = tune_global_threshold(self.val_targets, scores)
        predicted = binarize(scores, threshold)
        micro = float(f1_score(self.val_targets, predicted, average="micro", zero_division=0))
        self.iteration += 1
        improved = f1 > self.best_f1 + 1e-9
        if improved:
            self.best_f1, self.stale = f1, 0
            self.best_state = self._weights_state()
        else:
            self.stale += 1
        result = IterationResult(
            self.iteration,
            self.step,
            self.step / self.steps_per_epoch,
            {k: v / max(steps, 1) for k, v in sums.items()},
            f1,
            threshold,
            improved,
            time.perf_counter() - started,
            micro,
        )
        self.history.append({**result.to_dict(), "hyperparameters": self.hyperparameters()})
        return result

    def fit(self) -> list[IterationResult]:
        """Train until the last epoch or early stopping, then restore the best weights."""
        results = []
        while not self.finished:
            results.append(self.run_iteration())
        self.restore_best()
        return results

    def hyperparameters(self) -> dict[str, Any]:
        """The current values of the hyper-parameters a tuner may change."""
        return {name: getattr(self.config, name) for name in (*MUTABLE, "lora_rank", "lora_alpha")}

    # -- state ------------------------------------------------------------------------------
    def _weights_state(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(self.model.encoder.model)
        return {
            "adapter": {k: v.detach().cpu().clone() for k, v in adapter.items()},
            "bias": self.model.bias.item(),
            "scale": self.model.scale,
        }

    def _load_weights(self, state: dict[str, Any]) -> None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model.encoder.model, state["adapter"])
        with torch.no_grad():
            self.model.bias.fill_(state["bias"])
        self.model.scale = state["scale"]
        if self.model.scale != self.config.scale:
            self.model.set_scale(self.config.scale)

    def restore_best(self) -> None:
        """Put the best validated weights back (no-op before the first validation)."""
        if self.best_state is not None:
            self._load_weights(self.best_state)

    def save_checkpoint(self, directory: str | Path) -> Path:
        """Write everything needed to resume exactly: weights, optimizer, step, RNG, history.

        The LoRA rank and alpha are stored with the weights; :meth:`load_checkpoint` adopts
        them, so a checkpoint cloned into a trial that sampled another rank keeps working.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "config": self.config.to_dict(),
            "weights": self._weights_state(),
            "best_state": self.best_state,
            "best_f1": self.best_f1,
            "stale": self.stale,
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "iteration": self.iteration,
            "history": self.history,
            "order": self._order,
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
                "generator": self.generator.get_state(),
            },
        }
        torch.save(state, directory / CHECKPOINT_FILE)
        return directory

    @classmethod
    def load_checkpoint(
        cls, directory: str | Path, dataset: Dataset, overrides: dict[str, Any] | None = None
    ) -> SFTTrainer:
        """Rebuild a trainer from :meth:`save_checkpoint`.

        Args:
            directory: The checkpoint directory.
            dataset: The same dataset it was trained on.
            overrides: New values for hyper-parameters in :data:`MUTABLE` (PBT explore) and for
                non-architectural settings (epochs, patience, progress). LoRA rank/alpha/dropout
                and targets always come from the checkpoint (they shape the weights).
        """
        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            raise ConfigError(f"no {CHECKPOINT_FILE} in checkpoint {directory}")
        state = torch.load(path, map_location="cpu", weights_only=False)
        values = dict(state["config"])
        architectural = (
            "lora_rank",
            "lora_alpha",
            "lora_dropout",
            "lora_target_modules",
            "base_model",
            "max_length",
        )
        for key, value in (overrides or {}).items():
            if key not in architectural:
                values[key] = value
        trainer = cls(dataset, TrainConfig.from_dict(values))
        trainer._load_weights(state["weights"])
        trainer._label_cache = None
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step, trainer.iteration = state["step"], state["iteration"]
        trainer.history, trainer._order = state["history"], state["order"]
        trainer.best_state, trainer.best_f1, trainer.stale = (
            state["best_state"],
            state["best_f1"],
            state["stale"],
        )
        rng = state["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        trainer.generator.set_state(rng["generator"])
        trainer._apply_hyperparameters()
        return trainer

    # -- output -----------------------------------------------------------------------------
    def thresholds(self, scores: np.ndarray | None = None) -> Thresholds:
        """Global and per-label thresholds tuned on the validation scores of the current weights.

        Args:
            scores: :meth:`validation_scores` when the caller already has them (computed if not).
        """
        scores = self.validation_scores() if scores is None else scores
        default, per_label = tune_thresholds(self.val_targets, scores)
        return Thresholds(default, {n: float(t) for n, t in zip(self.label_names, per_label, strict=True)})

    def save_model(
        self,
        out_dir: str | Path,
        extra_info: dict[str, Any] | None = None,
        lineage: dict[str, Any] | None = None,
    ) -> Path:
        """Write the current weights as a Model artifact (atomically), with tuned thresholds.

        Label embeddings are recomputed with the trained encoder.
        """
        scores = self.validation_scores()
        thresholds = self.thresholds(scores)
        val_pred = binarize(scores, thresholds.for_labels(self.label_names))
        val_f1 = macro_f1(self.val_targets, val_pred)
        _, _, f1, support = precision_recall_fscore_support(self.val_targets, val_pred, zero_division=0)
        per_label = {
            name: {"f1": float(f1[j]), "support": int(support[j])} for j, name in enumerate(self.label_names)
        }
        with self._reading_predict_length() as encoder:
            label_emb = encoder.embed(self.label_texts, self.config.eval_batch_size).numpy()
        base_path = resolve_base_model(self.config.base_model)
        info = {
            "base_model": self.config.base_model,
            "base_model_digest": weights_digest(base_path),
            "max_length": self.config.predict_max_length,
            "pooling": self.pooling.mode,
            "normalize": self.pooling.normalize,
            "long_documents": self.chunking.mode,
            "chunk_stride": self.chunking.stride,
            "scale": self.model.scale,
            "bias": self.model.bias.item(),
            "embedding_dim": int(label_emb.shape[1]),
            "config": self.config.to_dict(),
            "base_adapter": self.base_adapter.describe() if self.base_adapter else None,
            "metrics": {
                "val_macro_f1_global_threshold": max(self.best_f1, 0.0),
                "val_macro_f1_tuned_thresholds": val_f1,
                "val_per_label": per_label,
            },
            "data": {
                "train documents": len(self.train_set.documents),
                "validation documents": len(self.val_set.documents),
                "labels": len(self.label_names),
            },
            "history": self.history,
            **(extra_info or {}),
        }
        with atomic_artifact_dir(out_dir) as tmp:
            save_model(
                tmp,
                self.model.encoder.model,
                self.tokenizer,
                self.dataset.labels,
                label_emb,
                thresholds,
                info,
                save_merged=self.config.save_merged,
                lineage=lineage,
                hierarchy=self.dataset.hierarchy,
            )
        return Path(out_dir)


def dataset_lineage(path: str | Path | None) -> dict[str, Any]:
    """Lineage entry for a dataset path: its artifact digest when it is an artifact."""
    if path is None:
        return {}
    try:
        read_manifest(path)
        return {"dataset": str(path), "dataset_digest": artifact_digest(path)}
    except Exception:  # a plain file or directory, not an artifact
        return {"dataset": str(path)}


def train_sft(
    dataset: Dataset, config: TrainConfig, out_dir: str | Path, source: str | Path | None = None
) -> SFTTrainer:
    """Train with early stopping and write the best model as a Model artifact.

    Args:
        dataset: Split dataset (``train`` and ``val``; see :func:`labelmatch.data.dataset.assign_splits`).
        config: Hyper-parameters.
        out_dir: Model artifact directory (replaced atomically at the end).
        source: Where the dataset came from (recorded as lineage).

    Returns:
        The trainer (its ``history`` holds the per-iteration results).
    """
    trainer = SFTTrainer(dataset, config)
    trainer.fit()
    trainer.save_model(out_dir, lineage=dataset_lineage(source))
    return trainer
