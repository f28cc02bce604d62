"""GRPO: policy optimisation of a new LoRA adapter on the SFT model, from user feedback.

* **Reference** = the SFT model, frozen (its logits on the feedback documents are computed once,
  with the new adapter disabled).
* **Policy** = the SFT model with its LoRA merged, plus a *new* trainable LoRA adapter (zero at
  start, so policy = reference at step 0). Cosine scale and logit bias stay those of the SFT model.
* Per step, for a batch of feedback documents: sample ``group_size`` label sets per document from
  the policy (independent Bernoulli per label), score them with :mod:`labelmatch.feedback.rewards`,
  normalise rewards within each group into advantages, then take ``inner_iterations`` gradient
  steps on ``−clipped surrogate + β·KL(π‖ref) − entropy_weight·H(π)`` (:mod:`labelmatch.feedback.grpo_math`),
  with each document's terms weighted by its export weight (previous-version feedback can weigh less)
  after the per-principal cap (:mod:`labelmatch.feedback.principals`: no principal carries more
  than ``max_principal_share`` of the run's weight, so one principal flooding the store cannot
  outvote the others). A batch's loss is divided by the run's mean weight, not the batch's own
  sum, so the cap holds step by step in expectation: a batch that happens to hold only a capped
  principal's records takes a correspondingly small step.
* **Replay** (keeping what feedback did not ask to change): with ``replay_kl_weight`` or
  ``replay_bce_weight`` > 0, each step also draws ``replay_batch_size`` of the SFT model's own
  training documents (``train_grpo(replay_dataset=...)``) and adds ``replay_kl_weight·KL(π‖ref)``
  on them (a trust region measured outside the feedback, where the feedback KL sees nothing)
  and/or ``replay_bce_weight·BCE`` against their labels (rehearsal of the SFT data).
* The encoder runs in eval mode (no dropout): the policy that sampled the actions and the one whose
  ratio is taken must be the same function, or the first ratio is not 1.

The output is a Model artifact with a merged ``encoder/`` (SFT + GRPO), label embeddings
recomputed with it, thresholds re-tuned on a validation set when one is given (else the SFT
ones), and ``labelmatch.json`` recording the reference model's digest, the feedback export's
digest and the GRPO config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from labelmatch.core.artifacts import artifact_digest, atomic_artifact_dir, verify_artifact
from labelmatch.core.errors import ConfigError, DataError
from labelmatch.data.dataset import Dataset
from labelmatch.feedback.feedback_store import FEEDBACK_FILE, read_export
from labelmatch.feedback.grpo_math import (
    bernoulli_entropy,
    bernoulli_kl,
    clipped_surrogate,
    group_advantages,
    label_log_probs,
    log_prob,
    sample_label_sets,
)
from labelmatch.feedback.principals import PrincipalWeights, cap_principal_weights, principal_key
from labelmatch.feedback.rewards import RewardConfig, feedback_label_rewards, feedback_rewards
from labelmatch.model.chunking import Chunking
from labelmatch.model.dual_encoder import DualEncoder
from labelmatch.model.encoder import Pooling, TextEncoder, add_lora
from labelmatch.model.io import load_encoder_model, read_hierarchy, save_model
from labelmatch.model.matching import Thresholds
from labelmatch.training.batches import next_batch

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "grpo_state.pt"


@dataclass
class GRPOConfig:
    """Settings of a GRPO run.

    Attributes:
        group_size: Label sets sampled per document (G).
        batch_size: Feedback documents per step.
        epochs: Passes over the feedback (ignored when ``steps`` is set).
        steps: Total optimisation steps (outer); ``None`` means ``epochs`` passes.
        inner_iterations: Gradient steps on each sampled batch (PPO-style re-use).
        credit: ``"set"``: one reward per sampled label set (F1, :func:`~labelmatch.feedback.rewards.
            feedback_rewards`) and one advantage for all its labels; ``"label"``: per-label
            credit (:func:`~labelmatch.feedback.rewards.feedback_label_rewards`): each label's draw gets
            its own group-normalised advantage and its own clipped ratio (much lower variance
            with many labels; see :mod:`labelmatch.feedback.rewards`).
        target_kl: Stop early once the batch's mean KL to the reference (nats per document)
            exceeds this budget (``None``: no budget). Guards against drifting away from the SFT
            model, which the KL is only measured against on feedback documents.
        clip_eps: PPO ratio clip ε.
        beta: Weight of the exact Bernoulli KL to the reference.
        entropy_weight: Weight of the entropy bonus (0 disables it).
        scale_std: Divide advantages by the group's std (GRPO); ``False`` only centres them.
        adv_eps: ε in ``(r − mean) / (std + ε)``.
        cosine_weight: Weight of the optional cosine-similarity reward term.
        lr: AdamW learning rate of the new LoRA adapter.
        weight_decay: AdamW weight decay.
        grad_clip: Gradient norm clip.
        lora_rank: Rank of the new adapter.
        lora_alpha: Its alpha.
        lora_dropout: Its dropout (0: the ratio must compare the same function, see module doc).
        max_length: Tokens per text; ``None`` keeps the SFT model's.
        label_gradients: Back-propagate through the label descriptions too (exact). ``False``
            (the default, as benchmarked) embeds the labels once per step with the sampling
            policy, without gradient, and reuses them in the inner iterations: 2–3× cheaper with
            many labels on a CPU.
        replay_kl_weight: Weight of the Bernoulli KL to the reference on replayed SFT training
            documents (0: off); needs ``train_grpo(replay_dataset=...)``. The defaults of both
            replay weights (1.0 and 0.5) were chosen on dev by ``make bench-grpo``
            (``bench/results/grpo_forgetting.md``) among plain GRPO, KL replay, BCE replay and both.
        replay_bce_weight: Weight of the BCE loss on replayed SFT training documents with their
            labels (0: off); needs the same.
        replay_batch_size: Replayed documents per step.
        replay_max_documents: At most this many replay documents are kept (a seeded sample),
            their reference logits computed once.
        max_principal_share: The largest share of the run's total feedback weight one principal
            may carry, in (0, 1]; 1.0: no cap. Records without a principal count per source as
            ``(unknown:<source>)``; with ``n`` principals the bound is ``max(share, 1/n)``
            (:func:`~labelmatch.feedback.principals.cap_principal_weights`); see
            ``make bench-feedback-poisoning`` for its effect against a flood.
        checkpoint_every: Save a resumable checkpoint every this many steps (0: never).
        checkpoint_dir: Where; a run finding a checkpoint there resumes from it.
        seed: Seed of sampling and shuffling.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: Show a progress bar.
    """

    group_size: int = 16
    batch_size: int = 16
    epochs: int = 3
    steps: int | None = None
    inner_iterations: int = 2
    credit: str = "label"
    target_kl: float | None = 1.0
    clip_eps: float = 0.2
    beta: float = 0.1
    entropy_weight: float = 0.0
    scale_std: bool = True
    adv_eps: float = 1e-6
    cosine_weight: float = 0.0
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    max_length: int | None = None
    label_gradients: bool = False
    replay_kl_weight: float = 1.0
    replay_bce_weight: float = 0.5
    replay_batch_size: int = 16
    replay_max_documents: int = 2000
    max_principal_share: float = 0.25
    checkpoint_every: int = 0
    checkpoint_dir: str | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("group_size", "batch_size", "epochs", "inner_iterations", "lora_rank",
                     "replay_batch_size", "replay_max_documents"):
            if getattr(self, name) < 1:
                raise ConfigError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ConfigError(
                "GRPOConfig.group_size must be >= 2 (advantages compare samples within a group)"
            )
        if self.steps is not None and self.steps < 1:
            raise ConfigError("GRPOConfig.steps must be >= 1 or None")
        if self.credit not in ("set", "label"):
            raise ConfigError(f"GRPOConfig.credit must be 'set' or 'label', got {self.credit!r}")
        if self.target_kl is not None and self.target_kl <= 0:
            raise ConfigError(f"GRPOConfig.target_kl must be > 0 or None, got {self.target_kl}")
        if not 0.0 < self.clip_eps < 1.0:
            raise ConfigError(f"GRPOConfig.clip_eps must be in (0, 1), got {self.clip_eps}")
        if self.lr <= 0 or min(self.beta, self.entropy_weight, self.cosine_weight, self.weight_decay,
                               self.replay_kl_weight, self.replay_bce_weight) < 0:
            raise ConfigError(
                "GRPOConfig: lr must be > 0; beta, entropy_weight, cosine_weight, weight_decay, "
                "replay_kl_weight, replay_bce_weight >= 0"
            )
        if not 0.0 < self.max_principal_share <= 1.0:
            raise ConfigError(
                f"GRPOConfig.max_principal_share must be in (0, 1], got {self.max_principal_share}"
            )
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ConfigError("GRPOConfig.checkpoint_every needs checkpoint_dir")

    @property
    def replays(self) -> bool:
        """Whether a replay term is on (the run then needs replay documents)."""
        return self.replay_kl_weight > 0 or self.replay_bce_weight > 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in ``labelmatch.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GRPOConfig:
        """Build a config, refusing unknown keys."""
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"unknown GRPOConfig field(s): {', '.join(unknown)}")
        return cls(**values)


@dataclass
class FeedbackTensors:
    """The feedback export as tensors in the model's label order.

    ``weights`` are the export's weights (before the per-principal cap); ``principals`` names
    each record's principal (:func:`~labelmatch.feedback.principals.principal_key`; empty: all
    records count as one principal).
    """

    texts: list[str]
    served: torch.Tensor
    scores: torch.Tensor
    corrected: torch.Tensor
    has_correction: torch.Tensor
    weights: torch.Tensor
    excluded_test_overlap: int = 0
    principals: list[str] = dataclasses.field(default_factory=list)


def feedback_tensors(
    feedback_dir: str | Path, label_names: list[str], exclude_texts: Collection[str] = ()
) -> FeedbackTensors:
    """Read a FeedbackExport and encode it against ``label_names``.

    Args:
        feedback_dir: The FeedbackExport artifact.
        label_names: The model's labels, in order.
        exclude_texts: Texts that must not be trained on (the evaluation's test documents):
            feedback records whose text is one of them (:func:`labelmatch.data.prepare.text_key`) are
            dropped and counted in ``excluded_test_overlap``, so the gate's test split stays
            unseen.

    Raises:
        DataError: when the export is empty (or nothing is left) or names a label the model lacks.
    """
    from labelmatch.data.prepare import text_key

    exported = read_export(feedback_dir)
    path = Path(feedback_dir) / FEEDBACK_FILE
    if not exported.records:
        raise DataError(path, "no feedback records to learn from")
    excluded = {text_key(t) for t in exclude_texts}
    keep = [i for i, record in enumerate(exported.records) if text_key(record.text) not in excluded]
    if not keep:
        raise DataError(path, f"all {len(exported.records)} feedback records are test documents")
    records = [exported.records[i] for i in keep]
    weights = [exported.weights[i] for i in keep]
    index = {name: j for j, name in enumerate(label_names)}
    n, width = len(records), len(label_names)
    served, corrected = torch.zeros((n, width)), torch.zeros((n, width))
    for i, record in enumerate(records):
        for row, names, field_name in (
            (served, record.predicted_labels, "predicted_labels"),
            (corrected, record.corrected_labels or [], "corrected_labels"),
        ):
            for name in names:
                if name not in index:
                    raise DataError(
                        path,
                        f"record {record.id}: label {name!r} is not a label of the model",
                        line=keep[i] + 1,
                        field=field_name,
                    )
                row[i, index[name]] = 1.0
    return FeedbackTensors(
        texts=[r.text for r in records],
        served=served,
        scores=torch.tensor([float(r.score) for r in records]),
        corrected=corrected,
        has_correction=torch.tensor([r.corrected_labels is not None for r in records]),
        weights=torch.tensor(weights, dtype=torch.float32),
        excluded_test_overlap=len(exported.records) - len(records),
        principals=[principal_key(r.principal, r.source) for r in records],
    )


def missing_replay_message(config: GRPOConfig) -> str:
    """The one-line refusal when replay is on but no replay documents were given."""
    return (f"GRPO replay is on (replay_kl_weight {config.replay_kl_weight:g}, replay_bce_weight "
            f"{config.replay_bce_weight:g}; on by default) but no replay documents were given: pass the SFT "
            "training data (CLI --replay-data DIR, train_grpo(replay_dataset=...); the KFP step replays the "
            "Dataset's train split) or set both replay weights to 0")


@dataclass
class ReplayTensors:
    """Replayed SFT training documents: their texts and labels in the model's label order."""

    texts: list[str]
    targets: torch.Tensor


def replay_tensors(dataset: Dataset, label_names: list[str], max_documents: int, seed: int) -> ReplayTensors:
    """The documents GRPO replays (a seeded sample of at most ``max_documents``), labels as targets.

    Args:
        dataset: Labelled documents (the SFT model's training split); labels the model lacks are
            ignored (their columns do not exist).
        label_names: The model's labels, in order.
        max_documents: Upper bound on the documents kept.
        seed: Seed of the sample.

    Raises:
        ConfigError: when ``dataset`` holds no document.
    """
    import random

    docs = list(dataset.documents)
    if not docs:
        raise ConfigError("GRPO replay: the replay dataset holds no document (GRPOConfig replay_* > 0 "
                          "needs the SFT training split)")
    if len(docs) > max_documents:
        docs = random.Random(seed).sample(docs, max_documents)
    index = {name: j for j, name in enumerate(label_names)}
    targets = torch.zeros((len(docs), len(label_names)))
    for i, doc in enumerate(docs):
        for name in doc.labels:
            if name in index:
                targets[i, index[name]] = 1.0
    return ReplayTensors([d.text for d in docs], targets)


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor, norm: float | None = None) -> torch.Tensor:
    """``Σ v·w / Σ w`` over the batch, or ``Σ v·w / (len · norm)`` with the run's mean weight ``norm``."""
    if norm is None:
        return (values * weights).sum() / weights.sum().clamp(min=1e-12)
    return (values * weights).sum() / (len(values) * norm)


def principal_weights(feedback: FeedbackTensors, max_share: float) -> PrincipalWeights:
    """The feedback's weights with each principal capped at ``max_share`` of the run's total.

    Args:
        feedback: The feedback (its export weights and principals).
        max_share: :attr:`GRPOConfig.max_principal_share`.

    Returns:
        The capped per-record weights and the report
        (:class:`~labelmatch.feedback.principals.PrincipalWeights`).
    """
    principals = feedback.principals or [""] * len(feedback.texts)
    return cap_principal_weights(principals, feedback.weights.tolist(), max_share)


class GRPOTrainer:
    """Runs GRPO steps on a policy built from an SFT Model artifact.

    Args:
        model_dir: The SFT Model artifact (the frozen reference).
        feedback: The feedback as tensors (:func:`feedback_tensors`).
        config: GRPO settings.

    Attributes:
        principal_weights: The per-principal cap applied to ``feedback.weights``
            (:func:`principal_weights`); ``weights`` are the capped weights the loss uses.
    """

    def __init__(
        self, model_dir: str | Path, feedback: FeedbackTensors, config: GRPOConfig,
        replay: ReplayTensors | None = None,
    ):
        from labelmatch.training.sft import resolve_device, seed_everything

        if config.replays and replay is None:
            raise ConfigError(missing_replay_message(config))
        self.config = config
        self.feedback = feedback
        self.principal_weights = principal_weights(feedback, config.max_principal_share)
        self.weights = torch.tensor(self.principal_weights.weights, dtype=torch.float32)
        self._weight_norm = float(self.weights.mean()) if len(self.weights) else 1.0
        self.model_dir = Path(model_dir)
        seed_everything(config.seed)
        merged, self.tokenizer, self.info = load_encoder_model(model_dir, verify=False, merge=True)
        self.labels: dict[str, str] = json.loads((self.model_dir / "labels.json").read_text())
        self.label_texts = list(self.labels.values())
        self.device = resolve_device(config.device)
        policy = add_lora(merged, config.lora_rank, config.lora_alpha, config.lora_dropout)
        max_length = config.max_length or int(self.info["max_length"])
        self.model = DualEncoder(
            TextEncoder(policy, self.tokenizer, max_length, Pooling.from_info(self.info)),
            self.info["scale"],
            self.info["bias"],
        )
        self.model.bias.requires_grad_(False)
        self.model.to(self.device).eval()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.sampler = torch.Generator().manual_seed(config.seed + 1)
        self.ref_logits = self._reference_logits(feedback.texts)
        self.replay = replay if config.replays else None
        self.replay_ref = self._reference_logits(self.replay.texts) if self.replay else None
        self.replay_generator = torch.Generator().manual_seed(config.seed + 2)
        n = len(feedback.texts)
        self.total_steps = config.steps or config.epochs * math.ceil(n / config.batch_size)
        self.step = 0
        self.stopped_early = False
        self.history: list[dict[str, float]] = []
        self._order: list[int] = []
        self._label_emb: torch.Tensor | None = None

    def _reference_logits(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Logits of the frozen reference (the new adapter disabled) on ``texts``."""
        encoder = self.model.encoder
        with encoder.model.disable_adapter():
            docs = encoder.embed(texts, batch_size)
            label_emb = encoder.embed(self.label_texts, batch_size)
        return self.model.logits(docs, label_emb)[1].detach().cpu()

    def _next_batch(self) -> list[int]:
        batch, self._order = next_batch(self._order, len(self.feedback.texts), self.config.batch_size,
                                        self.generator)
        return batch

    def _forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, logits)`` of the policy; labels without gradient unless ``label_gradients``."""
        if self.config.label_gradients:
            return self.model(texts, self.label_texts)
        if self._label_emb is None:
            with torch.no_grad():
                self._label_emb = self.model.encoder(self.model.encoder.tokenize(self.label_texts))
        return self.model.logits(self.model.encoder(self.model.encoder.tokenize(texts)), self._label_emb)

    def train_step(self) -> dict[str, float]:
        """Sample, reward, and take ``inner_iterations`` clipped policy-gradient steps on one batch."""
        cfg, fb = self.config, self.feedback
        index = self._next_batch()
        self._label_emb = None  # re-embedded once per step by the sampling policy
        texts = [fb.texts[i] for i in index]
        ref, weights = self.ref_logits[index].to(self.device), self.weights[index].to(self.device)
        cos, logits = self._forward(texts)
        # Sampled on the CPU with a dedicated generator: reproducible whatever the device.
        actions = sample_label_sets(logits.detach().cpu(), cfg.group_size, self.sampler).to(self.device)
        # "set": one log-probability per label set; "label": one per label draw (B, G, L).
        action_log_prob = label_log_probs if cfg.credit == "label" else log_prob
        old_log_prob = action_log_prob(logits.detach(), actions)
        rewards = feedback_rewards(
            actions.cpu(),
            fb.served[index],
            fb.scores[index],
            fb.corrected[index],
            fb.has_correction[index],
            cos.detach().cpu(),
            RewardConfig(cfg.cosine_weight),
        ).to(self.device)
        if cfg.credit == "label":
            label_rewards = feedback_label_rewards(
                actions.cpu(),
                fb.served[index],
                fb.scores[index],
                fb.corrected[index],
                fb.has_correction[index],
            ).to(self.device)
            advantages = group_advantages(label_rewards, cfg.scale_std, cfg.adv_eps)
        else:
            advantages = group_advantages(rewards, cfg.scale_std, cfg.adv_eps)
        stats: dict[str, float] = {}
        replay_index = (
            torch.randint(len(self.replay.texts), (cfg.replay_batch_size,),
                          generator=self.replay_generator).tolist()
            if self.replay else []
        )
        for inner in range(cfg.inner_iterations):
            if inner:
                cos, logits = self._forward(texts)
            objective, clipped = clipped_surrogate(
                action_log_prob(logits, actions), old_log_prob, advantages, cfg.clip_eps
            )
            if cfg.credit == "label":
                # The separable reward's gradient is Σ over labels; averaged instead so that the
                # surrogate keeps the scale of a set reward and β means the same in both modes.
                objective = objective.mean(-1)
            kl = bernoulli_kl(logits, ref)
            entropy = bernoulli_entropy(logits)
            norm = self._weight_norm  # the run's mean weight: a batch of capped records steps less
            loss = (
                -_weighted_mean(objective.mean(1), weights, norm)
                + cfg.beta * _weighted_mean(kl, weights, norm)
                - cfg.entropy_weight * _weighted_mean(entropy, weights, norm)
            )
            replay_stats: dict[str, float] = {}
            if self.replay is not None and self.replay_ref is not None:
                _, replay_logits = self._forward([self.replay.texts[i] for i in replay_index])
                replay_kl = bernoulli_kl(replay_logits, self.replay_ref[replay_index].to(self.device)).mean()
                replay_bce = torch.nn.functional.binary_cross_entropy_with_logits(
                    replay_logits, self.replay.targets[replay_index].to(self.device), reduction="sum"
                ) / len(replay_index)
                loss = loss + cfg.replay_kl_weight * replay_kl + cfg.replay_bce_weight * replay_bce
                replay_stats = {"replay_kl": replay_kl.item(), "replay_bce": replay_bce.item()}
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip
            )
            self.optimizer.step()
            stats = {
                "loss": loss.item(),
                "kl": _weighted_mean(kl, weights).item(),
                "entropy": entropy.mean().item(),
                "clip_fraction": clipped.float().mean().item(),
                **replay_stats,
            }
        self.step += 1
        record = {"step": self.step, "reward": rewards.mean().item(), **stats}
        self.history.append(record)
        return record

    def fit(self) -> list[dict[str, float]]:
        """Run until ``total_steps``, checkpointing every ``checkpoint_every`` steps."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=self.total_steps, initial=self.step, desc="grpo", disable=not cfg.progress)
        while self.step < self.total_steps:
            record = self.train_step()
            bar.update(1)
            bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                self.save_checkpoint(cfg.checkpoint_dir)
            if cfg.target_kl is not None and record["kl"] > cfg.target_kl:
                self.stopped_early = True
                break
        bar.close()
        return self.history

    # -- checkpoints ----------------------------------------------------------------------
    def save_checkpoint(self, directory: str | Path | None) -> Path:
        """Save the adapter, optimizer, step, shuffling state and history."""
        from peft import get_peft_model_state_dict

        directory = Path(directory or self.config.checkpoint_dir or ".")
        directory.mkdir(parents=True, exist_ok=True)
        state = {
            "adapter": get_peft_model_state_dict(self.model.encoder.model),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "history": self.history,
            "order": self._order,
            "generator": self.generator.get_state(),
            "sampler": self.sampler.get_state(),
            "replay_generator": self.replay_generator.get_state(),
            "config": self.config.to_dict(),
        }
        tmp = directory / (CHECKPOINT_FILE + ".tmp")
        torch.save(state, tmp)
        tmp.replace(directory / CHECKPOINT_FILE)
        return directory

    def load_checkpoint(self, directory: str | Path) -> bool:
        """Resume from ``directory`` when it holds a checkpoint; return whether one was loaded."""
        from peft import set_peft_model_state_dict

        path = Path(directory) / CHECKPOINT_FILE
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=False)
        set_peft_model_state_dict(self.model.encoder.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.history, self._order = state["step"], state["history"], state["order"]
        self.generator.set_state(state["generator"])
        self.sampler.set_state(state["sampler"])
        if "replay_generator" in state:  # checkpoints written before replay existed have none
            self.replay_generator.set_state(state["replay_generator"])
        return True

    # -- output ---------------------------------------------------------------------------
    def merged_encoder(self) -> TextEncoder:
        """The policy with its new adapter merged (a plain Hugging Face model) as a TextEncoder."""
        plain = self.model.encoder.model.merge_and_unload()
        return TextEncoder(plain, self.tokenizer, self.model.encoder.max_length, self.model.encoder.pooling)


def retune_thresholds(classifier: Any, val_dataset: Dataset) -> tuple[Thresholds, float]:
    """Thresholds tuned for ``classifier`` on labelled documents (global, then per label).

    Args:
        classifier: A :class:`~labelmatch.model.classifier.Classifier`.
        val_dataset: Labelled documents with the classifier's labels.

    Returns:
        ``(thresholds, validation macro-F1 with them)``.
    """
    from labelmatch.evaluation.metrics import binarize, macro_f1, tune_thresholds

    labels = classifier.labels
    names, scores = classifier.scores([d.text for d in val_dataset.documents], labels, replace=True)
    targets = Dataset(val_dataset.documents, labels).label_matrix()
    default, per_label = tune_thresholds(targets, scores)
    thresholds = Thresholds(default, {n: float(t) for n, t in zip(names, per_label, strict=True)})
    return thresholds, macro_f1(targets, binarize(scores, per_label))


def _thresholds(
    model_dir: Path,
    encoder: TextEncoder,
    labels: dict[str, str],
    label_emb: np.ndarray,
    info: dict[str, Any],
    val_dataset: Dataset | None,
) -> tuple[Thresholds, dict[str, float]]:
    """SFT thresholds, or thresholds re-tuned on ``val_dataset`` (with its macro-F1)."""
    from labelmatch.model.classifier import Classifier

    if val_dataset is None or not val_dataset.documents:
        return Thresholds.from_json(json.loads((model_dir / "thresholds.json").read_text())), {}
    classifier = Classifier(encoder, labels, label_emb, info["scale"], info["bias"], Thresholds())
    thresholds, val_f1 = retune_thresholds(classifier, val_dataset)
    return thresholds, {"val_macro_f1_tuned_thresholds": val_f1}


def train_grpo(
    model_dir: str | Path,
    feedback_dir: str | Path,
    out_dir: str | Path,
    config: GRPOConfig,
    val_dataset: Dataset | None = None,
    test_texts: Collection[str] = (),
    replay_dataset: Dataset | None = None,
) -> dict[str, Any]:
    """Optimise a new LoRA on the SFT model from a feedback export; write the SFT+GRPO Model artifact.

    Args:
        model_dir: SFT Model artifact (the frozen reference and the starting policy).
        feedback_dir: FeedbackExport artifact (``labelmatch feedback export``).
        out_dir: Output Model artifact directory (replaced atomically).
        config: GRPO settings.
        val_dataset: Optional labelled documents (with the model's labels) to re-tune thresholds
            on; without it the SFT thresholds are kept.
        test_texts: The evaluation's test documents: feedback on any of them is not trained on
            (counted in ``feedback_excluded_test_overlap``).
        replay_dataset: The SFT model's training documents, replayed when ``config.replays``
            (see :class:`GRPOConfig` ``replay_*``); ignored otherwise.

    Returns:
        Summary: ``steps``, ``reward_curve``, ``kl_curve``, ``final_kl``, ``history``, ``seconds``,
        ``reference_model_digest``, ``feedback_digest``, ``feedback_records``,
        ``feedback_excluded_test_overlap``, ``principals`` (the per-principal cap and its effect:
        :meth:`~labelmatch.feedback.principals.PrincipalWeights.report`) and ``out_dir``.
    """
    started = time.perf_counter()
    model_dir, feedback_dir = Path(model_dir), Path(feedback_dir)
    verify_artifact(model_dir, "Model")
    labels = json.loads((model_dir / "labels.json").read_text())
    feedback = feedback_tensors(feedback_dir, list(labels), test_texts)
    if feedback.excluded_test_overlap:
        log.warning("%d feedback records are test documents: not trained on", feedback.excluded_test_overlap)
    replay = (
        replay_tensors(replay_dataset, list(labels), config.replay_max_documents, config.seed)
        if config.replays and replay_dataset is not None else None
    )
    trainer = GRPOTrainer(model_dir, feedback, config, replay)
    if config.checkpoint_dir:
        trainer.load_checkpoint(config.checkpoint_dir)
    trainer.fit()
    history = trainer.history
    encoder = trainer.merged_encoder()
    label_emb = encoder.embed(trainer.label_texts).numpy()
    thresholds, val_metrics = _thresholds(model_dir, encoder, labels, label_emb, trainer.info, val_dataset)
    summary = {
        "steps": trainer.step,
        "reward_curve": [h["reward"] for h in history],
        "kl_curve": [h["kl"] for h in history],
        "final_kl": history[-1]["kl"] if history else 0.0,
        "stopped_early": trainer.stopped_early,
        "reference_model_digest": artifact_digest(model_dir),
        "feedback_digest": artifact_digest(feedback_dir),
        "feedback_records": len(trainer.feedback.texts),
        "feedback_excluded_test_overlap": feedback.excluded_test_overlap,
        "principals": trainer.principal_weights.report(),
    }
    capped = summary["principals"]
    if capped["capped_principals"]:
        log.info("principal cap %.3g (effective %.3g): %d of %d principals capped, %.1f%% of the "
                 "weight moved", capped["max_share"], capped["effective_share"], capped["capped_principals"],
                 capped["principals"], 100 * capped["weight_moved"])
    info = {
        **{
            k: v
            for k, v in trainer.info.items()
            if k not in ("format", "format_version", "labelmatch_version", "layout")
        },
        "max_length": encoder.max_length,
        # GRPO may read another length than SFT: the window (and a stride chosen for the old
        # window) follows the new one.
        "chunk_stride": Chunking.for_model(
            Chunking.from_info(trainer.info).mode, encoder.max_length,
            trainer.info.get("chunk_stride") if encoder.max_length == trainer.info["max_length"] else None,
        ).stride,
        "metrics": val_metrics,
        "history": history,
        "reference_model": str(model_dir),
        "reference_model_digest": summary["reference_model_digest"],
        "feedback_export": str(feedback_dir),
        "feedback_digest": summary["feedback_digest"],
        "grpo": {
            "config": config.to_dict(),
            "steps": trainer.step,
            "feedback_records": summary["feedback_records"],
            "feedback_excluded_test_overlap": summary["feedback_excluded_test_overlap"],
            "final_kl": summary["final_kl"],
            "stopped_early": trainer.stopped_early,
            "principals": summary["principals"],
        },
    }
    lineage = {
        "reference_model": str(model_dir),
        "reference_model_digest": summary["reference_model_digest"],
        "feedback": str(feedback_dir),
        "feedback_digest": summary["feedback_digest"],
    }
    with atomic_artifact_dir(out_dir) as tmp:
        save_model(
            tmp, encoder.model, trainer.tokenizer, labels, label_emb, thresholds, info, lineage=lineage,
            hierarchy=read_hierarchy(model_dir),
        )
    summary.update(history=history, seconds=round(time.perf_counter() - started, 2), out_dir=str(out_dir))
    return summary
