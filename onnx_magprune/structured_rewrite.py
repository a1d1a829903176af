"""Rewrite a model so that removed units no longer exist (or are only masked).

``remove`` cuts every tensor of each group along its axis (the producer's
output columns/channels and bias, every per-channel constant on the chain,
the consumer's input rows/channels, in blocks after Flatten or per attention
head), lowers a unit count in a Reshape's target shape on the chain (its last
entry, or an attention block's head count and width), and drops the
stale ``value_info`` of the activations whose channel count changed.
``mask`` leaves every shape alone and zeroes the consumers' input slices of
the removed units instead: the reference that the removed model must match.
Either way, tensors listed in ``values`` (re-fitted consumer weights and
biases, full size) replace the model's values first.  Tensors keep their
names, dtypes and storage (``raw_data``).  The graph's nodes are untouched, except that a
Reshape whose target constant (or the Concat building it) is shared with other nodes gets its own
lowered copy of it (exporters that fold equal constants share one target across layers).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .model_io import iter_graphs, value_names
from .structured import UnitGroup


_SHAPE = object()  # marks the cut of a Reshape's target shape (its last entry loses the removed units)


def unit_indices(removed: np.ndarray, block: int) -> np.ndarray:
    """The indices along a cut axis owned by the ``removed`` units (``block`` each)."""
    removed = np.asarray(removed, dtype=np.int64)
    return (removed[:, None] * block + np.arange(block)[None, :]).reshape(-1)


def tensor_protos(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Main-graph initializers and Constant values by name."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    found.setdefault(node.output[0], a.t)
    return found


def _write(tensor: onnx.TensorProto, array: np.ndarray) -> None:
    new = numpy_helper.from_array(np.ascontiguousarray(array), tensor.name)
    new.data_type = tensor.data_type  # bfloat16 and friends keep their ONNX type
    doc = tensor.doc_string
    tensor.CopyFrom(new)
    tensor.doc_string = doc


def rewrite(model: onnx.ModelProto, plans: Sequence[tuple[UnitGroup, np.ndarray]],
            values: Mapping[str, np.ndarray] | None = None, *, mode: str = "remove") -> onnx.ModelProto:
    """Apply ``plans`` (each group with the sorted indices of its removed units) to ``model`` in place."""
    if mode not in ("remove", "mask"):
        raise ValueError(f"mode must be 'remove' or 'mask', got {mode!r}")
    values = dict(values or {})
    protos = tensor_protos(model)
    cuts: dict[str, list[tuple[int, np.ndarray]]] = {}
    private: list[tuple[str, str, int, int]] = []  # (shared shape constant, Reshape output, entry, amount)
    for group, removed in plans:
        removed = np.asarray(removed, dtype=np.int64)
        if removed.size == 0:
            continue
        seen: set[tuple] = set()
        for s in group.shrinks:
            if mode == "mask" and s.role != "consumer":
                continue
            if (s.tensor, s.axis, s.role == "shape", s.own) in seen:  # one constant read twice on a chain
                continue  # (cut once)
            seen.add((s.tensor, s.axis, s.role == "shape", s.own))
            if s.role == "shape" and s.own is not None:  # shared: that Reshape gets its own lowered copy
                private.append((s.tensor, s.own, s.axis, len(removed) * s.block))
                continue
            if s.role == "shape":  # an entry of a Reshape's target (a unit count), lowered
                cuts.setdefault(s.tensor, []).append((_SHAPE, (s.axis, len(removed) * s.block)))
                continue
            cuts.setdefault(s.tensor, []).append((s.axis, unit_indices(removed, s.block)))
    for name in dict.fromkeys(list(values) + list(cuts)):
        tensor = protos[name]
        original = numpy_helper.to_array(tensor)
        array = np.asarray(values[name]).astype(original.dtype) if name in values else original
        if array.shape != original.shape:
            raise ValueError(f"new values for '{name}' have shape {array.shape}, expected {original.shape}")
        for axis, idx in cuts.get(name, []):
            if axis is _SHAPE:
                entry, amount = idx
                array = array.copy()
                array.reshape(-1)[entry] -= amount
            elif mode == "mask":
                array = array.copy()
                sl = [slice(None)] * array.ndim
                sl[axis] = idx
                array[tuple(sl)] = 0
            else:
                array = np.delete(array, idx, axis=axis)
        _write(tensor, array)
    if private:
        _own_copies(model, private, protos)
    if mode == "remove":
        stale = {t for group, removed in plans if len(removed) for t in group.channel_tensors}
        keep = [vi for vi in model.graph.value_info if vi.name not in stale]
        del model.graph.value_info[:]
        model.graph.value_info.extend(keep)
        # an initializer that is also a graph input (--include-overridable) declares its shape there too
        for vi in list(model.graph.input) + list(model.graph.value_info):
            if vi.name in cuts and vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
                dims = protos[vi.name].dims
                shape = vi.type.tensor_type.shape
                del shape.dim[:]
                for d in dims:
                    shape.dim.add().dim_value = d
    return model


__all__ = ["rewrite", "unit_indices"]


def _readers(model: onnx.ModelProto) -> dict[str, int]:
    """How many node inputs (in any graph, captures included) and main-graph outputs read each name."""
    count: dict[str, int] = {}
    for g in iter_graphs(model):
        for n in g.node:
            for i in n.input:
                count[i] = count.get(i, 0) + 1
    for o in model.graph.output:
        count[o.name] = count.get(o.name, 0) + 1
    return count


def _own_copies(model: onnx.ModelProto, private, protos: Mapping[str, onnx.TensorProto]) -> None:
    """Give each Reshape of ``private`` (shared constant, Reshape output, entry, amount) its own copy
    of the shared constant with ``entry`` lowered by ``amount``, read directly or as a part of its
    Concat (the Concat is copied too, just before the Reshape, when others read it).  Originals that
    end up unread are dropped."""
    graph = model.graph
    taken = value_names(model)
    originals: list[str] = []

    def fresh(base: str, reshape_out: str) -> str:
        candidate, k = f"{base}__{reshape_out}", 1
        while candidate in taken:
            candidate, k = f"{base}__{reshape_out}_{k}", k + 1
        taken.add(candidate)
        return candidate

    for name, reshape_out, entry, amount in private:
        position, reshape = next((i, n) for i, n in enumerate(graph.node)
                                 if n.op_type == "Reshape" and reshape_out in n.output)
        array = numpy_helper.to_array(protos[name]).copy()
        array.reshape(-1)[entry] -= amount
        copy = numpy_helper.from_array(array, fresh(name, reshape_out))
        copy.data_type = protos[name].data_type
        graph.initializer.append(copy)
        originals.append(name)
        if reshape.input[1] == name:
            reshape.input[1] = copy.name
            continue
        concat = next(n for n in graph.node if reshape.input[1] in n.output and n.op_type == "Concat")
        shared_concat = _readers(model).get(concat.output[0], 0) > 1
        if shared_concat:  # others read the Concat: this Reshape gets a copy of it too
            originals.append(concat.output[0])
            own = onnx.NodeProto()
            own.CopyFrom(concat)
            own.name = fresh(concat.name, reshape_out) if concat.name else ""
            own.output[0] = fresh(concat.output[0], reshape_out)
            reshape.input[1] = own.output[0]
            concat = own
        for i, part in enumerate(concat.input):
            if part == name:
                concat.input[i] = copy.name
        if shared_concat:
            graph.node.insert(position, concat)  # (insert stores a copy: edited first)
    _drop_unread(model, originals)


def _drop_unread(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Remove the Concat nodes, Constant nodes and initializers among ``names`` nothing reads any more
    (Concats first: dropping one may leave its parts unread)."""
    graph = model.graph
    for concats in (True, False):
        readers = _readers(model)
        for name in dict.fromkeys(names):
            if readers.get(name, 0):
                continue
            node = next((n for n in graph.node if name in n.output), None)
            if node is not None and (node.op_type == "Concat") == concats and node.op_type in ("Concat", "Constant"):
                graph.node.remove(node)
            elif not concats:
                for t in list(graph.initializer):
                    if t.name == name:
                        graph.initializer.remove(t)
