"""From feedback to a reward for any sampled label set (the action of GRPO).

An action ``a`` is a 0/1 vector over the model's labels. For one feedback record:

* **corrected labels** ``c`` given: ``r(a) = F1(a, c)`` — agreement with what the user says is right.
* **score only** ``s`` (1–5) on the served labels ``y``: ``r(a) = F1(a, y) · (s − 3) / 2``.
  A 5 rewards agreeing with what was served (up to +1), a 1 rewards departing from it (an exact
  repeat of the served set costs −1, a disjoint set costs 0), a 3 carries no signal.
* optional **cosine term** (``cosine_weight`` w > 0): ``+ w · mean_l (2a_l − 1) · cos_l`` with the
  policy's cosine similarities at sampling time: a small pull towards labels whose description is
  close to the document, as in the original design (kept off by default).

F1 of two empty sets is 1 (both say "no label"); F1 with exactly one empty set is 0.

What is assumed when an action differs from the rated one: the user rated only the *served*
set. A score says nothing direct about another set; we assume the rating transfers in
proportion to overlap: a set that shares a fraction F1 with the served one inherits that share of
its (centred) rating. This is exact for the served set itself, zero for disjoint sets (no
evidence either way), and between the two a linear guess. With corrected labels no such
assumption is needed: every action is compared with the corrected set. When a record has both,
the correction wins (it is the more informative signal); the score is then not used.

**Per-label credit** (:func:`feedback_label_rewards`, ``GRPOConfig.credit = "label"``): the
policy draws each label independently, so a reward that is a *sum over labels*
``R(a) = Σ_l r_l(a_l)`` can be credited label by label: label ``l``'s log-probability is pushed by
its own advantage (``r_l`` normalised within the group), not by the noise of the other 24 draws.
For such a separable reward this is the same expected gradient with far less variance. The
per-label rewards are:

* **corrected labels**: ``r_l = 1[a_l = c_l]`` (Hamming agreement with the correction);
* **score ≥ 3** on served ``y``: ``r_l = (s − 3)/2 · 1[a_l = y_l]`` for every label — a good
  rating endorses the whole served decision, its positives and its negatives;
* **score < 3**: ``r_l = (s − 3)/2 · a_l`` for the served labels only (keeping a served label
  costs, dropping it is neutral); the other labels get no signal — a bad rating says *something*
  served was wrong, not which unserved label should have been given.

It is a different reward from set F1 (Hamming agreement instead of F1), chosen because it is
separable; the reward curve of a run still reports the set reward above, so both modes are
compared on the same scale.

Note on scale: with GRPO's group normalisation (``(r − mean) / std``) the magnitude of
``(s − 3)/2`` cancels within a group (a 4 and a 5 push equally hard, only the direction
differs); ``GRPOConfig.scale_std=False`` keeps the magnitudes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RewardConfig:
    """Reward settings.

    Attributes:
        cosine_weight: Weight ``w`` of the cosine-similarity term (0 disables it).
    """

    cosine_weight: float = 0.0


def set_f1(actions: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """F1 between 0/1 label sets, broadcast over leading dimensions; two empty sets score 1.

    Args:
        actions: ``(..., L)`` 0/1 tensor.
        target: ``(..., L)`` 0/1 tensor broadcastable to ``actions``.

    Returns:
        ``(...)`` F1 values in [0, 1].
    """
    actions, target = actions.float(), target.float()
    tp = (actions * target).sum(-1)
    size = actions.sum(-1) + target.sum(-1)
    return torch.where(size > 0, 2 * tp / size.clamp(min=1e-12), torch.ones_like(tp))


def feedback_rewards(
    actions: torch.Tensor,
    served: torch.Tensor,
    scores: torch.Tensor,
    corrected: torch.Tensor,
    has_correction: torch.Tensor,
    cos: torch.Tensor | None = None,
    config: RewardConfig | None = None,
) -> torch.Tensor:
    """Rewards of sampled label sets for a batch of feedback records.

    Args:
        actions: ``(B, G, L)`` sampled 0/1 label sets (G per document).
        served: ``(B, L)`` the served labels (0/1).
        scores: ``(B,)`` user scores 1–5.
        corrected: ``(B, L)`` corrected labels (0/1; ignored where ``has_correction`` is False).
        has_correction: ``(B,)`` bool, whether the record has corrected labels.
        cos: ``(B, L)`` cosine similarities for the optional cosine term.
        config: Reward settings.

    Returns:
        ``(B, G)`` rewards.
    """
    config = config or RewardConfig()
    with_correction = set_f1(actions, corrected.unsqueeze(1))
    with_score = set_f1(actions, served.unsqueeze(1)) * ((scores.float() - 3.0) / 2.0).unsqueeze(1)
    rewards = torch.where(has_correction.unsqueeze(1), with_correction, with_score)
    if config.cosine_weight and cos is not None:
        rewards = rewards + config.cosine_weight * ((2 * actions.float() - 1) * cos.unsqueeze(1)).mean(-1)
    return rewards


def feedback_label_rewards(
    actions: torch.Tensor,
    served: torch.Tensor,
    scores: torch.Tensor,
    corrected: torch.Tensor,
    has_correction: torch.Tensor,
) -> torch.Tensor:
    """Per-label rewards of sampled label sets (the separable reward of per-label credit).

    Args:
        actions: ``(B, G, L)`` sampled 0/1 label sets.
        served: ``(B, L)`` the served labels (0/1).
        scores: ``(B,)`` user scores 1–5.
        corrected: ``(B, L)`` corrected labels (0/1; ignored where ``has_correction`` is False).
        has_correction: ``(B,)`` bool.

    Returns:
        ``(B, G, L)`` rewards ``r_l`` (see the module docstring).
    """
    actions = actions.float()
    agree_correction = (actions == corrected.float().unsqueeze(1)).float()
    centred = ((scores.float() - 3.0) / 2.0).view(-1, 1, 1)
    served = served.float().unsqueeze(1)
    agree_served = (actions == served).float()
    with_score = torch.where(centred >= 0, centred * agree_served, centred * actions * served)
    return torch.where(has_correction.view(-1, 1, 1), agree_correction, with_score)
