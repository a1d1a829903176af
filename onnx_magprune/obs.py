"""Second-order (OBS) pruning of one linear layer: SparseGPT in float64 (pure numpy/scipy).

Conventions: ``w`` is ``[out, in]`` (``y = x @ w.T``); ``hessian`` is the
``[in, in]`` sum ``XᵀX`` of the layer's input rows (not averaged); ``col_sq`` is
``diag(XᵀX)``; a mask is bool with True = pruned (set to 0).

:func:`obs_prune` follows Frantar & Alistarh, "SparseGPT" (2023): with ``U`` the
upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``), columns are pruned left to
right; the error of column ``i`` is spread over the columns to its right through
row ``i`` of ``U``, which is the exact OBS update for the weights not yet
processed.  Updates are applied lazily per block of columns.  Masks are chosen
from the *updated* weights: per block for ``count`` (score ``w² / U_ii²``), per
group of ``m`` columns for an N:M ``pattern`` (as in the reference code).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.lapack

_MAX_RETRIES = 6  # damp x10 after each failed factorisation
_FIRST_RETRY_DAMP = 1e-6  # relative damp tried first when the configured damp is 0


@dataclass(frozen=True)
class ObsParams:
    """Tuning of :func:`obs_prune`."""

    block_size: int = 128  # columns per lazy-update block
    damp: float = 0.1  # damp * mean(diag(H)) is added to the diagonal (MethodOptions' default)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, (int, np.integer)) \
                or self.block_size < 1:
            raise ValueError(f"ObsParams.block_size must be an integer >= 1, got {self.block_size!r}")
        if isinstance(self.damp, bool) or not isinstance(self.damp, (int, float, np.integer, np.floating)) \
                or not math.isfinite(self.damp) or self.damp < 0:
            raise ValueError(f"ObsParams.damp must be a finite number >= 0, got {self.damp!r}")


@dataclass
class ObsResult:
    """Outcome of :func:`obs_prune`."""

    weights: np.ndarray  # float64 [out, in]; pruned entries exactly 0.0, the others updated
    mask: np.ndarray  # bool [out, in]; True = pruned
    damp_added: float  # absolute value added to the diagonal of H (after any retries)
    dead_inputs: int  # input columns with diag(H) == 0
    error_masked: float  # output error of plain masking: trace(Δ H Δᵀ), Δ = w - w*~mask
    error_after: float  # output error of the reconstructed weights


def wanda_scores(w: np.ndarray, col_sq: np.ndarray) -> np.ndarray:
    """Wanda importance ``|w_ij| * sqrt(col_sq_j)`` (float64 ``[out, in]``)."""
    w = np.asarray(w, dtype=np.float64)
    col_sq = np.asarray(col_sq, dtype=np.float64)
    if w.ndim != 2 or col_sq.shape != (w.shape[1],):
        raise ValueError(f"col_sq must have shape ({w.shape[-1] if w.ndim else '?'},) for w of shape {w.shape}, "
                         f"got {col_sq.shape}")
    if np.any(col_sq < 0) or np.isnan(col_sq).any():
        raise ValueError("col_sq must be >= 0 (sums of squares)")
    return np.abs(w) * np.sqrt(col_sq)[None, :]


def _check_nm(n: int, m: int, n_in: int) -> tuple[int, int]:
    try:
        n, m = operator.index(n), operator.index(m)
    except TypeError:
        raise ValueError(f"N:M pattern needs integers, got n={n!r}, m={m!r}") from None
    if not (m >= 1 and 0 <= n <= m):
        raise ValueError(f"N:M pattern needs 0 <= n <= m and m >= 1, got n={n}, m={m}")
    if n_in % m:
        raise ValueError(f"N:M pattern needs the input dimension ({n_in}) to be a multiple of m={m}")
    return n, m


def nm_mask(scores: np.ndarray, n: int, m: int) -> np.ndarray:
    """N:M mask along the input dim: in every group of ``m`` consecutive columns of
    each row keep the ``n`` largest scores, prune the ``m - n`` smallest.  Ties are
    broken stably: among equal scores the earlier column is pruned first."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be 2-D [out, in], got shape {scores.shape}")
    n, m = _check_nm(n, m, scores.shape[1])
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    groups = scores.reshape(scores.shape[0], -1, m)
    order = np.argsort(groups, axis=-1, kind="stable")[..., : m - n]
    mask = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(mask, order, True, axis=-1)
    return mask.reshape(scores.shape)


def output_error(w_old: np.ndarray, w_new: np.ndarray, hessian: np.ndarray) -> float:
    """``trace(Δ H Δᵀ)`` with ``Δ = w_old - w_new`` in float64: the summed squared
    output change ``||X Δᵀ||²`` over the rows that built ``H = XᵀX``."""
    delta = np.asarray(w_old, dtype=np.float64) - np.asarray(w_new, dtype=np.float64)
    hessian = np.asarray(hessian, dtype=np.float64)
    if delta.ndim != 2 or hessian.shape != (delta.shape[1],) * 2:
        raise ValueError(f"hessian of shape {hessian.shape} does not fit weights of shape {delta.shape}")
    return float(np.sum((delta @ hessian) * delta))


def _inverse_cholesky(h: np.ndarray, base: float, damp_rel: float) -> tuple[np.ndarray, float]:
    """Upper ``U`` with ``UᵀU = (h + λI)⁻¹`` (SparseGPT's ``cholesky(cholesky_inverse(cholesky(H)),
    upper=True)``); λ starts at ``damp_rel * base`` and is multiplied by 10 after each failed
    (or numerically singular) factorisation.

    Computed without forming ``H⁻¹``: with ``J`` the reversal permutation and
    ``JHJ = LLᵀ``, ``H⁻¹ = (J L⁻¹ J)ᵀ (J L⁻¹ J)`` and ``J L⁻¹ J`` is upper triangular
    with a positive diagonal, hence the (unique) factor.  One Cholesky and one
    triangular inverse instead of two Choleskys and a full inverse."""
    n = h.shape[0]
    rev = h[::-1, ::-1]
    diag = np.diag(rev)
    lam = damp_rel * base
    for attempt in range(_MAX_RETRIES + 1):
        hd = np.array(rev, order="F")
        hd.flat[:: n + 1] += lam
        try:
            low = scipy.linalg.cholesky(hd, lower=True, overwrite_a=True, check_finite=False)
            # a pivot that lost (almost) all of its column's energy: numerically singular
            if np.min(np.diag(low) ** 2 / (diag + lam)) >= 16 * n * np.finfo(np.float64).eps:
                inv, info = scipy.linalg.lapack.dtrtri(low, lower=1)
                u = np.ascontiguousarray(inv[::-1, ::-1])
                if info == 0 and np.isfinite(u).all():
                    return u, lam
        except np.linalg.LinAlgError:
            pass
        if attempt < _MAX_RETRIES:
            lam = lam * 10 if lam > 0 else _FIRST_RETRY_DAMP * base
    raise np.linalg.LinAlgError(f"hessian is not positive definite even with {lam:.3g} added to its diagonal")


def _damped_factor(h_in: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(dead, U, λ)``: the dead inputs (``diag(H) == 0``, given a unit diagonal) and the
    upper factor of the damped inverse, λ relative to the mean diagonal."""
    h = h_in.astype(np.float64, copy=True)
    diag = np.diag(h)
    if np.any(diag < 0):
        raise ValueError("hessian has a negative diagonal entry (not a sum of squares)")
    dead = diag == 0
    h[dead, dead] = 1.0
    if not len(h):
        return dead, h, 0.0
    mean = float(np.mean(np.diag(h)))
    u, lam = _inverse_cholesky(h, mean if mean > 0 else 1.0, damp)
    return dead, u, lam


def obs_saliency(w: np.ndarray, hessian: np.ndarray, damp: float) -> np.ndarray:
    """OBS saliency ``w_ij^2 / [H^-1]_jj`` of every weight (0 on dead inputs), divided by the
    layer's output energy ``tr(W H Wᵀ)``: the share of the layer's output each removal costs."""
    dead, u, _lam = _damped_factor(hessian, damp)
    inv_diag = np.einsum("ij,ij->j", u, u)  # diag(UᵀU) = diag(H⁻¹)
    scores = w ** 2 / inv_diag[None, :]
    scores[:, dead] = 0.0
    return scores / (output_error(w, np.zeros_like(w), hessian) or 1.0)


def dense_target(w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, damp: float,
                 residual: np.ndarray | None = None) -> np.ndarray:
    """The weights that best reproduce the *reference* layer output from the *current* inputs.

    With ``X`` the current input rows (``hessian = XᵀX``), ``X_ref`` the reference
    model's rows for the same samples (``cross = XᵀX_ref``) and ``w`` the reference
    weights, this is the ridge solution of ``min ||X W'ᵀ - X_ref wᵀ||² + λ||W' - w||²``:
    ``W' = w (crossᵀ + λI) (H + λI)⁻¹``, λ = ``damp`` × mean(diag H) (raised like
    :func:`obs_prune`'s when H is singular).  When ``X == X_ref`` it is ``w`` itself.
    Pruning ``W'`` with OBS against ``H`` then minimises the error against the
    reference output: with λ = 0, ``||X W_pᵀ - X_ref wᵀ||² = ||X (W_p - W')ᵀ||² + const``
    exactly; with λ > 0 it is the same split for the damped objective.
    Dead inputs (``diag(H) == 0``) keep their weights (they multiply zeros anyway).

    ``residual`` (``Xᵀ(R_ref - R)``, ``[in, out]``): the layer's output is added to a residual
    stream ``R`` that already carries the error of earlier layers; the target then also cancels
    that error, ``min ||X W'ᵀ + R - (X_ref wᵀ + R_ref)||² + λ||W' - w||²``.
    """
    w = np.asarray(w, dtype=np.float64)
    h_in = np.asarray(hessian, dtype=np.float64)
    c = np.asarray(cross, dtype=np.float64)
    n_in = w.shape[1] if w.ndim == 2 else -1
    if h_in.shape != (n_in, n_in) or c.shape != (n_in, n_in):
        raise ValueError(f"hessian {h_in.shape} and cross {c.shape} must both be ({n_in}, {n_in}) for w of "
                         f"shape {w.shape}")
    if not (np.isfinite(w).all() and np.isfinite(h_in).all() and np.isfinite(c).all()):
        raise ValueError("w, hessian or cross contains NaN or Inf")
    dead, u, lam = _damped_factor(h_in, float(damp))
    rhs = w @ c.T
    rhs += lam * w
    if residual is not None:
        if residual.shape != (n_in, w.shape[0]):
            raise ValueError(f"residual must be ({n_in}, {w.shape[0]}), got {residual.shape}")
        rhs += residual.T
    out = (rhs @ u.T) @ u
    out[:, dead] = w[:, dead]
    return out


def _round_div(num: int, den: int) -> int:
    """round(num / den), halves up, in exact integer arithmetic (num >= 0, den > 0)."""
    return (2 * num + den) // (2 * den)


def obs_prune(w: np.ndarray, hessian: np.ndarray, *, count: int | None = None, mask: np.ndarray | None = None,
              pattern: tuple[int, int] | None = None, params: ObsParams = ObsParams()) -> ObsResult:
    """Prune ``w`` ([out, in]) with SparseGPT's OBS reconstruction against ``hessian = XᵀX``.

    Exactly one of:

    * ``count``: prune exactly this many entries, spread over the column blocks in
      proportion to their size (rounded so the total is exact); within a block the
      smallest scores ``w² / U_ii²`` go first (stable row-major tie-break);
    * ``mask``: prune exactly these entries (bool [out, in]) and re-fit the rest;
    * ``pattern=(n, m)``: N:M along the input dim, keep ``n`` of every ``m``
      consecutive columns per row (the block size is rounded down to a multiple of m).

    Dead inputs (``diag(H) == 0``) get ``H_jj = 1`` and score 0, so they are pruned
    first.  The inputs are never modified; the returned weights are float64.
    """
    w_in = np.asarray(w)
    if w_in.ndim != 2:
        raise ValueError(f"w must be 2-D [out, in], got shape {w_in.shape}")
    n_out, n_in = w_in.shape
    h_in = np.asarray(hessian)
    if h_in.shape != (n_in, n_in):
        raise ValueError(f"hessian must have shape ({n_in}, {n_in}) for w of shape {w_in.shape}, got {h_in.shape}")
    if not np.isfinite(w_in).all():
        raise ValueError("w contains NaN or Inf")
    if not np.isfinite(h_in).all():
        raise ValueError("hessian contains NaN or Inf")
    if sum(x is not None for x in (count, mask, pattern)) != 1:
        raise ValueError("give exactly one of count, mask or pattern")
    total = n_out * n_in
    bs = params.block_size
    if count is not None:
        if isinstance(count, bool):
            raise ValueError(f"count must be an integer, got {count!r}")
        try:
            count = operator.index(count)
        except TypeError:
            raise ValueError(f"count must be an integer, got {count!r}") from None
        if not 0 <= count <= total:
            raise ValueError(f"count must be in [0, {total}], got {count}")
    elif mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != w_in.shape:
            raise ValueError(f"mask must be a bool array of shape {w_in.shape}, got {mask.dtype} {mask.shape}")
    else:
        if not isinstance(pattern, (tuple, list)) or len(pattern) != 2:
            raise ValueError(f"pattern must be an (n, m) pair, got {pattern!r}")
        n_keep, m = _check_nm(pattern[0], pattern[1], n_in)
        bs = max(m, bs // m * m)

    dead, u, lam = _damped_factor(h_in, float(params.damp))

    W = w_in.astype(np.float64, copy=True)
    M = np.zeros((n_out, n_in), dtype=bool)
    for c0 in range(0, n_in, bs):
        c1 = min(c0 + bs, n_in)
        W1 = W[:, c0:c1].copy()
        U1 = u[c0:c1, c0:c1]
        d = np.diag(U1)
        dead1 = dead[c0:c1]
        if count is not None:
            k = _round_div(count * c1 * n_out, total) - _round_div(count * c0 * n_out, total) if total else 0
            scores = W1 ** 2 / d ** 2
            scores[:, dead1] = 0.0
            M1 = np.zeros(W1.size, dtype=bool)
            M1[np.argsort(scores, axis=None, kind="stable")[:k]] = True
            M1 = M1.reshape(W1.shape)
        elif mask is not None:
            M1 = mask[:, c0:c1]
        else:
            M1 = np.zeros(W1.shape, dtype=bool)
        err = np.zeros_like(W1)
        for i in range(c1 - c0):
            if pattern is not None and i % m == 0:
                scores = W1[:, i:i + m] ** 2 / d[i:i + m] ** 2
                scores[:, dead1[i:i + m]] = 0.0
                M1[:, i:i + m] = nm_mask(scores, n_keep, m)
            col = W1[:, i]
            q = np.where(M1[:, i], 0.0, col)
            e = (col - q) / d[i]
            if e.any():
                W1[:, i:] -= np.outer(e, U1[i, i:])
                err[:, i] = e
            W1[:, i] = q
        W[:, c0:c1] = W1
        M[:, c0:c1] = M1
        if c1 < n_in and err.any():
            W[:, c1:] -= err @ u[c0:c1, c1:]
    W[M] = 0.0

    w64 = w_in.astype(np.float64)
    return ObsResult(weights=W, mask=M, damp_added=float(lam), dead_inputs=int(dead.sum()),
                     error_masked=output_error(w64, np.where(M, 0.0, w64), h_in),
                     error_after=output_error(w64, W, h_in))
