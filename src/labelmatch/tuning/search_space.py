"""The hyper-parameter search space of a tuning run: bounds, initial population, PBT mutations.

The space is written as plain bounds (not Ray objects) so it can be validated, saved in the
artifact and shown in ``--help`` without Ray; :meth:`SearchSpace.mutations` turns it into the
``hyperparam_mutations`` of Ray Tune's ``PopulationBasedTraining``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from labelmatch.core.errors import ConfigError

#: Hyper-parameters PBT mutates (a subset of ``labelmatch.training.sft.MUTABLE``).
MUTATED = ("lr", "weight_decay", "warmup_ratio", "contrastive_weight", "scale")
#: Hyper-parameters sampled on a log scale.
LOG_SCALE = ("lr",)


@dataclass
class SearchSpace:
    """Ranges of every tuned hyper-parameter, as ``(low, high)`` pairs.

    Attributes:
        lr: Peak LoRA learning rate, sampled log-uniformly. The default (1e-4–3e-3) sits around
            the trainer's default 1e-3: LoRA adapters start at zero and need 10–100× the
            learning rate of full fine-tuning (the issue's 1e-6–5e-5 is a full fine-tuning
            range; at 1e-5 a rank-8 adapter barely moves in a tuning budget). Configurable.
        weight_decay: AdamW weight decay of the LoRA parameters.
        warmup_ratio: Share of the steps spent warming the learning rate up.
        contrastive_weight: λ of the contrastive margin term.
        scale: Cosine scale of ``logit = scale * cos + bias``.
        lora_ranks: LoRA ranks; each trial gets one at the start (spread over the population,
            see :meth:`initial_population`). Not mutated: a checkpoint's weights have its rank.
    """

    lr: tuple[float, float] = (1e-4, 3e-3)
    weight_decay: tuple[float, float] = (0.0, 0.1)
    warmup_ratio: tuple[float, float] = (0.0, 0.2)
    contrastive_weight: tuple[float, float] = (0.05, 1.0)
    scale: tuple[float, float] = (10.0, 40.0)
    lora_ranks: tuple[int, ...] = (4, 8, 16, 32)

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: Any = "search_space") -> SearchSpace:
        """Build from a JSON-like mapping, refusing unknown hyper-parameters by name and values of
        the wrong type (:func:`labelmatch.core.settings.build_settings`)."""
        from labelmatch.core.settings import build_settings

        cls.check_names(values)
        return build_settings(cls, values, source)

    @classmethod
    def check_names(cls, values: Any) -> None:
        """Refuse hyper-parameters the search space does not tune, by name.

        Raises:
            ConfigError: ``unknown hyper-parameter(s) in the search space: dropout (tunable: ...)``.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known) if isinstance(values, dict) else []
        if unknown:
            raise ConfigError(
                f"unknown hyper-parameter(s) in the search space: {', '.join(unknown)} "
                f"(tunable: {', '.join(sorted(known))})"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (recorded in the report and the model's ``labelmatch.json``)."""
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad range."""
        for name in MUTATED:
            bounds = getattr(self, name)
            if len(bounds) != 2 or not all(isinstance(b, int | float) and math.isfinite(b) for b in bounds):
                raise ConfigError(
                    f"search space '{name}' must be a pair of numbers (low, high), got {bounds!r}"
                )
            low, high = bounds
            if low > high:
                raise ConfigError(f"search space '{name}' range is reversed: low {low} > high {high}")
            if low < 0 or ((name in LOG_SCALE or name == "scale") and low <= 0):
                raise ConfigError(f"search space '{name}' must be positive, got low {low}")
        if self.warmup_ratio[1] >= 1.0:
            raise ConfigError(
                f"search space 'warmup_ratio' must stay below 1, got high {self.warmup_ratio[1]}"
            )
        if not self.lora_ranks or any(not isinstance(r, int) or r <= 0 for r in self.lora_ranks):
            raise ConfigError(f"search space 'lora_ranks' must be positive integers, got {self.lora_ranks!r}")

    def sample(self, rng: np.random.Generator) -> dict[str, float]:
        """One random point of the mutated hyper-parameters."""
        point = {}
        for name in MUTATED:
            low, high = getattr(self, name)
            if name in LOG_SCALE:
                point[name] = float(math.exp(rng.uniform(math.log(low), math.log(high))))
            else:
                point[name] = float(rng.uniform(low, high))
        return point

    def initial_population(self, trials: int, seed: int) -> list[dict[str, Any]]:
        """The starting configuration of every trial, reproducible from ``seed``.

        Ranks are dealt round-robin from a shuffled list rather than drawn independently, so a
        small population still covers every rank (4 trials, 4 ranks: one each); the other
        hyper-parameters are drawn at random. PBT and random search start from the same list.
        """
        rng = np.random.default_rng(seed)
        ranks = [int(r) for r in rng.permutation(list(self.lora_ranks))]
        return [
            {**self.sample(rng), "lora_rank": ranks[i % len(ranks)], "trial_index": i} for i in range(trials)
        ]

    def mutations(self) -> dict[str, Any]:
        """``hyperparam_mutations`` for ``PopulationBasedTraining`` (resample distributions)."""
        from ray import tune

        return {
            name: tune.loguniform(*getattr(self, name))
            if name in LOG_SCALE
            else tune.uniform(*getattr(self, name))
            for name in MUTATED
        }


@dataclass
class ClipToBounds:
    """PBT ``custom_explore_fn``: keep perturbed values inside the search space.

    PBT perturbs by multiplying with 0.8 or 1.2 and does not clip, so without this a learning
    rate walks out of its range after a few perturbations.
    """

    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for name, (low, high) in self.bounds.items():
            config[name] = float(min(max(config[name], low), high))
        return config
