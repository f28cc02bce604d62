"""The training loss of the dual encoder, in one place.

For a batch of documents ``d`` and labels ``l`` with cosine ``c[d,l]`` and logit
``z[d,l] = scale * c[d,l] + bias``::

    L = w_hard * BCE(z, y; pos_weight)                       hard 0/1 targets
      + w_soft * BCE(z, s) over pairs that have a soft score  soft targets in [0, 1]
      + λ     * mean( y * relu(1 - c) + (1 - y) * relu(c - margin) )   contrastive margin term
      + ρ     * mean over positive pairs (d, p) of
                softplus( logsumexp_{n negative for d} (t * c[d,n]) - t * c[d,p] )   ranking term

* ``w_hard = w_soft = 0.5`` when the batch has soft scores (configurable), else ``w_hard = 1``.
* ``pos_weight[l]`` up-weights the positives of rare labels: ``clip(sqrt(neg_l / pos_l), 1, max)``
  computed on the training split (the square root tempers the raw ratio, which over-predicts
  rare labels).
* The contrastive term works on cosines directly: it pulls a document towards its labels'
  descriptions and pushes it below ``margin`` from the others, independent of scale and bias.
* The ranking term (``ρ``, off by default) is a multi-positive softmax over the label
  descriptions, in the spirit of sentence-transformers' MultipleNegativesRankingLoss with the
  labels as candidates: each positive label competes with the document's negative labels (not
  with its other positives), at temperature ``1 / t``. Every other label is a negative, so the
  most similar wrong labels (the hard negatives) carry most of its gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class LossWeights:
    """Weights of the loss terms.

    Attributes:
        hard: Weight of the hard-target BCE when soft scores are also present.
        soft: Weight of the soft-score BCE when soft scores are present.
        contrastive: λ, weight of the contrastive margin term.
        margin: Cosine below which a negative pair costs nothing.
        ranking: ρ, weight of the multi-positive ranking term (0: off).
        ranking_scale: ``t``, the cosine scale inside the ranking term's softmax.
    """

    hard: float = 0.5
    soft: float = 0.5
    contrastive: float = 0.2
    margin: float = 0.2
    ranking: float = 0.0
    ranking_scale: float = 20.0


def label_match_loss(
    cos: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: LossWeights,
    pos_weight: torch.Tensor | None = None,
    soft: torch.Tensor | None = None,
    soft_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Compute the loss and its parts.

    Args:
        cos: ``(batch, labels)`` cosine similarities.
        logits: ``(batch, labels)`` ``scale * cos + bias``.
        targets: ``(batch, labels)`` hard 0/1 targets.
        weights: Term weights.
        pos_weight: ``(labels,)`` positive weights for the hard BCE, or ``None``.
        soft: ``(batch, labels)`` soft scores (ignored where ``soft_mask`` is 0).
        soft_mask: ``(batch, labels)`` 1 where a soft score exists.

    Returns:
        ``{"loss", "bce_hard", "bce_soft", "contrastive", "ranking"}`` (scalars; ``loss`` is
        differentiable).
    """
    bce_hard = nn.functional.binary_cross_entropy_with_logits(logits, targets, pos_weight=pos_weight)
    has_soft = soft is not None and soft_mask is not None and bool(soft_mask.any())
    if has_soft:
        per_pair = nn.functional.binary_cross_entropy_with_logits(logits, soft, reduction="none")
        bce_soft = (per_pair * soft_mask).sum() / soft_mask.sum()
        bce = weights.hard * bce_hard + weights.soft * bce_soft
    else:
        bce_soft = torch.zeros((), device=logits.device)
        bce = bce_hard
    contrastive = (
        targets * (1 - cos).clamp(min=0) + (1 - targets) * (cos - weights.margin).clamp(min=0)
    ).mean()
    loss = bce + weights.contrastive * contrastive
    ranking = torch.zeros((), device=logits.device)
    if weights.ranking > 0:
        ranking = ranking_loss(cos, targets, weights.ranking_scale)
        loss = loss + weights.ranking * ranking
    return {
        "loss": loss,
        "bce_hard": bce_hard.detach(),
        "bce_soft": bce_soft.detach(),
        "contrastive": contrastive.detach(),
        "ranking": ranking.detach(),
    }


def ranking_loss(cos: torch.Tensor, targets: torch.Tensor, scale: float) -> torch.Tensor:
    """The multi-positive ranking term (module docstring): each positive pair's softmax
    cross-entropy against the document's negatives only; 0 when the batch has no positive.

    Args:
        cos: ``(batch, labels)`` cosine similarities.
        targets: ``(batch, labels)`` hard 0/1 targets.
        scale: Cosine scale ``t`` inside the softmax.
    """
    positive = targets > 0.5
    if not bool(positive.any()):
        return cos.sum() * 0.0
    scaled = scale * cos
    negatives = torch.logsumexp(scaled.masked_fill(positive, float("-inf")), dim=1, keepdim=True)
    per_pair = nn.functional.softplus(negatives - scaled)  # -log p(positive | itself + negatives)
    return per_pair[positive].mean()


def positive_weights(targets: torch.Tensor, max_weight: float = 10.0) -> torch.Tensor:
    """Per-label positive weights ``clip(sqrt(neg / pos), 1, max_weight)`` from a target matrix."""
    pos = targets.sum(dim=0)
    neg = targets.shape[0] - pos
    ratio = torch.sqrt(neg / pos.clamp(min=1.0))
    return ratio.clamp(min=1.0, max=max_weight)
