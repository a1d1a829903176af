"""Decide which constant tensors are prunable weights, with a reason for every skip.

A constant (initializer or Constant-node tensor) is a weight when it is
floating point and *every* path from it, through layout-only ops (Transpose,
Reshape, Identity, Squeeze/Unsqueeze, Flatten, Cast to a float type,
Slice/Split/Concat, Expand/Tile/Pad, Gather with constant indices, a
Quantize/Dequantize pair), ends in a weight slot (:data:`WEIGHT_SLOTS`).
Shape and Size read no values, so their uses are ignored.  Each check returns *why* a tensor is
not a weight rather than raising, so ``inspect`` can print it.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from .graph_index import GraphIndex, Use, Value
from .tensor_data import FLOAT_TYPES, QUANT_TYPES, dtype_name, numel

#: (domain, op_type) -> input slots that hold a weight when constant.
WEIGHT_SLOTS: dict[tuple[str, str], frozenset[int] | None] = {
    ("", "MatMul"): frozenset({0, 1}),
    ("", "Gemm"): frozenset({0, 1}),
    ("", "Conv"): frozenset({1}),
    ("", "ConvTranspose"): frozenset({1}),
    ("", "DeformConv"): frozenset({1}),
    ("", "LSTM"): frozenset({1, 2}),
    ("", "GRU"): frozenset({1, 2}),
    ("", "RNN"): frozenset({1, 2}),
    ("", "Einsum"): None,  # every operand
    ("com.microsoft", "FusedMatMul"): frozenset({0, 1}),
    ("com.microsoft", "FusedGemm"): frozenset({0, 1}),
    ("com.microsoft", "FusedConv"): frozenset({1}),
    ("com.microsoft", "NhwcConv"): frozenset({1}),
    ("com.microsoft", "Attention"): frozenset({1}),
    ("com.microsoft", "GemmFastGelu"): frozenset({1}),
}

#: Ops that read only a tensor's shape, never its values: such uses neither
#: make a tensor a weight nor stop it being one.
_METADATA_ONLY: dict[tuple[str, str], int] = {("", "Shape"): 0, ("", "Size"): 0}

#: (domain, op_type) -> the data slots a layout-only (pure data movement) op
#: passes through unchanged; None means every input.
_PASS_THROUGH: dict[tuple[str, str], frozenset[int] | None] = {
    **{("", op): frozenset({0}) for op in (
        "Transpose", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten", "Cast", "CastLike", "Slice",
        "Split", "Gather", "Expand", "Tile", "Pad", "QuantizeLinear", "DequantizeLinear",
    )},
    ("", "Concat"): None,  # e.g. PyTorch's LSTM export re-orders gate blocks with Slice + Concat
}

_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"}
_CONSTANT_KINDS = ("initializer", "constant", "constant_attr")


@dataclass(frozen=True)
class QuantRef:
    """How a quantized weight is dequantized: its scale and zero-point values."""

    scale: Value
    zero_point: Value | None
    axis: int
    block_size: int
    via: str


@dataclass(eq=False)
class Weight:
    """A prunable tensor and the weight slots it reaches (``quant`` for quantized weights)."""

    value: Value
    uses: list[Use]
    quant: QuantRef | None = None

    @property
    def name(self) -> str:
        return self.value.name

    @property
    def tensor(self) -> TensorProto:
        return self.value.tensor

    def consumers(self) -> list[str]:
        """Op types it reaches, once each, in first-use order."""
        seen: list[str] = []
        for use in self.uses:
            domain, op = use.op
            label = f"{domain}.{op}" if domain else op
            if label not in seen:
                seen.append(label)
        return seen


@dataclass(frozen=True)
class Skipped:
    name: str
    where: str
    reason: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Discovery:
    weights: list[Weight]
    skipped: list[Skipped]


def _is_constant(value: Value | None) -> bool:
    return value is not None and value.kind in _CONSTANT_KINDS and not value.overridable


def _passes_through(use: Use, index: GraphIndex) -> bool:
    node = use.node
    if node is None or use.op not in _PASS_THROUGH:
        return False
    slots = _PASS_THROUGH[use.op]
    if slots is not None and use.slot not in slots:
        return False
    op = use.op[1]
    if op == "Cast":
        to = next((a.i for a in node.attribute if a.name == "to"), None)
        return to in FLOAT_TYPES
    if op == "Gather":
        return len(node.input) > 1 and _is_constant(index.input_value(node, 1))
    return True


def _trace(value: Value, index: GraphIndex) -> tuple[list[Use], list[tuple[str, Use]]]:
    """Weight uses reachable through layout-only ops, and the other uses (with a reason)."""
    weight_uses: list[Use] = []
    other: list[tuple[str, Use]] = []
    stack, seen = [value], set()
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses:
            slots = WEIGHT_SLOTS.get(use.op, frozenset())
            if use.node is not None and (slots is None or use.slot in slots):
                weight_uses.append(use)
            elif _METADATA_ONLY.get(use.op) == use.slot:
                continue
            elif index.callee_input(use) is not None:  # into a local function: follow its body
                stack.append(index.callee_input(use))
            elif _passes_through(use, index):
                stack.extend(v for v in index.outputs_of(use.node) if v is not None)
            elif use.node is None:
                other.append(("is a graph output", use))
            elif use.op == ("", "Gather") and use.slot == 0:
                other.append(("embedding table (data of a Gather with run-time indices)", use))
            elif use.op[1] in _QUANT_OPS and use.slot > 0:
                other.append(("quantization scale or zero point", use))
            else:
                other.append(("also feeds a non-weight input", use))
    return weight_uses, other


def find_weights(index: GraphIndex, *, min_numel: int, include_overridable: bool = False) -> Discovery:
    """Weights and skipped constants.  ``include_overridable`` treats
    initializers that are also graph inputs (as older exporters and IR < 4
    models list every initializer) as ordinary constants."""
    weights: list[Weight] = []
    skipped: list[Skipped] = []
    for value in index.constants():
        tensor = value.tensor
        if value.sparse is not None:  # listed at its dense shape and type
            shape, dtype = tuple(value.sparse.dims), dtype_name(value.sparse.values.data_type)
        else:
            shape = tuple(tensor.dims) if tensor is not None else ()
            dtype = dtype_name(tensor.data_type) if tensor is not None else "sparse"
        reason = _static_reason(value, min_numel, include_overridable)
        uses: list[Use] = []
        quant: QuantRef | None = None
        if reason == _QUANT_CANDIDATE:
            uses, quant, reason = _trace_quantized(value, index)
        elif reason == _ONE_D_CANDIDATE:  # a weight stored flat and reshaped into a weight slot is a weight
            uses, other = _trace(value, index)
            weight = uses and not other and all(not _direct_read(u, value) for u in uses)
            reason = None if weight else _ONE_D
        elif reason is None:
            uses, other = _trace(value, index)
            if other:
                why, use = other[0]
                reason = f"{why}: {use.describe()}"
            elif not uses:
                reason = "unused (reaches no weight input)"
        if reason is None:
            weights.append(Weight(value, uses, quant))
        else:
            skipped.append(Skipped(value.name, value.where(), reason, dtype, shape))
    return Discovery(weights, skipped + _attribute_parameters(index))


#: list attributes that hold numbers: their element type, as reports name it
_LIST_ATTRS = {onnx.AttributeProto.FLOATS: "float32", onnx.AttributeProto.INTS: "int64"}
_SCALAR_ATTRS = {onnx.AttributeProto.FLOAT: "float32", onnx.AttributeProto.INT: "int64"}


def _attribute_parameters(index: GraphIndex) -> list[Skipped]:
    """Numbers held in attributes rather than tensors, listed so the report says why they are left:
    Constants with ``value_floats``/``value_ints``/``value_float``/``value_int``, and the parameters of
    ``ai.onnx.ml`` operators (scikit-learn's linear models, trees, SVMs keep their weights there)."""
    out: list[Skipped] = []
    for v in index.values:
        node = v.node
        if node is None or not node.output or node.output[0] != v.name:
            continue
        if v.kind == "constant_attr":
            for a in node.attribute:
                if a.type in _LIST_ATTRS or a.type in _SCALAR_ATTRS:
                    shape = (len(a.floats) if a.type == onnx.AttributeProto.FLOATS else len(a.ints),) \
                        if a.type in _LIST_ATTRS else ()
                    dtype = _LIST_ATTRS.get(a.type) or _SCALAR_ATTRS[a.type]
                    out.append(Skipped(v.name, v.where(), f"a Constant's {a.name} attribute (a number list, "
                                                          "not a tensor): left as it is", dtype, shape))
        elif node.domain == "ai.onnx.ml":
            label = f" '{node.name}'" if node.name else ""
            for a in node.attribute:
                if a.type == onnx.AttributeProto.FLOATS and a.floats:
                    out.append(Skipped(f"{node.name or node.op_type}.{a.name}",
                                       f"attribute of ai.onnx.ml.{node.op_type}{label} in {v.graph}",
                                       "parameters held in an operator attribute, not a tensor: only tensors "
                                       "are pruned", "float32", (len(a.floats),)))
    return out


def _direct_read(use: Use, value: Value) -> bool:
    """Whether the weight slot reads ``value`` itself (a 1-D operand: a vector, not a layer's weight)."""
    return use.node is not None and use.node.input[use.slot] == value.name


def _static_reason(value: Value, min_numel: int, include_overridable: bool) -> str | None:
    """Why ``value`` cannot be a weight whatever it feeds, or None."""
    if value.kind in ("sparse_initializer", "sparse_constant"):
        return "stored as a sparse tensor (already encoded; decode it first)"
    if value.overridable and not include_overridable:
        return ("initializer is also a graph input, so callers can override it at run time "
                "(--include-overridable prunes it)")
    if value.duplicate:
        return "its name is bound more than once in its graph"
    tensor = value.tensor
    n = numel(tensor)
    if tensor.data_type not in FLOAT_TYPES:
        kind = dtype_name(tensor.data_type)
        if tensor.data_type in QUANT_TYPES and len(tensor.dims) >= 2 and n >= min_numel:
            return _QUANT_CANDIDATE
        if tensor.data_type in _INTEGER_TYPES and len(tensor.dims) >= 2 and n >= min_numel:
            return f"integer tensor ({kind}) is not a quantization type this tool prunes"
        if tensor.data_type in QUANT_TYPES and len(tensor.dims) >= 2 and 0 < n < min_numel:
            return f"too small: {n} elements, below min_numel {min_numel}"  # a quantized weight, but tiny
        return f"{kind} tensor, not floating point"
    if not tensor.dims:
        return "scalar"
    if len(tensor.dims) == 1:
        return _ONE_D_CANDIDATE if n >= max(min_numel, 1) else _ONE_D
    if n == 0:
        return "empty tensor"
    if n < min_numel:
        return f"too small: {n} elements, below min_numel {min_numel}"
    return None


_QUANT_CANDIDATE = "<quantized candidate>"
_ONE_D = "1-D tensor (bias, scale or norm parameter)"
_ONE_D_CANDIDATE = "<1-D candidate>"  # a weight only if it is reshaped into a weight slot

#: (domain, op) -> (weight slot, scale slot, zero-point slot, default axis) for quantized operators
_QLINEAR = {
    ("", "QLinearConv"): (3, 4, 5, 0),
    ("", "QLinearMatMul"): (3, 4, 5, -1),
    ("com.microsoft", "QGemm"): (3, 4, 5, None),  # axis: the output-channel axis of B (transB decides)
}
_UNSCALED = {("", "MatMulInteger"), ("", "ConvInteger")}


def _attr(node, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _quant_ref(node, index: GraphIndex, scale_slot: int, zp_slot: int, axis: int, block: int,
               via: str) -> QuantRef | str:
    scale = index.input_value(node, scale_slot) if len(node.input) > scale_slot else None
    if scale is None or scale.kind not in ("initializer", "constant") or scale.overridable:
        return f"its {via} scale is not a constant"
    if scale.tensor.data_type not in FLOAT_TYPES:
        return f"its {via} scale is not floating point"
    zp = None
    if len(node.input) > zp_slot and node.input[zp_slot]:
        zp = index.input_value(node, zp_slot)
        if zp is None or zp.kind not in ("initializer", "constant") or zp.overridable:
            return f"its {via} zero point is not a constant"
    return QuantRef(scale, zp, axis, block, via)


def _output_scale(node, weight: Value, index: GraphIndex) -> QuantRef | str:
    """The weight scale of a MatMulInteger as ONNX Runtime's dynamic quantization writes it:
    ``Mul(Cast(MatMulInteger(x_q, W_q, x_zp, W_zp)), Mul(x_scale, W_scale))`` (or the constant
    scale directly), per tensor or per output column; the zero point is the op's input 3."""
    out = index.outputs_of(node)[0] if index.outputs_of(node) else None
    if out is None or len(out.uses) != 1 or out.uses[0].op != ("", "Cast"):
        return "its output is not Cast and then scaled by a Mul, where the scale would be read"
    cast_out = index.outputs_of(out.uses[0].node)[0]
    if cast_out is None or len(cast_out.uses) != 1 or cast_out.uses[0].op != ("", "Mul"):
        return "its output is not Cast and then scaled by a Mul, where the scale would be read"
    mul = cast_out.uses[0]
    other = index.input_value(mul.node, 1 - mul.slot)
    scale = None
    if other is not None and other.kind in ("initializer", "constant"):
        scale = other
    elif other is not None and other.kind == "node_output" and other.node.op_type == "Mul" \
            and other.node.domain in ("", "ai.onnx"):
        consts = [index.input_value(other.node, i) for i in range(len(other.node.input))]
        consts = [c for c in consts if c is not None and c.kind in ("initializer", "constant")]
        if len(consts) > 1:
            return "the Mul that scales its output multiplies two constants: which is the weight's scale is unknown"
        scale = consts[0] if consts else None
    if scale is None or scale.overridable or scale.tensor is None or scale.tensor.data_type not in FLOAT_TYPES:
        return "the Mul that scales its output has no constant float weight scale"
    if len(weight.tensor.dims) != 2:
        return f"a {len(weight.tensor.dims)}-D (batched) weight has no single output-column axis"
    units = weight.tensor.dims[-1]
    n = numel(scale.tensor)
    if not (n == 1 or (len(scale.tensor.dims) == 1 and n == units)):
        return f"the scale of shape {list(scale.tensor.dims)} is neither per tensor nor per output column"
    zp = index.input_value(node, 3) if len(node.input) > 3 and node.input[3] else None
    if zp is not None and (zp.kind not in ("initializer", "constant") or zp.overridable
                           or numel(zp.tensor) not in (1, units)):
        return "its zero point is not a constant per tensor or per output column"
    return QuantRef(scale, zp, 1, 0, "MatMulInteger")  # per column: axis 1 of B [K, N]; a scalar ignores it


def _trace_quantized(value: Value, index: GraphIndex) -> tuple[list[Use], QuantRef | None, str | None]:
    """Weight uses and the dequantization of an integer constant, or why it is not a quantized weight."""
    weight_uses: list[Use] = []
    refs: list[QuantRef] = []
    kind = dtype_name(value.tensor.data_type)
    for use in value.uses:
        node = use.node
        if node is None:
            return [], None, f"is a graph output: {use.describe()}"
        if use.op == ("", "DequantizeLinear") and use.slot == 0:
            ref = _quant_ref(node, index, 1, 2, _attr(node, "axis", 1), _attr(node, "block_size", 0),
                             "DequantizeLinear")
            if isinstance(ref, str):
                return [], None, ref
            out = index.outputs_of(node)[0]
            uses, other = _trace(out, index) if out is not None else ([], [])
            if other:
                why, bad = other[0]
                return [], None, f"its dequantized value {why}: {bad.describe()}"
            if not uses:
                return [], None, "its dequantized value reaches no weight input"
            weight_uses += uses
        elif use.op in _QLINEAR and use.slot == _QLINEAR[use.op][0]:
            _w, s_slot, z_slot, axis = _QLINEAR[use.op]
            if axis is None:
                axis = 0 if _attr(node, "transB", 0) else 1
            ref = _quant_ref(node, index, s_slot, z_slot, axis, 0, use.op[1])
            if isinstance(ref, str):
                return [], None, ref
            weight_uses.append(use)
        elif use.op == ("", "MatMulInteger") and use.slot == 1:
            ref = _output_scale(node, value, index)
            if isinstance(ref, str):
                return [], None, f"{kind} weight of MatMulInteger: {ref}, so it is not pruned"
            weight_uses.append(use)
        elif use.op in _UNSCALED:
            return [], None, (f"{kind} weight of {use.op[1]}: without a scale its magnitude is not comparable "
                              f"with other weights, so it is not pruned ({use.op[1]} reads no scale)")
        elif use.op == ("com.microsoft", "MatMulNBits"):
            return [], None, "MatMulNBits packed low-bit blocks are not pruned"
        else:
            return [], None, f"{kind} tensor that is not a quantized weight: {use.describe()}"
        refs.append(ref)
    if not refs:
        return [], None, "unused (reaches no weight input)"
    first = refs[0]
    if any((r.scale is not first.scale or r.zero_point is not first.zero_point or r.axis != first.axis
            or r.block_size != first.block_size) for r in refs[1:]):
        return [], None, "dequantized by several nodes with different scales or zero points"
    return weight_uses, first, None


_INTEGER_TYPES = {
    TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16, TensorProto.INT32,
    TensorProto.UINT32, TensorProto.INT64, TensorProto.UINT64,
}
for _name in ("INT4", "UINT4", "INT2", "UINT2"):
    if hasattr(TensorProto, _name):
        _INTEGER_TYPES.add(getattr(TensorProto, _name))
