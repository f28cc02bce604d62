"""The feedback → reward mapping on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from labelmatch.feedback.rewards import RewardConfig, feedback_label_rewards, feedback_rewards, set_f1


def rewards_for(actions, served=(1, 1, 0), score=5, corrected=None, cos=None, cosine_weight=0.0):
    """Rewards of a list of 3-label actions for one feedback record."""
    return feedback_rewards(
        torch.tensor([actions], dtype=torch.float32),
        torch.tensor([served], dtype=torch.float32),
        torch.tensor([score]),
        torch.tensor([corrected or (0, 0, 0)], dtype=torch.float32),
        torch.tensor([corrected is not None]),
        None if cos is None else torch.tensor([cos]),
        RewardConfig(cosine_weight),
    )[0].tolist()


def test_set_f1():
    assert set_f1(torch.tensor([1.0, 0, 1]), torch.tensor([1.0, 0, 1])).item() == 1.0
    assert set_f1(torch.tensor([1.0, 0, 0]), torch.tensor([1.0, 0, 1])).item() == pytest.approx(2 / 3)
    assert set_f1(torch.tensor([0.0, 1, 0]), torch.tensor([1.0, 0, 1])).item() == 0.0
    assert set_f1(torch.tensor([0.0, 0, 0]), torch.tensor([0.0, 0, 0])).item() == 1.0  # both say "none"
    assert set_f1(torch.tensor([0.0, 0, 0]), torch.tensor([1.0, 0, 0])).item() == 0.0


def test_corrected_labels_reward_agreement_with_them():
    got = rewards_for([(1, 0, 1), (1, 0, 0), (0, 1, 0), (0, 0, 0)], corrected=(1, 0, 1), score=1)
    assert got == pytest.approx([1.0, 2 / 3, 0.0, 0.0])  # the score (1) is not used


def test_empty_correction_rewards_the_empty_set():
    # corrected_labels == [] means "no label applies": only the empty set agrees with it
    assert rewards_for([(0, 0, 0), (1, 0, 0)], corrected=(), score=2) == pytest.approx([1.0, 0.0])


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (5, [1.0, 0.5, 0.0]),  # a 5: agreeing with the served set is good
        (4, [0.5, 0.25, 0.0]),
        (3, [0.0, 0.0, 0.0]),  # a 3: no signal
        (2, [-0.5, -0.25, 0.0]),
        (1, [-1.0, -0.5, 0.0]),  # a 1: repeating the served set is bad, departing from it is not
    ],
)
def test_score_only_rewards_agreement_with_served_times_centred_score(score, expected):
    # actions: the served set itself, half overlap (F1 0.5), disjoint
    got = rewards_for([(1, 1, 0), (1, 0, 1), (0, 0, 1)], served=(1, 1, 0), score=score)
    assert got == pytest.approx(expected)


def test_cosine_term_adds_signed_mean_cosine():
    cos = (0.8, -0.2, 0.1)
    base = rewards_for([(1, 0, 0)], served=(1, 0, 0), score=5)
    with_cos = rewards_for([(1, 0, 0)], served=(1, 0, 0), score=5, cos=cos, cosine_weight=0.5)
    assert with_cos[0] - base[0] == pytest.approx(0.5 * (0.8 + 0.2 - 0.1) / 3)
    assert rewards_for([(1, 0, 0)], served=(1, 0, 0), score=5, cos=cos, cosine_weight=0.0) == base


def test_batch_mixes_corrected_and_score_only_records():
    actions = torch.tensor([[[1.0, 0, 0]], [[1.0, 0, 0]]])
    got = feedback_rewards(
        actions,
        torch.tensor([[1.0, 0, 0], [1.0, 0, 0]]),
        torch.tensor([1, 1]),
        torch.tensor([[1.0, 0, 0], [0.0, 0, 0]]),
        torch.tensor([True, False]),
    )
    assert got.tolist() == [[1.0], [-1.0]]


def label_rewards_for(actions, served=(1, 1, 0), score=5, corrected=None):
    """Per-label rewards of a list of 3-label actions for one feedback record."""
    return feedback_label_rewards(
        torch.tensor([actions], dtype=torch.float32),
        torch.tensor([served], dtype=torch.float32),
        torch.tensor([score]),
        torch.tensor([corrected or (0, 0, 0)], dtype=torch.float32),
        torch.tensor([corrected is not None]),
    )[0].tolist()


def test_label_rewards_with_correction_are_per_label_agreement():
    got = label_rewards_for([(1, 0, 1), (0, 1, 1)], corrected=(1, 0, 0), score=1)
    assert got == [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize(
    ("score", "expected"),
    [
        (5, [[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]]),  # a good rating endorses positives and negatives
        (4, [[0.5, 0.5, 0.5], [0.5, 0.0, 0.0]]),
        (3, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
        # a bad rating: keeping a served label costs; unserved labels get no signal
        (1, [[-1.0, -1.0, 0.0], [-1.0, 0.0, 0.0]]),
    ],
)
def test_label_rewards_with_score_only(score, expected):
    # actions: the served set itself; served label 0 kept, served label 1 dropped, label 2 added
    assert label_rewards_for([(1, 1, 0), (1, 0, 1)], served=(1, 1, 0), score=score) == expected
