"""Quantized weights: rank by the dequantized magnitude, prune to the zero point.

A quantized weight ``q`` (int8/uint8/int16/uint16/int4/uint4) is read through
``y = (q - zero_point) * scale`` (DequantizeLinear, QLinearConv's and
QLinearMatMul's weight inputs), per tensor, per axis or per block.  Pruning an
entry sets it to its zero point, so its dequantized value is exactly 0; the
scale and zero-point tensors themselves are never touched.  Pure numpy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QuantInfo:
    scale: np.ndarray
    zero_point: np.ndarray | None
    axis: int = 1
    block_size: int = 0
    via: str = "DequantizeLinear"  # the op that dequantizes it, for reports

    def describe(self) -> str:
        if self.scale.size == 1:
            kind = "per-tensor"
        elif self.block_size:
            kind = f"blocked (axis {self.axis}, block {self.block_size})"
        else:
            kind = f"per-axis (axis {self.axis})"
        return f"{kind} via {self.via}"


class QuantShapeError(ValueError):
    """Scale or zero point do not fit the weight."""


def _broadcast(param: np.ndarray, shape: tuple[int, ...], axis: int, block_size: int) -> np.ndarray:
    """``param`` expanded to ``shape`` as DequantizeLinear applies it."""
    if param.size == 1:
        return param.reshape(())
    rank = len(shape)
    axis = axis + rank if axis < 0 else axis
    if not 0 <= axis < rank:
        raise QuantShapeError(f"axis {axis} is out of range for a rank-{rank} weight")
    if block_size:
        if param.ndim != rank:
            raise QuantShapeError("blocked quantization needs scale of the weight's rank")
        expanded = np.repeat(param, block_size, axis=axis)
        index = [slice(None)] * rank
        index[axis] = slice(0, shape[axis])
        expanded = expanded[tuple(index)]
        if expanded.shape != shape:
            raise QuantShapeError(f"blocked scale of shape {list(param.shape)} does not fit {list(shape)}")
        return expanded
    if param.ndim != 1 or param.shape[0] != shape[axis]:
        raise QuantShapeError(f"per-axis scale of shape {list(param.shape)} does not fit axis {axis} of "
                              f"{list(shape)}")
    view = [1] * rank
    view[axis] = shape[axis]
    return param.reshape(view)


def dequantize(q: np.ndarray, info: QuantInfo) -> np.ndarray:
    """The dequantized values in float64 (exact for every integer and scale type used)."""
    scale = _broadcast(np.asarray(info.scale, dtype=np.float64), q.shape, info.axis, info.block_size)
    shifted = q.astype(np.float64)
    if info.zero_point is not None:
        shifted = shifted - _broadcast(info.zero_point.astype(np.float64), q.shape, info.axis, info.block_size)
    return shifted * scale


def prune_to_zero_point(q: np.ndarray, pruned: np.ndarray, info: QuantInfo) -> np.ndarray:
    """``q`` with every ``pruned`` entry set to its zero point (0 without one).  Entries that already
    dequantize to 0 keep their bytes (e.g. every entry of a channel whose scale is 0)."""
    out = q.copy()
    scale = np.broadcast_to(_broadcast(np.asarray(info.scale), q.shape, info.axis, info.block_size), q.shape)
    pruned = pruned & (scale != 0)  # (entries at their zero point are set to it again: a no-op)
    if info.zero_point is None:
        out[pruned] = 0
    else:
        zp = np.broadcast_to(_broadcast(info.zero_point, q.shape, info.axis, info.block_size), q.shape)
        out[pruned] = zp[pruned].astype(q.dtype)
    return out


def _param_at(flat_index: np.ndarray, shape: tuple[int, ...], param: np.ndarray, axis: int,
              block_size: int) -> np.ndarray:
    """The scale (or zero point) applying to each flat index of a weight of ``shape``."""
    if param.size == 1:
        return param.reshape(-1)[:1]
    rank = len(shape)
    axis = axis + rank if axis < 0 else axis
    inner = int(np.prod(shape[axis + 1:], dtype=np.int64))
    dim = shape[axis]
    along = (flat_index // inner) % dim
    if not block_size:
        return param.reshape(-1)[along]
    blocks = param.shape[axis]
    outer = flat_index // (inner * dim)
    return param.reshape(-1)[(outer * blocks + along // block_size) * inner + flat_index % inner]


class DequantizedSource:
    """Dequantized values of a quantized weight, computed block by block (a
    selection source: no float copy of the whole tensor is made)."""

    dtype = np.dtype(np.float64)

    def __init__(self, raw: np.ndarray, info: QuantInfo):
        _broadcast(np.asarray(info.scale), raw.shape, info.axis, info.block_size)  # raises if they do not fit
        if info.zero_point is not None:
            _broadcast(np.asarray(info.zero_point), raw.shape, info.axis, info.block_size)
        self.raw, self.info = raw, info
        self.flat = raw.reshape(-1)
        self.size = int(self.flat.size)

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.size)
        idx = np.arange(start, stop, dtype=np.int64)
        return self._values(self.flat[start:stop], idx)

    def take_strided(self, first: int, stride: int) -> np.ndarray:
        idx = np.arange(first, self.size, stride, dtype=np.int64)
        return self._values(self.flat[idx], idx)

    def _values(self, q: np.ndarray, idx: np.ndarray) -> np.ndarray:
        info, shape = self.info, self.raw.shape
        v = q.astype(np.float64)
        if info.zero_point is not None:
            v -= _param_at(idx, shape, np.asarray(info.zero_point), info.axis, info.block_size).astype(np.float64)
        return v * _param_at(idx, shape, np.asarray(info.scale, dtype=np.float64), info.axis, info.block_size)
