"""How many units each group loses, and which ones by weight norm (pure numpy).

Counts are exact: ``round(S x units)`` per group in local scope (halves up,
as :func:`~onnx_magprune.selection.target_count`), or ``round(S x all units)``
over the pooled groups in global scope, always keeping ``min_units`` per
group and honouring per-group bounds.  Ties break by group order, then unit
index, so the result is deterministic.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .selection import target_count


def unit_rows(w: np.ndarray, out_axis: int, block: int = 1) -> np.ndarray:
    """The producer weight as ``[units, fan]``: each row holds one unit's weights (``block``
    consecutive indices along ``out_axis`` per unit, e.g. an attention head's columns)."""
    moved = np.moveaxis(np.asarray(w), out_axis, 0)
    return moved.reshape(w.shape[out_axis] // block, -1)


def norm_scores(w_units: np.ndarray, norm: str) -> np.ndarray:
    """Per-unit L1 or L2 norm, per weight (mean ``|w|`` / root-mean-square), so layers of
    different fan-in compare under one global ranking; a layer's own order is the plain norm's."""
    a = np.abs(np.asarray(w_units, dtype=np.float64))
    if norm == "l1":
        return a.mean(axis=1)
    if norm == "l2":
        return np.sqrt(np.mean(a * a, axis=1))
    raise ValueError(f"norm must be 'l1' or 'l2', got {norm!r}")


def smallest(scores: np.ndarray, k: int) -> np.ndarray:
    """The indices of the ``k`` smallest scores, sorted (stable: earlier units go first on ties)."""
    order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")[:k]
    return np.sort(order)


def _cap(units: int, hi: float, min_units: int) -> int:
    return max(0, min(target_count(hi, units), units - min_units))


def local_counts(units: Sequence[int], fractions: Sequence[float], min_units: int) -> list[int]:
    """``round(f x units)`` per group, keeping at least ``min_units``."""
    return [max(0, min(target_count(f, u), u - min_units)) for u, f in zip(units, fractions)]


def global_counts(scores: Sequence[np.ndarray], fraction: float, bounds: Sequence[tuple[float, float]],
                  min_units: int) -> list[int]:
    """Per-group counts for one ranking of all units: ``round(fraction x total)`` lowest scores,
    each group between its bounds and keeping ``min_units``.  When the bounds make the target
    unreachable the nearest reachable count is returned (the caller reports the difference)."""
    sizes = [len(s) for s in scores]
    total = target_count(fraction, sum(sizes))
    caps = [_cap(u, hi, min_units) for u, (_lo, hi) in zip(sizes, bounds)]
    floors = [min(target_count(lo, u), c) for u, (lo, _hi), c in zip(sizes, bounds, caps)]
    counts = list(floors)
    left = total - sum(floors)
    if left <= 0:
        return counts
    pooled_scores, pooled_group, pooled_rank = [], [], []
    for g, s in enumerate(scores):
        order = np.argsort(np.asarray(s, dtype=np.float64), kind="stable")
        extra = order[floors[g]:caps[g]]
        pooled_scores.append(np.asarray(s, dtype=np.float64)[extra])
        pooled_group.append(np.full(len(extra), g))
        pooled_rank.append(np.arange(len(extra)))
    if not pooled_scores:
        return counts
    s_all = np.concatenate(pooled_scores)
    g_all = np.concatenate(pooled_group)
    r_all = np.concatenate(pooled_rank)
    # within a group the pooled entries are already in score order; lexsort keys: score, group, rank
    pick = np.lexsort((r_all, g_all, s_all))[:left]
    for g in g_all[pick]:
        counts[int(g)] += 1
    return counts


__all__ = ["unit_rows", "norm_scores", "smallest", "local_counts", "global_counts"]
