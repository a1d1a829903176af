"""Choosing a compact code per tensor: the exact size of every candidate code and
an estimate of its decode cost at session start (pure numpy; no onnx imports)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .compact_code import (Alphabet, Blocking, Layout, Mode, Objective, _Gaps, _gaps, alphabets, bound_bytes,
                           encoded_nbytes, fiber_major, nonzero_mask)


@dataclass(frozen=True)
class Estimate:
    alphabet: Alphabet
    nbytes: int
    entries: int        # total entries (planes x k)
    startup: float      # estimated decode cost, in units of loading the dense tensor
    plan: Blocking | None = None  # the blocks it is coded in (None: whole)


def startup_cost(alphabet: Alphabet, fibers: int, k: int, nbytes: int, n: int, itemsize: int,
                 two_d: bool = True) -> float:
    """Estimated decode cost relative to loading the dense tensor.  Measured with ONNX
    Runtime 1.32 on CPU, folding costs about the same per byte of every node's output as
    loading costs per byte of stored tensor, so this is (bytes the decoder's nodes write +
    bytes stored) / dense bytes: the full-size tensors (zeros, scatter, and for planes a
    reshape), int32 per entry for the cast, lookup (and its reshape) and positions (in
    skip mode also the is-value flags, their sums, offsets and value index), plus the
    gathered updates.  A tensor decoded in blocks gets the same estimate: blocks make
    every code cheaper to decode, and the estimate only ranks the codes."""
    entries = fibers * k
    words = entries // alphabet.planes
    if alphabet.mode is Mode.POSITION:  # Cast of the positions, zeros, scatter (and a Reshape unless 2-D)
        written = entries * 4 + (2 + (not two_d)) * n * itemsize
        return (written + nbytes) / max(n * itemsize, 1)
    if alphabet.layout is Layout.COLUMNS:
        # scattering along the first axis writes a different row for every fiber: ONNX Runtime's
        # ScatterElements then misses the cache on every entry (~65 ns each measured, about what
        # loading 20 bytes of a dense tensor costs)
        int32_outputs = words + entries * (1 if alphabet.planes == 1 else 3) + entries * 5
        full = 2
    else:
        int32_outputs = words + entries * (1 if alphabet.identity else 2)
        full = 3
    written = int32_outputs * 4 + full * n * itemsize
    if alphabet.mode is Mode.SKIP:
        written += entries * (4 * 4 + itemsize)
    return (written + nbytes) / max(n * itemsize, 1)


def _whole(array: np.ndarray) -> list[Estimate]:
    """Every alphabet that can encode ``array`` whole, with its exact size."""
    shape = tuple(array.shape)
    n, itemsize = array.size, array.dtype.itemsize
    out = []
    cache: dict[tuple[Layout, int], _Gaps] = {}
    flat_positions: dict[Layout, np.ndarray] = {}
    for alphabet in alphabets():
        if not alphabet.fits(shape):
            continue
        fibers = alphabet.fibers(shape)
        key = (alphabet.layout, fibers)
        if key not in cache:
            mask = nonzero_mask(fiber_major(array, alphabet.layout))
            if alphabet.layout not in flat_positions:
                flat_positions[alphabet.layout] = np.flatnonzero(mask)
            cache[key] = _gaps(mask, fibers, flat_positions[alphabet.layout])
        nbytes, k = encoded_nbytes(cache[key], alphabet, itemsize)
        out.append(Estimate(alphabet, nbytes, fibers * k,
                            startup_cost(alphabet, fibers, k, nbytes, n, itemsize, len(shape) == 2)))
    return out


def candidates(array: np.ndarray, plan: Blocking | None = None) -> list[Estimate]:
    """Every alphabet that can encode ``array`` whole (``plan`` None) or every block of ``plan``,
    with its exact size (summed over the blocks) and estimated decode cost (weighted by size)."""
    if array.size == 0:
        raise ValueError("an empty tensor has nothing to encode")
    if plan is None:
        return _whole(array)
    blocks = plan.split(array)
    per_block = [{e.alphabet: e for e in _whole(np.ascontiguousarray(b))} for b in blocks]
    out = []
    for alphabet in per_block[0]:
        if all(alphabet in found for found in per_block):
            parts = [found[alphabet] for found in per_block]
            out.append(Estimate(alphabet, sum(e.nbytes for e in parts), sum(e.entries for e in parts),
                                sum(e.startup * b.size for e, b in zip(parts, blocks)) / array.size, plan))
    return out


#: balanced: the fastest-starting code within this factor of the information bound
BALANCED_CAP = 1.095


def choose(array: np.ndarray, objective: Objective, plan: Blocking | None = None) -> Estimate:
    """The code ``objective`` prefers; ``balanced`` takes the fastest-starting code within
    :data:`BALANCED_CAP` of the information bound, else the smallest.  ``plan``: the blocks the
    tensor may be coded in (:func:`~onnx_magprune.compact_code.blocking`); ``size`` codes it
    whole (each block re-pads and restarts its code), and ``balanced`` does when no blocked code
    is within the cap.  The estimate's ``plan`` says which."""
    cap = _cap(array) if objective is Objective.BALANCED else None
    if objective is Objective.SIZE or plan is None:
        return _pick(array, candidates(array), objective, cap)
    chosen = _pick(array, candidates(array, plan), objective, cap)
    if cap is not None and chosen.nbytes > cap:
        return _pick(array, candidates(array), objective, cap)
    return chosen


def _cap(array: np.ndarray) -> float:
    mask = nonzero_mask(array)
    return BALANCED_CAP * bound_bytes(mask.size, int(mask.sum()), array.dtype.itemsize)


def _pick(array: np.ndarray, found: list[Estimate], objective: Objective, cap: float | None) -> Estimate:
    """``cap``: the balanced objective's size cap (:func:`_cap`), computed once by the caller."""
    smallest = min(found, key=lambda e: (e.nbytes, e.startup))
    dense = array.size * array.dtype.itemsize
    found = [e for e in found if e.nbytes < dense] or [smallest]  # a faster start never at more than dense bytes
    if objective is Objective.SIZE:
        return smallest
    if objective is Objective.STARTUP:
        return min(found, key=lambda e: (e.startup, e.nbytes))
    near = [e for e in found if e.nbytes <= cap]
    return min(near, key=lambda e: (e.startup, e.nbytes)) if near else smallest
