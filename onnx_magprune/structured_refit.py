"""Calibration-aware unit selection and least-squares re-fit of the consumer (pure numpy, float64).

Conventions: the consumer layer is ``Y = X W`` with ``W`` as ``[in, out]``
(rows are input features) and ``H = XᵀX`` the ``[in, in]`` sum over the
calibration rows of the consumer's input.  When the consumer has a bias, the
last feature is the constant 1 (``X`` gets a ones column, the bias is the
last row of ``W``): re-fitting then also moves the bias, which absorbs the
removed units' mean contribution.  ``cols[u]`` lists the input features unit
``u`` owns (one for MatMul/Gemm, ``kH*kW`` for a Conv consumer, a block after
Flatten).

* :func:`activation_scores`: ``||x_u|| * ||W_u||`` (activation norm times
  outgoing weight norm, Wanda-style, per unit);
* :func:`obs_remove`: structured OBS (Optimal Brain Surgeon on the input
  dimension): greedily remove the unit whose removal, with the best update
  of the remaining rows, costs least, ``W_Uᵀ [H⁻¹]_UU⁻¹ W_U``; update
  ``W -= H⁻¹[:, U] [H⁻¹]_UU⁻¹ W_U`` and downdate ``H⁻¹`` (damped);
* :func:`lsq_refit`: the least-squares re-fit of the kept rows for a given
  selection, ``W_K = (H_KK + λI)⁻¹ H_K: W``;
* :func:`output_error`: ``tr(Δᵀ H Δ)``, the summed squared change of the
  layer's output on the calibration rows.
"""

from __future__ import annotations

import numpy as np

from .obs import _damped_factor

_COMPACT_EVERY = 32  # greedy steps between dropping removed rows from the working matrices


def damping(h: np.ndarray, damp: float, rows: int) -> float:
    """Relative dampening, raised in proportion when there are fewer rows than features."""
    width = h.shape[0]
    return max(damp, damp * width / max(rows, 1)) if rows < width else damp


def activation_scores(col_sq: np.ndarray, w: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``sqrt(sum_c ||x_c||² ||W_c||²)`` over the features ``c`` of each unit (``||x_u|| ||W_u||`` for one)."""
    w = np.asarray(w, dtype=np.float64)
    per_feature = np.asarray(col_sq, dtype=np.float64) * np.einsum("io,io->i", w, w)
    return np.sqrt(per_feature[cols].sum(axis=1))


def output_error(w_old: np.ndarray, w_new: np.ndarray, h: np.ndarray) -> float:
    d = np.asarray(w_old, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)
    return float(np.einsum("io,ij,jo->", d, h, d))


def _inverse(h: np.ndarray, damp: float) -> np.ndarray:
    _dead, u, _lam = _damped_factor(np.asarray(h, dtype=np.float64), damp)
    return u.T @ u


def removal_costs(h: np.ndarray, w: np.ndarray, cols: np.ndarray, damp: float) -> np.ndarray:
    """OBS cost of removing each unit alone (with the optimal update of the rest)."""
    hinv = _inverse(h, damp)
    w = np.asarray(w, dtype=np.float64)
    return _costs(hinv, w, cols)


def _costs(hinv: np.ndarray, w: np.ndarray, cols: np.ndarray) -> np.ndarray:
    if cols.shape[1] == 1:
        c = cols[:, 0]
        return np.einsum("io,io->i", w[c], w[c]) / np.diag(hinv)[c]
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [U, b, b]
    wb = w[cols]  # [U, b, out]
    sol = np.linalg.solve(blocks, wb)
    return np.einsum("ubo,ubo->u", wb, sol)


def obs_remove(h: np.ndarray, w: np.ndarray, cols: np.ndarray, count: int,
               damp: float) -> tuple[np.ndarray, np.ndarray]:
    """Greedy structured OBS: ``(removed units, sorted; updated W with their rows exactly 0)``.

    ``h`` [n, n], ``w`` [n, out], ``cols`` [units, b] (features not in ``cols``, e.g. the bias
    row, are never removed but are updated).  Ties break to the lower unit index."""
    cols = np.asarray(cols, dtype=np.int64)
    n_units = cols.shape[0]
    if not 0 <= count <= n_units:
        raise ValueError(f"count must be in [0, {n_units}], got {count}")
    w_full = np.asarray(w, dtype=np.float64).copy()
    if count == 0:
        return np.zeros(0, dtype=np.int64), w_full
    hinv = _inverse(h, damp)
    pos = np.arange(h.shape[0])  # working index -> original feature
    W = w_full
    alive = np.ones(n_units, dtype=bool)
    removed: list[int] = []
    where = np.empty(h.shape[0], dtype=np.int64)  # original feature -> working index
    for step in range(count):
        if step % _COMPACT_EVERY == 0:
            dead_feats = cols[~alive].reshape(-1)
            keep = np.ones(len(pos), dtype=bool)
            if dead_feats.size:
                keep[np.isin(pos, dead_feats)] = False
            if not keep.all():
                hinv = np.ascontiguousarray(hinv[np.ix_(keep, keep)])
                W = np.ascontiguousarray(W[keep])
                pos = pos[keep]
            where[:] = -1
            where[pos] = np.arange(len(pos))
            live = np.flatnonzero(alive)
            local = where[cols[live]]
        costs = _costs(hinv, W, local)
        k = int(np.argmin(costs))
        unit = int(live[k])
        J = local[k]
        if J.size == 1:
            j = int(J[0])
            coef = hinv[:, j] / hinv[j, j]
            W -= np.outer(coef, W[j])
            hinv -= np.outer(coef, hinv[j])
        else:
            binv = np.linalg.inv(hinv[np.ix_(J, J)])
            left = hinv[:, J] @ binv
            W -= left @ W[J]
            hinv -= left @ hinv[J, :]
        W[J] = 0.0
        hinv[J, :] = 0.0
        hinv[:, J] = 0.0
        hinv[J, J] = 1.0  # keeps the removed features inert until the next compaction
        alive[unit] = False
        removed.append(unit)
        keep_rows = np.ones(len(live), dtype=bool)
        keep_rows[k] = False
        live, local = live[keep_rows], local[keep_rows]
    out = np.zeros_like(w_full)
    out[pos] = W
    out[cols[~alive].reshape(-1)] = 0.0
    return np.sort(np.asarray(removed, dtype=np.int64)), out


def lsq_refit(h: np.ndarray, w: np.ndarray, cols: np.ndarray, removed: np.ndarray, damp: float) -> np.ndarray:
    """The rows of ``w`` kept after removing ``removed`` units, re-fitted by damped least squares
    to reproduce the full layer's output on the calibration rows; removed rows are 0.  The ridge
    pulls toward the original rows (``min ||X_K W_K - X W||² + λ||W_K - W_K⁰||²``), as the damped
    OBS update of :func:`obs_remove` does, so both give the same weights for the same selection."""
    w = np.asarray(w, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    drop = np.zeros(h.shape[0], dtype=bool)
    drop[np.asarray(cols, dtype=np.int64)[np.asarray(removed, dtype=np.int64)].reshape(-1)] = True
    keep = ~drop
    out = np.zeros_like(w)
    if not keep.any():
        return out
    h_kk = h[np.ix_(keep, keep)]
    # the same absolute λ as obs_remove's (relative to the full H's mean diagonal, dead inputs as 1)
    full, kept = np.diag(h), np.diag(h_kk)
    base = float(np.mean(np.where(full == 0, 1.0, full)))
    ref = float(np.mean(np.where(kept == 0, 1.0, kept)))
    _dead, u, lam = _damped_factor(h_kk, damp * base / ref if ref > 0 else damp)
    out[keep] = (u.T @ u) @ (h[keep] @ w + lam * w[keep])
    return out


__all__ = ["activation_scores", "obs_remove", "lsq_refit", "removal_costs", "output_error", "damping"]
