"""Per-weight sparsities from sensitivity curves (pure numpy).

Each weight ``i`` has a curve: the drift when it alone is pruned to each swept
level (level 0: no drift).  Drift is turned into an additive cost (``rel_l2``
errors of independent perturbations add in quadrature, so its cost is the
square; other metrics add as they are), made non-decreasing, and the lower
convex hull of the points inside the weight's bounds is kept (levels above the
highest swept one are not used).  For a Lagrange multiplier ``lam`` every weight
takes the hull vertex maximising ``lam * n_i * s_i - cost_i(s_i)``; the number
of pruned entries grows with ``lam``, so bisecting ``lam`` finds the multiplier
at which the pool reaches a target count, and the remainder is filled along
the marginal hull segments (cheapest cost per pruned entry first), exactly.
The predicted drift of an allocation sums the costs (interpolated linearly
between swept levels) and maps back to drift.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class WeightCurve:
    numel: int
    levels: np.ndarray  # ascending, levels[0] == 0
    cost: np.ndarray  # additive cost at each level, non-decreasing, cost[0] == 0
    lo: float  # bounds on the weight's sparsity
    hi: float

    @property
    def k_lo(self) -> int:
        return _count(self.lo, self.numel)

    @property
    def k_hi(self) -> int:
        return max(self.k_lo, _count(min(self.hi, float(self.levels[-1])), self.numel))

    def cost_at(self, level: float) -> float:
        return float(np.interp(level, self.levels, self.cost))

    def hull(self) -> tuple[np.ndarray, np.ndarray]:
        """Vertices (levels, costs) of the lower convex hull between the bounds (as counts / numel)."""
        a, b = self.k_lo / self.numel, self.k_hi / self.numel
        inside = [x for x in self.levels if a < x < b]
        xs = np.array([a, *inside, b] if b > a else [a], dtype=np.float64)
        ys = np.array([self.cost_at(x) for x in xs])
        keep: list[int] = []
        for j in range(len(xs)):
            while len(keep) >= 2:
                p, q = keep[-2], keep[-1]
                # drop q if it lies on or above the segment p -> j
                if (ys[q] - ys[p]) * (xs[j] - xs[p]) >= (ys[j] - ys[p]) * (xs[q] - xs[p]):
                    keep.pop()
                else:
                    break
            keep.append(j)
        return xs[keep], ys[keep]


def _count(level: float, n: int) -> int:
    return min(n, int(math.floor(level * n + 0.5)))


def make_curve(numel: int, levels: Sequence[float], drift: Sequence[float], bounds: tuple[float, float] = (0.0, 1.0),
               *, quadrature: bool = False) -> WeightCurve:
    """A curve from measured drifts (``quadrature``: cost = drift**2, else drift; NaN/inf: very costly)."""
    lv = np.array([0.0, *levels], dtype=np.float64)
    d = np.array([0.0, *drift], dtype=np.float64)
    d = np.where(np.isfinite(d), d, 1e6)
    d = np.maximum(d, 0.0)  # an accuracy "drop" below zero is no gain to bank on
    cost = np.maximum.accumulate(d ** 2 if quadrature else d)
    return WeightCurve(int(numel), lv, cost, float(bounds[0]), float(bounds[1]))


def to_drift(cost: float, *, quadrature: bool = False) -> float:
    return math.sqrt(max(cost, 0.0)) if quadrature else cost


def to_cost(drift: float, *, quadrature: bool = False) -> float:
    return drift * drift if quadrature else drift


@dataclass(frozen=True)
class Allocation:
    counts: list[int]  # entries pruned per weight (counted like prune: round(s x n))
    levels: list[float]  # the same as fractions
    cost: float  # predicted additive cost
    multiplier: float  # the Lagrange multiplier reached
    bisections: int


def min_zeros(curves: Sequence[WeightCurve]) -> int:
    return sum(c.k_lo for c in curves)


def max_zeros(curves: Sequence[WeightCurve]) -> int:
    return sum(c.k_hi for c in curves)


def predicted_cost(curves: Sequence[WeightCurve], levels: Sequence[float]) -> float:
    return float(sum(c.cost_at(s) for c, s in zip(curves, levels)))


def _pick(hulls, lam: float) -> list[int]:
    """For each weight the hull vertex chosen at multiplier ``lam`` (the last with slope <= lam)."""
    picks = []
    for (xs, ys), n in hulls:
        j = 0
        while j + 1 < len(xs) and (ys[j + 1] - ys[j]) <= lam * n * (xs[j + 1] - xs[j]):
            j += 1
        picks.append(j)
    return picks


def allocate(curves: Sequence[WeightCurve], zeros: int, *, iterations: int = 200) -> Allocation:
    """Counts per weight summing to ``zeros`` (clamped to what the bounds allow) with the least predicted cost."""
    if not curves:
        return Allocation([], [], 0.0, 0.0, 0)
    zeros = min(max(zeros, min_zeros(curves)), max_zeros(curves))
    hulls = [(c.hull(), c.numel) for c in curves]

    def total(picks) -> float:
        return sum(n * xs[j] for ((xs, _ys), n), j in zip(hulls, picks))

    slopes = [(ys[j + 1] - ys[j]) / (n * (xs[j + 1] - xs[j]))
              for (xs, ys), n in hulls for j in range(len(xs) - 1)]
    lam_lo, lam_hi = 0.0, (max(slopes) if slopes else 0.0) * 2 + 1e-12
    steps = 0
    if total(_pick(hulls, lam_lo)) < zeros:
        for steps in range(1, iterations + 1):  # bisect: total(lam_lo) < zeros <= total(lam_hi)
            mid = 0.5 * (lam_lo + lam_hi)
            if mid <= lam_lo or mid >= lam_hi:
                break
            if total(_pick(hulls, mid)) < zeros:
                lam_lo = mid
            else:
                lam_hi = mid
        base = _pick(hulls, lam_lo)
        top = _pick(hulls, lam_hi)
    else:
        base = top = _pick(hulls, lam_lo)
    levels = [float(xs[j]) for ((xs, _ys), _n), j in zip(hulls, base)]
    need = zeros - total(base)
    # fill the remainder along the segments between base and top, cheapest per entry first
    segs = []
    for i, (((xs, ys), n), a, b) in enumerate(zip(hulls, base, top)):
        for j in range(a, b):
            segs.append(((ys[j + 1] - ys[j]) / (n * (xs[j + 1] - xs[j])), i, j))
    for _slope, i, j in sorted(segs):
        if need <= 1e-9:
            break
        (xs, _ys), n = hulls[i]
        take = min(need, n * (xs[j + 1] - xs[j]))
        levels[i] += take / n
        need -= take
    counts = _round_counts(curves, levels, zeros)
    exact = [k / c.numel for k, c in zip(counts, curves)]
    return Allocation(counts, exact, predicted_cost(curves, exact), lam_hi, steps)


def _round_counts(curves: Sequence[WeightCurve], levels: Sequence[float], zeros: int) -> list[int]:
    """Integer counts within the bounds, summing to ``zeros`` (largest remainders first, then weight order)."""
    raw = [s * c.numel for s, c in zip(levels, curves)]
    counts = [min(max(int(math.floor(r)), c.k_lo), c.k_hi) for r, c in zip(raw, curves)]
    short = zeros - sum(counts)
    order = sorted(range(len(curves)), key=lambda i: (-(raw[i] - math.floor(raw[i])), i))
    while short != 0:
        moved = False
        for i in order:
            if short > 0 and counts[i] < curves[i].k_hi:
                counts[i] += 1
                short -= 1
                moved = True
            elif short < 0 and counts[i] > curves[i].k_lo:
                counts[i] -= 1
                short += 1
                moved = True
            if short == 0:
                break
        if not moved:  # pragma: no cover - zeros was clamped to the bounds
            break
    return counts


def zeros_for_cost(curves: Sequence[WeightCurve], budget: float) -> int:
    """The largest pool count whose allocation's predicted cost stays within ``budget``."""
    lo, hi = min_zeros(curves), max_zeros(curves)
    if allocate(curves, lo).cost > budget:
        return lo
    while lo < hi:  # cost(lo) <= budget
        mid = (lo + hi + 1) // 2
        if allocate(curves, mid).cost <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def split_count(k: int, numels: Sequence[int], bounds: Sequence[tuple[float, float]]) -> list[int]:
    """``k`` entries of a group shared by its members in proportion to their sizes, within each member's
    bounds (largest remainders first, then member order)."""
    total = sum(numels) or 1
    members = [WeightCurve(n, np.array([0.0, 1.0]), np.array([0.0, 0.0]), lo, hi) for n, (lo, hi) in
               zip(numels, bounds)]
    k = min(max(k, min_zeros(members)), max_zeros(members))
    return _round_counts(members, [k / total] * len(numels), k)
