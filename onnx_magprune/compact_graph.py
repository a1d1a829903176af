"""The ``compact`` decoder as ONNX nodes, and the way back.

:func:`decoder` turns a :class:`~onnx_magprune.compact_code.CompactTensor`
into a few standard ONNX ops (Cast, Range, Div, Mod, Gather, Reshape, CumSum,
Add, Mul, ConstantOfShape, ScatterElements, and Concat for a blocked code) whose inputs are all constants, so ONNX
Runtime constant-folds them when it creates a session: the optimized graph
holds the ordinary dense weight.  Every decoder node is named
``onnx_magprune.compact:<step>:<weight>``, which is how :func:`find_decoders`
(for ``decode``) and the folding check recognise them.

:func:`evaluate` runs a decoder with numpy, op by op, exactly as the ONNX
spec defines those ops (bit-exact; no onnxruntime needed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .compact_code import BlockedTensor, CompactTensor, Layout, Mode, decoded_itemsize

PREFIX = "onnx_magprune.compact:"
#: the decoder's ops need opset 11 (CumSum, Range, ScatterElements)
MIN_OPSET = 11
#: ONNX Runtime does not constant-fold a node whose output exceeds this (its default
#: optimization.constant_folding_max_output_size_in_bytes); a decoder it does not fold
#: would run on every inference, so no intermediate may be larger
FOLD_LIMIT_BYTES = 1 << 30


def node_name(step: str, weight: str) -> str:
    return f"{PREFIX}{step}:{weight}"


def weight_of(node: onnx.NodeProto) -> str | None:
    """The weight a decoder node belongs to, or None for other nodes."""
    if not isinstance(node.name, str) or not node.name.startswith(PREFIX):  # a corrupt name parses as bytes
        return None
    parts = node.name[len(PREFIX):].split(":", 1)
    return parts[1] if len(parts) == 2 else None


def largest_intermediate(code: CompactTensor | BlockedTensor) -> int:
    """Bytes of the decoder's largest intermediate tensor (float32 for bfloat16, which decodes in float32)."""
    if isinstance(code, BlockedTensor):
        joined = code.numel * code.dtype.itemsize
        return max([joined] + [largest_intermediate(b) for b in code.blocks])
    itemsize = decoded_itemsize(code.dtype)
    table = (0 if code.alphabet.identity or code.alphabet.mode is Mode.POSITION
             else code.alphabet.planes * 256 ** code.alphabet.word_bytes * 4)
    return max(code.numel * itemsize, code.total_entries * 4, table)


@dataclass
class Decoder:
    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]


#: constants up to this size are shared by every block that needs the same one
_SHARED_CONST_BYTES = 4096


class _Builder:
    """Nodes and constants of one weight's decoder.  Small equal constants and equal nodes
    (the lookup table, the zeros of one block shape) are made once and shared by the blocks."""

    def __init__(self, stem: str, weight: str):
        self.stem, self.weight = stem, weight
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._consts: dict[tuple, str] = {}
        self._made: dict[tuple, str] = {}
        self._names: set[str] = set()

    def _fresh(self, name: str) -> str:
        full, i = f"{self.stem}/{name}", 1
        while full in self._names:
            i += 1
            full = f"{self.stem}/{name}_{i}"
        self._names.add(full)
        return full

    def const(self, name: str, array: np.ndarray, share: bool = True) -> str:
        """A constant; with ``share``, an equal small one made before is used instead (never
        for a block's own codes and values, whose bytes the report counts block by block)."""
        array = np.array(array, order="C")
        key = None
        if share and array.nbytes <= _SHARED_CONST_BYTES:
            key = (name, array.dtype.str, array.shape, array.tobytes())
            if key in self._consts:
                return self._consts[key]
        full = self._fresh(name)
        if array.dtype.name == "bfloat16":
            self.inits.append(helper.make_tensor(full, TensorProto.BFLOAT16, list(array.shape),
                                                 array.view(np.uint16).tobytes(), raw=True))
        else:
            self.inits.append(numpy_helper.from_array(array, full))
        if key is not None:
            self._consts[key] = full
        return full

    def node(self, step: str, op: str, inputs: list[str], **attrs) -> str:
        key = (op, tuple(inputs), repr(sorted((k, _attr_key(v)) for k, v in attrs.items())))
        if key in self._made:
            return self._made[key]
        out = self._fresh(step)
        self.nodes.append(helper.make_node(op, inputs, [out], name=node_name(out[len(self.stem) + 1:],
                                                                            self.weight), **attrs))
        self._made[key] = out
        return out


def _attr_key(value) -> object:
    if isinstance(value, onnx.TensorProto):
        return value.SerializeToString()
    return value


def decoder(code: CompactTensor | BlockedTensor, weight: str, elem_type: int, taken: set[str]) -> Decoder:
    """Nodes and constants that rebuild ``weight`` (of ONNX type ``elem_type``) from ``code``.
    ``taken`` holds the names in use; the constants get fresh names under ``<weight>/compact``.
    A blocked code gets one decoder per block (sharing their small constants and lookup
    table) and a Concat of the blocks."""
    base = f"{weight}/compact"
    stem, i = base, 0
    while any(isinstance(t, str) and (t == stem or t.startswith(stem + "/")) for t in taken):
        i += 1
        stem = f"{base}{i}"
    b = _Builder(stem, weight)
    if isinstance(code, BlockedTensor):
        parts = [_block_decoder(block, elem_type, b, f"block{j}/") for j, block in enumerate(code.blocks)]
        b.node("concat", "Concat", parts, axis=code.blocking.axis)
    else:
        _block_decoder(code, elem_type, b, "")
    b.nodes[-1].output[0] = weight  # the last node writes the weight itself
    return Decoder(b.nodes, b.inits)


def _block_decoder(code: CompactTensor, elem_type: int, b: _Builder, at: str) -> str:
    """The nodes rebuilding one (block of a) tensor; returns the name of its output.  Steps and
    constants of the block are named ``<at><step>``; shared ones have no prefix."""
    const, node = b.const, b.node
    a = code.alphabet
    k = code.entries
    columns = a.layout is Layout.COLUMNS
    bf16 = elem_type == TensorProto.BFLOAT16
    i32 = lambda v: np.array(v, dtype=np.int32)  # noqa: E731
    compute = TensorProto.FLOAT if bf16 else elem_type
    zero = helper.make_tensor("value", compute, [1], np.zeros(1, dtype=_np(compute)).tobytes(), raw=True)
    if a.mode is Mode.POSITION:
        out = _position_decoder(code, b, at, zero, bf16)
    else:
        # columns: entries stored [k, rest of the shape], fibers along axis 0; planes: [planes, k]
        entry_shape = [k] + list(code.shape[1:]) if columns else [a.planes, k]
        axis = 0 if columns else 1

        if columns:
            codes = const(f"{at}codes", code.codes.reshape(entry_shape) if a.planes == 1 else code.codes, False)
        else:
            codes = const(f"{at}codes", code.codes.reshape(1, k) if a.identity else code.codes, False)
        words = node(f"{at}words", "Cast", [codes], to=TensorProto.INT32)
        if a.identity:
            advance = words  # the code word is the advance
        else:  # a lookup table from every code word to its symbols (planes: [planes, words]; columns: [words, planes])
            n_words = 256 ** a.word_bytes
            every = node("every_word", "Range", [const("zero", i32(0)), const("n_words", i32(n_words)),
                                                 const("one", i32(1))])
            radix = (a.size ** np.arange(a.planes, dtype=np.int64)).astype(np.int32)
            if columns:
                every = node("every_word_column", "Reshape",
                             [every, const("column", np.array([n_words, 1], np.int64))])
                radix = radix.reshape(1, a.planes)
            else:
                radix = radix.reshape(a.planes, 1)
            digits = node("digits", "Div", [every, const("radix", radix)])
            symbols = node("symbols", "Mod", [digits, const("base", i32(a.size))])
            if a.mode is Mode.FILLER:
                table = symbols  # filler symbols are their advances
            else:
                table = node("advance_table", "Gather", [const("advance_of_symbol", a.table[:, 0].astype(np.int32)),
                                                         symbols])
            if columns:  # [k, words per row, per word] -> [k, rest of the shape]
                advance = node(f"{at}advances_grouped", "Gather", [table, words], axis=0)
                advance = node(f"{at}advances", "Reshape",
                               [advance, const("entry_shape", np.array(entry_shape, np.int64))])
            else:
                advance = node(f"{at}advances_per_plane", "Gather", [table, words], axis=1)  # [planes, k]
        axis_name = const("axis", i32(axis))
        positions = node(f"{at}positions", "CumSum", [advance, axis_name], exclusive=1)
        if a.mode is Mode.FILLER:
            updates = const(f"{at}values", code.values.reshape(entry_shape), False)
            if bf16:
                updates = node(f"{at}values_f32", "Cast", [updates], to=TensorProto.FLOAT)
        else:
            values = const(f"{at}values", code.values, False)
            if bf16:
                values = node(f"{at}values_f32", "Cast", [values], to=TensorProto.FLOAT)
            flags = node("is_value_table", "Gather", [const("is_value_of_symbol", a.table[:, 1].astype(np.int32)),
                                                      symbols])
            is_value = node(f"{at}is_value", "Gather", [flags, words], axis=1)
            counted = node(f"{at}counted", "CumSum", [is_value, axis_name])
            offset = node(f"{at}offset", "Add", [counted, const("plane_base", code.plane_base.astype(np.int32)
                                                               .reshape(a.planes, 1))])
            index = node(f"{at}value_index", "Mul", [offset, is_value])
            updates = node(f"{at}updates", "Gather", [values, index])
        target_shape = list(code.shape) if columns else [a.planes, code.numel // a.planes]
        out = _scatter(code, b, at, zero, target_shape, positions, updates, axis)
    if bf16:
        out = node(f"{at}to_bfloat16", "Cast", [out], to=TensorProto.BFLOAT16)
    return out


def _position_decoder(code: CompactTensor, b: _Builder, at: str, zero: onnx.TensorProto, bf16: bool) -> str:
    """Rows layout: Cast the stored positions to int32, scatter the values into zeros of shape
    [rows, row length] along axis 1 (a Reshape only when the weight is not 2-D)."""
    const, node = b.const, b.node
    fibers, k = code.fibers, code.entries
    positions = node(f"{at}positions", "Cast", [const(f"{at}codes", code.codes.reshape(fibers, k), False)],
                     to=TensorProto.INT32)
    updates = const(f"{at}values", code.values.reshape(fibers, k), False)
    if bf16:  # scattered in float32
        updates = node(f"{at}values_f32", "Cast", [updates], to=TensorProto.FLOAT)
    return _scatter(code, b, at, zero, [fibers, code.numel // fibers], positions, updates, 1)


def _scatter(code: CompactTensor, b: _Builder, at: str, zero: onnx.TensorProto, target_shape: list[int],
             positions: str, updates: str, axis: int) -> str:
    """Scatter the entries into zeros of ``target_shape`` along ``axis``, then Reshape to the
    block's shape when the two differ; returns the output's name."""
    zeros = b.node(f"{at}zeros", "ConstantOfShape",
                   [b.const("target_shape", np.array(target_shape, dtype=np.int64))], value=zero)
    out = b.node(f"{at}scatter", "ScatterElements", [zeros, positions, updates], axis=axis)
    if list(code.shape) != target_shape:
        out = b.node(f"{at}reshape", "Reshape", [out, b.const("shape", np.array(code.shape, dtype=np.int64))])
    return out


def _np(data_type: int) -> np.dtype:
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type))


# ---------------------------------------------------------------- the way back


def find_decoders(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """weight name -> its decoder nodes (in graph order), for the decoders in ``graph`` itself."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        w = weight_of(node)
        if w is not None:
            found.setdefault(w, []).append(node)
    return found


def evaluate(nodes: list[onnx.NodeProto], constants: dict[str, np.ndarray], output: str) -> np.ndarray:
    """Run a decoder with numpy (the ops it uses, as the ONNX spec defines them)."""
    env = dict(constants)

    def attr(node, name, default=None):
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    for node in nodes:
        x = [env[i] for i in node.input]
        op = node.op_type
        if op == "Cast":
            to = attr(node, "to")
            y = _cast(x[0], to)
        elif op == "Gather":
            y = np.take(x[0], x[1].astype(np.int64), axis=int(attr(node, "axis", 0)))
        elif op == "Reshape":
            y = x[0].reshape(tuple(int(d) for d in x[1]))
        elif op == "CumSum":
            y = np.cumsum(x[0], axis=int(x[1]), dtype=x[0].dtype)
            if attr(node, "exclusive", 0):
                y = (y - x[0]).astype(x[0].dtype)
        elif op == "Range":
            y = np.arange(x[0], x[1], x[2], dtype=x[0].dtype)
        elif op == "Div":  # integer division truncates toward zero (all operands here are >= 0)
            y = (x[0] // x[1]).astype(x[0].dtype)
        elif op == "Mod":
            y = (x[0] % x[1]).astype(x[0].dtype)
        elif op == "Add":
            y = (x[0] + x[1]).astype(x[0].dtype)
        elif op == "Mul":
            y = (x[0] * x[1]).astype(x[0].dtype)
        elif op == "ConstantOfShape":
            value = attr(node, "value")
            fill = numpy_helper.to_array(value).reshape(-1)[:1]
            y = np.zeros(tuple(int(d) for d in x[0]), dtype=fill.dtype)
            bits = y.view(np.dtype(f"u{y.dtype.itemsize}"))
            bits[...] = fill.view(bits.dtype)[0]
        elif op == "Concat":
            y = np.concatenate(x, axis=int(attr(node, "axis")))
        elif op == "ScatterElements":
            axis = int(attr(node, "axis", 0))
            data, idx, upd = x
            y = data.copy()
            axis = axis % data.ndim
            idx = idx.astype(np.int64)
            idx = np.where(idx < 0, idx + data.shape[axis], idx)
            bits = y.view(np.dtype(f"u{y.dtype.itemsize}"))
            ubits = np.ascontiguousarray(upd).view(bits.dtype)
            np.put_along_axis(bits, idx, ubits, axis=axis)
        else:
            raise ValueError(f"not a compact decoder op: {op}")
        env[node.output[0]] = y
    return env[output]


def _cast(x: np.ndarray, to: int) -> np.ndarray:
    if to == TensorProto.INT32:
        return x.astype(np.int32)
    if to == TensorProto.FLOAT:
        if x.dtype.name == "bfloat16":
            return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        return x.astype(np.float32)
    if to == TensorProto.BFLOAT16:  # exact: every value came from bfloat16
        bits = (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return bits.view(_np(TensorProto.BFLOAT16))
    return x.astype(_np(to))
