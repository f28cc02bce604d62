"""The per-principal cap on GRPO weights: the bound it promises, what it leaves alone, its report."""

from __future__ import annotations

import random

import pytest

from labelmatch.core.errors import ConfigError
from labelmatch.feedback.principals import cap_principal_weights, principal_key


def flood(
    honest_users: int = 12, per_user: int = 4, attacker_share: float = 0.5
) -> tuple[list[str], list[float]]:
    """``honest_users`` users with ``per_user`` records each, plus ``mallory`` holding ``attacker_share``
    of all records (half of them at weight 0.5, as previous-version feedback)."""
    honest = [f"user-{k}" for k in range(honest_users) for _ in range(per_user)]
    n_attack = round(len(honest) * attacker_share / (1 - attacker_share))
    principals = honest + ["mallory"] * n_attack
    weights = [1.0] * len(honest) + [1.0 if i % 2 else 0.5 for i in range(n_attack)]
    return principals, weights


def test_a_flooding_principal_is_held_to_the_cap_exactly_and_nobody_else_changes():
    principals, weights = flood()
    capped = cap_principal_weights(principals, weights, 0.1)
    assert capped.records["mallory"] == 48 and capped.share_before["mallory"] == pytest.approx(36 / 84)
    assert capped.share_after["mallory"] == pytest.approx(0.1, abs=1e-12)  # exactly the cap
    assert capped.capped == ["mallory"] and capped.effective_share == 0.1
    # honest records keep their weights; the attacker's are scaled by one factor (0.5 vs 1 kept)
    honest = [(w, c) for p, w, c in zip(principals, weights, capped.weights, strict=True) if p != "mallory"]
    assert all(w == c for w, c in honest)
    attack = [(w, c) for p, w, c in zip(principals, weights, capped.weights, strict=True) if p == "mallory"]
    factors = {round(c / w, 12) for w, c in attack}
    assert len(factors) == 1 and factors.pop() < 1
    # its total is 0.1 of the run: 48 honest weight units hold 0.9
    assert sum(c for _, c in attack) == pytest.approx(48 / 9)
    report = capped.report(top_k=3)
    assert report["top"][0] == {"principal": "mallory", "records": 48, "share_before": pytest.approx(36 / 84),
                                "share_after": pytest.approx(0.1), "capped": True}
    assert len(report["top"]) == 3 and report["principals"] == 13 and report["records"] == 96
    assert report["largest_share_after"] == pytest.approx(0.1) and report["capped_principals"] == 1
    assert report["weight_moved"] == pytest.approx(36 / 84 - 0.1)


def test_honest_users_under_the_cap_are_untouched_and_a_cap_of_one_changes_nothing():
    principals, weights = flood(attacker_share=0.0)
    for share in (0.1, 1.0):
        capped = cap_principal_weights(principals, weights, share)
        assert capped.weights == weights and capped.capped == [] and capped.weight_moved == 0.0
    principals, weights = flood()
    assert cap_principal_weights(principals, weights, 1.0).weights == weights


def test_too_few_principals_end_up_equal():
    """With n principals nobody can be held below 1/n: the bound is max(share, 1/n)."""
    principals = ["a"] * 10 + ["b"] * 3 + ["c"]
    capped = cap_principal_weights(principals, [1.0] * 14, 0.1)
    assert capped.effective_share == pytest.approx(1 / 3)
    assert all(v == pytest.approx(1 / 3) for v in capped.share_after.values())
    assert capped.capped == ["a", "b"] and capped.weights[-1] == 1.0  # nobody is raised
    one = cap_principal_weights(["x"] * 5, [1.0] * 5, 0.1)  # a single principal: nothing to cap
    assert one.weights == [1.0] * 5 and one.effective_share == 1.0


def test_the_bound_holds_for_any_input():
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randint(1, 15)
        principals = [f"p{rng.randrange(n)}" for _ in range(rng.randint(1, 60))]
        weights = [rng.choice([1.0, 0.5, rng.uniform(0.01, 1.0)]) for _ in principals]
        share = rng.choice([0.05, 0.1, 0.2, 1 / 3, 0.5, 1.0, rng.uniform(0.01, 1.0)])
        capped = cap_principal_weights(principals, weights, share)
        assert capped.effective_share == max(share, 1 / len(set(principals)))
        assert max(capped.share_after.values()) <= capped.effective_share + 1e-9
        assert all(c <= w for w, c in zip(weights, capped.weights, strict=True))
        assert all(c == w for p, w, c in zip(principals, weights, capped.weights, strict=True)
                   if p not in capped.capped)
        for p in capped.capped:  # a capped principal sits exactly at the bound
            assert capped.share_after[p] == pytest.approx(capped.effective_share, abs=1e-9)


def test_records_without_a_principal_count_per_source():
    assert principal_key("alice", "serve") == "alice"
    assert principal_key("", "serve") == "(unknown:serve)"
    assert principal_key("", "serve-text") == "(unknown:serve-text)" != principal_key("", "import")
    assert principal_key("", "") == "(unknown:?)"


def test_bad_settings_are_refused():
    for share in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="max_principal_share"):
            cap_principal_weights(["a"], [1.0], share)
    with pytest.raises(ConfigError, match="2 principals for 1 weights"):
        cap_principal_weights(["a", "b"], [1.0], 0.1)
