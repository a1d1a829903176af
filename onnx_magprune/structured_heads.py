"""Find the attention blocks whose heads structured removal can cut, or say why not.

A *head group* is one multi-head attention block of separate Q, K and V
layers, as PyTorch and TensorFlow export scaled dot-product attention::

    Q = X  Wq [+ bq] -> Reshape [.., H|-1, d] -> Transpose(s) [, * or / a scalar]   [.., H, S, d]
    K = X' Wk [+ bk] -> Reshape [.., H|-1, d] -> Transpose(s) [, * or / a scalar]   [.., H, d, S']
    V = X' Wv [+ bv] -> Reshape [.., H|-1, d] -> Transpose(s)                       [.., H, S', d]
    MatMul(Q, K) -> (* or / a scalar, + or Where with a mask the same for every head)*
      -> Softmax(last axis) [-> Dropout/Cast] -> MatMul(., V) -> Transpose(s)
      -> Reshape [.., -1|H*d] -> MatMul/Gemm Wo [+ bo]

Head ``h`` owns columns ``[h*d, (h+1)*d)`` of ``Wq``, ``Wk``, ``Wv`` and their
biases and rows ``[h*d, (h+1)*d)`` of ``Wo``; a constant head count ``H`` in a
split target and a constant ``H*d`` in the merge target are lowered with the
removal.  Heads never mix before ``Wo``, so removing ``h`` equals zeroing its
rows of ``Wo`` (the masked model).  A mask added to the scores must be the
same for every head: a constant is checked here, a computed mask is listed in
:attr:`UnitGroup.head_axis_checks` for a run-time check of its shape, as is a split whose head
count is -1 (the other target entries must leave the heads on that axis).

Anything else stops the block with a reason: fused QKV layers (Split),
grouped or multi-query attention (K/V heads repeated), a tensor of the block
read elsewhere (beyond Shape reads of dimensions the heads do not touch),
target shapes that cannot be followed, shared weights or shape constants.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph_index import GraphIndex, Value
from .structured import (Consumer, Shrink, SkippedGroup, UnitGroup, _attr, _check_overlaps, _const_problem,
                         _constant, _in_axis, _label, _layer_weight, _out_axis, _State, _Stop, _Walker)

_PASS_UNARY = ("Dropout", "Cast", "Identity")  # between Softmax and the MatMul with V


@dataclass
class _Branch:
    """One of Q, K, V: its layer, the cuts on the way, and the axis labels of what the MatMul reads."""

    node: onnx.NodeProto
    weight: Value
    layout: str
    heads: int
    dim: int
    labels: list[str]
    shrinks: list[Shrink] = field(default_factory=list)
    tensors: list[str] = field(default_factory=list)
    split_output: str = ""
    heads_inferred: bool = False  # the split's head entry is -1


@dataclass(frozen=True)
class _Entry:
    """One entry of a Reshape's target: its value (None when computed at run time), and the
    constant holding it with the flat index there (None when not a constant of its own)."""

    value: int | None
    const: Value | None = None
    index: int = 0


class _HeadFinder:
    def __init__(self, model: onnx.ModelProto, index: GraphIndex, include_overridable: bool):
        self.index = index
        # graph inputs' declared dims (int, or None when symbolic/unknown); None for an unknown rank
        self.input_dims: dict[str, list[int | None] | None] = {}
        for vi in model.graph.input:
            tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
            self.input_dims[vi.name] = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim] \
                if tt is not None and tt.HasField("shape") else None
        self.walker = _Walker(index, include_overridable)
        self.include_overridable = include_overridable
        self.producers = {v.name: v.node for v in index.values if v.graph == "main" and v.kind == "node_output"}
        self.ranks = _inferred_ranks(model)

    # -- helpers ----------------------------------------------------------------

    def _uses(self, name: str):
        v = self.walker.outputs.get(name)
        if v is None:
            raise _Stop(f"'{name}' is not a node output of the main graph")
        return v

    def _only_use(self, name: str, forbidden: tuple[int, ...] = (), rank: int | None = None) -> onnx.NodeProto:
        """The single node reading ``name``, Shape reads aside that pick no axis in ``forbidden``
        (positions from the end, e.g. the head axis); ``rank`` when known."""
        v = self._uses(name)
        readers = []
        for use in v.uses:
            if use.node is None:
                raise _Stop(f"'{name}' is a graph output")
            if use.graph != "main":
                raise _Stop(f"'{name}' is read inside a subgraph ({use.graph})")
            if use.node.op_type == "Shape" and forbidden and self._reads_avoid(use.node, forbidden, rank):
                continue
            readers.append(use)
        if len(readers) != 1:
            raise _Stop(f"'{name}' is read by {len(readers)} ops ({', '.join(r.describe() for r in readers[:3])})"
                        if readers else f"'{name}' is read by nothing")
        return readers[0].node

    def _reads_avoid(self, shape: onnx.NodeProto, forbidden: tuple[int, ...], rank: int | None) -> bool:
        """Whether every read of this Shape's output (Gather of constant indices, Slice of constant
        bounds) picks no dimension at the ``forbidden`` positions (counted from the end)."""
        if any(a.name in ("start", "end") for a in shape.attribute):
            return False
        out = self.index.outputs_of(shape)[0]
        if out is None:
            return False
        lowest = min(forbidden)
        for use in out.uses:
            node = use.node
            if node is None or use.slot != 0 or node.domain not in ("", "ai.onnx"):
                return False
            consts = [self.index.input_value(node, i) for i in range(1, len(node.input))]
            if not consts or any(c is None or c.kind not in ("initializer", "constant") for c in consts):
                return False
            vals = [numpy_helper.to_array(c.tensor).reshape(-1).tolist() for c in consts]
            if node.op_type == "Gather" and _attr(node, "axis", 0) == 0:
                picks = [i if i < 0 else (i - rank if rank is not None else None) for i in vals[0]]
                ok = all(p is not None and p not in forbidden for p in picks)
            elif node.op_type == "Slice" and len(vals) >= 2 and len(vals[0]) == 1 \
                    and (len(vals) < 4 or vals[3] == [1]) and (len(vals) < 3 or vals[2] == [0]):
                start, end = vals[0][0], vals[1][0]
                if rank is not None:
                    lo, hi = (start if start >= 0 else start + rank), (end if end >= 0 else end + rank)
                    ok = not any(i - rank in forbidden for i in range(max(lo, 0), min(hi, rank)))
                else:  # from the start up to ``end`` from the end: positions below ``end``
                    ok = start >= 0 and -2 ** 31 < end < 0 and lowest >= end
            else:
                return False
            if not ok:
                return False
        return True

    def _entries(self, reshape: onnx.NodeProto) -> tuple[list[_Entry], bool]:
        """The target's entries from the end (as far as they can be read) and whether that is all of them."""
        v = self.index.input_value(reshape, 1)
        if v is None:
            return [], False
        if v.kind in ("initializer", "constant"):
            vals = numpy_helper.to_array(v.tensor).reshape(-1).tolist()
            return [_Entry(int(x), v, i) for i, x in enumerate(vals)][::-1], True
        src = v.node if v.kind == "node_output" else None
        if src is None or src.op_type != "Concat" or src.domain not in ("", "ai.onnx"):
            return [], False
        out: list[_Entry] = []
        for i in range(len(src.input) - 1, -1, -1):
            part = self.index.input_value(src, i)
            if part is None:
                return out, False
            if part.kind in ("initializer", "constant"):
                vals = numpy_helper.to_array(part.tensor).reshape(-1).tolist()  # (reads outside the block
                out += [_Entry(int(x), part, j) for j, x in enumerate(vals)][::-1]  # stop it if it is cut)
                continue
            if self._one_element(part):
                out.append(_Entry(None))
                continue
            return out, False
        return out, True

    def _one_element(self, part: Value) -> bool:
        """Unsqueeze of a scalar (a Gather of one index from a Shape, a Cast, ...)."""
        node = part.node if part.kind == "node_output" else None
        if node is None or node.op_type != "Unsqueeze":
            return False
        src = self.index.input_value(node, 0)
        gnode = src.node if src is not None and src.kind == "node_output" else None
        if gnode is not None and gnode.op_type == "Gather":
            idx = self.index.input_value(gnode, 1)
            return idx is not None and idx.kind in ("initializer", "constant") and not list(idx.tensor.dims)
        return False

    def _shape_const(self, e: _Entry, reshape: onnx.NodeProto, block: int) -> Shrink:
        """The cut lowering entry ``e`` of ``reshape``'s target by ``block`` per removed head."""
        c = e.const
        if c is None:
            raise _Stop(f"the target shape of Reshape '{_label(reshape)}' holds the head count in a constant "
                        "read elsewhere too")
        if c.tensor.data_type != TensorProto.INT64 or _const_problem(c, self.include_overridable, need_float=False):
            raise _Stop(f"the target shape '{c.name}' of Reshape '{_label(reshape)}' cannot be changed")
        return Shrink(c.name, e.index, "shape", block)

    # -- the block ------------------------------------------------------------

    def block(self, softmax: onnx.NodeProto) -> UnitGroup:
        axis = _attr(softmax, "axis", -1 if self.index.opsets.get("", 13) >= 13 else 1)
        # scores back to MatMul(Q, K): the ops between, each a scalar or a head-invariant mask
        checks: list[tuple[str, str]] = []  # (mask tensor, where) for a head-axis check
        scalar_ops: list[str] = []
        tensors: list[str] = []
        cur = softmax.input[0]
        while True:
            node = self.producers.get(cur)
            if node is None or node.domain not in ("", "ai.onnx"):
                raise _Stop(f"the scores of Softmax '{_label(softmax)}' do not come from a MatMul of Q and K")
            tensors.append(cur)
            if node.op_type == "MatMul" and _layer_weight(node, self.index)[0] is None \
                    and _constant(self.index, node, 0) is None:
                qk = node
                break
            if node.op_type in ("Mul", "Div", "Add", "Sub") and len(node.input) == 2:
                slot = self._score_slot(node)
                other = node.input[1 - slot]
                checks.append((other, f"{node.op_type} '{_label(node)}'"))
                scalar_ops.append(node.op_type)
                cur = node.input[slot]
                continue
            if node.op_type == "Where" and len(node.input) == 3:
                slot = next((s for s in (1, 2) if self._reaches_matmul(node.input[s])), None)
                if slot is None:
                    raise _Stop(f"Where '{_label(node)}' on the scores has no score operand")
                checks += [(node.input[s], f"Where '{_label(node)}'") for s in (0, 3 - slot)]
                scalar_ops.append("Where")
                cur = node.input[slot]
                continue
            if node.op_type in _PASS_UNARY:
                if any(o is not None and o.uses for o in self.index.outputs_of(node)[1:]):
                    raise _Stop(f"the extra output of {node.op_type} '{_label(node)}' is read")
                tensors += [o for o in node.output[1:] if o]  # (a Dropout mask: its value_info goes too)
                cur = node.input[0]
                continue
            raise _Stop(f"the scores of Softmax '{_label(softmax)}' pass {node.op_type} '{_label(node)}'")
        tensors.reverse()
        q = self._branch(qk.input[0], "Q")
        k = self._branch(qk.input[1], "K")
        rank = len(q.labels)
        if len(k.labels) != rank or "h" not in q.labels[:-2] or q.labels[-1] != "e" or k.labels[-2] != "e" \
                or "h" not in k.labels[:-2] or q.labels.index("h") != k.labels.index("h"):
            raise _Stop(f"MatMul '{_label(qk)}' does not multiply Q [.., heads, S, d] by Kᵀ [.., heads, d, S]")
        hpos = q.labels.index("h") - rank  # the head axis, from the end
        for name in tensors:  # every score tensor read only by the next op (or Shape reads of other axes)
            self._only_use(name, (hpos,), rank)
        if axis not in (-1, rank - 1):
            raise _Stop(f"Softmax '{_label(softmax)}' normalises axis {axis}, not the last")
        mask_checks = []
        for name, where in checks:
            mask_checks += self._invariant(name, hpos, where)
        # Softmax forward to MatMul(probs, V)
        cur = softmax.output[0]
        while True:
            guard = self._nan_guard(cur)
            if guard is not None:  # Where(IsNaN(p), 0, p): PyTorch's sdpa guard for fully masked rows
                tensors += [cur, guard.input[0]]
                cur = guard.output[0]
                continue
            node = self._only_use(cur, (hpos,), rank)
            tensors.append(cur)
            if node.op_type in _PASS_UNARY and node.input[0] == cur:
                if any(o is not None and o.uses for o in self.index.outputs_of(node)[1:]):
                    raise _Stop(f"the extra output of {node.op_type} '{_label(node)}' is read")
                tensors += [o for o in node.output[1:] if o]
                cur = node.output[0]
                continue
            if node.op_type == "MatMul" and node.input[0] == cur:
                pv = node
                break
            raise _Stop(f"the probabilities of Softmax '{_label(softmax)}' reach {node.op_type} '{_label(node)}'")
        v = self._branch(pv.input[1], "V")
        if len(v.labels) != rank or v.labels[-1] != "e" or v.labels.index("h") - rank != hpos:
            raise _Stop(f"MatMul '{_label(pv)}' does not read V as [.., heads, S, d]")
        heads, dim = q.heads, q.dim
        if (k.heads, k.dim) != (heads, dim) or (v.heads, v.dim) != (heads, dim):
            raise _Stop(f"Q, K and V have different heads x size: {q.heads}x{q.dim}, {k.heads}x{k.dim}, "
                        f"{v.heads}x{v.dim}")
        if len({id(q.node), id(k.node), id(v.node)}) != 3 or len({q.weight.name, k.weight.name, v.weight.name}) != 3:
            raise _Stop("Q, K and V come from the same layer")
        # forward from the attention output to the merge and the output projection
        labels = list(q.labels[:-1]) + ["e"]
        cur = pv.output[0]
        keep_cuts: list[Shrink] = []
        keep_checks: list[tuple[str, int, int, str]] = []
        while True:
            node = self._only_use(cur, (labels.index("h") - len(labels),), len(labels))
            tensors.append(cur)
            if node.op_type == "Transpose":
                perm = list(_attr(node, "perm", list(range(len(labels)))[::-1]))
                if sorted(perm) != list(range(len(labels))):
                    raise _Stop(f"Transpose '{_label(node)}' has perm {perm} for a rank-{len(labels)} tensor")
                labels = [labels[p] for p in perm]
                cur = node.output[0]
                continue
            if node.op_type == "Reshape" and node.input[0] == cur:
                if labels[-2:] == ["h", "e"] and self._merges(node, heads, dim):
                    merge = node
                    break
                cuts = self._keeps_layout(node, labels, heads)
                keep_cuts += cuts
                if not cuts:  # the head entry is -1: the run shows whether the heads stay on that axis
                    keep_checks.append((node.output[0], labels.index("h") - len(labels), heads, "split"))
                cur = node.output[0]
                continue
            raise _Stop(f"the attention output reaches {node.op_type} '{_label(node)}' before its heads are merged")
        group = UnitGroup(q.weight.name, q.node.op_type, q.node, heads, kind="heads")
        group.shrinks += keep_cuts
        entries, _complete = self._entries(merge)
        if entries[0].value == heads * dim:
            group.shrinks.append(self._shape_const(entries[0], merge, dim))
        tensors.append(merge.output[0])
        consumer = self._consumer(group, merge, heads, dim)
        group.shrinks = q.shrinks + k.shrinks + v.shrinks + group.shrinks
        group.shrinks.sort(key=lambda s: {"producer": 0, "producer bias": 1, "shape": 2, "consumer": 3}[s.role])
        group.co_producers = [k.weight.name, v.weight.name]
        group.consumers.append(consumer)
        group.chain = ["Reshape", "Transpose", "MatMul"] + scalar_ops[::-1] + ["Softmax", "MatMul", "Transpose", "Reshape"]
        group.channel_tensors = list(dict.fromkeys(q.tensors + k.tensors + v.tensors + tensors))
        group.head_axis_checks = mask_checks + [(b.split_output, -2, heads, "split") for b in (q, k, v)
                                                if b.heads_inferred] + keep_checks
        group.site = f"Softmax '{_label(softmax)}'"
        self._check_shapes_private(group)
        return group

    def _merges(self, node: onnx.NodeProto, heads: int, dim: int) -> bool:
        """Whether this Reshape of ``[.., heads, d]`` merges the last two axes: its target ends in
        -1 or ``heads*d`` with no other -1 (and, with allowzero=1, no 0).  The output projection's
        width (checked in :meth:`_consumer`) confirms the last axis is ``heads*d``."""
        entries, _complete = self._entries(node)
        if not entries or entries[0].value not in (-1, heads * dim) or any(e.value == -1 for e in entries[1:]):
            return False
        return not (_attr(node, "allowzero", 0) and any(e.value == 0 for e in entries))

    def _keeps_layout(self, node: onnx.NodeProto, labels: list[str], heads: int) -> list[Shrink]:
        """A Reshape that gives the tensor back its own layout (PyTorch's sdpa export reshapes the
        attention output to ``[B, -1, S, d]``): the same rank, the head entry -1 or the head count
        (cut), no other -1 and no 0 from the head axis on.  Its cuts; stops otherwise."""
        entries, complete = self._entries(node)
        rank, h = len(labels), labels.index("h")
        back = rank - h  # entries from the end up to and including the head axis
        why = _Stop(f"Reshape '{_label(node)}' changes the layout of the attention output before its heads "
                    "are merged")
        if len(entries) < back or (complete and len(entries) != rank) or _attr(node, "allowzero", 0):
            raise why
        head = entries[back - 1]
        if head.value not in (-1, heads) or any(e.value in (-1, 0) for i, e in enumerate(entries) if i != back - 1):
            raise why
        if entries[0].value is not None and labels[-1] == "e" and entries[0].value <= 0:
            raise why
        return [self._shape_const(head, node, 1)] if head.value == heads else []

    def _nan_guard(self, name: str) -> onnx.NodeProto | None:
        """``Where(IsNaN(name), c, name)`` with ``c`` a scalar constant, when that is all that reads ``name``."""
        v = self._uses(name)
        if len(v.uses) != 2 or any(u.node is None for u in v.uses):
            return None
        ops = {u.node.op_type: u for u in v.uses}
        if set(ops) != {"IsNaN", "Where"} or ops["Where"].slot != 2:
            return None
        isnan, where = ops["IsNaN"].node, ops["Where"].node
        flag = self.walker.outputs.get(isnan.output[0])
        c = _constant(self.index, where, 1)
        if flag is None or len(flag.uses) != 1 or flag.uses[0].node is not where or flag.uses[0].slot != 0 \
                or c is None or int(np.prod(c.tensor.dims)) != 1:
            return None
        return where

    def _score_slot(self, node: onnx.NodeProto) -> int:
        """Which input of an element-wise op on the scores carries them."""
        hits = [s for s in (0, 1) if self._reaches_matmul(node.input[s])]
        if len(hits) != 1:
            raise _Stop(f"{node.op_type} '{_label(node)}' on the scores: cannot tell the scores from the mask")
        return hits[0]

    def _reaches_matmul(self, name: str, depth: int = 0) -> bool:
        """Whether ``name`` is a MatMul of two activations through element-wise ops on one operand."""
        node = self.producers.get(name)
        if node is None or depth > 8:
            return False
        if node.op_type == "MatMul":
            return _layer_weight(node, self.index)[0] is None and _constant(self.index, node, 0) is None
        if node.op_type in ("Mul", "Div", "Add", "Sub") + _PASS_UNARY:
            return any(self._reaches_matmul(i, depth + 1) for i in node.input[:2] if i)
        if node.op_type == "Where" and len(node.input) == 3:
            return any(self._reaches_matmul(i, depth + 1) for i in node.input[1:])
        return False

    def _invariant(self, name: str, hpos: int, where: str) -> list[tuple[str, int, int, str]]:
        """Nothing when ``name`` is the same for every head; a check for the run when only a run
        shows it; stops when its declared size on the head axis is not 1 (or not declared)."""
        value = self.walker.constants.get(name)
        if value is not None:
            if value.tensor is None:
                raise _Stop(f"the operand '{name}' of {where} is not readable")
            dims = list(value.tensor.dims)
            pos = len(dims) + hpos
            if pos >= 0 and dims[pos] != 1:
                raise _Stop(f"the constant '{name}' of {where} has {dims[pos]} entries on the head axis "
                            "(e.g. a per-head position bias)")
            return []
        if name in self.input_dims:  # a graph input: its declared size on the head axis, when fixed
            dims = self.input_dims[name]
            if dims is not None:
                pos = len(dims) + hpos
                if pos < 0 or dims[pos] == 1:
                    return []
                if isinstance(dims[pos], int) and dims[pos] > 1:
                    raise _Stop(f"the input '{name}' of {where} has {dims[pos]} entries on the head axis")
            raise _Stop(f"the input '{name}' of {where} has no declared size on the head axis")
        if name not in self.walker.outputs:
            raise _Stop(f"the operand '{name}' of {where} is not in the main graph")
        return [(name, hpos, 1, "mask")]

    def _branch(self, name: str, role: str) -> _Branch:
        """Follow Q, K or V back from the attention MatMul to its layer."""
        perms: list[list[int]] = []
        tensors = []
        cur = name
        while True:
            node = self.producers.get(cur)
            if node is None or node.domain not in ("", "ai.onnx"):
                raise _Stop(f"{role} does not come from a layer of the main graph")
            tensors.append(cur)
            if node.op_type == "Transpose":
                perms.insert(0, list(_attr(node, "perm", [])))
                cur = node.input[0]
            elif node.op_type in ("Mul", "Div") and len(node.input) == 2 and \
                    (c := _constant(self.index, node, 1)) is not None and int(np.prod(c.tensor.dims)) == 1:
                cur = node.input[0]
            elif node.op_type == "Reshape":
                split = node
                break
            else:
                raise _Stop(_not_a_layer(role, node))
        if any(not p for p in perms):
            raise _Stop(f"a Transpose on the way of {role} has no perm")
        entries, complete = self._entries(split)
        if len(entries) < 2 or entries[0].value is None or entries[0].value <= 0:
            raise _Stop(f"the target shape of Reshape '{_label(split)}' does not end in a constant head size")
        dim, head_entry = entries[0].value, entries[1]
        if head_entry.value is None or head_entry.value == 0 or head_entry.value < -1 or \
                (head_entry.value == -1 and any(e.value == -1 for e in entries[2:])):
            raise _Stop(f"the target shape of Reshape '{_label(split)}' does not split [.., heads x size]")
        if _attr(split, "allowzero", 0) and any(e.value == 0 for e in entries):
            raise _Stop(f"Reshape '{_label(split)}' has allowzero=1 and a 0 entry")
        rank = len(perms[0]) if perms else (len(entries) if complete else None)
        if rank is None or (complete and len(entries) != rank) or any(len(p) != rank for p in perms):
            raise _Stop(f"the rank of {role} after Reshape '{_label(split)}' is not known")
        for p in perms:
            if sorted(p) != list(range(rank)):
                raise _Stop(f"a Transpose on the way of {role} has perm {p}")
        labels = [f"x{i}" for i in range(rank - 2)] + ["h", "e"]
        for t in reversed(tensors):  # from the Reshape's output to what the MatMul reads
            node = self.producers[t]
            if node.op_type == "Transpose":
                labels = [labels[i] for i in _attr(node, "perm", [])]
            self._only_use(t, (labels.index("h") - rank,), rank)  # Shape reads of other axes are fine
        # the layer: MatMul/Gemm [+ bias Add] [* or / a scalar] -> Reshape
        shrinks: list[Shrink] = []
        src_name = split.input[0]
        src = self.producers.get(src_name)
        path = [src_name]
        bias_add = None
        while src is not None and src.domain in ("", "ai.onnx") and src.op_type in ("Add", "Mul", "Div"):
            slots = [s for s in (0, 1) if _constant(self.index, src, s) is not None]
            scalar = len(slots) == 1 and int(np.prod(_constant(self.index, src, slots[0]).tensor.dims)) == 1 \
                and (src.op_type != "Div" or slots[0] == 1)
            if src.op_type in ("Mul", "Div") and scalar:  # Whisper scales Q before the split
                pass
            elif src.op_type == "Add" and bias_add is None:
                if len(slots) != 1:
                    raise _Stop(self._not_a_bias(role, src))
                bias_add = src
            else:
                raise _Stop(f"{role} passes {src.op_type} '{_label(src)}' on the way from its layer")
            path.append(src.input[1 - slots[0]])
            src = self.producers.get(src.input[1 - slots[0]])
        if src is None or src.op_type not in ("MatMul", "Gemm") or src.domain not in ("", "ai.onnx"):
            raise _Stop(_not_a_layer(role, src) if src is not None else f"{role} does not come from a layer")
        weight, layout = self._own_weight(src, f"the {role} layer")
        width = int(weight.tensor.dims[_out_axis(layout)])
        heads = width // dim if head_entry.value == -1 else head_entry.value
        if heads * dim != width or heads < 2:
            raise _Stop(f"Reshape '{_label(split)}' splits the {width} outputs of the {role} layer into "
                        f"{heads} x {dim}")
        shrinks.append(Shrink(weight.name, _out_axis(layout), "producer", dim))
        trial = UnitGroup(weight.name, src.op_type, src, width)
        self.walker._producer_bias(trial, src, width)
        if bias_add is not None:
            state = _State(axis=-1, rank=2 if src.op_type == "Gemm" else None)
            slot = next(s for s in (0, 1) if _constant(self.index, bias_add, s) is not None)
            self.walker._per_channel(trial, bias_add, slot, state, exact_1d=False)
        for s in trial.shrinks:
            shrinks.append(Shrink(s.tensor, s.axis, "producer bias", dim))
        for t in path:  # Shape reads of the leading dims (x.size()[:-1]) are fine
            self._only_use(t, (-1,), 2 if src.op_type == "Gemm" else self.ranks.get(t))
        if head_entry.value != -1:
            shrinks.append(self._shape_const(head_entry, split, 1))
        return _Branch(src, weight, layout, heads, dim, labels, shrinks, path[::-1] + tensors[::-1],
                       split.output[0], head_entry.value == -1)

    def _own_weight(self, node: onnx.NodeProto, what: str) -> tuple[Value, str]:
        """The constant weight of a MatMul/Gemm that only this node reads, and its layout, or stop."""
        weight, layout = _layer_weight(node, self.index)
        if weight is None:
            raise _Stop(f"{what} {node.op_type} '{_label(node)}' has no constant weight")
        if node.op_type == "Gemm" and _attr(node, "transA", 0):
            raise _Stop(f"{what} is Gemm '{_label(node)}' with transA=1")
        problem = _const_problem(weight, self.include_overridable)
        if problem:
            raise _Stop(f"the weight of {what} {problem}")
        if len(weight.uses) != 1:
            raise _Stop(f"the weight of {what} '{weight.name}' is shared by {len(weight.uses)} ops")
        return weight, layout

    def _not_a_bias(self, role: str, add: onnx.NodeProto) -> str:
        for i in add.input:
            src = self.producers.get(i)
            if src is not None and src.op_type in ("Identity", "Cast") and src.input \
                    and _constant(self.index, src, 0) is not None:
                return (f"{role}'s bias Add '{_label(add)}' reads {src.op_type} of the constant '{src.input[0]}' "
                        "(exporters share equal biases this way), not a bias of its own")
        return f"{role} passes Add '{_label(add)}' that is not a bias"

    def _consumer(self, group: UnitGroup, merge: onnx.NodeProto, heads: int, dim: int) -> Consumer:
        node = self._only_use(merge.output[0])
        if node.op_type not in ("MatMul", "Gemm") or node.input[0] != merge.output[0]:
            raise _Stop(f"the merged heads reach {node.op_type} '{_label(node)}', not a layer's input")
        weight, layout = self._own_weight(node, "the output projection")
        if int(weight.tensor.dims[_in_axis(layout)]) != heads * dim:
            raise _Stop(f"{node.op_type} '{_label(node)}' reads {weight.tensor.dims[_in_axis(layout)]} features, "
                        f"expected {heads * dim}")
        bias, bias_axis = self.walker._consumer_bias(node, layout)
        group.shrinks.append(Shrink(weight.name, _in_axis(layout), "consumer", dim))
        return Consumer(weight.name, node, layout, merge.output[0], dim, bias, bias_axis)

    def _check_shapes_private(self, group: UnitGroup) -> None:
        """Cut constants (biases, shape entries) must be read only inside the block."""
        inside = {id(n) for n in self._block_nodes(group)}
        for s in group.shrinks:
            if s.role not in ("shape", "producer bias"):
                continue
            v = self.walker.constants[s.tensor]
            outside = [u for u in v.uses if u.node is None or id(u.node) not in inside]
            if outside:
                raise _Stop(f"'{s.tensor}' is also read by {outside[0].describe()}")

    def _block_nodes(self, group: UnitGroup):
        out = []
        for name in group.channel_tensors:
            node = self.producers.get(name)
            if node is not None:
                out.append(node)
            v = self.walker.outputs.get(name)
            for use in (v.uses if v is not None else []):
                if use.node is not None:
                    out.append(use.node)
        for name in group.channel_tensors:  # the Concat building a target shape, and its Reshape
            v = self.walker.outputs.get(name)
            for use in (v.uses if v is not None else []):
                node = use.node
                if node is not None and node.op_type == "Reshape":
                    tgt = self.index.input_value(node, 1)
                    if tgt is not None and tgt.kind == "node_output":
                        out.append(tgt.node)
        return out


def _inferred_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks from ONNX shape inference (empty when it fails, e.g. beyond protobuf's 2 GiB):
    they tell which axis a non-negative Shape index reads."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without ranks, only negative Shape indices pass
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
        if tt is not None and tt.HasField("shape"):
            out[vi.name] = len(tt.shape.dim)
    return out


def _not_a_layer(role: str, node: onnx.NodeProto) -> str:
    if node.op_type in ("Split", "Slice", "Gather"):
        return f"{role} comes from {node.op_type} '{_label(node)}' (a fused QKV layer is not cut)"
    if node.op_type in ("Expand", "Tile", "Concat"):
        return f"{role} passes {node.op_type} '{_label(node)}' (repeated or cached heads are not cut)"
    return f"{role} passes {node.op_type} '{_label(node)}' on the way from its layer"


def find_head_groups(model: onnx.ModelProto, index: GraphIndex | None = None, *,
                     include_overridable: bool = False) -> tuple[list[UnitGroup], list[SkippedGroup]]:
    """Every attention block of the main graph (one per Softmax) as a head group, or skipped with the reason."""
    index = index or GraphIndex(model)
    finder = _HeadFinder(model, index, include_overridable)
    groups: list[UnitGroup] = []
    skipped: list[SkippedGroup] = []
    for node in model.graph.node:
        if node.op_type != "Softmax" or node.domain not in ("", "ai.onnx"):
            continue
        try:
            groups.append(finder.block(node))
        except _Stop as e:
            skipped.append(SkippedGroup(f"Softmax '{_label(node)}'", "Softmax", 0, f"attention heads: {e}"))
    _check_overlaps(groups, skipped)
    return groups, skipped


__all__ = ["find_head_groups"]
