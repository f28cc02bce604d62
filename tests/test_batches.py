"""Length-grouped batches: every document once per pass, less padding, resumable."""

from __future__ import annotations

import random

import torch

from labelmatch.training.batches import next_batch


def _draw(n_items: int, batch_size: int, steps: int, lengths: list[int] | None,
          seed: int = 0) -> list[list[int]]:
    generator, order, batches = torch.Generator().manual_seed(seed), [], []
    for _ in range(steps):
        batch, order = next_batch(order, n_items, batch_size, generator, lengths, group_batches=5)
        batches.append(batch)
    return batches


def _padded_tokens(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)


def test_length_grouped_batches_see_every_document_once_per_pass_and_pad_less():
    rng = random.Random(0)
    n, size = 203, 8  # 203 is not a multiple of 8: passes straddle batches
    lengths = [rng.randint(5, 128) for _ in range(n)]
    steps = -(-3 * n // size)  # three whole passes (and the start of a fourth)
    grouped = _draw(n, size, steps, lengths)
    plain = _draw(n, size, steps, None)
    assert all(len(batch) == size for batch in grouped)
    drawn = [i for batch in grouped for i in batch]
    for p in range(3):  # each pass is a permutation
        assert sorted(drawn[p * n : (p + 1) * n]) == list(range(n))
    assert _padded_tokens(grouped, lengths) < 0.8 * _padded_tokens(plain, lengths)
    # Groups still mix: the first pass's batches do not run from shortest to longest.
    firsts = [min(lengths[i] for i in batch) for batch in grouped[: n // size]]
    assert firsts != sorted(firsts)


def test_length_grouped_order_is_reproducible_and_resumes_from_a_saved_order():
    lengths = [(7 * i) % 50 + 1 for i in range(100)]
    assert _draw(100, 16, 20, lengths, seed=1) == _draw(100, 16, 20, lengths, seed=1)
    assert _draw(100, 16, 20, lengths, seed=1) != _draw(100, 16, 20, lengths, seed=2)
    generator, order = torch.Generator().manual_seed(3), []
    for _ in range(9):
        _, order = next_batch(order, 100, 16, generator, lengths)
    saved_order, saved_state = list(order), generator.get_state()
    expected = [next_batch(order, 100, 16, generator, lengths)[0] for _ in range(1)]
    resumed = torch.Generator()
    resumed.set_state(saved_state)
    assert [next_batch(saved_order, 100, 16, resumed, lengths)[0]] == expected
