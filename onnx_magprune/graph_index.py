"""Index a model's dataflow: which tensor feeds which node and input slot.

Every name binding (graph input, initializer, sparse initializer, node output)
becomes a :class:`Value`; every place a value is read (a node input slot, or a
graph output) is a :class:`Use` on it.  Subgraphs (If/Loop/Scan bodies, any
graph attribute, recursively) see the enclosing scopes, so a name captured
from an outer scope is a use of the outer value, and a name a subgraph binds
itself shadows the outer one.  Local functions are indexed as graphs of their
own.  Nodes need not be topologically sorted.
"""

from __future__ import annotations

from collections import ChainMap
from dataclasses import dataclass, field
from typing import Mapping

import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(eq=False)
class Use:
    """One read of a value: input ``slot`` of ``node``, or graph output ``slot`` when ``node`` is None."""

    node: onnx.NodeProto | None
    slot: int
    graph: str

    @property
    def op(self) -> tuple[str, str]:
        if self.node is None:
            return ("", "<graph output>")
        domain = "" if self.node.domain in DEFAULT_DOMAINS else self.node.domain
        return (domain, self.node.op_type)

    def describe(self) -> str:
        if self.node is None:
            return f"output {self.slot} of graph {self.graph}"
        domain, op = self.op
        name = f"{domain}.{op}" if domain else op
        label = f" '{self.node.name}'" if self.node.name else ""
        return f"{name}{label} input {self.slot}"


@dataclass(eq=False)
class Value:
    """One name binding.  ``kind`` is one of ``graph_input``, ``initializer``,
    ``sparse_initializer``, ``constant`` (a Constant node's ``value`` tensor),
    ``sparse_constant``, ``constant_attr`` (Constant with a scalar/list
    attribute or a function attribute reference) and ``node_output``."""

    name: str
    graph: str
    kind: str
    tensor: onnx.TensorProto | None = None
    node: onnx.NodeProto | None = None
    sparse: onnx.SparseTensorProto | None = None  # a sparse initializer's or sparse Constant's tensor
    overridable: bool = False  # an initializer also listed as a graph input
    duplicate: bool = False  # the name is bound more than once in its graph
    uses: list[Use] = field(default_factory=list)

    def where(self) -> str:
        if self.kind in ("constant", "sparse_constant", "constant_attr") and self.node is not None:
            label = f" '{self.node.name}'" if self.node.name else ""
            return f"Constant node{label} in {self.graph}"
        return f"{self.kind.replace('_', ' ')} in {self.graph}"


class GraphIndex:
    def __init__(self, model: onnx.ModelProto):
        self.values: list[Value] = []
        self._outputs: dict[int, list[Value | None]] = {}
        self._inputs: dict[tuple[int, int], Value] = {}
        self.opsets = {("" if o.domain in DEFAULT_DOMAINS else o.domain): o.version for o in model.opset_import}
        #: (domain, name) of each local function -> its formal inputs' values, in order
        self.function_inputs: dict[tuple[str, str], list[Value]] = {}
        self._graph(model.graph, "main", {})
        for function in model.functions:
            self._function(function)

    def callee_input(self, use: Use) -> Value | None:
        """The formal input a call to a local function passes ``use``'s value to, if it is one."""
        if use.node is None:
            return None
        formals = self.function_inputs.get((use.node.domain, use.node.op_type))
        if formals is None or use.slot >= len(formals):
            return None
        return formals[use.slot]

    def outputs_of(self, node: onnx.NodeProto) -> list[Value | None]:
        return self._outputs.get(id(node), [])

    def input_value(self, node: onnx.NodeProto, slot: int) -> Value | None:
        return self._inputs.get((id(node), slot))

    def constants(self) -> list[Value]:
        """Initializers and Constant-node tensors, in model order."""
        kinds = ("initializer", "constant", "sparse_initializer", "sparse_constant")
        return [v for v in self.values if v.kind in kinds]

    # -- building ----------------------------------------------------------

    def _bind(self, local: dict[str, Value], value: Value) -> None:
        self.values.append(value)
        if value.name in local:
            local[value.name].duplicate = True
            value.duplicate = True
        else:
            local[value.name] = value

    def _bind_nodes(self, local: dict[str, Value], nodes, label: str) -> None:
        for node in nodes:
            outs: list[Value | None] = []
            for i, name in enumerate(node.output):
                if not name:
                    outs.append(None)
                    continue
                value = Value(name, label, _node_output_kind(node, i), node=node)
                if value.kind == "constant":
                    value.tensor = next(a.t for a in node.attribute if a.name == "value")
                elif value.kind == "sparse_constant":
                    value.sparse = next(a.sparse_tensor for a in node.attribute if a.name == "sparse_value")
                self._bind(local, value)
                outs.append(value)
            self._outputs[id(node)] = outs

    def _use_nodes(self, scope: Mapping[str, Value], nodes, label: str) -> None:
        for node in nodes:
            for slot, name in enumerate(node.input):
                if name and name in scope:
                    scope[name].uses.append(Use(node, slot, label))
                    self._inputs[(id(node), slot)] = scope[name]
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.HasField("g") else []
                subgraphs += list(attr.graphs)
                for j, sub in enumerate(subgraphs):
                    node_label = node.name or (node.output[0] if node.output else "")
                    suffix = f"[{j}]" if len(attr.graphs) > 1 else ""
                    self._graph(sub, f"{label}/{node.op_type} '{node_label}'.{attr.name}{suffix}", scope)

    def _graph(self, graph: onnx.GraphProto, label: str, outer: Mapping[str, Value]) -> None:
        local: dict[str, Value] = {}
        initializer_names = {t.name for t in graph.initializer}
        input_names = {i.name for i in graph.input}
        for inp in graph.input:
            if inp.name not in initializer_names:
                self._bind(local, Value(inp.name, label, "graph_input"))
        for t in graph.initializer:
            self._bind(local, Value(t.name, label, "initializer", tensor=t, overridable=t.name in input_names))
        for sparse in graph.sparse_initializer:
            self._bind(local, Value(sparse.values.name, label, "sparse_initializer", sparse=sparse))
        self._bind_nodes(local, graph.node, label)
        scope = ChainMap(local, outer)
        self._use_nodes(scope, graph.node, label)
        for slot, out in enumerate(graph.output):
            if out.name in scope:
                scope[out.name].uses.append(Use(None, slot, label))

    def _function(self, function: onnx.FunctionProto) -> None:
        label = f"function {function.domain}:{function.name}" if function.domain else f"function {function.name}"
        local: dict[str, Value] = {}
        for name in function.input:
            self._bind(local, Value(name, label, "graph_input"))
        self.function_inputs[(function.domain, function.name)] = [local[n] for n in function.input if n in local]
        self._bind_nodes(local, function.node, label)
        self._use_nodes(local, function.node, label)
        for slot, name in enumerate(function.output):
            if name in local:
                local[name].uses.append(Use(None, slot, label))


def _node_output_kind(node: onnx.NodeProto, index: int) -> str:
    if node.op_type != "Constant" or node.domain not in DEFAULT_DOMAINS or index != 0:
        return "node_output"
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return "constant"
        if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
            return "sparse_constant"
    return "constant_attr"
