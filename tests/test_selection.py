"""The pure-numpy selection core: exact counts, the tie order, bounds, dtypes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_magprune.selection import (
    NonFiniteValues,
    SelectionParams,
    apply_plan,
    finite_counts,
    plan_global,
    plan_local,
    select_smallest,
    target_count,
)

BF16 = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.BFLOAT16))
# tiny chunks, blocks, caps and samples force the streaming, threaded and fallback paths on small arrays
TINY = SelectionParams(chunk=5, chunks_per_block=2, threads=2, direct_max=8, sample_size=8, candidate_cap=6,
                       split_ways=3)
PARAMS = [SelectionParams(), TINY]


def reference_mask(arrays, k):
    """Brute force: sort (|w|, array index, flat index), take the first k finite entries."""
    keys = []
    for i, a in enumerate(arrays):
        mags = np.abs(a.reshape(-1).astype(np.float64))
        keys += [(float(m), i, j) for j, m in enumerate(mags) if np.isfinite(m)]
    keys.sort()
    masks = [np.zeros(a.size, bool) for a in arrays]
    for _m, i, j in keys[:k]:
        masks[i][j] = True
    return masks


def bits(a):
    return a.reshape(-1).view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def check_plans(arrays, plans, k, params):
    expected = reference_mask(arrays, k)
    assert sum(p.pruned for p in plans) == k
    for a, plan, mask in zip(arrays, plans, expected):
        out = a.copy()
        stats = apply_plan(out, plan, params=params)
        was_zero = np.abs(a.reshape(-1).astype(np.float64)) == 0
        now_zero_bits = bits(out) == 0
        # selected entries become +0.0 exactly; everything else keeps its bits
        assert np.all(now_zero_bits[mask])
        assert np.array_equal(bits(out)[~mask], bits(a)[~mask])
        assert stats.zeros_before == int(was_zero.sum())
        assert stats.zeros_after == int((np.abs(out.reshape(-1).astype(np.float64)) == 0).sum())


values = st.one_of(
    st.floats(-4, 4, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5]),  # ties
)


@st.composite
def pools(draw):
    n_arrays = draw(st.integers(1, 4))
    arrays = []
    for _ in range(n_arrays):
        dtype = draw(st.sampled_from([np.float32, np.float16, np.float64, BF16]))
        size = draw(st.integers(0, 40))
        raw = draw(hnp.arrays(np.float64, size, elements=values))
        arrays.append(raw.astype(dtype))
    return arrays


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays=pools(), frac=st.floats(0, 1), params=st.sampled_from(PARAMS))
def test_select_smallest_matches_brute_force(arrays, frac, params):
    n = sum(a.size for a in arrays)
    k = int(round(frac * n))
    plans = select_smallest(arrays, k, params=params)
    check_plans(arrays, plans, k, params)


@settings(max_examples=100, deadline=None)
@given(arrays=pools(), sparsity=st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]), params=st.sampled_from(PARAMS))
def test_global_and_local_counts_are_exact(arrays, sparsity, params):
    n = sum(a.size for a in arrays)
    plans = plan_global(arrays, sparsity, params=params)
    check_plans(arrays, plans, target_count(sparsity, n), params)
    for a in arrays:
        plan = plan_local(a, sparsity, params=params)
        assert plan.pruned == target_count(sparsity, a.size)
        check_plans([a], [plan], plan.pruned, params)


def test_target_count_rounds_the_decimal_half_up():
    assert target_count(0.15, 10) == 2  # 0.15 * 10 is 1.4999999999999998 in binary floating point
    assert target_count(0.25, 2) == 1  # half rounds up (Python's round would give 0)
    assert target_count(0.0, 7) == 0 and target_count(1.0, 7) == 7
    assert target_count(0.8, 0) == 0
    with pytest.raises(ValueError):
        target_count(1.5, 3)


def test_ties_break_by_array_then_flat_index():
    a = np.array([1, 1, 1], np.float32)
    b = np.array([1, 1], np.float32)
    plans = select_smallest([a, b], 4)
    assert [(p.below, p.ties) for p in plans] == [(0, 3), (0, 1)]
    out = b.copy()
    apply_plan(out, plans[1])
    assert out.tolist() == [0.0, 1.0]


def test_large_pool_takes_streaming_path_and_is_exact():
    rng = np.random.default_rng(7)
    arrays = [rng.standard_normal(300_000).astype(np.float32), rng.standard_normal((500, 300)).astype(np.float16)]
    params = SelectionParams(chunk=4096, direct_max=1000, sample_size=2000, candidate_cap=50_000)
    k = target_count(0.9, sum(a.size for a in arrays))
    plans = select_smallest(arrays, k, params=params)
    assert sum(p.pruned for p in plans) == k
    # same as the direct (partition) path
    direct = select_smallest(arrays, k)
    assert plans == direct


def test_heavily_tied_pool_terminates_on_a_single_value():
    arrays = [np.zeros(5000, np.float32), np.full(5000, 0.25, np.float32), np.ones(10, np.float32)]
    params = SelectionParams(chunk=64, direct_max=10, sample_size=50, candidate_cap=20)
    for k in (1, 4999, 5000, 5001, 9999, 10_005):
        plans = select_smallest(arrays, k, params=params)
        check_plans(arrays, plans, k, params)


def test_adversarial_sample_miss_falls_back_to_bisection():
    # every sampled position (prime stride) holds a huge value, the rest are tiny
    params = SelectionParams(chunk=16, direct_max=10, sample_size=10, candidate_cap=4)
    a = np.full(1000, 1e-3, np.float32)
    a[::101] = 1e3
    for k in (5, 500, 990, 1000):
        check_plans([a], select_smallest([a], k, params=params), k, params)


def test_nonfinite_raise_or_are_kept_and_never_pruned():
    a = np.array([0.1, np.nan, -0.2, np.inf, 0.3, -np.inf], np.float32)
    with pytest.raises(NonFiniteValues) as info:
        plan_global([np.ones(3, np.float32), a], 0.5)
    assert (info.value.array_index, info.value.count) == (1, 3)
    for params in PARAMS:
        plan = plan_local(a, 1.0, keep_nonfinite=True, params=params)
        assert plan.pruned == 3  # only the finite entries count
        out = a.copy()
        apply_plan(out, plan, params=params)
        assert np.isnan(out[1]) and out[3] == np.inf and out[5] == -np.inf
        assert out[[0, 2, 4]].tolist() == [0, 0, 0]
    assert finite_counts([a], keep_nonfinite=True) == [3]


def test_mixed_precision_thresholds_are_exact():
    # a float64 threshold that float16 cannot represent must not round into a float16 neighbour
    h = np.array([0.0999755859375, 0.10003662109375], np.float16)  # float16 values around 0.1
    d = np.array([0.1], np.float64)
    plans = select_smallest([h, d], 2)
    check_plans([h, d], plans, 2, SelectionParams())


def test_bounds_are_respected_and_total_is_exact():
    rng = np.random.default_rng(3)
    small = rng.standard_normal(1000).astype(np.float32) * 0.01  # would be pruned almost fully
    big = rng.standard_normal(1000).astype(np.float32)
    plans = plan_global([small, big], 0.5, bounds=[(0.0, 0.6), (0.0, 1.0)])
    assert plans[0].pruned == 600  # held at its max
    assert plans[0].pruned + plans[1].pruned == 1000
    plans = plan_global([small, big], 0.5, bounds=[(0.0, 1.0), (0.45, 1.0)])
    assert plans[1].pruned == 450 and plans[0].pruned == 550
    with pytest.raises(ValueError, match="bounds allow only"):
        plan_global([small, big], 0.9, bounds=[(0.0, 0.5), (0.0, 0.5)])


def test_bounded_cut_matches_brute_force_on_random_pools():
    rng = np.random.default_rng(11)
    for trial in range(40):
        arrays = [rng.standard_normal(rng.integers(5, 40)).astype(np.float32) * rng.uniform(0.1, 3) for _ in range(3)]
        bounds = [tuple(sorted(rng.uniform(0, 1, 2).round(2))) for _ in arrays]
        sizes = [a.size for a in arrays]
        lo = sum(target_count(b[0], n) for b, n in zip(bounds, sizes))
        hi = sum(target_count(b[1], n) for b, n in zip(bounds, sizes))
        s = float(rng.uniform(0, 1))
        k = target_count(s, sum(sizes))
        if not lo <= k <= hi:
            continue
        plans = plan_global(arrays, s, bounds=bounds)
        counts = [p.pruned for p in plans]
        assert sum(counts) == k
        for c, b, n in zip(counts, bounds, sizes):
            assert target_count(b[0], n) <= c <= target_count(b[1], n)
        # arrays strictly inside their bounds share one threshold: none of their kept entries is
        # smaller than a pruned entry of another such array
        free = [i for i, (c, b, n) in enumerate(zip(counts, bounds, sizes))
                if target_count(b[0], n) < c < target_count(b[1], n)]
        if len(free) > 1:
            ts = {plans[i].threshold for i in free}
            assert len(ts) == 1, (trial, ts)


def test_apply_refuses_read_only_arrays():
    a = np.ones(4, np.float32)
    a.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        apply_plan(a, plan_local(np.ones(4, np.float32), 0.5))


def test_threads_do_not_change_results():
    rng = np.random.default_rng(5)
    arrays = [rng.standard_normal(20_000).astype(np.float32) for _ in range(3)]
    one = SelectionParams(chunk=256, chunks_per_block=4, threads=1, direct_max=100, sample_size=500)
    two = SelectionParams(chunk=256, chunks_per_block=4, threads=2, direct_max=100, sample_size=500)
    assert plan_global(arrays, 0.7, params=one) == plan_global(arrays, 0.7, params=two)
