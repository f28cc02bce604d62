"""GRPO mathematics against brute force over all 2^3 label sets of 3 labels."""

from __future__ import annotations

import itertools

import pytest
import torch

from labelmatch.feedback.grpo_math import (
    bernoulli_entropy,
    bernoulli_kl,
    clipped_surrogate,
    group_advantages,
    label_log_probs,
    log_prob,
    sample_label_sets,
)

ALL_SETS = torch.tensor(list(itertools.product([0.0, 1.0], repeat=3)))  # (8, 3)


def brute_probability(logits: torch.Tensor) -> torch.Tensor:
    """P(a) for each of the 8 label sets, as the product of per-label Bernoulli probabilities."""
    p = torch.sigmoid(logits)
    return torch.stack([torch.prod(torch.where(a.bool(), p, 1 - p)) for a in ALL_SETS])


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.tensor([1.3, -0.7, 0.2], dtype=torch.float64)


def test_log_prob_matches_enumeration_and_sums_to_one(logits):
    got = log_prob(logits.unsqueeze(0), ALL_SETS.double().unsqueeze(0))[0]
    expected = brute_probability(logits)
    torch.testing.assert_close(got.exp(), expected)
    assert float(got.exp().sum()) == pytest.approx(1.0)


def test_log_prob_is_finite_for_saturated_logits():
    z = torch.tensor([[60.0, -60.0, 0.0]])
    value = log_prob(z, torch.tensor([[[0.0, 1.0, 1.0]]]))
    assert torch.isfinite(value).all() and value.item() < -100


def test_kl_matches_enumeration(logits):
    ref = torch.tensor([0.4, 0.9, -1.5], dtype=torch.float64)
    p, q = brute_probability(logits), brute_probability(ref)
    expected = (p * (p / q).log()).sum()
    got = bernoulli_kl(logits.unsqueeze(0), ref.unsqueeze(0))[0]
    torch.testing.assert_close(got, expected)
    assert bernoulli_kl(logits.unsqueeze(0), logits.unsqueeze(0)).abs().item() < 1e-12
    assert got.item() > 0


def test_kl_gradient_matches_enumeration(logits):
    ref = torch.tensor([0.4, 0.9, -1.5], dtype=torch.float64)
    z1 = logits.clone().requires_grad_(True)
    bernoulli_kl(z1.unsqueeze(0), ref.unsqueeze(0)).sum().backward()
    z2 = logits.clone().requires_grad_(True)
    p, q = brute_probability(z2), brute_probability(ref)
    (p * (p / q).log()).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_entropy_matches_enumeration(logits):
    p = brute_probability(logits)
    torch.testing.assert_close(bernoulli_entropy(logits.unsqueeze(0))[0], -(p * p.log()).sum())


def test_sampling_frequencies_match_probabilities(logits):
    generator = torch.Generator().manual_seed(0)
    samples = sample_label_sets(logits.float().unsqueeze(0), 20000, generator)[0]  # (G, 3)
    index = (samples * torch.tensor([4.0, 2.0, 1.0])).sum(-1).long()  # product() order: first label is MSB
    frequencies = torch.bincount(index, minlength=8).double() / len(index)
    torch.testing.assert_close(frequencies, brute_probability(logits), atol=0.015, rtol=0)


def test_policy_gradient_of_surrogate_equals_exact_gradient(logits):
    """At ratio 1, E_a[∇ρ(a)·A(a)] = ∇ Σ_a π(a) A(a) (the score-function identity)."""
    advantages = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3, 1.1, -2.0, 0.7], dtype=torch.float64)
    z1 = logits.clone().requires_grad_(True)
    new = log_prob(z1.unsqueeze(0), ALL_SETS.double().unsqueeze(0))
    objective, _ = clipped_surrogate(new, new.detach(), advantages.unsqueeze(0))
    weights = brute_probability(logits).unsqueeze(0)
    (objective * weights).sum().backward()
    z2 = logits.clone().requires_grad_(True)
    (brute_probability(z2) * advantages).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_per_label_credit_gradient_equals_exact_gradient_of_separable_reward(logits):
    """Per-label credit: for R(a) = Σ_l r_l(a_l), Σ_l ∇ρ_l(a_l)·r_l(a_l) averaged over π is ∇ E_π[R]."""
    table = torch.tensor([[0.3, -1.0], [2.0, 0.5], [-0.4, 1.5]], dtype=torch.float64)  # r_l(0), r_l(1)
    per_label = torch.stack([table[torch.arange(3), a.long()] for a in ALL_SETS])  # (8, 3)
    z1 = logits.clone().requires_grad_(True)
    new = label_log_probs(z1.unsqueeze(0), ALL_SETS.double().unsqueeze(0))  # (1, 8, 3)
    torch.testing.assert_close(new.sum(-1), log_prob(z1.unsqueeze(0), ALL_SETS.double().unsqueeze(0)))
    objective, _ = clipped_surrogate(new, new.detach(), per_label.unsqueeze(0))
    (objective.sum(-1) * brute_probability(logits).unsqueeze(0)).sum().backward()
    z2 = logits.clone().requires_grad_(True)
    (brute_probability(z2) * per_label.sum(-1)).sum().backward()
    torch.testing.assert_close(z1.grad, z2.grad)


def test_group_advantages():
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-12)
    mean, std = 0.5, (0.125) ** 0.5  # population std of [1, 0, .5, .5]
    torch.testing.assert_close(adv[0], (rewards[0] - mean) / std)
    assert torch.equal(adv[1], torch.zeros(4))  # no preference within an all-equal group
    torch.testing.assert_close(group_advantages(rewards, scale_std=False)[0], rewards[0] - mean)
    assert adv[0].mean().abs() < 1e-6
    per_label = torch.stack([rewards, rewards.flip(1)], dim=-1)  # (B, G, L): each label in its own group
    torch.testing.assert_close(group_advantages(per_label, eps=1e-12)[..., 0], adv)


@pytest.mark.parametrize(
    ("ratio", "advantage", "expected", "clipped"),
    [
        (1.5, 2.0, 1.2 * 2.0, True),  # good action, ratio above 1+ε: capped
        (0.5, 2.0, 0.5 * 2.0, False),  # good action made less likely: no cap (pessimistic min)
        (0.5, -2.0, 0.8 * -2.0, True),  # bad action, ratio below 1−ε: capped
        (1.5, -2.0, 1.5 * -2.0, False),  # bad action made more likely: full penalty
        (1.1, 1.0, 1.1, False),  # inside the trust region
    ],
)
def test_clipped_surrogate(ratio, advantage, expected, clipped):
    old = torch.tensor([-1.0])
    new = (old + torch.log(torch.tensor([ratio]))).requires_grad_(True)
    objective, was_clipped = clipped_surrogate(new, old, torch.tensor([advantage]), clip_eps=0.2)
    assert objective.item() == pytest.approx(expected, rel=1e-5)
    assert bool(was_clipped.item()) is clipped
    objective.sum().backward()
    assert (new.grad.abs().item() == 0.0) is clipped  # a clipped sample gives no gradient
