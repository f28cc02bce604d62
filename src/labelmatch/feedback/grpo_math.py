"""The mathematics of GRPO for a multi-label policy of independent Bernoulli labels.

For a document with label logits ``z`` (``p = sigmoid(z)``), the policy draws a label set ``a``
with ``a_l ~ Bernoulli(p_l)`` independently, so

* ``log π(a) = Σ_l a_l log p_l + (1 − a_l) log(1 − p_l)``;
* ``KL(π ‖ ref) = Σ_l p_l log(p_l / q_l) + (1 − p_l) log((1 − p_l) / (1 − q_l))`` exactly, in closed
  form (no sampling estimate), with ``q = sigmoid(z_ref)``;
* ``H(π) = −Σ_l p_l log p_l + (1 − p_l) log(1 − p_l)``.

Everything is computed from logits with ``logsigmoid`` (``log(1 − p) = logsigmoid(−z)``), which
stays finite for saturated probabilities. ``tests/test_grpo_math.py`` checks each function
against brute-force enumeration of all 2^L label sets.
"""

from __future__ import annotations

import torch
from torch.nn.functional import logsigmoid


def sample_label_sets(
    logits: torch.Tensor, group_size: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``group_size`` label sets per document: ``(B, L)`` logits → ``(B, G, L)`` float 0/1."""
    probs = torch.sigmoid(logits.detach()).unsqueeze(1).expand(-1, group_size, -1)
    return torch.bernoulli(probs, generator=generator)


def label_log_probs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log π(a_l)`` of each label's draw; ``(B, L)`` logits and ``(B, G, L)`` actions → ``(B, G, L)``."""
    z = logits.unsqueeze(1) if actions.dim() == logits.dim() + 1 else logits
    return actions * logsigmoid(z) + (1 - actions) * logsigmoid(-z)


def log_prob(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """``log π(a)`` summed over labels; ``(B, L)`` logits and ``(B, G, L)`` actions → ``(B, G)``."""
    return label_log_probs(logits, actions).sum(-1)


def bernoulli_kl(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Exact ``KL(π ‖ ref)`` of independent Bernoulli labels, summed over labels: ``(B, L)`` → ``(B,)``."""
    p = torch.sigmoid(logits)
    log_p, log_not_p = logsigmoid(logits), logsigmoid(-logits)
    log_q, log_not_q = logsigmoid(ref_logits), logsigmoid(-ref_logits)
    return (p * (log_p - log_q) + (1 - p) * (log_not_p - log_not_q)).sum(-1)


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of independent Bernoulli labels, summed over labels: ``(B, L)`` → ``(B,)``."""
    p = torch.sigmoid(logits)
    return -(p * logsigmoid(logits) + (1 - p) * logsigmoid(-logits)).sum(-1)


def group_advantages(rewards: torch.Tensor, scale_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-normalised advantages ``(r − mean) / (std + eps)`` over the group dimension (1).

    ``rewards`` is ``(B, G)`` (one reward per label set) or ``(B, G, L)`` (per-label credit: each
    label is normalised within its own group).

    ``std`` is the population standard deviation of the group. With ``scale_std=False`` only
    the mean is subtracted (reward magnitudes are kept). A group whose rewards are all equal
    gets zero advantages: it carries no preference.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_std:
        return centred
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def clipped_surrogate(
    new_log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_eps: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped objective per sample (to be *maximised*) and whether clipping was active.

    ``min(ρ A, clip(ρ, 1 − ε, 1 + ε) A)`` with ``ρ = exp(new − old)``; ``old_log_prob`` is the
    log-probability under the policy that sampled the actions (treated as a constant).

    Returns:
        ``(objective, clipped)``, both shaped like ``advantages``.
    """
    ratio = torch.exp(new_log_prob - old_log_prob.detach())
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * advantages
    objective = torch.minimum(unclipped, clipped)
    return objective, (clipped < unclipped).detach()
