"""Choosing a compact code per tensor: the exact size of every candidate code and
an estimate of its decode cost at session start (pure numpy; no onnx imports)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .compact_code import (Alphabet, Layout, Mode, Objective, _Gaps, _gaps, alphabets, bound_bytes,
                           encoded_nbytes, fiber_major, nonzero_mask)


@dataclass(frozen=True)
class Estimate:
    alphabet: Alphabet
    nbytes: int
    entries: int        # total entries (planes x k)
    startup: float      # estimated decode cost, in units of loading the dense tensor


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


def candidates(array: np.ndarray, block_shapes: Sequence[tuple[int, ...]] = ()) -> list[Estimate]:
    """Every alphabet that can encode ``array`` (and each of ``block_shapes``, when it is coded
    in blocks), with its size coded whole: exact for a tensor coded whole, an estimate for one
    coded in blocks."""
    if array.size == 0:
        raise ValueError("an empty tensor has nothing to encode")
    shape = tuple(array.shape)
    n, itemsize = array.size, array.dtype.itemsize
    out = []
    cache: dict[tuple[Layout, int], _Gaps] = {}
    flat_positions: dict[Layout, np.ndarray] = {}
    for alphabet in alphabets():
        if not alphabet.fits(shape) or not all(alphabet.fits(b) for b in block_shapes):
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


#: balanced: the fastest-starting code within this factor of the information bound
BALANCED_CAP = 1.095


def choose(array: np.ndarray, objective: Objective, block_shapes: Sequence[tuple[int, ...]] = ()) -> Estimate:
    """The code ``objective`` prefers; ``balanced`` takes the fastest-starting code
    within :data:`BALANCED_CAP` of the information bound, else the smallest.  With
    ``block_shapes``, only alphabets that fit every block."""
    found = candidates(array, block_shapes)
    smallest = min(found, key=lambda e: (e.nbytes, e.startup))
    dense = array.size * array.dtype.itemsize
    found = [e for e in found if e.nbytes < dense] or [smallest]  # a faster start never at more than dense bytes
    if objective is Objective.SIZE:
        return smallest
    if objective is Objective.STARTUP:
        return min(found, key=lambda e: (e.startup, e.nbytes))
    mask = nonzero_mask(array)
    cap = BALANCED_CAP * bound_bytes(mask.size, int(mask.sum()), array.dtype.itemsize)
    near = [e for e in found if e.nbytes <= cap]
    return min(near, key=lambda e: (e.startup, e.nbytes)) if near else smallest
