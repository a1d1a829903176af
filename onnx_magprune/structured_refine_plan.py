"""Which removal groups ``--refine-epochs`` can refine, and the pieces it needs (graph side).

:func:`refine_plan` returns a :class:`RefinePlan` for a group of the form
``x -> MatMul/Gemm(W_p) [-> Add(b_p)] -> elementwise chain -> MatMul/Gemm(W_c) [-> bias]``,
or the reason it cannot be refined (a check that says why, rather than raising).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .structured import UnitGroup
from .structured_refine import CHAIN_OPS, ChainNode
from .structured_rewrite import tensor_protos

_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16)


@dataclass(frozen=True)
class RefinePlan:
    x: str  # the producer's input activation
    producer: str  # its weight, 2-D
    unit_axis: int  # the weight's axis of units (1: [in, units]; 0: Gemm transB [units, in])
    producer_bias: str | None
    start: str  # the producer's output after its bias: where the chain starts
    chain: tuple[ChainNode, ...]
    constants: Mapping[str, np.ndarray]  # the constants the chain reads, by name (float32)
    end: str  # the consumer's input


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """:func:`~onnx_magprune.structured_rewrite.tensor_protos`, plus Constant nodes written with
    ``value_float`` / ``value_floats`` (read only here: the rewrite never cuts those)."""
    out = tensor_protos(model)
    for n in model.graph.node:
        if n.op_type == "Constant" and n.output and n.output[0] not in out:
            for a in n.attribute:
                if a.name in ("value_float", "value_floats"):
                    v = np.asarray(helper.get_attribute_value(a), dtype=np.float32)
                    out[n.output[0]] = numpy_helper.from_array(v, n.output[0])
    return out


def refine_plan(proto: onnx.ModelProto, g: UnitGroup) -> RefinePlan | str:
    """The plan for refining ``g``, or why it cannot be refined."""
    if g.kind != "units":
        return "only neuron/channel groups are refined, not attention heads"
    if len(g.consumers) != 1 or g.co_producers:
        return "it has several consumers or a gated producer pair"
    c = g.consumers[0]
    if c.layout not in ("matmul_b", "gemm_b", "gemm_bt"):
        return f"its consumer is a {c.node.op_type} ({c.layout}); only MatMul/Gemm consumers are refined"
    if c.block != 1:
        return f"its consumer reads each unit as a block of {c.block} inputs (after Flatten)"
    if c.node.op_type == "Gemm" and (_attr(c.node, "transA", 0) or _attr(c.node, "alpha", 1.0) != 1.0):
        return "its consumer Gemm has transA or alpha != 1"
    graph = proto.graph
    consts = _constants(proto)
    p = g.node
    if p.op_type not in ("MatMul", "Gemm"):
        return f"its producer is a {p.op_type}; only MatMul/Gemm producers are refined"
    if len(p.input) < 2 or p.input[1] != g.producer:
        return "its producer does not read its weight as the second input"
    w = consts.get(g.producer)
    if w is None or len(w.dims) != 2 or w.data_type not in _FLOATS:
        return "its producer weight is not a 2-D float constant"
    unit_axis = 1
    if p.op_type == "Gemm":
        if _attr(p, "transA", 0) or _attr(p, "alpha", 1.0) != 1.0 or _attr(p, "beta", 1.0) != 1.0:
            return "its producer Gemm has transA, alpha or beta != 1"
        unit_axis = 0 if _attr(p, "transB", 0) else 1
        has_c = len(p.input) > 2 and p.input[2]
        if has_c and p.input[2] not in {s.tensor for s in g.shrinks if s.role == "producer bias"}:
            return "its producer Gemm adds a C that is not one value per unit"
    users: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    bias_names = [s.tensor for s in g.shrinks if s.role == "producer bias"]
    start, bias = p.output[0], None
    nxt = users.get(start, [])
    if not bias_names and len(nxt) == 1 and nxt[0].op_type == "Add":  # MatMul -> Add(bias): the bias is trained
        other = [i for i in nxt[0].input if i != start]
        t = consts.get(other[0]) if len(other) == 1 else None
        if t is not None and int(np.prod(t.dims)) == g.units and t.dims and t.dims[-1] == g.units:
            bias_names = other
    if bias_names:
        bias = bias_names[0]
        if p.op_type == "Gemm" and len(p.input) > 2 and p.input[2] == bias:
            pass  # z = x W + C
        else:
            nxt = users.get(start, [])
            if len(nxt) != 1 or nxt[0].op_type != "Add" or bias not in nxt[0].input:
                return "its producer bias is not added right after the producer"
            start = nxt[0].output[0]
        b = consts.get(bias)
        if b is None or int(np.prod(b.dims)) != g.units:
            return "its producer bias is not one value per unit"
    end = c.input_name
    if c.node.input[0] != end:
        return "its consumer does not read the units as its first input"
    # the chain: nodes on a path from start to end
    forward, frontier = set(), [start]
    producers = {o: n for n in graph.node for o in n.output}
    while frontier:
        name = frontier.pop()
        for n in users.get(name, []):
            if id(n) not in forward and n is not c.node:
                forward.add(id(n))
                frontier.extend(n.output)
    backward, frontier = set(), [end]
    while frontier:
        name = frontier.pop()
        n = producers.get(name)
        if n is None or id(n) in backward or name == start:
            continue
        backward.add(id(n))
        frontier.extend(n.input)
    on_path = [n for n in graph.node if id(n) in forward and id(n) in backward]
    if end != start and not on_path:
        return "no elementwise chain joins its producer and consumer"
    made = {start} | {o for n in on_path for o in n.output}
    nodes, needed = [], []
    for n in on_path:
        if n.op_type not in CHAIN_OPS or n.domain not in ("", "ai.onnx"):
            return f"its chain holds a {n.op_type}, which refinement cannot differentiate"
        if n.op_type == "Cast" and _attr(n, "to", 0) not in _FLOATS:
            return "its chain casts to a non-float type"
        if n.op_type == "Pow" and len(n.input) > 1 and n.input[1] in made:
            return "its chain raises a constant to the power of the units (Pow with a varying exponent)"
        for i in n.input:
            if i in made:
                continue
            t = consts.get(i)
            if t is None:
                return f"its chain reads '{i}', which is neither a constant nor on the chain"
            size = int(np.prod(t.dims))
            if size != 1 and (not t.dims or t.dims[-1] != g.units or size != g.units):
                return f"its chain constant '{i}' is neither a scalar nor one value per unit"
            needed.append(i)
        for o in n.output:
            if o != end and any(u not in on_path for u in users.get(o, [])):
                return f"its chain value '{o}' is also read outside the chain"
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        nodes.append(ChainNode(n.op_type, tuple(n.input), n.output[0], attrs))
    constants = {k: numpy_helper.to_array(consts[k]).astype(np.float32) for k in dict.fromkeys(needed)}
    return RefinePlan(p.input[0], g.producer, unit_axis, bias, start, tuple(nodes), constants, end)


__all__ = ["RefinePlan", "refine_plan"]
