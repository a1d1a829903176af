"""Which normalization reads a layer's output (graph side, no numpy maths).

A layer whose output (after an optional Add of a constant bias, an optional
residual Add and any reshapes) is the input of a normalization over the last
axis does not need every calibration row reproduced equally well: the norm
divides each row by its own scale, so an error ``δ`` in a row whose
pre-norm standard deviation is ``σ`` reaches the next layer as ``δ / σ``.
Transformers have a few tokens with pre-norm scales ten or more times the
rest ([CLS], [SEP], punctuation), and an unweighted least-squares re-fit
spends its capacity on those.  :func:`norm_sites` finds these norms so the
statistics can weight each row by ``1 / (σ² + ε)`` (``1 / (mean(z²) + ε)``
for RMS norms): the objective then is the squared error *after* the norm.

Recognised: ``LayerNormalization`` (axis -1 or the last axis, input 0),
``RMSNormalization`` (opset 23) and ``com.microsoft`` ``SimplifiedLayerNormalization``
(same), and the decomposed form older exporters write, a ``ReduceMean`` over
the last axis whose result is subtracted from the same tensor (ε is then 0,
which changes nothing for rows of normal scale).  The rows of the norm's input
must be the layer's rows; :class:`~onnx_magprune.layer_stats.StatsModel`
checks that on the data.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple

import onnx
from onnx import helper

from .layer_view import LinearView
from .stats_graph import _RESHAPES, _ROW_LAYOUTS, _constant_tensors

_RMS = {("", "RMSNormalization"), ("com.microsoft", "SimplifiedLayerNormalization")}


class NormSite(NamedTuple):
    """The tensor a normalization reads, whether it is centred first (LayerNorm) and its ε."""

    tensor: str
    centered: bool
    epsilon: float


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _last_axis(axis: int, rank: int | None) -> bool:
    return axis == -1 or (rank is not None and axis == rank - 1)


def _reads_last_axis(node: onnx.NodeProto, constants: Mapping[str, onnx.TensorProto], rank: int | None) -> bool:
    """A ReduceMean over the last axis only (axes as attribute, or as a constant second input)."""
    axes = _attr(node, "axes", None)
    if axes is None and len(node.input) > 1 and node.input[1] in constants:
        axes = [int(a) for a in onnx.numpy_helper.to_array(constants[node.input[1]]).reshape(-1)]
    return axes is not None and len(axes) == 1 and _last_axis(int(axes[0]), rank)


def _site(tensor: str, consumers: Mapping[str, list[onnx.NodeProto]], constants, rank: int | None) -> NormSite | None:
    for node in consumers.get(tensor, []):
        key = (node.domain or "", node.op_type)
        if node.input and node.input[0] == tensor:
            if key == ("", "LayerNormalization") and _last_axis(int(_attr(node, "axis", -1)), rank):
                return NormSite(tensor, True, float(_attr(node, "epsilon", 1e-5)))
            if key in _RMS and _last_axis(int(_attr(node, "axis", -1)), rank):
                return NormSite(tensor, False, float(_attr(node, "epsilon", 1e-5)))
        if key == ("", "ReduceMean") and node.input[0] == tensor and _reads_last_axis(node, constants, rank):
            mean = node.output[0]
            if any(n.op_type == "Sub" and list(n.input[:2]) == [tensor, mean] for n in consumers.get(mean, [])):
                return NormSite(tensor, True, 0.0)
    return None


def norm_sites(model: onnx.ModelProto, views: Mapping[str, LinearView]) -> dict[str, NormSite]:
    """weight name -> the normalization its layer's output reaches, for top-level row layers."""
    graph = model.graph
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)
    const_names = _constant_tensors(graph)
    constants = {t.name: t for t in graph.initializer if t.name in const_names}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in const_names:
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            if value is not None:
                constants[node.output[0]] = value
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*graph.value_info, *graph.output]
             if vi.type.tensor_type.HasField("shape")}
    top = {out for n in graph.node for out in n.output if out}
    out: dict[str, NormSite] = {}
    for name, view in views.items():
        if view.layout not in _ROW_LAYOUTS or view.trans_a or view.node.output[0] not in top:
            continue
        y, biased, residual = view.node.output[0], False, False
        for _step in range(8):
            site = _site(y, consumers, constants, ranks.get(y))
            if site is not None:
                out[name] = site
                break
            nodes = consumers.get(y, [])
            if len(nodes) != 1:
                break
            node = nodes[0]
            if node.op_type in _RESHAPES and node.input[0] == y:
                y = node.output[0]
                continue
            if node.op_type != "Add" or len(node.input) != 2 or node.input[0] == node.input[1]:
                break
            other = node.input[1] if node.input[0] == y else node.input[0]
            if other in const_names:
                if biased:
                    break
                biased = True
            else:
                if residual:
                    break
                residual = True
            y = node.output[0]
    return out


__all__ = ["NormSite", "norm_sites"]
