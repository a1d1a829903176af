"""Find the unit groups that structured removal can shrink, or say why not.

A *unit group* is the set of output units (MatMul/Gemm columns, Conv output
channels) of one **producer** layer, followed through a chain of ops that
treat every channel on its own, to the **consumer** layers that read them as
their input dimension::

    producer W [+ bias] -> (Add bias, Relu, Gelu (Erf or Tanh form), Sigmoid,
    Tanh, Mul by a per-channel constant, BatchNormalization, pools, ...)* -> consumer W

Removing unit ``j`` deletes column/channel ``j`` of the producer weight and
bias, entry ``j`` of every per-channel constant on the chain and row/input
channel ``j`` of every consumer weight.  Whatever the chain computes for unit
``j``, only the consumer rows read it: the result equals the model whose
consumer rows ``j`` are zeroed (the "masked" model) up to float rounding.

Anything on the chain that could see the channel count or mix channels stops
the group with a reason: Reshape (e.g. into attention heads), Transpose,
Concat, Split, a residual Add with another branch, a graph output, a Shape
read, a subgraph, normalisations over channels, shared weights or shared
per-channel constants.  ``Flatten(axis=1)`` of an NCHW tensor directly into a
Gemm/MatMul is followed: channel ``j`` is the ``j``-th contiguous block of the
consumer's input dimension.  Only the top-level graph is searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .graph_index import GraphIndex, Value
from .tensor_data import FLOAT_TYPES, dtype_name

#: ops applied to every element on its own: any channel count passes through
UNARY = frozenset({
    "Relu", "Sigmoid", "Tanh", "Erf", "Gelu", "LeakyRelu", "Elu", "Selu", "Celu", "Softplus", "Softsign",
    "HardSigmoid", "HardSwish", "Mish", "ThresholdedRelu", "Neg", "Abs", "Exp", "Log", "Sqrt", "Reciprocal",
    "Sin", "Cos", "Identity", "Floor", "Ceil", "Round", "Sign", "Dropout", "Cast", "Clip", "FastGelu",
})
#: element-wise binary ops: the other operand is a constant (scalar or per channel) or the same group
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu"})
#: spatial ops that keep channels apart (NCHW tensors, channel axis 1)
POOLS = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
#: per-channel normalisations: (op, constant slots of shape [C])
PER_CHANNEL_NORMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2)}

_WHY_NOT = {
    "Reshape": "it reaches Reshape '{name}' (e.g. a split into attention heads): the channel layout changes",
    "Transpose": "it reaches Transpose '{name}': the channel axis moves",
    "Concat": "it reaches Concat '{name}': other tensors share its channel axis",
    "Split": "it reaches Split '{name}': it cuts the channel axis at fixed sizes",
    "Slice": "it reaches Slice '{name}': it may index the channel axis",
    "Shape": "its shape is read by Shape '{name}'",
    "Size": "its size is read by Size '{name}'",
    "Flatten": "it reaches Flatten '{name}' not directly into a Gemm/MatMul, or not at axis 1 of an NCHW tensor",
}


@dataclass(frozen=True)
class Shrink:
    """Cut a constant along ``axis``: unit ``j`` owns indices ``[j*block, (j+1)*block)``."""

    tensor: str
    axis: int
    role: str  # "producer", "producer bias", "chain", "consumer", "shape" (a Reshape's target)
    block: int = 1  # for "shape": ``axis`` is the entry of the target, lowered by ``block`` per removed unit
    # for "shape" when the target (or its unit count) is shared with other nodes: the output of the
    # Reshape that gets its own lowered copy (exporters that fold equal constants share one across layers)
    own: str | None = None


@dataclass(frozen=True)
class Consumer:
    """A layer reading the group's units as (part of) its input dimension."""

    weight: str
    node: onnx.NodeProto
    layout: str  # "matmul_b", "gemm_b", "gemm_bt", "conv"
    input_name: str  # the activation it reads (after the chain)
    block: int = 1  # >1 after Flatten: unit j is a block of the input dimension
    bias: str | None = None  # the bias added to its output (re-fitted with it), if any
    bias_axis: int = -1


@dataclass
class UnitGroup:
    producer: str  # the producer weight
    producer_op: str
    node: onnx.NodeProto
    units: int
    shrinks: list[Shrink] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    chain: list[str] = field(default_factory=list)  # op types between producer and consumers
    co_producers: list[str] = field(default_factory=list)  # the other weight of a gated pair, cut with it
    channel_tensors: list[str] = field(default_factory=list)  # activations whose channel count changes
    kind: str = "units"  # or "heads": an attention block (structured_heads), its units heads of ``block`` columns
    # head groups: sizes only a run of the model shows (structured_probe): (tensor, axis from the end,
    # the size it must have there, what it is): a computed mask on the scores must have 1 on the head
    # axis, a split whose head count is -1 must give the head count
    head_axis_checks: list[tuple[str, int, int, str]] = field(default_factory=list)
    site: str = ""  # where the group is, for messages (head groups: the attention's Softmax)

    def tensors(self) -> list[str]:
        """The tensors it cuts (a shared shape constant is not cut: its Reshape gets its own copy)."""
        return list(dict.fromkeys(s.tensor for s in self.shrinks if s.own is None))


@dataclass(frozen=True)
class SkippedGroup:
    producer: str
    producer_op: str
    units: int
    reason: str


@dataclass(frozen=True)
class _State:
    """Where the channels of an activation are: ``axis`` counted from the end, ``rank`` if known."""

    axis: int
    rank: int | None
    flat: bool = False  # after Flatten: only consumers (and unary ops) may follow


class _Stop(Exception):
    pass


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _constant(index: GraphIndex, node: onnx.NodeProto, slot: int) -> Value | None:
    if slot >= len(node.input) or not node.input[slot]:
        return None
    v = index.input_value(node, slot)
    if v is None or v.kind not in ("initializer", "constant") or v.tensor is None:
        return None
    return v


def _const_problem(v: Value, include_overridable: bool, *, need_float: bool = True) -> str | None:
    if v.overridable and not include_overridable:
        return f"'{v.name}' is an initializer that is also a graph input (callers can override it)"
    if v.duplicate:
        return f"'{v.name}' is bound more than once"
    if need_float and v.tensor.data_type not in FLOAT_TYPES:
        return f"'{v.name}' is {dtype_name(v.tensor.data_type)}, not floating point"
    return None


def _layout(node: onnx.NodeProto) -> str:
    """The weight layout of a MatMul (B) / Gemm (B) / Conv (W) node."""
    if node.op_type == "Gemm":
        return "gemm_bt" if _attr(node, "transB", 0) else "gemm_b"
    return "conv" if node.op_type == "Conv" else "matmul_b"


_SHAPE_TYPES = (TensorProto.INT64, TensorProto.INT32)  # a Reshape target's parts (int32 before a Cast)


def _layer_weight(node: onnx.NodeProto, index: GraphIndex) -> tuple[Value | None, str | None]:
    """The constant weight of a MatMul (B) / Gemm (B) / Conv (W) node, with its layout."""
    op = node.op_type
    if op not in ("MatMul", "Gemm", "Conv"):
        return None, None
    v = _constant(index, node, 1)
    if v is None:
        return None, None
    rank = len(v.tensor.dims)
    if (op == "MatMul" and rank != 2) or (op == "Conv" and rank < 3):
        return None, None
    return v, _layout(node)


def _out_axis(layout: str) -> int:
    """The axis of the stored weight that indexes output units."""
    return {"matmul_b": 1, "gemm_b": 1, "gemm_bt": 0, "conv": 0}[layout]


def _in_axis(layout: str) -> int:
    return {"matmul_b": 0, "gemm_b": 0, "gemm_bt": 1, "conv": 1}[layout]


class _Walker:
    """Follows one producer's units to their consumers."""

    def __init__(self, index: GraphIndex, include_overridable: bool):
        self.index = index
        self.include_overridable = include_overridable
        self.outputs = {v.name: v for v in index.values if v.graph == "main" and v.kind == "node_output"}
        self.constants = {v.name: v for v in index.values if v.graph == "main"
                          and v.kind in ("initializer", "constant")}

    def group(self, node: onnx.NodeProto, weight: Value, layout: str) -> UnitGroup:
        dims = tuple(weight.tensor.dims)
        units = dims[_out_axis(layout)]
        g = UnitGroup(weight.name, node.op_type, node, units)
        problem = _const_problem(weight, self.include_overridable)
        if problem:
            raise _Stop(f"its weight {problem}")
        if len(weight.uses) != 1:
            raise _Stop(f"its weight '{weight.name}' is shared by {len(weight.uses)} ops")
        if node.op_type == "Conv" and _attr(node, "group", 1) != 1:
            raise _Stop("grouped convolution (group != 1)")
        if units < 2:
            raise _Stop(f"it has {units} output unit(s)")
        g.shrinks.append(Shrink(weight.name, _out_axis(layout), "producer"))
        self._producer_bias(g, node, units)
        if node.op_type == "Conv":
            rank = len(dims)
            state = _State(axis=-(rank - 1), rank=rank)
        else:
            state = _State(axis=-1, rank=2 if node.op_type == "Gemm" else None)
        self._walk(g, node.output[0], state)
        if not g.consumers:
            raise _Stop("its units reach no consumer layer")
        self._check_shared(g)
        return g

    def _producer_bias(self, g: UnitGroup, node: onnx.NodeProto, units: int) -> None:
        if len(node.input) < 3 or not node.input[2]:
            return
        v = _constant(self.index, node, 2)
        if v is None:
            raise _Stop(f"its bias '{node.input[2]}' is not a constant")
        problem = _const_problem(v, self.include_overridable)
        if problem:
            raise _Stop(f"its bias {problem}")
        if len(v.uses) != 1:  # e.g. exporters that merge equal (zero) biases read one through Identity elsewhere
            other = next(u for u in v.uses if u.node is not node)
            raise _Stop(f"its bias '{v.name}' is also read by {other.describe()}")
        dims = tuple(v.tensor.dims)
        if node.op_type == "Conv":
            if dims != (units,):
                raise _Stop(f"its bias has shape {list(dims)}, expected [{units}]")
            g.shrinks.append(Shrink(v.name, 0, "producer bias"))
        elif dims and dims[-1] == units and units != 1:
            g.shrinks.append(Shrink(v.name, len(dims) - 1, "producer bias"))
        elif dims and dims[-1] != 1:
            raise _Stop(f"its bias has shape {list(dims)}, which does not broadcast per unit")

    # -- the chain ------------------------------------------------------------

    def _walk(self, g: UnitGroup, start: str, state: _State) -> None:
        states: dict[str, _State] = {start: state}
        queue = [start]
        pending: dict[int, onnx.NodeProto] = {}
        done: set[int] = set()
        while True:
            while queue:
                name = queue.pop(0)
                value = self._value(name)
                g.channel_tensors.append(name)
                for use in value.uses:
                    if use.node is None:
                        raise _Stop(f"it reaches the graph output '{name}'")
                    if use.graph != "main":
                        raise _Stop(f"'{name}' is read inside a subgraph ({use.graph})")
                    node = use.node
                    if id(node) in done:
                        continue
                    outs = self._step(g, node, use.slot, name, states)
                    if outs is None:  # waits for its other operand
                        pending[id(node)] = node
                        continue
                    done.add(id(node))
                    pending.pop(id(node), None)
                    for out, st in outs:
                        if out in states:
                            if states[out] != st:
                                raise _Stop(f"'{out}' is reached with two channel layouts")
                            continue
                        states[out] = st
                        queue.append(out)
            progressed = False
            for key, node in list(pending.items()):
                slot = next(i for i, n in enumerate(node.input) if n in states)
                other = node.input[1 - slot] if node.op_type == "Mul" and len(node.input) == 2 \
                    and g.producer_op in ("MatMul", "Gemm") and states[node.input[slot]].axis == -1 \
                    and not states[node.input[slot]].flat else None
                if other is not None and other not in states:  # a gated pair: act(x W_gate) * (x W_up)
                    path = self._co_producer(g, other, states[node.input[slot]], node)
                    if path is not None:
                        for name in path:
                            states[name] = states[node.input[slot]]
                            g.channel_tensors.append(name)
                outs = self._step(g, node, slot, node.input[slot], states)
                if outs is not None:
                    done.add(key)
                    del pending[key]
                    for out, st in outs:
                        if out not in states:
                            states[out] = st
                            queue.append(out)
                    progressed = True
            if not progressed:
                break
        if pending:
            node = next(iter(pending.values()))
            other = next(n for n in node.input if n and n not in states)
            src = self.outputs.get(other)
            if src is not None and src.node.op_type in ("Identity", "Cast") and src.node.input \
                    and _constant(self.index, src.node, 0) is not None:  # exporters sharing equal (zero) biases
                raise _Stop(f"it reaches {node.op_type} '{_label(node)}' whose other operand '{other}' is "
                            f"{src.node.op_type} of the constant '{src.node.input[0]}', not a constant of its own")
            kind = "a residual Add" if node.op_type in ("Add", "Sub") else f"{node.op_type}"
            raise _Stop(f"it reaches {kind} '{_label(node)}' with another branch ('{other}')")

    def _co_producer(self, g: UnitGroup, name: str, state: _State, gate: onnx.NodeProto) -> list[str] | None:
        """The other producer of a gated pair: ``name`` (an operand of the Mul ``gate``) computed from
        one MatMul/Gemm with a constant weight of the same unit count through element-wise ops (constant,
        per-unit or same-branch operands, so SiLU's ``h * sigmoid(h)`` too), read nowhere else.  Its
        weight, bias and per-unit constants join the group's cuts; the tensors on the way are returned.
        None when ``name`` is not such a branch."""
        path: list[str] = []
        nodes: dict[int, onnx.NodeProto] = {}
        shrinks: list[Shrink] = []
        producer = None
        queue = [name]
        while queue:
            cur = queue.pop()
            if cur in path:
                continue
            v = self.outputs.get(cur)
            if v is None or v.node.domain not in ("", "ai.onnx") or len(path) > 64:
                return None
            node = v.node
            path.append(cur)
            nodes[id(node)] = node
            if any(o is not None and o.uses for o in self.index.outputs_of(node)[1:]):
                return None  # e.g. a Dropout mask read elsewhere
            if node.op_type in ("MatMul", "Gemm"):
                weight, layout = _layer_weight(node, self.index)
                if weight is None or len(weight.uses) != 1 or _const_problem(weight, self.include_overridable) \
                        or weight.tensor.dims[_out_axis(layout)] != g.units or (producer not in (None, node)):
                    return None
                producer = node
                continue
            if node.op_type in UNARY and len([i for i in node.input if i]) == 1:
                queue.append(node.input[0])
                continue
            if node.op_type in ("Add", "Sub", "Mul", "Div") and len(node.input) == 2:
                consts = [i for i in (0, 1) if _constant(self.index, node, i) is not None]
                if len(consts) == 1:
                    trial = UnitGroup(g.producer, g.producer_op, g.node, g.units)
                    try:
                        self._per_channel(trial, node, consts[0], state, exact_1d=False)
                    except _Stop:
                        return None
                    shrinks += trial.shrinks
                    queue.append(node.input[1 - consts[0]])
                elif not consts:
                    queue += list(node.input)
                else:
                    return None
                continue
            return None
        if producer is None:
            return None
        for cur in path:  # the branch is read only inside itself and by the gate
            if any(u.node is None or (id(u.node) not in nodes and u.node is not gate) for u in self.outputs[cur].uses):
                return None
        weight, layout = _layer_weight(producer, self.index)
        trial = UnitGroup(weight.name, producer.op_type, producer, g.units)
        try:
            self._producer_bias(trial, producer, g.units)
        except _Stop:
            return None
        g.shrinks += [Shrink(weight.name, _out_axis(layout), "producer")] + shrinks + trial.shrinks
        g.co_producers.append(weight.name)
        return [p for p in path if p != producer.output[0]] + [producer.output[0]]

    def _value(self, name: str) -> Value:
        if name in self.outputs:
            return self.outputs[name]
        raise _Stop(f"'{name}' is not a node output of the main graph")

    def _step(self, g: UnitGroup, node: onnx.NodeProto, slot: int, name: str,
              states: dict[str, _State]) -> list[tuple[str, _State]] | None:
        """The channel-carrying outputs of ``node`` (reading ``name`` in ``slot``), None to wait."""
        state = states[name]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            raise _Stop(f"it reaches {node.domain}.{op} '{_label(node)}'")
        if op in ("MatMul", "Gemm", "Conv"):
            self._consumer(g, node, slot, name, state)
            return []
        if state.flat and op not in UNARY:
            raise _Stop(f"after Flatten it reaches {op} '{_label(node)}' instead of a Gemm/MatMul")
        if op in UNARY:
            return self._unary(g, node, slot, state)
        if op in BINARY:
            return self._binary(g, node, slot, state, states)
        if op in POOLS:
            self._need_axis1(state, node)
            self._only_first_output(node)
            g.chain.append(op)
            return [(node.output[0], state)]
        if op in PER_CHANNEL_NORMS:
            self._need_axis1(state, node)
            if slot != 0:
                raise _Stop(f"it reaches {op} '{_label(node)}' as a parameter")
            self._only_first_output(node)
            for s in PER_CHANNEL_NORMS[op]:
                self._per_channel(g, node, s, state, exact_1d=True)
            g.chain.append(op)
            return [(node.output[0], state)]
        if op == "Flatten":
            return self._flatten(g, node, state)
        if op == "Reshape":
            return self._reshape(g, node, slot, state)
        if op == "Shape" and (self._leading_dims_only(node, state) or self._feeds_own_reshape(node, name)):
            return []  # reads dimensions for reshapes that stay consistent (GPT-2's x.size()[:-1], x.size(-1))
        template = _WHY_NOT.get(op)
        if template:
            raise _Stop(template.format(name=_label(node)))
        raise _Stop(f"it reaches {op} '{_label(node)}', which mixes or reshapes channels")

    def _need_axis1(self, state: _State, node: onnx.NodeProto) -> None:
        if state.rank is None or state.axis != -(state.rank - 1) or state.rank < 3:
            raise _Stop(f"{node.op_type} '{_label(node)}' needs channels on axis 1 of an NCHW tensor")

    def _only_first_output(self, node: onnx.NodeProto) -> None:
        for out in self.index.outputs_of(node)[1:]:
            if out is not None and out.uses:
                raise _Stop(f"the extra output '{out.name}' of {node.op_type} '{_label(node)}' is used")

    def _unary(self, g, node, slot, state):
        if slot != 0:
            raise _Stop(f"it reaches {node.op_type} '{_label(node)}' in input {slot}")
        if node.op_type == "Cast" and _attr(node, "to", 0) not in FLOAT_TYPES:
            raise _Stop(f"Cast '{_label(node)}' to a non-float type")
        for s in range(1, len(node.input)):  # Clip min/max, Dropout ratio/training_mode: scalars only
            if node.input[s]:
                v = _constant(self.index, node, s)
                if v is None or int(np.prod(v.tensor.dims)) != 1:
                    raise _Stop(f"input {s} of {node.op_type} '{_label(node)}' is not a constant scalar")
        self._only_first_output(node)
        g.chain.append(node.op_type)
        return [(node.output[0], state)]

    def _binary(self, g, node, slot, state, states):
        other_slot = 1 - slot
        if node.op_type == "PRelu" and slot != 0:
            raise _Stop(f"it reaches PRelu '{_label(node)}' as the slope")
        other = node.input[other_slot]
        v = _constant(self.index, node, other_slot)
        if v is not None:
            self._per_channel(g, node, other_slot, state, exact_1d=False)
            g.chain.append(node.op_type)
            return [(node.output[0], state)]
        if other in states:
            if states[other] != state:
                raise _Stop(f"{node.op_type} '{_label(node)}' combines two channel layouts")
            g.chain.append(node.op_type)
            return [(node.output[0], state)]
        return None  # maybe the other operand joins the group later (Gelu's x * (1 + erf(x)))

    def _per_channel(self, g: UnitGroup, node: onnx.NodeProto, slot: int, state: _State, *, exact_1d: bool) -> None:
        v = _constant(self.index, node, slot)
        if v is None:
            raise _Stop(f"input {slot} of {node.op_type} '{_label(node)}' is not a constant")
        dims = tuple(v.tensor.dims)
        if exact_1d:
            if dims != (g.units,):
                raise _Stop(f"'{v.name}' of {node.op_type} '{_label(node)}' has shape {list(dims)}, "
                            f"expected [{g.units}]")
            axis = 0
        else:
            if state.rank is not None and len(dims) > state.rank:
                raise _Stop(f"the constant '{v.name}' of {node.op_type} '{_label(node)}' broadcasts to a "
                            "higher rank")
            pos = len(dims) + state.axis
            size = dims[pos] if pos >= 0 else 1
            if size == 1:
                return  # the same value for every unit: nothing to cut
            if size != g.units:
                raise _Stop(f"the constant '{v.name}' of {node.op_type} '{_label(node)}' has {size} entries on "
                            f"the channel axis, expected {g.units} or 1")
            axis = pos
        problem = _const_problem(v, self.include_overridable)
        if problem:
            raise _Stop(f"per-channel constant {problem}")
        if state.flat:
            raise _Stop(f"per-unit constant '{v.name}' after Flatten")
        g.shrinks.append(Shrink(v.name, axis, "chain"))

    def _reshape(self, g: UnitGroup, node: onnx.NodeProto, slot: int, state: _State):
        """A Reshape that keeps the channels as the last axis, its last target dimension a constant equal
        to the unit count (GPT-2's Conv1D: [N*T, C] -> [N, T, C] around a Gemm), directly or as the last
        1-element input of a Concat: that constant is cut too (role "shape").  Anything else (a split
        into attention heads) stops the group."""
        why = _Stop(_WHY_NOT["Reshape"].format(name=_label(node)))
        if slot != 0 or state.axis != -1 or state.flat or len(node.input) < 2:
            raise why
        if not _attr(node, "allowzero", 0) and not self._no_copied_dims(node):  # allowzero=1 copies no dim
            raise why
        const, shared = self._last_dim(node)
        if const is not None:
            count = int(numpy_helper.to_array(const.tensor).reshape(-1)[-1])
            if count != g.units:
                raise why
            g.shrinks.append(Shrink(const.name, -1, "shape", own=node.output[0] if shared else None))
        elif not self._last_dim_is_own(node):
            shared = self._shared_target(node, g.units)
            raise _Stop(shared) if shared else why
        g.chain.append("Reshape")
        return [(node.output[0], _State(axis=-1, rank=self._target_rank(node)))]

    def _target(self, node: onnx.NodeProto) -> Value | None:
        """A Reshape's target shape, seen through one Cast read by it alone (tf2onnx casts an int32
        Concat of shape parts to int64)."""
        v = self.index.input_value(node, 1)
        while v is not None and v.kind == "node_output" and v.node.op_type == "Cast" and len(v.uses) == 1 \
                and v.node.domain in ("", "ai.onnx"):
            v = self.index.input_value(v.node, 0)
        return v

    def _target_rank(self, node: onnx.NodeProto) -> int | None:
        """The rank a Reshape produces, when its shape is a constant vector or a Concat of parts of
        known length (1-D constants, Unsqueeze of a Gather of one index, a Gather of a 1-D constant
        index: tf2onnx's ``Gather(Shape(x), [0, 1])``), else None."""
        v = self._target(node)
        if v is not None and v.kind in ("initializer", "constant") and len(v.tensor.dims) == 1:
            return int(v.tensor.dims[0])
        src = v.node if v is not None and v.kind == "node_output" else None
        if src is None or src.op_type != "Concat":
            return None
        rank = 0
        for i in range(len(src.input)):
            part = self.index.input_value(src, i)
            if part is None:
                return None
            if part.kind in ("initializer", "constant"):
                if len(part.tensor.dims) != 1:
                    return None
                rank += int(part.tensor.dims[0])
                continue
            u = part.node if part.kind == "node_output" else None
            if u is not None and u.op_type == "Gather":  # a Gather of a 1-D constant index: its length
                index = self.index.input_value(u, 1)
                if index is None or index.kind not in ("initializer", "constant") or len(index.tensor.dims) != 1:
                    return None
                rank += int(index.tensor.dims[0])
                continue
            gather = self.index.input_value(u, 0) if u is not None and u.op_type == "Unsqueeze" else None
            gnode = gather.node if gather is not None and gather.kind == "node_output" else None
            index = self.index.input_value(gnode, 1) if gnode is not None and gnode.op_type == "Gather" else None
            if index is None or index.kind not in ("initializer", "constant") or list(index.tensor.dims):
                return None  # one element only when a scalar index is gathered and unsqueezed
            rank += 1
        return rank

    def _feeds_own_reshape(self, node: onnx.NodeProto, name: str) -> bool:
        """Whether this Shape of ``name`` is read only as ``name``'s own last dimension for Reshapes of
        ``name`` itself: each read is ``Slice(shape, -1, end)`` or ``Gather(shape, -1)``, then
        Squeeze/Unsqueeze/Cast, then the last part of a Concat that only a Reshape of ``name`` reads
        as its target (GPT-2's ``view(-1, x.size(-1))``): that size changes with the units, consistently."""
        out = self.outputs.get(node.output[0])
        if out is None or not out.uses:
            return False
        for use in out.uses:
            pick = use.node
            if pick is None or use.slot != 0 or not self._picks_last(pick):
                return False
            cur = self.outputs.get(pick.output[0])
            while cur is not None and len(cur.uses) == 1 and cur.uses[0].node is not None \
                    and cur.uses[0].node.op_type in ("Squeeze", "Unsqueeze", "Cast") and cur.uses[0].slot == 0:
                cur = self.outputs.get(cur.uses[0].node.output[0])
            if cur is None or len(cur.uses) != 1 or cur.uses[0].node is None:
                return False
            concat = cur.uses[0].node
            if concat.op_type != "Concat" or cur.uses[0].slot != len(concat.input) - 1:
                return False
            shape = self.outputs.get(concat.output[0])
            if shape is None or len(shape.uses) != 1 or shape.uses[0].node is None:
                return False
            reshape = shape.uses[0].node
            if reshape.op_type != "Reshape" or shape.uses[0].slot != 1 or reshape.input[0] != name:
                return False
        return True

    def _picks_last(self, pick: onnx.NodeProto) -> bool:
        """Whether ``pick`` (reading a shape vector) is ``Slice(-1, end)`` or ``Gather(-1)``."""
        if pick.domain not in ("", "ai.onnx") or pick.op_type not in ("Slice", "Gather"):
            return False
        consts = [self.index.input_value(pick, i) for i in range(1, len(pick.input))]
        if not consts or any(c is None or c.kind not in ("initializer", "constant") for c in consts):
            return False
        vals = [numpy_helper.to_array(c.tensor).reshape(-1).tolist() for c in consts]
        if pick.op_type == "Gather":
            return vals[0] == [-1] and _attr(pick, "axis", 0) == 0
        return len(vals) >= 2 and vals[0] == [-1] and vals[1][0] >= 2 ** 31 and (len(vals) < 3 or vals[2] == [0]) \
            and (len(vals) < 4 or vals[3] == [1])

    def _last_dim_is_own(self, node: onnx.NodeProto) -> bool:
        """Whether a Reshape's last target dimension is its input's own last dimension, read at run time:
        the last part of a Concat that is ``Slice(Shape(x), -1, end)`` or ``Gather(Shape(x), -1)`` (through
        Squeeze/Unsqueeze/Cast), ``x`` being the Reshape's input."""
        v = self._target(node)
        src = v.node if v is not None and v.kind == "node_output" else None
        if src is None or src.op_type != "Concat" or not src.input:
            return False
        part = self.index.input_value(src, len(src.input) - 1)
        while part is not None and part.kind == "node_output" and part.node.op_type in ("Squeeze", "Unsqueeze", "Cast"):
            part = self.index.input_value(part.node, 0)
        pick = part.node if part is not None and part.kind == "node_output" else None
        if pick is None or pick.op_type not in ("Slice", "Gather"):
            return False
        shape = self.index.input_value(pick, 0)
        if shape is None or shape.kind != "node_output" or shape.node.op_type != "Shape" \
                or shape.node.input[0] != node.input[0] or any(a.name in ("start", "end") for a in shape.node.attribute):
            return False
        return self._picks_last(pick)

    def _leading_dims_only(self, node: onnx.NodeProto, state: _State) -> bool:
        """Whether every read of this Shape's output is a Gather (after integer Casts) of constant
        indices, scalar or 1-D, none of them the channel axis (the last, of a known rank)."""
        if state.axis != -1 or state.rank is None or any(a.name in ("start", "end") for a in node.attribute):
            return False
        out = self.index.outputs_of(node)[0]
        if out is None or not out.uses:
            return out is not None
        pending = list(out.uses)
        while pending:
            use = pending.pop()
            if use.node is not None and use.op == ("", "Cast") and use.slot == 0:  # tf2onnx: Cast to int32
                cast_out = self.index.outputs_of(use.node)[0]
                if cast_out is None or not cast_out.uses:
                    return False
                pending.extend(cast_out.uses)
                continue
            if use.node is None or use.op != ("", "Gather") or use.slot != 0 or _attr(use.node, "axis", 0) != 0:
                return False
            index = self.index.input_value(use.node, 1)
            if index is None or index.kind not in ("initializer", "constant") or len(index.tensor.dims) > 1:
                return False
            for i in numpy_helper.to_array(index.tensor).reshape(-1).tolist():
                if (i % state.rank if -state.rank <= i < state.rank else None) in (None, state.rank - 1):
                    return False
        return True

    def _no_copied_dims(self, node: onnx.NodeProto) -> bool:
        """Whether no constant entry of a Reshape's target shape is 0 (a copy of the input's dimension
        at that index, which may be the units'): with ``allowzero=0`` it would move with the removal."""
        v = self._target(node)
        parts = [v]
        if v is not None and v.kind == "node_output" and v.node.op_type == "Concat":
            parts = [self.index.input_value(v.node, i) for i in range(len(v.node.input))]
        for part in parts:
            if part is not None and part.kind in ("initializer", "constant") \
                    and (numpy_helper.to_array(part.tensor) == 0).any():
                return False
        return True

    def _last_dim(self, node: onnx.NodeProto) -> tuple[Value | None, bool]:
        """The constant holding a Reshape's last target dimension (or None), and whether it is shared:
        read by other nodes too, directly or through a Concat other nodes read.  A shared one can be
        given a private copy only when the Reshape reads the constant or the Concat directly."""
        v = self._target(node)
        if v is None:
            return None, False
        direct = v is self.index.input_value(node, 1)
        if v.kind in ("initializer", "constant"):
            ok = v.tensor.data_type in _SHAPE_TYPES and len(v.tensor.dims) == 1 \
                and not _const_problem(v, self.include_overridable, need_float=False)
            shared = len(v.uses) != 1
            return (v if ok and (direct or not shared) else None), shared
        src = v.node if v.kind == "node_output" else None
        if src is None or src.op_type != "Concat" or src.domain not in ("", "ai.onnx") or not src.input:
            return None, False
        last = self.index.input_value(src, len(src.input) - 1)
        if last is None or last.kind not in ("initializer", "constant") \
                or last.tensor.data_type not in _SHAPE_TYPES or list(last.tensor.dims) != [1] \
                or _const_problem(last, self.include_overridable, need_float=False) \
                or list(src.input).count(last.name) != 1:
            return None, False
        shared = len(v.uses) != 1 or len(last.uses) != 1
        return (last if direct or not shared else None), shared

    def _shared_target(self, node: onnx.NodeProto, units: int) -> str | None:
        """Why a Reshape that keeps the units as its last axis cannot be cut: its target's last entry
        is the unit count but the target (or that entry) is read elsewhere too.  None otherwise."""
        v = self._target(node)
        if v is None:
            return None
        last = v
        if v.kind == "node_output" and v.node.op_type == "Concat" and v.node.input:
            last = self.index.input_value(v.node, len(v.node.input) - 1)
        if last is None or last.kind not in ("initializer", "constant") or last.tensor is None \
                or last.tensor.data_type not in _SHAPE_TYPES:
            return None
        entries = numpy_helper.to_array(last.tensor).reshape(-1)
        if not entries.size or int(entries[-1]) != units:
            return None
        path = {id(node)}  # the nodes from the target to the Reshape (the Concat, Casts)
        cur = self.index.input_value(node, 1)
        while cur is not None and cur.kind == "node_output" and cur.name != v.name:
            path.add(id(cur.node))
            cur = self.index.input_value(cur.node, 0)
        if last is not v:
            path.add(id(v.node))
        other = next((u for held in (v, last) for u in held.uses if u.node is None or id(u.node) not in path), None)
        if other is None:
            return None
        return (f"it reaches Reshape '{_label(node)}', which keeps the units as the last axis, but its target "
                f"shape's unit count '{last.name}' is also read by {other.describe()}: cutting it would change "
                "that too")

    def _flatten(self, g: UnitGroup, node: onnx.NodeProto, state: _State):
        if _attr(node, "axis", 1) != 1 or state.rank is None or state.axis != -(state.rank - 1):
            raise _Stop(_WHY_NOT["Flatten"].format(name=_label(node)))
        g.chain.append("Flatten")
        return [(node.output[0], _State(axis=-1, rank=2, flat=state.rank > 2))]

    def _consumer(self, g: UnitGroup, node: onnx.NodeProto, slot: int, name: str, state: _State) -> None:
        weight, layout = _layer_weight(node, self.index)
        op = node.op_type
        if weight is None:
            raise _Stop(f"it reaches {op} '{_label(node)}' whose other operand is not a constant weight")
        if slot != 0:
            raise _Stop(f"it reaches {op} '{_label(node)}' as its weight operand")
        if op == "Gemm" and _attr(node, "transA", 0):
            raise _Stop(f"it reaches Gemm '{_label(node)}' with transA=1")
        if op == "Conv":
            if _attr(node, "group", 1) != 1:
                raise _Stop(f"it reaches the grouped Conv '{_label(node)}'")
            self._need_axis1(state, node)
        elif state.axis != -1:
            raise _Stop(f"its channels are not the last axis where {op} '{_label(node)}' reads them")
        problem = _const_problem(weight, self.include_overridable)
        if problem:
            raise _Stop(f"consumer weight {problem}")
        if len(weight.uses) != 1:
            raise _Stop(f"the consumer weight '{weight.name}' is shared by {len(weight.uses)} ops")
        width = weight.tensor.dims[_in_axis(layout)]
        block = 1
        if state.flat:
            if width % g.units:
                raise _Stop(f"after Flatten, {op} '{_label(node)}' reads {width} features, not a multiple of "
                            f"{g.units} channels")
            block = width // g.units
        elif width != g.units:
            raise _Stop(f"{op} '{_label(node)}' reads {width} features, expected {g.units}")
        bias, bias_axis = self._consumer_bias(node, layout)
        g.consumers.append(Consumer(weight.name, node, layout, name, block, bias, bias_axis))
        g.shrinks.append(Shrink(weight.name, _in_axis(layout), "consumer", block))

    def _consumer_bias(self, node: onnx.NodeProto, layout: str) -> tuple[str | None, int]:
        """The bias the consumer's output gets (re-fitted with the consumer), when it is its own."""
        if node.op_type in ("Gemm", "Conv"):
            if node.op_type == "Gemm" and _attr(node, "beta", 1.0) != 1.0:  # beta x C: C is not the fitted bias
                return None, -1
            v = _constant(self.index, node, 2)
            if v is None or len(v.uses) != 1 or _const_problem(v, self.include_overridable):
                return None, -1
            dims = tuple(v.tensor.dims)
            return (v.name, len(dims) - 1) if dims and (node.op_type == "Gemm" or len(dims) == 1) else (None, -1)
        out = self.index.outputs_of(node)[0]
        if out is None or len(out.uses) != 1 or out.uses[0].node is None or out.uses[0].op != ("", "Add"):
            return None, -1
        add = out.uses[0].node
        v = _constant(self.index, add, 1 - out.uses[0].slot)
        if v is None or len(v.uses) != 1 or _const_problem(v, self.include_overridable):
            return None, -1
        dims = tuple(v.tensor.dims)
        if not dims or any(d != 1 for d in dims[:-1]):
            return None, -1
        return v.name, len(dims) - 1

    def _check_shared(self, g: UnitGroup) -> None:
        """Per-channel constants cut for this group must not be read anywhere else."""
        inside = {id(g.node)} | {id(c.node) for c in g.consumers}
        chain_nodes = set()
        for name in g.channel_tensors:
            for use in self._value(name).uses:
                if use.node is not None:
                    chain_nodes.add(id(use.node))
        inside |= chain_nodes
        for s in g.shrinks:
            if s.role != "chain":
                continue
            v = self.constants[s.tensor]
            outside = [u for u in v.uses if u.node is None or id(u.node) not in inside]
            if outside:
                raise _Stop(f"the per-channel constant '{s.tensor}' is also read by {outside[0].describe()}")


def find_groups(model: onnx.ModelProto, index: GraphIndex | None = None, *,
                include_overridable: bool = False) -> tuple[list[UnitGroup], list[SkippedGroup]]:
    """Every producer layer of the main graph as a group, or skipped with the reason."""
    index = index or GraphIndex(model)
    walker = _Walker(index, include_overridable)
    groups: list[UnitGroup] = []
    skipped: list[SkippedGroup] = []
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        weight, layout = _layer_weight(node, index)
        if weight is None or any(weight.name in g.co_producers for g in groups):
            continue  # (the other half of a gated pair is cut with its group)
        units = weight.tensor.dims[_out_axis(layout)]
        try:
            groups.append(walker.group(node, weight, layout))
        except _Stop as e:
            skipped.append(SkippedGroup(weight.name, node.op_type, int(units), str(e)))
    _check_overlaps(groups, skipped)
    skipped += _unreached_layers(model, index)
    return groups, skipped


_DECODING = ("Cast", "DequantizeLinear", "Transpose", "Reshape", "Identity")  # ops that compute a weight


def _units(op: str, node: onnx.NodeProto, dims) -> int:
    """Output units of a MatMul/Gemm/Conv whose weight has ``dims`` (0 when unknown)."""
    if len(dims) < 2:
        return 0
    return int(dims[-1]) if op == "MatMul" else int(dims[_out_axis(_layout(node))])


def _unreached_layers(model: onnx.ModelProto, index: GraphIndex) -> list[SkippedGroup]:
    """Layers the search does not take, so the report still says why: a weight computed from a
    constant (Cast of a bfloat16 weight, DequantizeLinear, ...), and layers inside subgraphs."""
    out: list[SkippedGroup] = []
    for node in model.graph.node:
        quantized = _quantized_layer(node, index) or _other_layer(node, index)
        if quantized is not None:
            out.append(quantized)
            continue
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm", "Conv") \
                or _layer_weight(node, index)[0] is not None or len(node.input) < 2:
            continue
        v = index.input_value(node, 1)
        src = v.node if v is not None and v.kind == "node_output" else None
        if src is None or src.op_type not in _DECODING or not src.input:
            continue
        const, dims = _decoded_from(src, index)
        if const is None:
            continue
        out.append(SkippedGroup(const.name, node.op_type, _units(node.op_type, node, dims),
                                f"its weight reaches {node.op_type} '{_label(node)}' through {src.op_type} "
                                f"'{_label(src)}': only weights the layer reads directly are cut"))
    for v in index.values:
        if v.graph == "main" or v.kind not in ("initializer", "constant") or v.tensor is None:
            continue
        for use in v.uses:
            if use.node is not None and use.slot == 1 and use.node.op_type in ("MatMul", "Gemm", "Conv") \
                    and use.node.domain in ("", "ai.onnx"):
                out.append(SkippedGroup(v.name, use.node.op_type, _units(use.node.op_type, use.node, v.tensor.dims),
                                        f"it is inside a subgraph ({v.graph}): only the top-level graph is searched"))
                break
    return out


def _decoded_from(src: onnx.NodeProto, index: GraphIndex, depth: int = 4):
    """The constant a chain of decoding ops (``_DECODING``, and the QuantizeLinear of a
    Q -> DQ fake-quantization) computes a weight from, with the dims the layer sees (``[]`` when
    a Reshape hides them), or ``(None, [])``."""
    chain = [src]
    while True:
        v = index.input_value(chain[-1], 0)
        if v is not None and v.kind in ("initializer", "constant") and v.tensor is not None:
            break
        prev = v.node if v is not None and v.kind == "node_output" else None
        if prev is None or prev.op_type not in _DECODING + ("QuantizeLinear",) or not prev.input \
                or len(chain) >= depth:
            return None, []
        chain.append(prev)
    dims = list(v.tensor.dims)
    for node in reversed(chain):
        if node.op_type == "Transpose":
            perm = _attr(node, "perm", list(range(len(dims)))[::-1])
            dims = [dims[p] for p in perm] if sorted(perm) == list(range(len(dims))) else []
        elif node.op_type == "Reshape":
            dims = []  # the shape the layer sees is not known here: no unit count
    return v, dims


#: quantized layers the neuron search does not cut: op -> the slot of their weight
_QUANTIZED_LAYERS = {
    ("", "MatMulInteger"): 1, ("", "QLinearMatMul"): 3, ("", "QLinearConv"): 3, ("", "ConvInteger"): 1,
    ("com.microsoft", "QGemm"): 3, ("com.microsoft", "MatMulNBits"): 1, ("com.microsoft", "DynamicQuantizeMatMul"): 1,
    ("com.microsoft", "MatMulIntegerToFloat"): 1, ("com.microsoft", "QAttention"): 1,
}


def _other_layer(node: onnx.NodeProto, index: GraphIndex) -> SkippedGroup | None:
    """A float layer with a constant weight that the search does not cut, with why: MatMul with the
    weight on the left or batched (3-D+), Einsum, ConvTranspose and the recurrent layers."""
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
        return None
    op = node.op_type
    const = [index.input_value(node, i) for i in range(len(node.input))]
    const = [(i, v) for i, v in enumerate(const)
             if v is not None and v.kind in ("initializer", "constant") and v.tensor is not None]
    label = f"{op} '{_label(node)}'"
    if op == "MatMul" and const:
        slot, v = const[0]
        dims = list(v.tensor.dims)
        if slot == 0 and len(const) == 1:
            why = f"its weight is the left operand of {label} (W @ x): only x @ W layers are cut"
        elif slot == 1 and len(dims) > 2:
            why = f"a {len(dims)}-D (batched) weight of {label}: only 2-D weights are cut"
        else:
            return None
        units = dims[-2] if slot == 0 and len(dims) >= 2 else (dims[-1] if dims else 0)  # W @ x: W's rows
        return SkippedGroup(v.name, op, int(units), why)
    if op in ("Einsum", "ConvTranspose", "LSTM", "GRU", "RNN") and const:
        slot, v = next(((i, v) for i, v in const if op == "Einsum" or i == 1), (None, None))
        if v is None:
            return None
        units = int(_attr(node, "hidden_size", 0)) if op in ("LSTM", "GRU", "RNN") else \
            int(v.tensor.dims[1] * _attr(node, "group", 1)) if op == "ConvTranspose" and len(v.tensor.dims) > 1 else 0
        why = {"Einsum": f"{label}: only MatMul, Gemm and Conv layers are cut",
               "ConvTranspose": f"{label}: only MatMul, Gemm and Conv layers are cut"}.get(
            op, f"the recurrent layer {label}: its hidden units feed back into it, so they are not cut")
        return SkippedGroup(v.name, op, units, why)
    return None


def _quantized_layer(node: onnx.NodeProto, index: GraphIndex) -> SkippedGroup | None:
    domain = "" if node.domain in ("", "ai.onnx") else node.domain
    slot = _QUANTIZED_LAYERS.get((domain, node.op_type))
    if slot is None or len(node.input) <= slot:
        return None
    v = index.input_value(node, slot)
    if v is None or v.kind not in ("initializer", "constant") or v.tensor is None:
        return None
    dims = list(v.tensor.dims)
    if node.op_type == "MatMulNBits":
        units = int(_attr(node, "N", 0))
    elif node.op_type in ("QLinearConv", "ConvInteger") or (node.op_type == "QGemm" and _attr(node, "transB", 0)):
        units = int(dims[0]) if dims else 0
    else:
        units = int(dims[-1]) if dims else 0
    label = f"{domain}.{node.op_type}" if domain else node.op_type
    return SkippedGroup(v.name, label, units, f"a quantized layer ({label} '{_label(node)}'): structured removal "
                                              "cuts float weights only (prune the float model, then quantize it)")


def _check_overlaps(groups: list[UnitGroup], skipped: list[SkippedGroup]) -> None:
    """A tensor may be cut by several groups only along different axes (e.g. a middle layer's weight)."""
    seen: dict[tuple[str, int, str | None], str] = {}  # (a private copy of a shared shape is its own tensor)
    for g in list(groups):
        clash = next((seen[(s.tensor, s.axis, s.own)] for s in g.shrinks if (s.tensor, s.axis, s.own) in seen), None)
        if clash is not None:
            groups.remove(g)
            skipped.append(SkippedGroup(g.producer, g.producer_op, g.units,
                                        f"it would cut a tensor that the group of '{clash}' cuts too"))
            continue
        for s in g.shrinks:
            seen[(s.tensor, s.axis, s.own)] = g.producer


__all__ = ["UnitGroup", "SkippedGroup", "Shrink", "Consumer", "find_groups"]
