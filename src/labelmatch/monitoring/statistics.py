"""Two-sample drift statistics: each compares a window of served predictions with the reference.

Every test here is *two-sample*: the reference is itself a finite sample (the validation split
as the exported model scores it), so its own noise is part of the null distribution and the
stated false-alarm rate holds at any reference size.

* :func:`mmd_permutation_test`: maximum mean discrepancy with RBF kernels at several bandwidths
  (multiples of the pooled sample's median pairwise distance) and a permutation p-value (Gretton
  et al., 2012; aggregated over bandwidths as in Schrab et al., 2023). Its false-alarm rate under
  no drift is at most ``alpha`` by construction (exchangeability), for any window size.
* :func:`psi`: population stability index over the reference's quantile bins, a descriptive
  figure with the usual reading (< 0.1 stable, 0.1–0.25 moderate shift, > 0.25 large shift);
  it has no p-value and grows on small windows, so no default rule fires on it.
* The Kolmogorov–Smirnov and Fisher exact tests come from SciPy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: The conventional reading of the population stability index.
PSI_MODERATE, PSI_LARGE = 0.1, 0.25
#: RBF bandwidths of the MMD test, as multiples of the median pairwise distance.
BANDWIDTHS = (0.25, 0.5, 1.0)


def rbf_bandwidth(pooled: np.ndarray, max_points: int = 1000, seed: int = 0) -> float:
    """The median pairwise Euclidean distance of (at most ``max_points`` of) ``pooled``."""
    rng = np.random.default_rng(seed)
    sample = pooled if len(pooled) <= max_points else pooled[rng.choice(len(pooled), max_points, False)]
    sq = _squared_distances(sample, sample)
    upper = sq[np.triu_indices(len(sample), k=1)]
    median = float(np.sqrt(np.median(upper))) if len(upper) else 1.0
    return median if median > 0 else 1.0


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(sq, 0.0)


def mmd_permutation_test(reference: np.ndarray, window: np.ndarray, permutations: int = 500, seed: int = 0,
                         bandwidths: Sequence[float] = BANDWIDTHS) -> tuple[float, float]:
    """MMD between two samples over several RBF bandwidths, and its permutation p-value.

    One bandwidth is a bet on the scale at which the samples differ: the median pairwise
    distance alone (the usual heuristic) misses a shift that moves a fifth of the documents to a
    small region (measured on Bitext, ``bench/bench_drift.py``). So the squared MMD is computed at
    each ``bandwidths`` multiple of the median distance, each is standardised by its own
    permutation distribution, and the largest standardised value is the statistic; the same
    permutations give its null distribution, so the test keeps its level (in the spirit of
    MMDAgg, Schrab et al., 2023).

    Args:
        reference: ``(n, d)`` reference vectors.
        window: ``(m, d)`` vectors of the window under test.
        permutations: Random relabellings of the pooled sample (the p-value's resolution is
            ``1 / (permutations + 1)``).
        seed: Seed of the permutations.
        bandwidths: Multiples of the median pairwise distance used as RBF bandwidths.

    Returns:
        ``(statistic, p_value)``: the largest standardised squared MMD (V-statistic) and
        ``(1 + #{permuted >= observed}) / (1 + permutations)``.
    """
    x = np.asarray(reference, dtype=np.float64)
    y = np.asarray(window, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ValueError(f"expected two non-empty (n, d) samples of one width, got {x.shape} and {y.shape}")
    pooled = np.concatenate([x, y])
    median = rbf_bandwidth(pooled, seed=seed)
    squared = _squared_distances(pooled, pooled)
    n, total = len(x), len(pooled)
    rng = np.random.default_rng(seed)
    orders = np.concatenate([np.arange(total)[None, :],
                             np.argsort(rng.random((permutations, total)), axis=1)])
    stats = np.empty((len(bandwidths), len(orders)))
    for b, multiple in enumerate(bandwidths):
        kernel = np.exp(-squared / (2.0 * (multiple * median) ** 2))
        for start in range(0, len(orders), 100):  # 100 relabellings per matrix product bounds memory
            chunk = orders[start : start + 100]
            w = np.full((len(chunk), total), -1.0 / (total - n))
            w[np.arange(len(chunk))[:, None], chunk[:, :n]] = 1.0 / n
            stats[b, start : start + len(chunk)] = ((w @ kernel) * w).sum(1)
    null = stats[:, 1:]
    standardised = (stats - null.mean(1, keepdims=True)) / (null.std(1, keepdims=True) + 1e-12)
    best = standardised.max(0)
    observed = float(best[0])
    exceed = int((best[1:] >= observed - 1e-12).sum())
    return observed, (1 + exceed) / (1 + permutations)


def quantile_edges(reference: np.ndarray, bins: int = 10) -> np.ndarray:
    """Inner bin edges at the reference's quantiles (ties merged), for :func:`psi`."""
    inner = np.quantile(np.asarray(reference, dtype=np.float64), np.linspace(0, 1, bins + 1)[1:-1])
    return np.unique(inner)


def psi(reference: np.ndarray, window: np.ndarray, bins: int = 10, eps: float = 1e-4) -> float:
    """Population stability index ``sum((w - r) * ln(w / r))`` over the reference's quantile bins.

    Args:
        reference: Reference values (e.g. max scores).
        window: Values of the window under test.
        bins: Quantile bins of the reference.
        eps: Floor of a bin's share (an empty bin would make the index infinite).
    """
    edges = quantile_edges(reference, bins)
    r = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    w = np.bincount(np.searchsorted(edges, window, side="right"), minlength=len(edges) + 1)
    r_share = np.maximum(r / max(r.sum(), 1), eps)
    w_share = np.maximum(w / max(w.sum(), 1), eps)
    return float(((w_share - r_share) * np.log(w_share / r_share)).sum())


__all__ = ["BANDWIDTHS", "PSI_LARGE", "PSI_MODERATE", "mmd_permutation_test", "psi", "quantile_edges",
           "rbf_bandwidth"]
