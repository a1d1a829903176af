"""A weight seen as the matrix of a linear layer, ``[out, in]``, with its input activations.

Calibration-aware criteria (wanda, OBS reconstruction) and N:M patterns need
to know, for each stored weight, which entries multiply which input feature
and which entries add into the same output unit.  :func:`linear_view` answers
that for the layouts exporters produce, or returns *why* it cannot (the
caller falls back to plain magnitude for that tensor and reports the reason):

========================  ==================  =========================================
op and slot               stored layout       matrix ``[out, in]``
========================  ==================  =========================================
MatMul B (``x @ W``)      ``[K, N]``          ``W.T``; rows of x are ``x.reshape(-1, K)``
MatMul A (``W @ x``)      ``[M, K]``          ``W``; rows are x's columns
Gemm B, transB=0 / 1      ``[K, N]`` / ``[N, K]``  ``W.T`` / ``W``; rows are A (or A.T)
Conv W, group=1           ``[O, I, *k]``      ``W`` moved to ``[O, *k, I]`` and flattened,
                                              so the input channel is the fastest axis
========================  ==================  =========================================

A float weight may reach its op through one float-to-float Cast (float16 or
bfloat16 storage computed in float32), a quantized one through its
DequantizeLinear.  Grouped convolutions, and the quantized ops MatMulInteger,
QLinearMatMul, com.microsoft QGemm and QLinearConv (which multiply quantized
activations), have views that give the layout (output scope, N:M) but say in
``unmeasured`` why their layer statistics are not collected: the calibrated
criteria fall back to magnitude for them.

The reduction ("in") axis of the matrix is therefore the axis N:M groups run
along, and the rows of :meth:`LinearView.rows` line up with its columns.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import onnx

from .discovery import Weight
from .graph_index import GraphIndex
from .tensor_data import FLOAT_TYPES


@dataclass(frozen=True)
class ConvGeometry:
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]  # begins then ends, as ONNX
    auto_pad: str


@dataclass(frozen=True)
class LinearView:
    """How one stored weight maps to ``[out, in]`` and where its input comes from."""

    op: str
    layout: str  # "matmul_b", "matmul_a", "gemm_b", "gemm_bt", "conv"
    input_name: str  # the activation tensor that multiplies the weight
    node: onnx.NodeProto
    trans_a: bool = False
    conv: ConvGeometry | None = None
    unmeasured: str | None = None  # why no layer statistics are collected (the layout still holds)

    def to_matrix(self, stored: np.ndarray) -> np.ndarray:
        if self.layout in ("matmul_b", "gemm_b"):
            return stored.T
        if self.layout == "conv":
            moved = np.moveaxis(stored, 1, -1)
            return moved.reshape(stored.shape[0], -1)
        return stored

    def from_matrix(self, matrix: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        if self.layout in ("matmul_b", "gemm_b"):
            return np.ascontiguousarray(matrix.T)
        if self.layout == "conv":
            moved_shape = (shape[0], *shape[2:], shape[1])
            return np.ascontiguousarray(np.moveaxis(matrix.reshape(moved_shape), -1, 1))
        return np.ascontiguousarray(matrix)

    def rows(self, x: np.ndarray) -> np.ndarray:
        """The activation ``x`` (one batch of the op's input) as rows ``[n, in]``."""
        if self.layout == "matmul_b":
            return x.reshape(-1, x.shape[-1])
        if self.layout == "matmul_a":
            return np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2])
        if self.layout in ("gemm_b", "gemm_bt"):
            return x.T if self.trans_a else x
        return _im2col(x, self.conv)

    def leading_shape(self, x: np.ndarray) -> tuple[int, ...] | None:
        """For MatMul B, the shape the rows come from (e.g. ``[batch, tokens]``), to drop padding rows."""
        return tuple(x.shape[:-1]) if self.layout == "matmul_b" else None


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


#: why a weight has no view: the calibrated criteria (layer input rows) and N:M patterns (reduction axis) need one
_NO_VIEW = "has no linear-layer view (calibrated criteria, output scope and N:M patterns need MatMul, Gemm or Conv)"


def linear_view(weight: Weight, index: GraphIndex, top_graph: str = "main") -> tuple[LinearView | None, str | None]:
    """The weight's :class:`LinearView`, or ``(None, why not)``."""
    tensor = weight.tensor
    if len(weight.uses) != 1:
        return None, f"it feeds {len(weight.uses)} ops (a shared weight has no single layer input)"
    use = weight.uses[0]
    node = use.node
    if use.graph != top_graph or weight.value.graph != top_graph:
        return None, "it is used inside a subgraph or function"
    if node.input[use.slot] != weight.name:  # read through one decoding op, or not a layer's weight
        producer = index.input_value(node, use.slot)
        via = producer.node if producer is not None else None
        decodes = via is not None and via.input[0] == weight.name and (
            (weight.quant is not None and via.op_type == "DequantizeLinear")
            or (weight.quant is None and via.op_type == "Cast" and _attr(via, "to", 0) in FLOAT_TYPES))
        if not decodes:
            return None, f"it reaches {node.op_type} through {via.op_type if via is not None else 'other ops'} " \
                         "(the layer's input rows are known only for a weight the op reads directly)"
    dims = tuple(tensor.dims)
    domain, op = use.op
    if (domain, op) in _QUANTIZED_OPS:
        return _quantized_view(node, use.slot, _QUANTIZED_OPS[(domain, op)], dims)
    if domain != "":
        return None, f"op {domain}.{op} {_NO_VIEW}"
    other = node.input[1 - use.slot] if op in ("MatMul", "Gemm") else node.input[0]
    if op == "MatMul":
        if len(dims) != 2:
            return None, f"a {len(dims)}-D MatMul weight (batched) {_NO_VIEW}"
        return LinearView(op, "matmul_b" if use.slot == 1 else "matmul_a", other, node), None
    if op == "Gemm":
        if use.slot != 1:
            return None, f"a Gemm weight in slot A {_NO_VIEW}"
        layout = "gemm_bt" if _attr(node, "transB", 0) else "gemm_b"
        return LinearView(op, layout, other, node, trans_a=bool(_attr(node, "transA", 0))), None
    if op == "Conv":
        return LinearView(op, "conv", other, node, conv=_geometry(node, dims), unmeasured=_grouped(node)), None
    return None, f"op {op} {_NO_VIEW}"


def _grouped(node: onnx.NodeProto) -> str | None:
    group = _attr(node, "group", 1)
    return None if group == 1 else (f"a grouped convolution (group={group}): its layer statistics are not "
                                    "collected (calibrated criteria need MatMul, Gemm or ungrouped Conv)")


#: quantized ops: {weight slot: (layout, activation slot)}; "gemm" is gemm_b or gemm_bt by transB
_QUANTIZED_OPS = {
    ("", "MatMulInteger"): {1: ("matmul_b", 0), 0: ("matmul_a", 1)},
    ("", "QLinearMatMul"): {3: ("matmul_b", 0), 0: ("matmul_a", 3)},
    ("com.microsoft", "QGemm"): {3: ("gemm", 0)},
    ("", "QLinearConv"): {3: ("conv", 0)},
}


def _quantized_view(node: onnx.NodeProto, slot: int, slots: dict, dims: tuple[int, ...]):
    op = node.op_type
    if slot not in slots:
        return None, f"a {op} weight in slot {slot} {_NO_VIEW}"
    layout, activation = slots[slot]
    other = node.input[activation]
    why = f"its op {op} multiplies quantized activations (no float input rows for the layer statistics)"
    if layout.startswith("matmul") and len(dims) != 2:
        return None, f"a {len(dims)}-D {op} weight (batched) {_NO_VIEW}"
    if layout == "gemm":
        layout = "gemm_bt" if _attr(node, "transB", 0) else "gemm_b"
        return LinearView(op, layout, other, node, trans_a=bool(_attr(node, "transA", 0)), unmeasured=why), None
    if layout == "conv":
        return LinearView(op, "conv", other, node, conv=_geometry(node, dims), unmeasured=why), None
    return LinearView(op, layout, other, node, unmeasured=why), None


def _geometry(node: onnx.NodeProto, dims: tuple[int, ...]) -> ConvGeometry:
    spatial = len(dims) - 2
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    return ConvGeometry(
        kernel=tuple(dims[2:]),
        strides=tuple(_attr(node, "strides", [1] * spatial)),
        dilations=tuple(_attr(node, "dilations", [1] * spatial)),
        pads=tuple(_attr(node, "pads", [0] * (2 * spatial))),
        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad),
    )


def _conv_pads(g: ConvGeometry, spatial_in: tuple[int, ...]) -> list[tuple[int, int]]:
    n = len(g.kernel)
    if g.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        pads = []
        for size, k, s, d in zip(spatial_in, g.kernel, g.strides, g.dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if g.auto_pad == "SAME_UPPER" else (big, small))
        return pads
    if g.auto_pad == "VALID":
        return [(0, 0)] * n
    return [(g.pads[i], g.pads[i + n]) for i in range(n)]


def _im2col(x: np.ndarray, g: ConvGeometry) -> np.ndarray:
    """Rows ``[batch * out_positions, prod(kernel) * channels]``, channel fastest."""
    batch, channels = x.shape[:2]
    pads = _conv_pads(g, tuple(x.shape[2:]))
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    out = [(xp.shape[2 + i] - ((k - 1) * d + 1)) // s + 1
           for i, (k, s, d) in enumerate(zip(g.kernel, g.strides, g.dilations))]
    patches = []
    for offset in itertools.product(*(range(k) for k in g.kernel)):
        sl = tuple(slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in zip(offset, g.dilations, g.strides, out))
        patches.append(xp[(slice(None), slice(None), *sl)])  # [B, C, *out]
    stacked = np.stack(patches, axis=-1)  # [B, C, *out, K]
    moved = np.moveaxis(stacked, 1, -1)  # [B, *out, K, C]
    return moved.reshape(batch * int(np.prod(out)), len(patches) * channels)
