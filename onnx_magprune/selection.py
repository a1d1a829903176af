"""Exact smallest-magnitude selection over one or many arrays (pure numpy).

The meaning of a selection is one total order over every entry of a pool of
arrays: by magnitude ``|w|``, then by the array's position in the pool, then by
flat index.  Pruning ``k`` entries means zeroing the first ``k`` entries of that
order, so the count is exact and ties are broken deterministically.

The result for each array is an :class:`ArrayPlan`: a magnitude threshold ``T``
(the k-th smallest magnitude, exactly the value of one entry), how many
entries lie strictly below it, and how many entries *equal* to it are pruned
(the first ones in flat order).

Selection never sorts the pool.  It streams over the arrays in cache-sized
chunks, in blocks spread over a thread pool (numpy releases the GIL in its
loops; results are combined in block order, so they never depend on
scheduling):

1. *sample*: a strided sample of the magnitudes (a small part of the memory);
2. *count*: from the sample, bracket the k-th magnitude in ``[lo, hi)``, count
   the entries below ``lo`` per array (detecting NaN/Inf on the way) and
   collect the few entries inside the bracket; the threshold is the right
   order statistic of those;
3. if the sample's bracket missed (adversarial or heavily tied data), narrow the
   bracket by multi-way bisection over the float64 bit patterns, which always
   terminates (at worst on a bracket holding one distinct value).

Memory beyond the arrays themselves is one chunk buffer per thread plus the
candidates (bounded by ``candidate_cap``).  Arrays may be float16, bfloat16 (as
onnx returns it), float32 or float64, mixed in one pool: comparisons are made
in each array's own precision against thresholds rounded *up* to it, which is
exact (see :func:`_ceil_in`).
"""

from __future__ import annotations

import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np

R = TypeVar("R")


@dataclass(frozen=True)
class SelectionParams:
    """Tuning knobs; defaults suit any pool size.  Tests shrink them to force
    the streaming and fallback paths on small arrays."""

    chunk: int = 1 << 16
    chunks_per_block: int = 16
    threads: int = 1  # 0: one per core (at most 8); measured slower on 2-vCPU machines
    direct_max: int = 1 << 21
    sample_size: int = 1 << 16  # at least; n/1024 for larger pools (each sample costs about one cache miss)
    candidate_cap: int = 1 << 21  # raised to n/32 for large pools
    split_ways: int = 16

    def __post_init__(self):
        for name, low in (("chunk", 1), ("chunks_per_block", 1), ("threads", 0), ("direct_max", 0),
                          ("sample_size", 1), ("candidate_cap", 0), ("split_ways", 2)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"SelectionParams.{name} must be an integer >= {low}, got {value!r}")


DEFAULT_PARAMS = SelectionParams()


@dataclass(frozen=True)
class ArrayPlan:
    """Which entries of one array to zero: every ``|w| < threshold`` entry and
    the first ``ties`` entries (flat order) with ``|w| == threshold``."""

    threshold: float
    below: int
    ties: int

    @property
    def pruned(self) -> int:
        return self.below + self.ties


NOTHING = ArrayPlan(threshold=0.0, below=0, ties=0)


class NonFiniteValues(ValueError):
    """An array of the pool holds NaN or Inf and the caller did not keep them."""

    def __init__(self, array_index: int, count: int):
        super().__init__(f"array {array_index} holds {count} NaN/Inf value(s)")
        self.array_index = array_index
        self.count = count


@dataclass(frozen=True)
class ApplyStats:
    zeros_before: int
    zeros_after: int


def target_count(sparsity: float, n: int) -> int:
    """``round(sparsity * n)`` with halves rounded up, computed exactly on the
    decimal value the user wrote (``0.15 * 10`` is 2, not 1)."""
    if math.isnan(sparsity) or not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity!r}")
    exact = Fraction(repr(float(sparsity))) * n
    return min(n, math.floor(exact + Fraction(1, 2)))


# ---------------------------------------------------------------------------
# dtype helpers


def _is_bf16(dtype: np.dtype) -> bool:
    return dtype.name == "bfloat16"


def compare_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype magnitudes of ``dtype`` are compared in (exact for all)."""
    dtype = np.dtype(dtype)
    if _is_bf16(dtype):
        return np.dtype(np.float32)
    if dtype in (np.float16, np.float32, np.float64):
        return dtype
    raise TypeError(f"cannot select on dtype {dtype}")


def _ceil_in(dtype: np.dtype, value: float):
    """Smallest ``dtype`` value >= ``value``.  For ``x`` of that dtype,
    ``x < value`` holds exactly when ``x < _ceil_in(dtype, value)``."""
    with np.errstate(over="ignore"):
        v = dtype.type(value)
    if float(v) < value:
        v = np.nextafter(v, dtype.type(np.inf))
    return v


def _bits_dtype(itemsize: int) -> np.dtype:
    return np.dtype({2: np.uint16, 4: np.uint32, 8: np.uint64}[itemsize])


def _flat(array: np.ndarray) -> np.ndarray:
    if not array.flags.c_contiguous:
        raise ValueError("arrays must be C-contiguous")
    return array.reshape(-1)


class ArraySource:
    """An in-memory array as a selection source."""

    def __init__(self, array: np.ndarray):
        self.flat = _flat(array)
        self.size = int(self.flat.size)
        self.dtype = self.flat.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.flat[start:stop]

    def take_strided(self, first: int, stride: int) -> np.ndarray:
        return self.flat[first::stride]


def as_source(a):
    """Selection reads arrays, or any object with ``size``, ``dtype``,
    ``read(start, stop)`` and ``take_strided(first, stride)`` (e.g. a tensor
    in a file, read block by block so memory stays bounded)."""
    return ArraySource(a) if isinstance(a, np.ndarray) else a


def _iter_mags(flat: np.ndarray, chunk: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, chunk_view, magnitudes)``; ``magnitudes`` is a reused buffer."""
    cd = compare_dtype(flat.dtype)
    buf = np.empty(min(chunk, max(flat.size, 1)), cd)
    bf16 = _is_bf16(flat.dtype)
    for start in range(0, flat.size, chunk):
        ch = flat[start : start + chunk]
        m = buf[: ch.size]
        if bf16:
            mu = m.view(np.uint32)
            np.left_shift(ch.view(np.uint16), 16, out=mu, dtype=np.uint32)
            np.bitwise_and(mu, np.uint32(0x7FFFFFFF), out=mu)
        else:
            np.abs(ch, out=m)
        yield start, ch, m


def _map_blocks(
    fn: Callable[[int, int, np.ndarray], R], arrays: Sequence[np.ndarray], params: SelectionParams
) -> list[tuple[int, R]]:
    """``[(array_index, fn(array_index, start, block))]`` over every block, in block order."""
    size = params.chunk * params.chunks_per_block
    sources = [as_source(a) for a in arrays]
    items = [(i, start) for i, src in enumerate(sources) for start in range(0, src.size, size)]

    def work(item):
        i, start = item
        return fn(i, start, sources[i].read(start, start + size))

    workers = params.threads or min(8, os.cpu_count() or 1)
    if workers <= 1 or len(items) <= 1:
        return [(it[0], work(it)) for it in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(work, items))
    return [(it[0], r) for it, r in zip(items, results)]


# ---------------------------------------------------------------------------
# finite counts and the sample


def _prime_at_least(n: int) -> int:
    n = max(n, 2)
    while any(n % p == 0 for p in range(2, math.isqrt(n) + 1)):
        n += 1
    return n


def _nonfinite_counts(arrays: Sequence[np.ndarray], params: SelectionParams) -> list[int]:
    """NaN/Inf entries per array.  Raw ``min``/``max`` of a chunk are finite
    exactly when the chunk holds none, so magnitudes are not needed."""

    def block_bad(_i: int, _start: int, block: np.ndarray) -> int:
        bad = 0
        for s in range(0, block.size, params.chunk):
            ch = block[s : s + params.chunk]
            if _is_bf16(ch.dtype):
                ch = ch.astype(np.float32)
            if not (np.isfinite(ch.max()) and np.isfinite(ch.min())):
                bad += int(ch.size - np.count_nonzero(np.isfinite(ch)))
        return bad

    counts = [0] * len(arrays)
    for i, bad in _map_blocks(block_bad, arrays, params):
        counts[i] += bad
    return counts


def _sample(arrays: Sequence[np.ndarray], params: SelectionParams) -> np.ndarray:
    """Sorted finite magnitudes of every ``stride``-th entry of the pool (a
    prime stride, so rows of any width are sampled across all columns).
    Strided reads touch a fraction of the memory: no full pass."""
    total = sum(int(a.size) for a in arrays)
    in_memory = all(isinstance(as_source(a), ArraySource) for a in arrays)
    # larger samples for large in-memory pools (cheap strided reads); sources read through
    # files pay a system call per sample, so they keep the base size
    size = max(params.sample_size, min(total // 1024, 16 * params.sample_size)) if in_memory else params.sample_size
    stride = _prime_at_least(total // size) if total > size else 1
    parts, pos = [], 0
    for a in map(as_source, arrays):
        picked = a.take_strided((-pos) % stride, stride)
        if _is_bf16(picked.dtype):
            picked = picked.astype(np.float32)
        parts.append(np.abs(picked.astype(np.float64)))
        pos += a.size
    smp = np.concatenate(parts) if parts else np.empty(0, np.float64)
    return np.sort(smp[np.isfinite(smp)])


# ---------------------------------------------------------------------------
# pass 2: count and collect


@dataclass
class _Counted:
    below_lo: list[int]
    below_hi: list[int]
    candidates: list[np.ndarray] | None  # per array, float64 magnitudes in [lo, hi)
    nonfinite: list[int]


def _count(arrays, lo: float, hi: float, params: SelectionParams, collect: bool) -> _Counted:
    """Entries below ``lo`` and below ``hi`` per array; with ``collect``, also
    the entries in ``[lo, hi)``, unless there are more than the cap."""
    lock = threading.Lock()
    collected = [0]
    overflow = [not collect]
    in_memory = all(isinstance(as_source(a), ArraySource) for a in arrays)
    # in-memory pools may collect up to n/32 candidates (speed); pools read from files keep the
    # fixed cap, so memory stays bounded (an overflowing bracket is narrowed by one more pass)
    cap = max(params.candidate_cap, sum(int(a.size) for a in arrays) // 32) if in_memory else params.candidate_cap

    def count_block(i: int, _start: int, block: np.ndarray):
        cd = compare_dtype(block.dtype)
        lo_c, hi_c = _ceil_in(cd, lo), _ceil_in(cd, hi)
        b_lo_buf = np.empty(min(params.chunk, block.size), bool)
        b_hi_buf = np.empty_like(b_lo_buf)
        n_lo = n_hi = bad = 0
        mine = []
        for _s, _ch, m in _iter_mags(block, params.chunk):
            if not np.isfinite(m.max()):
                bad += int(m.size - np.count_nonzero(np.isfinite(m)))
            b_lo = np.less(m, lo_c, out=b_lo_buf[: m.size])
            b_hi = np.less(m, hi_c, out=b_hi_buf[: m.size])
            c_lo, c_hi = int(np.count_nonzero(b_lo)), int(np.count_nonzero(b_hi))
            n_lo += c_lo
            n_hi += c_hi
            if c_hi > c_lo and not overflow[0]:
                with lock:
                    collected[0] += c_hi - c_lo
                    overflow[0] = collected[0] > cap
                if not overflow[0]:
                    np.not_equal(b_lo, b_hi, out=b_hi)  # lo <= m < hi
                    mine.append(m[b_hi].astype(np.float64))
        return n_lo, n_hi, mine, bad

    below_lo, below_hi, nonfinite = [0] * len(arrays), [0] * len(arrays), [0] * len(arrays)
    per_array: list[list[np.ndarray]] = [[] for _ in arrays]
    for i, (n_lo, n_hi, mine, bad) in _map_blocks(count_block, arrays, params):
        below_lo[i] += n_lo
        below_hi[i] += n_hi
        nonfinite[i] += bad
        per_array[i].extend(mine)
    if overflow[0]:
        return _Counted(below_lo, below_hi, None, nonfinite)
    cands = [np.concatenate(p) if p else np.empty(0, np.float64) for p in per_array]
    return _Counted(below_lo, below_hi, cands, nonfinite)


def _count_below(arrays, points: Sequence[float], params: SelectionParams) -> list[int]:
    """Total number of entries below each point (one pass)."""

    def count_block(_i: int, _start: int, block: np.ndarray):
        cd = compare_dtype(block.dtype)
        bounds = [_ceil_in(cd, p) for p in points]
        totals = [0] * len(points)
        for _s, _ch, m in _iter_mags(block, params.chunk):
            for j, b in enumerate(bounds):
                totals[j] += int(np.count_nonzero(m < b))
        return totals

    totals = [0] * len(points)
    for _i, r in _map_blocks(count_block, arrays, params):
        totals = [a + b for a, b in zip(totals, r)]
    return totals


def _key(x: float) -> int:
    return int(np.float64(x).view(np.uint64))


def _unkey(k: int) -> float:
    return float(np.uint64(k).view(np.float64))


def _bracket_from_sample(sample: np.ndarray, k: int, n: int) -> tuple[float, float]:
    s = sample.size
    if s == 0:
        return 0.0, math.inf
    q = k / n
    d = 5.0 * math.sqrt(s * q * (1.0 - q)) + 8.0
    i_lo = math.floor(q * s - d)
    i_hi = math.ceil(q * s + d)
    lo = float(sample[i_lo]) if i_lo >= 0 else 0.0
    hi = float(sample[i_hi]) if i_hi < s else math.inf
    if hi <= lo:
        hi = float(np.nextafter(lo, np.inf))
    return lo, hi


def _plans_from_threshold(k: int, t: float, below: list[int], equal: list[int]) -> list[ArrayPlan]:
    ties_left = k - sum(below)
    plans = []
    for b, e in zip(below, equal):
        take = min(e, ties_left)
        ties_left -= take
        plans.append(ArrayPlan(threshold=t, below=b, ties=take))
    if ties_left != 0:  # pragma: no cover - guarded by the bracket invariant
        raise RuntimeError("selection invariant broken: tie count mismatch")
    return plans


def _check_finite(nonfinite: Sequence[int], keep_nonfinite: bool) -> None:
    if not keep_nonfinite:
        for i, bad in enumerate(nonfinite):
            if bad:
                raise NonFiniteValues(i, bad)


def _select_direct(arrays, count_for: Callable[[int], int], keep_nonfinite: bool,
                   params: SelectionParams) -> list[ArrayPlan]:
    mags, nonfinite = [], []
    for a in map(as_source, arrays):
        parts = [m.astype(np.float64) for _s, _c, m in _iter_mags(a.read(0, a.size), params.chunk)]
        whole = np.concatenate(parts) if parts else np.empty(0, np.float64)
        finite = np.isfinite(whole)
        nonfinite.append(int(whole.size - np.count_nonzero(finite)))
        mags.append(whole[finite])
    _check_finite(nonfinite, keep_nonfinite)
    allm = np.concatenate(mags) if mags else np.empty(0, np.float64)
    k = _checked_k(count_for, allm.size)
    if k == 0:
        return [NOTHING] * len(arrays)
    t = float(np.partition(allm, k - 1)[k - 1])
    below = [int(np.count_nonzero(m < t)) for m in mags]
    equal = [int(np.count_nonzero(m == t)) for m in mags]
    return _plans_from_threshold(k, t, below, equal)


def _checked_k(count_for: Callable[[int], int], n: int) -> int:
    k = count_for(n)
    if not 0 <= k <= n:
        raise ValueError(f"k={k} is outside [0, {n}]")
    return k


def _select_streaming(arrays, count_for: Callable[[int], int], keep_nonfinite: bool,
                      params: SelectionParams) -> list[ArrayPlan]:
    total = sum(int(a.size) for a in arrays)
    sample = _sample(arrays, params)
    lo, hi = _bracket_from_sample(sample, min(max(1, count_for(total)), total), total)
    counted = _count(arrays, lo, hi, params, collect=True)
    _check_finite(counted.nonfinite, keep_nonfinite)
    n = total - sum(counted.nonfinite)
    k = _checked_k(count_for, n)
    if k == 0:
        return [NOTHING] * len(arrays)
    while True:
        g_lo, g_hi = sum(counted.below_lo), sum(counted.below_hi)
        single = _key(hi) - _key(lo) == 1
        if g_lo < k <= g_hi:
            if single:  # every entry in the bracket has the value lo
                equal = [h - b for b, h in zip(counted.below_lo, counted.below_hi)]
                return _plans_from_threshold(k, lo, counted.below_lo, equal)
            if counted.candidates is not None:
                return _plans_from_candidates(k, g_lo, counted)
            lo, hi = _narrow(arrays, lo, hi, g_lo, g_hi, k, params)
        elif k <= g_lo:
            lo, hi = _narrow(arrays, 0.0, lo, 0, g_lo, k, params)
        else:
            lo, hi = _narrow(arrays, hi, math.inf, g_hi, n, k, params)
        counted = _count(arrays, lo, hi, params, collect=_key(hi) - _key(lo) > 1)


def _plans_from_candidates(k: int, g_lo: int, counted: _Counted) -> list[ArrayPlan]:
    cands = counted.candidates
    j = k - g_lo  # 1-based rank inside the bracket
    t = float(np.partition(np.concatenate(cands), j - 1)[j - 1])
    below = [b + int(np.count_nonzero(c < t)) for b, c in zip(counted.below_lo, cands)]
    equal = [int(np.count_nonzero(c == t)) for c in cands]
    return _plans_from_threshold(k, t, below, equal)


def _narrow(arrays, lo: float, hi: float, g_lo: int, g_hi: int, k: int, params: SelectionParams):
    """Shrink ``[lo, hi)`` (which holds the k-th magnitude) until its entries fit
    the candidate cap or it holds one distinct value.  Returns the new bracket."""
    klo, khi = _key(lo), _key(hi)
    while khi - klo > 1 and g_hi - g_lo > params.candidate_cap:
        step = max(1, (khi - klo) // params.split_ways)
        keys = list(range(klo + step, khi, step))[: params.split_ways - 1]
        totals = _count_below(arrays, [_unkey(x) for x in keys], params)
        for x, g in zip(keys, totals):
            if g < k:
                klo, g_lo = x, g
            else:
                khi, g_hi = x, g
                break
    return _unkey(klo), _unkey(khi)


# ---------------------------------------------------------------------------
# public entry points


def select_smallest(
    arrays: Sequence[np.ndarray],
    count: int | Callable[[int], int],
    *,
    keep_nonfinite: bool = False,
    params: SelectionParams = DEFAULT_PARAMS,
) -> list[ArrayPlan]:
    """Plans that zero exactly the ``k`` smallest-magnitude finite entries of
    the pool (order: magnitude, array position, flat index).  ``count`` is
    ``k`` or a function from the number of finite entries to ``k``.  NaN/Inf
    raise :class:`NonFiniteValues` unless ``keep_nonfinite``, in which case they
    are never pruned and not counted."""
    count_for = count if callable(count) else (lambda _n: count)
    if sum(int(a.size) for a in arrays) <= params.direct_max:
        return _select_direct(arrays, count_for, keep_nonfinite, params)
    return _select_streaming(arrays, count_for, keep_nonfinite, params)


def finite_counts(
    arrays: Sequence[np.ndarray], *, keep_nonfinite: bool = False, params: SelectionParams = DEFAULT_PARAMS
) -> list[int]:
    """Finite entries per array; raises :class:`NonFiniteValues` unless kept."""
    bad = _nonfinite_counts(arrays, params)
    _check_finite(bad, keep_nonfinite)
    return [int(a.size) - b for a, b in zip(arrays, bad)]


def plan_local(
    array: np.ndarray, sparsity: float, *, keep_nonfinite: bool = False, params: SelectionParams = DEFAULT_PARAMS
) -> ArrayPlan:
    """Prune ``round(sparsity * n)`` of one array's ``n`` finite entries."""
    return select_smallest(
        [array], lambda n: target_count(sparsity, n), keep_nonfinite=keep_nonfinite, params=params
    )[0]


def plan_global(
    arrays: Sequence[np.ndarray],
    sparsity: float,
    *,
    bounds: Sequence[tuple[float, float]] | None = None,
    keep_nonfinite: bool = False,
    params: SelectionParams = DEFAULT_PARAMS,
) -> list[ArrayPlan]:
    """One threshold across the pool: prune ``round(sparsity * N)`` entries.

    ``bounds`` gives each array a ``(min_sparsity, max_sparsity)``; the result
    is the cut of the global order whose per-array counts, clamped to the
    bounds, sum to the target (arrays held at a bound prune their own smallest
    entries).  Arrays whose unclamped count violates a bound are fixed at it,
    one side at a time, which is exact: if the clamped total falls short, the
    final cut lies further up, so arrays already over their max stay over it
    (and symmetrically for the min side).
    """
    target = lambda n: target_count(sparsity, n)  # noqa: E731
    if bounds is None or all(tuple(b) == (0.0, 1.0) for b in bounds):
        return select_smallest(arrays, target, keep_nonfinite=keep_nonfinite, params=params)
    finite = finite_counts(arrays, keep_nonfinite=keep_nonfinite, params=params)
    n = sum(finite)
    k = target(n)
    lo_n = [target_count(lo, f) for (lo, _hi), f in zip(bounds, finite)]
    hi_n = [target_count(hi, f) for (_lo, hi), f in zip(bounds, finite)]
    if any(a > b for a, b in zip(lo_n, hi_n)):
        raise ValueError("a min sparsity bound is above its max")
    if not sum(lo_n) <= k <= sum(hi_n):
        raise ValueError(
            f"global sparsity {sparsity} needs {k} of {n} weights zeroed, but the per-tensor bounds "
            f"allow only {sum(lo_n)} to {sum(hi_n)}"
        )
    fixed: dict[int, int] = {}
    while True:
        active = [i for i in range(len(arrays)) if i not in fixed]
        k_active = k - sum(fixed.values())
        plans = select_smallest([arrays[i] for i in active], k_active, keep_nonfinite=True, params=params)
        counts = {i: p.pruned for i, p in zip(active, plans)}
        over = [i for i in active if counts[i] > hi_n[i]]
        under = [i for i in active if counts[i] < lo_n[i]]
        excess = sum(counts[i] - hi_n[i] for i in over) - sum(lo_n[i] - counts[i] for i in under)
        if excess >= 0:
            fixed.update({i: hi_n[i] for i in over})
        if excess <= 0:
            fixed.update({i: lo_n[i] for i in under})
        if excess == 0:
            break
    result = dict(zip(active, plans))
    for i, c in fixed.items():
        result[i] = select_smallest([arrays[i]], c, keep_nonfinite=True, params=params)[0]
    return [result[i] for i in range(len(arrays))]


def apply_plan(array: np.ndarray, plan: ArrayPlan, *, params: SelectionParams = DEFAULT_PARAMS) -> ApplyStats:
    """Zero, in place, the entries ``plan`` selects (as +0.0, bit pattern 0).

    Blocks are pruned in parallel; tie entries (``|w| == threshold``) are
    located per block and the first ``plan.ties`` of them, in flat order, are
    zeroed afterwards.
    """
    flat = _flat(array)
    if not flat.flags.writeable:
        raise ValueError("array is read-only")
    cd = compare_dtype(flat.dtype)
    t_ceil = _ceil_in(cd, plan.threshold)
    want_ties = plan.ties if float(t_ceil) == plan.threshold else 0
    bits_dt = _bits_dtype(flat.dtype.itemsize)

    def apply_block(_i: int, start: int, block: np.ndarray):
        mask = np.empty(min(params.chunk, block.size), bool)
        zeros = 0
        ties: list[np.ndarray] = []
        found = 0
        for s, ch, m in _iter_mags(block, params.chunk):
            mb = mask[: m.size]
            z = int(np.count_nonzero(np.equal(m, 0, out=mb)))
            zeros += z
            if plan.pruned == 0:
                continue
            if found < want_ties:
                eq = np.flatnonzero(np.equal(m, t_ceil, out=mb))[: want_ties - found]
                ties.append(eq + (start + s))
                found += eq.size
            np.less(m, t_ceil, out=mb)
            np.logical_not(mb, out=mb)
            bits = ch.view(bits_dt)
            np.multiply(bits, mb, out=bits)
        return zeros, ties

    zeros_before = 0
    tie_positions: list[np.ndarray] = []
    for _i, (z, t) in _map_blocks(apply_block, [flat], params):
        zeros_before += z
        tie_positions.extend(t)
    if plan.pruned == 0:
        return ApplyStats(zeros_before, zeros_before)
    ties = np.concatenate(tie_positions)[:want_ties] if tie_positions else np.empty(0, np.intp)
    if ties.size != plan.ties:
        raise RuntimeError(f"plan does not match the array: {ties.size} ties found, plan has {plan.ties}")
    flat.view(bits_dt)[ties] = 0
    # every zero lies below a positive threshold; a zero threshold prunes only zeros
    zeros_after = plan.below + ties.size if plan.threshold > 0 else zeros_before
    return ApplyStats(zeros_before, zeros_after)


def count_zeros(source, *, params: SelectionParams = DEFAULT_PARAMS) -> int:
    """Entries equal to zero (either sign), block by block."""

    def block_zeros(_i: int, _start: int, block: np.ndarray) -> int:
        return sum(int(m.size - np.count_nonzero(m)) for _s, _c, m in _iter_mags(block, params.chunk))

    return sum(z for _i, z in _map_blocks(block_zeros, [source], params))
