"""Who weighs how much in a GRPO run: each principal's weight capped at a share of the run's.

Whoever can write feedback steers the next model, so one principal (one token, one identity)
flooding the store must not outvote everybody else. Before a GRPO run the records' weights are
grouped by principal and each principal's total is capped (:func:`cap_principal_weights`):

* **The bound.** After the cap no principal holds more than ``max_share`` of the run's total
  weight. A capped principal's records are all scaled by the same factor (their relative weights,
  e.g. the export's previous-version weights, are kept); principals under the cap keep their
  weights. Weights are only ever lowered, never raised.
* **Too few principals.** With ``n`` principals no principal can be held below ``1/n``; the bound
  enforced is ``max(max_share, 1/n)`` (``effective_share``), i.e. with ``n ≤ 1/max_share``
  principals every principal ends up with the same weight. The cap therefore needs more than
  ``1/max_share`` principals to hold an attacker to ``max_share``.
* **Records without a principal** (``principal == ""``: imports, feedback stored before
  authentication, anonymous callers) are grouped **by source**, as the pseudo-principal
  ``(unknown:<source>)``: all anonymous ``serve`` feedback weighs at most one principal's share,
  and so does all anonymous ``serve-text`` feedback, while a curated ``import`` does not share its
  cap with anonymous traffic. (A file import can name any principal and any source, so grouping
  by source gives an importer nothing it did not have.)
* **The exact solution** (water-filling): with the principals' totals ``t₁ ≥ t₂ ≥ … ≥ tₙ`` and the
  ``k`` largest capped at ``τ``, the capped ones hold ``τ / (kτ + R_k) = c`` of the run
  (``R_k = t_{k+1} + … + tₙ``), so ``τ = c·R_k / (1 − c·k)`` for the ``k`` with
  ``t_{k+1} ≤ τ ≤ t_k``.

The :class:`PrincipalWeights` result carries the report (principals, records and share per
principal before and after, how much weight moved) that GRPO records in its metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from labelmatch.core.errors import ConfigError

#: Prefix of the pseudo-principal that records without a principal are grouped under.
UNKNOWN_PRINCIPAL = "(unknown:{source})"


def principal_key(principal: str, source: str) -> str:
    """The principal a record's weight is counted under.

    Args:
        principal: The record's principal ("" when unknown).
        source: The record's source (``serve``, ``serve-text``, ``import``, ...).

    Returns:
        ``principal``, or ``(unknown:<source>)`` when it is empty.
    """
    return principal or UNKNOWN_PRINCIPAL.format(source=source or "?")


@dataclass
class PrincipalWeights:
    """Record weights after the per-principal cap, and what the cap did.

    Attributes:
        weights: One weight per record, after the cap (same order as the input).
        max_share: The configured cap (1.0: no cap).
        effective_share: The bound enforced: ``max(max_share, 1 / principals)``.
        records: Records per principal.
        share_before: Each principal's share of the run's total weight before the cap.
        share_after: The same after the cap (every value ≤ ``effective_share``).
        capped: Principals whose weight was lowered, largest first.
    """

    weights: list[float]
    max_share: float
    effective_share: float
    records: dict[str, int]
    share_before: dict[str, float]
    share_after: dict[str, float]
    capped: list[str]

    @property
    def weight_moved(self) -> float:
        """Share of the run's weight the cap moved between principals (total variation distance)."""
        return 0.5 * sum(abs(self.share_after[p] - self.share_before[p]) for p in self.share_before)

    def report(self, top_k: int = 10) -> dict[str, Any]:
        """JSON-able summary: the cap, principals, the ``top_k`` principals by records, shares.

        Args:
            top_k: How many principals to list (by share before the cap, largest first).

        Returns:
            ``max_share``, ``effective_share``, ``principals``, ``records``, ``capped_principals``,
            ``largest_share_before``, ``largest_share_after``, ``weight_moved`` and ``top`` (a
            list of ``{principal, records, share_before, share_after, capped}``).
        """
        order = sorted(self.share_before, key=lambda p: (-self.share_before[p], p))
        capped = set(self.capped)
        return {
            "max_share": self.max_share,
            "effective_share": self.effective_share,
            "principals": len(self.records),
            "records": sum(self.records.values()),
            "capped_principals": len(self.capped),
            "largest_share_before": max(self.share_before.values(), default=0.0),
            "largest_share_after": max(self.share_after.values(), default=0.0),
            "weight_moved": self.weight_moved,
            "top": [
                {
                    "principal": p,
                    "records": self.records[p],
                    "share_before": self.share_before[p],
                    "share_after": self.share_after[p],
                    "capped": p in capped,
                }
                for p in order[:top_k]
            ],
        }


def _cap_level(totals: list[float], share: float) -> float | None:
    """The level ``τ`` the largest totals are cut to so that none exceeds ``share`` of the sum.

    Args:
        totals: Positive per-principal totals.
        share: The bound, ``≥ 1 / len(totals)``.

    Returns:
        ``τ``, or ``None`` when no total exceeds the bound.
    """
    ordered = sorted(totals, reverse=True)
    total = sum(ordered)
    if ordered[0] <= share * total * (1 + 1e-12):
        return None
    rest = total
    for k in range(1, len(ordered)):
        rest -= ordered[k - 1]  # R_k: the sum of the n − k smallest totals
        if share * k >= 1.0:
            break
        level = share * rest / (1.0 - share * k)
        if ordered[k] <= level * (1 + 1e-12) and level <= ordered[k - 1] * (1 + 1e-12):
            return level
    return ordered[-1]  # share == 1/n: every principal at the smallest total


def cap_principal_weights(
    principals: Sequence[str], weights: Sequence[float], max_share: float
) -> PrincipalWeights:
    """Cap every principal's share of the total weight at ``max_share`` (see the module doc).

    Args:
        principals: One principal per record (:func:`principal_key`).
        weights: One weight per record (> 0).
        max_share: The largest share of the run's total weight one principal may carry, in
            (0, 1]; 1.0 leaves the weights as they are.

    Returns:
        The capped weights and the report.

    Raises:
        ConfigError: when ``max_share`` is outside (0, 1] or the lengths differ.
    """
    if not 0.0 < max_share <= 1.0:
        raise ConfigError(f"max_principal_share must be in (0, 1], got {max_share}")
    if len(principals) != len(weights):
        raise ConfigError(f"{len(principals)} principals for {len(weights)} weights")
    totals: dict[str, float] = {}
    records: dict[str, int] = {}
    for principal, weight in zip(principals, weights, strict=True):
        totals[principal] = totals.get(principal, 0.0) + float(weight)
        records[principal] = records.get(principal, 0) + 1
    effective = max(max_share, 1.0 / len(totals)) if totals else max_share
    level = _cap_level(list(totals.values()), effective) if totals else None
    factor = {
        p: (level / t if level is not None and t > level * (1 + 1e-12) else 1.0) for p, t in totals.items()
    }
    capped_totals = {p: t * factor[p] for p, t in totals.items()}
    before, after = sum(totals.values()) or 1.0, sum(capped_totals.values()) or 1.0
    return PrincipalWeights(
        weights=[float(w) * factor[p] for p, w in zip(principals, weights, strict=True)],
        max_share=max_share,
        effective_share=effective,
        records=records,
        share_before={p: t / before for p, t in totals.items()},
        share_after={p: t / after for p, t in capped_totals.items()},
        capped=sorted((p for p in totals if factor[p] < 1.0), key=lambda p: -totals[p]),
    )
