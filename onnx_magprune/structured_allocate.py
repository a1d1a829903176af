"""Share a global unit budget between groups by measured drift curves (pure numpy).

Each group comes with points ``(units removed, drift of the model's outputs
with only this group removed)``, measured on the calibration data.  Drifts of
different groups are taken to add up (on MiniLM's feed-forward layers the sum
of the single-layer drifts predicts the drift of removing all six within a
few percent).  Each curve is replaced by its lower convex hull through
``(0, 0)``; the budget then goes, exactly, to the cheapest hull segments
first (optimal for piecewise-linear convex costs), a group's floor first.
Units past a group's last measured point are taken only when the measured
segments of every group cannot meet the budget (the curves are convex, so
a straight extrapolation would underestimate them), cheapest last slope first.
"""

from __future__ import annotations

from typing import Sequence


def lower_hull(ks: Sequence[int], ds: Sequence[float]) -> list[tuple[int, float]]:
    """The lower convex hull of the points (sorted by ``k``, starting at ``(0, 0)``)."""
    pts = sorted({(0, 0.0), *((int(k), max(0.0, float(d))) for k, d in zip(ks, ds))})
    by_k: dict[int, float] = {}
    for k, d in pts:
        by_k[k] = min(d, by_k.get(k, d))
    pts = sorted(by_k.items())
    hull: list[tuple[int, float]] = []
    for p in pts:
        while len(hull) >= 2:
            (k1, d1), (k2, d2) = hull[-2], hull[-1]
            if (d2 - d1) * (p[0] - k1) >= (p[1] - d1) * (k2 - k1):  # hull[-1] is not below the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(curves: Sequence[tuple[Sequence[int], Sequence[float]]], total: int, floors: Sequence[int],
             caps: Sequence[int]) -> list[int]:
    """Units per group summing to ``total`` (clamped to what floors and caps allow)."""
    counts = [int(f) for f in floors]
    segments = []  # (unmeasured, slope, group, start, stop)
    for g, (ks, ds) in enumerate(curves):
        hull = lower_hull([k for k in ks if k <= caps[g]], [d for k, d in zip(ks, ds) if k <= caps[g]])
        measured = len(hull)
        if hull[-1][0] < caps[g]:  # beyond the last measured point: only when needed, at the last slope
            (k1, d1), (k2, d2) = (hull[-2], hull[-1]) if len(hull) > 1 else ((0, 0.0), (1, 1.0))
            slope = (d2 - d1) / max(1, k2 - k1)
            hull.append((caps[g], d2 + slope * (caps[g] - k2)))
        for i, ((k1, d1), (k2, d2)) in enumerate(zip(hull, hull[1:])):
            lo, hi = max(k1, floors[g]), min(k2, caps[g])
            if hi > lo:
                segments.append((i + 1 >= measured, (d2 - d1) / (k2 - k1), g, lo, hi))
    left = total - sum(counts)
    for _unmeasured, _slope, g, lo, hi in sorted(segments):
        if left <= 0:
            break
        take = min(hi - lo, left)
        counts[g] += take
        left -= take
    return counts


__all__ = ["lower_hull", "allocate"]
