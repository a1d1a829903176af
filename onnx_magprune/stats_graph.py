"""The graph side of the statistics run (no numpy maths): the statistics model's proto,
which weights a tensor depends on, the order of sequential stages, and the residual streams
layers add into."""

from __future__ import annotations

from typing import Iterable, Mapping, NamedTuple

import onnx

from .layer_view import LinearView


def overridable_proto(model: onnx.ModelProto, fed: Iterable[str]) -> onnx.ModelProto:
    """A copy of ``model`` whose ``fed`` weights (top-level initializers or Constant nodes) are
    overridable initializers: graph inputs that keep their values as defaults, so one session
    runs the model as it is and with any subset of those weights replaced in the feeds."""
    return stats_proto(model, fed, (), defaults=True)


class Stream(NamedTuple):
    """The residual stream a layer adds into: ``name`` is the stream's tensor, ``side`` the
    layer's own input of that Add (the same shape when nothing broadcasts)."""

    name: str
    side: str


def residual_inputs(model: onnx.ModelProto, views: Mapping[str, LinearView]) -> dict[str, Stream]:
    """For each weight whose layer output (after an optional Add of a constant bias, and any
    reshapes) is added to another activation, that activation: the residual stream the layer
    writes into.  Only top-level MatMul (weight as B) and Gemm (no transA, alpha 1) layers whose
    output feeds nothing else qualify; that the stream's rows are the layer's rows (same shape
    as the layer's side of the Add) is checked on the data
    (:class:`~onnx_magprune.layer_stats.StatsModel`).  See also :func:`settled`."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in set(node.input) | _captured(node):  # subgraph reads count as consumers too
            if name:
                consumers.setdefault(name, []).append(node)
    constants = _constant_tensors(graph)
    outputs = {o.name for o in graph.output}
    top = {out for n in graph.node for out in n.output if out}  # outputs of top-level nodes
    out: dict[str, Stream] = {}
    for name, view in views.items():
        if view.layout not in _ROW_LAYOUTS or view.trans_a or view.node.output[0] not in top:
            continue
        alpha = next((a.f for a in view.node.attribute if a.name == "alpha"), 1.0)
        if view.op == "Gemm" and alpha != 1.0:  # the layer adds alpha x its product to the stream
            continue
        y, biased = view.node.output[0], False
        for _step in range(8):
            nodes = consumers.get(y, [])
            if y in outputs or len(nodes) != 1:
                break
            node = nodes[0]
            if node.op_type in _RESHAPES and node.input[0] == y:
                y = node.output[0]
                continue
            if node.op_type != "Add" or len(node.input) != 2:
                break
            other = node.input[1] if node.input[0] == y else node.input[0]
            if other == y:
                break
            if other in constants:
                if biased:
                    break
                y, biased = node.output[0], True  # the bias
                continue
            out[name] = Stream(other, y)
            break
    return out


_ROW_LAYOUTS = ("matmul_b", "gemm_b", "gemm_bt")  # layers whose output rows are their input rows
_RESHAPES = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"}  # row order kept (checked on the data)


_RANDOM_OPS = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Initializers, Constant outputs, and outputs of nodes that read only those (e.g. the
    Identity of a shared bias PyTorch writes for parameters with equal values); nodes in order."""
    constants = {t.name for t in graph.initializer}  # those also listed as inputs too: calibration never feeds them
    for node in graph.node:
        if node.op_type == "Constant" or (
                node.input and all(i and i in constants for i in node.input) and node.op_type not in _RANDOM_OPS
                and not any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)):
            constants.update(o for o in node.output if o)
    return constants


def settled(residuals: Mapping[str, Stream], deps: Mapping[str, set[str]],
            finished: Iterable[str]) -> dict[str, Stream]:
    """The entries of ``residuals`` whose stream depends only on weights in ``finished``: a stream
    that still depends on a layer fitted at the same time (a parallel branch) or later would have
    its error corrected twice.  ``deps`` is :func:`weight_dependencies` over the calibrated weights."""
    done = set(finished)
    return {k: r for k, r in residuals.items() if deps.get(r.name, set()) <= done}


def stats_proto(model: onnx.ModelProto, fed: Iterable[str], views: Iterable[LinearView], *,
                 defaults: bool = False, extra_outputs: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of ``model`` whose ``fed`` weights are graph inputs and whose layer inputs are graph outputs.
    With ``defaults`` the weights keep their values as initializers (overridable initializers)."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    graph = proto.graph
    fed = set(fed)
    declared = {i.name for i in graph.input}
    keep = []
    for t in graph.initializer:
        if t.name in fed:
            if t.name not in declared:
                graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            if defaults:
                keep.append(t)
        else:
            keep.append(t)
    nodes = []
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in fed:
            t = next(a.t for a in node.attribute if a.name == "value")
            graph.input.append(onnx.helper.make_tensor_value_info(node.output[0], t.data_type, list(t.dims)))
            if defaults:
                init = onnx.TensorProto()
                init.CopyFrom(t)
                init.name = node.output[0]
                keep.append(init)
        else:
            nodes.append(node)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del graph.node[:]
    graph.node.extend(nodes)
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    for name in [v.input_name for v in views] + list(extra_outputs):
        if name not in outputs and name not in inputs:
            graph.output.append(onnx.ValueInfoProto(name=name))
            outputs.add(name)
    return proto


def weight_dependencies(model: onnx.ModelProto, weights: Iterable[str]) -> dict[str, set[str]]:
    """For every top-level tensor, the ``weights`` it depends on (through the graph, with
    subgraph captures counted); a weight depends on itself."""
    weights = set(weights)
    deps: dict[str, set[str]] = {name: {name} for name in weights}
    for node in _topo_order(model.graph):
        reads = set(node.input) | _captured(node)
        acc: set[str] = set()
        for r in reads:
            acc |= deps.get(r, set())
        for out in node.output:
            if out and out not in weights:  # a Constant-node weight depends on itself only
                deps[out] = acc
    return deps


def topological_stages(model: onnx.ModelProto, views: Mapping[str, LinearView]) -> list[list[str]]:
    """Groups of weights for a sequential pass: a layer comes after every
    calibrated layer its input depends on (through the top-level graph, with
    subgraph captures counted), and layers of one stage are independent."""
    deps = weight_dependencies(model, views)
    stage: dict[str, int] = {}
    order = sorted(views, key=lambda n: len(deps.get(views[n].input_name, set())))
    pending = list(order)
    while pending:
        progressed = False
        for name in list(pending):
            ups = deps.get(views[name].input_name, set()) - {name}
            ups &= set(views)
            if all(u in stage for u in ups):
                stage[name] = 1 + max((stage[u] for u in ups), default=-1)
                pending.remove(name)
                progressed = True
        if not progressed:  # a cycle cannot happen in a valid graph; keep the rest together
            for name in pending:
                stage[name] = max(stage.values(), default=-1) + 1
            break
    n = max(stage.values(), default=-1) + 1
    return [[name for name in views if stage[name] == s] for s in range(n)]


def _captured(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
    for a in node.attribute:
        for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
            for n in g.node:
                names |= set(n.input) | _captured(n)
    return names


def _topo_order(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    produced = {out: i for i, n in enumerate(graph.node) for out in n.output if out}
    state: dict[int, int] = {}
    order: list[onnx.NodeProto] = []
    for start in range(len(graph.node)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if expanded:
                if state.get(i) != 2:
                    state[i] = 2
                    order.append(graph.node[i])
                continue
            if state.get(i):
                continue
            state[i] = 1
            stack.append((i, True))
            node = graph.node[i]
            for name in list(node.input) + sorted(_captured(node)):
                j = produced.get(name)
                if j is not None and not state.get(j):
                    stack.append((j, False))
    return order
