"""Shuffled mini-batches that survive a checkpoint (SFT and GRPO draw batches the same way).

With ``lengths``, each pass is length-grouped (the idea of Hugging Face's
``LengthGroupedSampler``): the shuffled pass is cut into groups of ``group_batches`` batches, each
group sorted by length and cut into batches, and the batches of a group shuffled. A batch then
holds documents of similar length, so dynamic padding pads less, while every document is still
seen once per pass and the groups still mix the corpus.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def length_grouped_pass(items: list[int], lengths: Sequence[int], batch_size: int,
                        group_batches: int, generator: torch.Generator) -> list[int]:
    """``items`` reordered so that consecutive batches hold items of similar length.

    ``items`` (already shuffled) is cut into groups of ``group_batches`` batches; each group is
    sorted by length and cut into batches, and a group's full batches are shuffled. A partial
    batch (fewer than ``batch_size`` items) can only be the last one, and stays last.

    Args:
        items: Shuffled indices.
        lengths: Length of every index (e.g. its token count).
        batch_size: Indices per batch.
        group_batches: Batches per sorted group (larger: less padding, less mixing).
        generator: The seeded generator the batches of a group are shuffled with.

    Returns:
        The same indices, reordered.
    """
    order: list[int] = []
    span = batch_size * group_batches
    for start in range(0, len(items), span):
        group = sorted(items[start : start + span], key=lambda i: lengths[i])
        batches = [group[b : b + batch_size] for b in range(0, len(group), batch_size)]
        partial = batches.pop() if len(batches[-1]) < batch_size else []
        for b in torch.randperm(len(batches), generator=generator).tolist():
            order.extend(batches[b])
        order.extend(partial)
    return order


def next_batch(order: list[int], n_items: int, batch_size: int, generator: torch.Generator,
               lengths: Sequence[int] | None = None, group_batches: int = 50) -> tuple[list[int], list[int]]:
    """The next batch of indices and the order left after it.

    ``order`` is the rest of the current shuffle; when fewer than ``batch_size`` remain, a new
    permutation of ``range(n_items)`` is appended (length-grouped when ``lengths`` is given), so
    every item is seen once per pass and a checkpoint that keeps ``order`` (and the generator's
    state) resumes the exact sequence.

    Args:
        order: Indices not drawn yet (saved in checkpoints).
        n_items: How many items there are.
        batch_size: Indices per batch.
        generator: The seeded generator shuffles draw from.
        lengths: Length of every item: group batches by length (``None``: plain shuffle).
        group_batches: Batches per sorted group when grouping by length.

    Returns:
        ``(batch, remaining order)``.
    """
    if len(order) < batch_size:
        permutation = torch.randperm(n_items, generator=generator).tolist()
        if lengths is not None:
            # The pass's first items complete the leftover batch, so its groups stay aligned.
            head = (batch_size - len(order)) % batch_size
            permutation = permutation[:head] + length_grouped_pass(
                permutation[head:], lengths, batch_size, group_batches, generator)
        order = order + permutation
    return order[:batch_size], order[batch_size:]
