"""The loss formula and the metric helpers, against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from labelmatch.evaluation.metrics import (
    expected_calibration_error,
    tune_global_threshold,
    tune_label_thresholds,
)
from labelmatch.model.losses import LossWeights, label_match_loss, positive_weights


def bce(z: float, y: float, w: float = 1.0) -> float:
    p = 1 / (1 + math.exp(-z))
    return -(w * y * math.log(p) + (1 - y) * math.log(1 - p))


def test_loss_matches_formula_with_soft_scores():
    cos = torch.tensor([[0.9, 0.1], [0.3, 0.5]])
    logits = 10 * cos - 3
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    soft = torch.tensor([[0.8, 0.0], [0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    pw = torch.tensor([1.0, 2.0])
    w = LossWeights(hard=0.5, soft=0.5, contrastive=0.3, margin=0.2)
    parts = label_match_loss(cos, logits, y, w, pos_weight=pw, soft=soft, soft_mask=mask)
    z = logits.tolist()
    hard = np.mean([bce(z[0][0], 1), bce(z[0][1], 0), bce(z[1][0], 0), bce(z[1][1], 1, 2.0)])
    soft_term = bce(z[0][0], 0.8)
    contrastive = np.mean([1 - 0.9, max(0.1 - 0.2, 0), max(0.3 - 0.2, 0), 1 - 0.5])
    expected = 0.5 * hard + 0.5 * soft_term + 0.3 * contrastive
    assert float(parts["loss"]) == pytest.approx(expected, rel=1e-5)
    assert float(parts["contrastive"]) == pytest.approx(contrastive, rel=1e-5)


def test_loss_without_soft_scores_uses_hard_bce_only():
    cos = torch.tensor([[0.2]])
    parts = label_match_loss(cos, cos * 5, torch.tensor([[1.0]]), LossWeights(contrastive=0.0))
    assert float(parts["loss"]) == pytest.approx(bce(1.0, 1.0), rel=1e-6)
    assert float(parts["bce_soft"]) == 0.0


def test_ranking_term_is_each_positives_softmax_against_the_negatives_only():
    cos = torch.tensor([[0.9, 0.6, 0.1, 0.5], [0.2, 0.3, 0.4, 0.8], [0.1, 0.2, 0.3, 0.4]])
    y = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    t = 20.0
    pairs = []
    for d, p in ((0, 0), (0, 1), (1, 3)):  # the third document has no positive: no pair
        negatives = [j for j in range(4) if y[d, j] == 0]
        logits = [t * float(cos[d, p])] + [t * float(cos[d, n]) for n in negatives]
        pairs.append(-(logits[0] - math.log(sum(math.exp(v) for v in logits))))
    weights = LossWeights(contrastive=0.0, ranking=0.7, ranking_scale=t)
    parts = label_match_loss(cos, 5 * cos, y, weights)
    assert float(parts["ranking"]) == pytest.approx(np.mean(pairs), rel=1e-5)
    bce_only = label_match_loss(cos, 5 * cos, y, LossWeights(contrastive=0.0))
    assert float(bce_only["ranking"]) == 0.0
    assert float(parts["loss"]) == pytest.approx(float(bce_only["loss"]) + 0.7 * np.mean(pairs), rel=1e-5)
    # Positives do not compete: raising the first positive changes its own pair only.
    raised = cos[:1].clone()
    raised[0, 0] = 0.95
    own = math.log1p(math.exp(t * 0.1 - t * 0.95) + math.exp(t * 0.5 - t * 0.95))
    first = label_match_loss(raised, 5 * raised, y[:1], weights)["ranking"]
    assert float(first) == pytest.approx((own + pairs[1]) / 2, rel=1e-5)
    assert float(label_match_loss(cos, 5 * cos, torch.zeros_like(y), weights)["ranking"]) == 0.0


def test_positive_weights_sqrt_ratio_clipped():
    targets = torch.tensor([[1.0, 1.0, 0.0]] + [[0.0, 1.0, 0.0]] * 99)
    w = positive_weights(targets, max_weight=5.0)
    assert w.tolist() == pytest.approx([5.0, 1.0, 5.0])
    assert float(positive_weights(targets, 100.0)[0]) == pytest.approx(math.sqrt(99))


def test_threshold_tuning():
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    s = np.array([[0.9, 0.2], [0.6, 0.3], [0.3, 0.35], [0.1, 0.1]])
    t, f1 = tune_global_threshold(y, s)
    assert f1 == pytest.approx(1.0) and 0.3 < t <= 0.35
    per = tune_label_thresholds(y, s, fallback=0.5, prior_positives=0)
    assert 0.3 < per[0] <= 0.6 and 0.3 < per[1] <= 0.35


def test_threshold_tuning_separates_scores_crowded_near_one():
    # Every label scores above 0.95 (a model on a domain it never saw); the positives sit higher.
    rng = np.random.default_rng(0)
    y = np.zeros((60, 3), dtype=int)
    y[np.arange(60), np.arange(60) % 3] = 1
    s = np.where(y == 1, rng.uniform(0.992, 0.999, y.shape), rng.uniform(0.96, 0.98, y.shape))
    t, f1 = tune_global_threshold(y, s)
    assert f1 == pytest.approx(1.0) and 0.95 < t <= 0.992
    assert (tune_label_thresholds(y, s, fallback=t, prior_positives=0) > 0.95).all()
    # Scores that separate below 0.95 keep the same answer as before the tail was added.
    assert tune_global_threshold(y, s - 0.5)[0] <= 0.95

def test_label_thresholds_shrink_towards_global_by_evidence():
    rng = np.random.default_rng(0)
    y = np.zeros((400, 3), dtype=int)
    y[:100, 0] = 1  # a frequent label: 100 validation positives
    y[100, 1] = 1  # a rare label: 1 validation positive
    s = rng.uniform(0.0, 0.2, size=y.shape)
    s[:100, 0] = rng.uniform(0.3, 0.4, size=100)  # separable at ~0.3 for label 0
    s[100, 1] = 0.25  # and at 0.25 for label 1
    raw = tune_label_thresholds(y, s, fallback=0.8, prior_positives=0)
    shrunk = tune_label_thresholds(y, s, fallback=0.8, prior_positives=4)
    assert raw[1] == pytest.approx(0.25, abs=0.011)
    assert shrunk[1] == pytest.approx((raw[1] + 4 * 0.8) / 5, abs=1e-6)  # one positive: mostly global
    assert abs(shrunk[0] - raw[0]) < 0.03  # 100 positives: its own threshold, barely moved
    assert shrunk[2] == pytest.approx(0.8)  # no positive: the global threshold
    with pytest.raises(ValueError, match="prior_positives"):
        tune_label_thresholds(y, s, fallback=0.8, prior_positives=-1)


def test_ece_perfect_and_overconfident():
    y = np.array([[1], [0]] * 50)
    assert expected_calibration_error(y, y.astype(float) * 0.999)[0] < 0.01
    ece, curve = expected_calibration_error(y, np.full((100, 1), 0.95))
    assert ece == pytest.approx(0.45, abs=1e-6) and curve["count"] == [100.0]
