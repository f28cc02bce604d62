"""Shuffled mini-batches that survive a checkpoint (SFT and GRPO draw batches the same way)."""

from __future__ import annotations

import torch


def next_batch(order: list[int], n_items: int, batch_size: int,
               generator: torch.Generator) -> tuple[list[int], list[int]]:
    """The next batch of indices and the order left after it.

    ``order`` is the rest of the current shuffle; when fewer than ``batch_size`` remain, a new
    permutation of ``range(n_items)`` is appended, so every item is seen once per pass and a
    checkpoint that keeps ``order`` (and the generator's state) resumes the exact sequence.

    Args:
        order: Indices not drawn yet (saved in checkpoints).
        n_items: How many items there are.
        batch_size: Indices per batch.
        generator: The seeded generator shuffles draw from.

    Returns:
        ``(batch, remaining order)``.
    """
    if len(order) < batch_size:
        order = order + torch.randperm(n_items, generator=generator).tolist()
    return order[:batch_size], order[batch_size:]
