"""SparseGPT/OBS reconstruction (onnx_magprune.obs): pure numpy, small seeded problems."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from onnx_magprune.obs import ObsParams, ObsResult, nm_mask, obs_prune, output_error, wanda_scores


def problem(out=37, n_in=300, rows=600, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((out, n_in))
    # correlated inputs with uneven scales, as real activations are
    x = rng.standard_normal((rows, n_in)) @ (np.eye(n_in) + 0.1 * rng.standard_normal((n_in, n_in)))
    x *= rng.uniform(0.2, 3.0, n_in)
    return w, x, x.T @ x


@pytest.fixture(scope="module")
def prob():
    return problem()


@pytest.mark.parametrize("k", [0, 1, 2, 1234, 37 * 300 // 2, 37 * 300 - 1, 37 * 300])
def test_exact_count(prob, k):
    w, _, h = prob
    w0, h0 = w.copy(), h.copy()
    r = obs_prune(w, h, count=k)  # block 128 over 300 columns: uneven blocks
    assert isinstance(r, ObsResult)
    assert r.weights.dtype == np.float64 and r.mask.dtype == bool and r.weights.shape == w.shape
    assert int(r.mask.sum()) == k
    assert np.all(r.weights[r.mask] == 0.0)
    assert not np.signbit(r.weights[r.mask]).any()
    assert r.dead_inputs == 0 and r.damp_added == pytest.approx(0.1 * np.mean(np.diag(h)), rel=1e-15)
    assert np.array_equal(w, w0) and np.array_equal(h, h0)  # inputs untouched
    if k == 0:
        assert np.array_equal(r.weights, w) and r.error_after == 0.0 == r.error_masked


def sparsegpt_reference(w, h, count, block_size, damp):
    """Unbatched SparseGPT (every update applied at once), with an explicit H⁻¹."""
    n = h.shape[0]
    h = h.copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(n)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, H⁻¹ = UᵀU
    w, mask = w.copy(), np.zeros(w.shape, dtype=bool)
    for c0 in range(0, n, block_size):
        c1 = min(c0 + block_size, n)
        k = int(math.floor(Fraction(count * c1, n) + Fraction(1, 2))) \
            - int(math.floor(Fraction(count * c0, n) + Fraction(1, 2)))
        scores = w[:, c0:c1] ** 2 / np.diag(u)[c0:c1] ** 2
        scores[:, dead[c0:c1]] = 0.0
        block = np.zeros(scores.size, dtype=bool)
        block[np.argsort(scores, axis=None, kind="stable")[:k]] = True
        mask[:, c0:c1] = block.reshape(scores.shape)
        for i in range(c0, c1):
            q = np.where(mask[:, i], 0.0, w[:, i])
            w[:, i:] -= np.outer((w[:, i] - q) / u[i, i], u[i, i:])
            w[:, i] = q
    return w, mask


@pytest.mark.parametrize("block_size", [1, 16, 50, 128])
def test_matches_unbatched_reference(block_size):
    w, x, _ = problem(out=13, n_in=50, rows=120, seed=7)
    x[:, 5] = 0.0  # one dead input
    h = x.T @ x
    r = obs_prune(w, h, count=333, params=ObsParams(block_size=block_size, damp=0.01))
    ref_w, ref_mask = sparsegpt_reference(w, h, 333, block_size, 0.01)
    assert np.array_equal(r.mask, ref_mask)
    np.testing.assert_allclose(r.weights, ref_w, rtol=0, atol=1e-10 * np.abs(ref_w).max())
    assert r.dead_inputs == 1


def test_count_spread_over_blocks(prob):
    w, _, h = prob
    r = obs_prune(w, h, count=1000, params=ObsParams(block_size=128))
    per_block = [int(r.mask[:, c:c + 128].sum()) for c in range(0, 300, 128)]
    # round-half-up of 1000 * c1 / 300 at c1 = 128, 256, 300
    assert per_block == [427, 426, 147] and sum(per_block) == 1000


def test_reconstruction_reduces_output_error(prob):
    w, x, h = prob
    r = obs_prune(w, h, count=w.size // 2)
    assert r.error_after < 0.75 * r.error_masked
    direct = np.sum((x @ r.weights.T - x @ w.T) ** 2)
    assert r.error_after == pytest.approx(direct, rel=1e-9)
    masked = np.where(r.mask, 0.0, w)
    assert r.error_masked == pytest.approx(np.sum((x @ masked.T - x @ w.T) ** 2), rel=1e-9)
    assert output_error(w, r.weights, h) == r.error_after


@pytest.mark.parametrize("block_size", [8, 128])
def test_exact_least_squares(block_size):
    rng = np.random.default_rng(1)
    out, n_in, p = 6, 40, 11
    x = rng.standard_normal((400, n_in))
    w = rng.standard_normal((out, n_in))
    mask = np.zeros((out, n_in), dtype=bool)
    mask[:, :p] = True
    r = obs_prune(w, x.T @ x, mask=mask, params=ObsParams(block_size=block_size, damp=0.0))
    assert r.damp_added == 0.0
    assert np.array_equal(r.mask, mask) and np.all(r.weights[:, :p] == 0.0)
    for j in range(out):
        ref = np.linalg.lstsq(x[:, p:], x @ w[j], rcond=None)[0]
        np.testing.assert_allclose(r.weights[j, p:], ref, rtol=1e-8, atol=1e-8 * np.abs(ref).max())


def test_refit_mode_keeps_given_mask(prob):
    w, x, h = prob
    mask = np.random.default_rng(3).random(w.shape) < 0.4
    r = obs_prune(w, h, mask=mask)
    assert np.array_equal(r.mask, mask) and r.mask is not mask
    assert np.all(r.weights[mask] == 0.0)
    assert r.error_after < r.error_masked


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8)])
def test_pattern_diagonal_hessian(n, m):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((9, 48))
    d = rng.uniform(0.1, 10.0, 48)
    # block size 6 is not a multiple of m: rounded down to m
    r = obs_prune(w, np.diag(d), pattern=(n, m), params=ObsParams(block_size=6, damp=0.0))
    groups = r.mask.reshape(9, -1, m)
    assert np.all(groups.sum(axis=-1) == m - n)
    # H = diag(d): U diagonal, score = w² d, no updates at all
    assert np.array_equal(r.mask, nm_mask(w ** 2 * d, n, m))
    np.testing.assert_array_equal(r.weights, np.where(r.mask, 0.0, w))


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (0, 4), (4, 4)])
def test_pattern_general_hessian(n, m):
    w, _, h = problem(out=21, n_in=264, rows=500, seed=6)  # blocks of 128, 128, 8 columns
    r = obs_prune(w, h, pattern=(n, m))
    assert np.all(r.mask.reshape(w.shape[0], -1, m).sum(axis=-1) == m - n)
    assert np.all(r.weights[r.mask] == 0.0)
    # the first group is chosen before any update: scores w² / U_ii² of the damped H
    hd = h + r.damp_added * np.eye(h.shape[0])
    u = np.linalg.cholesky(np.linalg.inv(hd)).T  # upper, H⁻¹ = UᵀU
    scores = w[:, :m] ** 2 / np.diag(u)[:m] ** 2
    assert np.array_equal(r.mask[:, :m], nm_mask(scores, n, m))
    if 0 < n < m:
        assert r.error_after < r.error_masked


def test_dead_inputs_pruned_first():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 24))
    dead = [3, 10, 17]
    x[:, dead] = 0.0
    w = rng.standard_normal((5, 24))
    r = obs_prune(w, x.T @ x, count=5 * len(dead))
    assert r.dead_inputs == 3
    expect = np.zeros(w.shape, dtype=bool)
    expect[:, dead] = True
    assert np.array_equal(r.mask, expect)
    np.testing.assert_array_equal(r.weights, np.where(expect, 0.0, w))  # no error, nothing to update
    assert r.error_masked == 0.0 and r.error_after == 0.0
    # dead weights that are kept are not zeroed
    r = obs_prune(w, x.T @ x, count=2)
    assert r.mask[:, dead].sum() == 2 and np.count_nonzero(r.weights[:, dead]) == 13


def test_rank_deficient_hessian_retries():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((20, 50))  # rank 20 < 50
    w = rng.standard_normal((7, 50))
    h = x.T @ x
    r = obs_prune(w, h, count=150, params=ObsParams(damp=0.0))
    assert r.damp_added > 0.0
    assert np.isfinite(r.weights).all() and int(r.mask.sum()) == 150
    assert r.error_after < r.error_masked


def test_wanda_scores_hand_made():
    # input 0: tiny activations, input 1: huge ones
    x = np.array([[0.01, 100.0], [-0.02, 50.0], [0.01, -80.0]])
    col_sq = np.sum(x ** 2, axis=0)
    w = np.array([[5.0, 0.1]])
    s = wanda_scores(w, col_sq)
    assert s.dtype == np.float64
    np.testing.assert_allclose(s, [[5.0 * np.sqrt(6e-4), 0.1 * np.sqrt(18900.0)]], rtol=1e-15)
    assert s[0, 1] > s[0, 0]  # small weight, huge activation ranks above
    assert np.array_equal(nm_mask(s, 1, 2), [[True, False]])
    with pytest.raises(ValueError):
        wanda_scores(w, col_sq[:1])


def test_nm_mask_exact_with_ties():
    s = np.array([
        [4.0, 1.0, 3.0, 2.0, 0.5, 0.5, 0.5, 0.5],
        [1.0, 1.0, 2.0, 2.0, 9.0, 1.0, 9.0, 1.0],
        [0.0, 0.0, 0.0, 0.0, 3.0, 3.0, 1.0, 3.0],
    ])
    expect = np.array([
        [0, 1, 0, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0, 1],
        [1, 1, 0, 0, 1, 0, 1, 0],
    ], dtype=bool)
    assert np.array_equal(nm_mask(s, 2, 4), expect)
    assert np.array_equal(nm_mask(s, 4, 4), np.zeros_like(expect))
    assert np.array_equal(nm_mask(s, 0, 4), np.ones_like(expect))
    assert np.array_equal(nm_mask(s, 1, 2), np.array([
        [0, 1, 0, 1, 1, 0, 1, 0],
        [1, 0, 1, 0, 0, 1, 0, 1],
        [1, 0, 1, 0, 1, 0, 1, 0],
    ], dtype=bool))


def test_deterministic(prob):
    w, _, h = prob
    for kw in ({"count": 4000}, {"pattern": (2, 4)}):
        a, b = obs_prune(w, h, **kw), obs_prune(w, h, **kw)
        assert a.weights.tobytes() == b.weights.tobytes() and a.mask.tobytes() == b.mask.tobytes()
        assert (a.error_after, a.error_masked, a.damp_added) == (b.error_after, b.error_masked, b.damp_added)


def test_validation():
    w, h = np.ones((2, 6)), np.eye(6)
    with pytest.raises(ValueError, match="exactly one"):
        obs_prune(w, h, count=1, mask=np.zeros((2, 6), dtype=bool))
    with pytest.raises(ValueError, match="exactly one"):
        obs_prune(w, h)
    with pytest.raises(ValueError, match="multiple of m=4"):
        obs_prune(w, h, pattern=(2, 4))
    with pytest.raises(ValueError, match="0 <= n <= m"):
        obs_prune(w, h, pattern=(3, 2))
    with pytest.raises(ValueError, match=r"count must be in \[0, 12\]"):
        obs_prune(w, h, count=13)
    with pytest.raises(ValueError, match="bool array"):
        obs_prune(w, h, mask=np.zeros((2, 6)))
    with pytest.raises(ValueError, match="hessian must have shape"):
        obs_prune(w, np.eye(5), count=1)
    with pytest.raises(ValueError, match="NaN"):
        obs_prune(np.full((2, 6), np.nan), h, count=1)
    for bad in ({"block_size": 0}, {"block_size": 2.0}, {"block_size": True},
                {"damp": -0.1}, {"damp": float("nan")}, {"damp": float("inf")}):
        with pytest.raises(ValueError, match="ObsParams"):
            ObsParams(**bad)
    with pytest.raises(ValueError, match="multiple of m"):
        nm_mask(np.ones((2, 6)), 2, 4)
