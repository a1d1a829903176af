"""Re-encoding pruned weights so the file is smaller.

Formats (one enum, encoders behind a small registry):

* ``dense``: zeros stored in place (no change);
* ``sparse``: the standard ``SparseTensorProto`` (COO, INT64 linear indices),
  held by a ``Constant`` node's ``sparse_value`` (an initializer becomes such a
  node with its name, at the head of its graph; onnx's shape inference cannot
  type a ``sparse_initializer`` feeding MatMul/Gemm/Conv, a Constant it can).
  onnx.checker (full check) accepts it; it is smaller than dense only above
  1 - itemsize/(itemsize + 8) sparsity (66.7% for float32);
* ``sparse-int32``: the same with INT32 indices: smaller (above 50% for
  float32) and ONNX Runtime loads it, but onnx.checker rejects it;
* ``auto``: per tensor, the smaller of ``dense`` and ``sparse`` (never larger
  than dense, always checker-valid).

ONNX Runtime densifies sparse initializers when it loads a model: these
formats cut file and download size, not inference time or memory.  Entries
whose bits are not all zero (``-0.0`` included) are kept as values, so
decoding is bit-exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ConfigError, MagpruneError
from .external_data import uses_external_data
from .tensor_data import FLOAT_TYPES, TensorStore, np_dtype, numel


class Format(str, enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    SPARSE_INT32 = "sparse-int32"
    AUTO = "auto"


def parse_format(value) -> Format:
    try:
        return Format(value)
    except ValueError:
        raise ConfigError(f"format must be one of {', '.join(f.value for f in Format)}, got {value!r}") from None


@dataclass(frozen=True)
class Encoded:
    """One tensor's encoding: the format chosen and its bytes before/after."""

    name: str
    format: str
    dense_bytes: int
    encoded_bytes: int


def _nonzero_positions(array: np.ndarray) -> np.ndarray:
    bits = array.reshape(-1).view(np.dtype(f"u{array.dtype.itemsize}"))
    return np.flatnonzero(bits)


def to_sparse(tensor: TensorProto, array: np.ndarray, index_type: int) -> onnx.SparseTensorProto:
    pos = _nonzero_positions(array)
    values = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=[pos.size],
                         raw_data=np.ascontiguousarray(array.reshape(-1)[pos]).tobytes())
    idx_dtype = np.int64 if index_type == TensorProto.INT64 else np.int32
    indices = TensorProto(name=f"{tensor.name}_indices", data_type=index_type, dims=[pos.size],
                          raw_data=pos.astype(idx_dtype).tobytes())
    sparse = onnx.SparseTensorProto(values=values, indices=indices)
    sparse.dims.extend(tensor.dims)
    return sparse


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> TensorProto:
    """The dense TensorProto a SparseTensorProto stands for (bit-exact, +0.0 elsewhere)."""
    from onnx import numpy_helper

    values = numpy_helper.to_array(sparse.values).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    shape = tuple(sparse.dims)
    n = int(np.prod(shape, dtype=np.int64))
    if indices.ndim == 2:  # [nnz, rank] coordinates
        indices = np.ravel_multi_index(tuple(indices.T), shape) if indices.size else indices.reshape(-1)
    dtype = np_dtype(sparse.values.data_type) if sparse.values.data_type in FLOAT_TYPES else values.dtype
    dense = np.zeros(n, dtype=dtype)
    dense[indices.reshape(-1)] = values
    return TensorProto(name=sparse.values.name, data_type=sparse.values.data_type, dims=list(shape),
                       raw_data=dense.tobytes())


def _sizes(n: int, nnz: int, itemsize: int) -> dict[Format, int]:
    return {Format.DENSE: n * itemsize, Format.SPARSE: nnz * (itemsize + 8),
            Format.SPARSE_INT32: nnz * (itemsize + 4)}


def choose(fmt: Format, n: int, nnz: int, itemsize: int) -> Format:
    if fmt is not Format.AUTO:
        return fmt
    sizes = _sizes(n, nnz, itemsize)
    return Format.SPARSE if sizes[Format.SPARSE] < sizes[Format.DENSE] else Format.DENSE


#: format -> index type of its SparseTensorProto
_INDEX_TYPE: dict[Format, int] = {Format.SPARSE: TensorProto.INT64, Format.SPARSE_INT32: TensorProto.INT32}


def _graph_holding(model: onnx.ModelProto, tensor: TensorProto):
    """The GraphProto whose initializer list holds ``tensor``, or None."""
    stack = [model.graph]
    while stack:
        g = stack.pop()
        if any(t is tensor for t in g.initializer):
            return g
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return None


def _constant_node_of(model: onnx.ModelProto, tensor: TensorProto):
    stack = [model.graph] + [f for f in model.functions]
    while stack:
        g = stack.pop()
        for node in g.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t is tensor and node.op_type == "Constant":
                    return node, attr
                if attr.HasField("g"):
                    stack.append(attr.g)
                stack.extend(attr.graphs)
    return None, None


def encode_tensors(model: onnx.ModelProto, tensors: list[TensorProto], fmt: Format, store: TensorStore,
                   overridable: Callable[[str], bool] = lambda _n: False) -> list[Encoded]:
    """Re-encode the given float tensors of ``model`` in place; returns what each became."""
    out = []
    for tensor in tensors:
        if tensor.data_type not in FLOAT_TYPES:
            continue  # quantized weights stay dense (their zero is the zero point, not 0)
        if uses_external_data(tensor):  # pragma: no cover - callers read external data in first
            raise MagpruneError(f"tensor '{tensor.name}' is still external: read it in before encoding")
        array = store.read(tensor)
        n, item = numel(tensor), array.dtype.itemsize
        nnz = int(_nonzero_positions(array).size)
        chosen = choose(fmt, n, nnz, item)
        sizes = _sizes(n, nnz, item)
        if chosen is Format.DENSE:
            out.append(Encoded(tensor.name, chosen.value, sizes[Format.DENSE], sizes[Format.DENSE]))
            continue
        sparse = to_sparse(tensor, array, _INDEX_TYPE[chosen])
        graph = _graph_holding(model, tensor)
        if graph is not None:
            if overridable(tensor.name) or any(i.name == tensor.name for i in graph.input):
                out.append(Encoded(tensor.name, Format.DENSE.value, sizes[Format.DENSE], sizes[Format.DENSE]))
                continue
            name = tensor.name
            graph.initializer.remove(tensor)  # other initializers keep their identity
            node = onnx.helper.make_node("Constant", [], [name], name=f"{name}_sparse", sparse_value=sparse)
            graph.node.insert(0, node)
        else:
            node, attr = _constant_node_of(model, tensor)
            if node is None:  # pragma: no cover - every weight is an initializer or a Constant
                raise MagpruneError(f"cannot find where tensor '{tensor.name}' is stored")
            node.attribute.remove(attr)
            node.attribute.append(onnx.helper.make_attribute("sparse_value", sparse))
        out.append(Encoded(tensor.name, chosen.value, sizes[Format.DENSE], sizes[chosen]))
    return out


def decode_model(model: onnx.ModelProto) -> int:
    """Turn sparse weights back into plain dense ones, in place (bit-exact): sparse
    initializers and graph-level sparse Constants become initializers, sparse
    Constants in local functions dense Constants.  Returns how many."""
    count = 0
    stack = [(model.graph, True)] + [(f, False) for f in model.functions]
    while stack:
        g, is_graph = stack.pop()
        if is_graph and len(g.sparse_initializer):
            g.initializer.extend(sparse_to_dense(s) for s in g.sparse_initializer)
            count += len(g.sparse_initializer)
            del g.sparse_initializer[:]
        for node in list(g.node):
            sparse_attr = next((a for a in node.attribute if a.name == "sparse_value"), None)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and sparse_attr is not None:
                dense = sparse_to_dense(sparse_attr.sparse_tensor)
                dense.name = node.output[0]
                if is_graph:
                    g.node.remove(node)
                    g.initializer.append(dense)
                else:
                    node.attribute.remove(sparse_attr)
                    node.attribute.append(onnx.helper.make_attribute("value", dense))
                count += 1
            for attr in node.attribute:
                if attr.HasField("g"):
                    stack.append((attr.g, True))
                stack.extend((sub, True) for sub in attr.graphs)
    return count
