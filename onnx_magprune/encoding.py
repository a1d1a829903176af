"""Re-encoding pruned weights so the file is smaller.

Formats (one enum, encoders behind a small registry):

* ``dense``: zeros stored in place (no change);
* ``sparse``: the standard ``SparseTensorProto`` (COO, INT64 linear indices),
  held by a ``Constant`` node's ``sparse_value`` (an initializer or a Constant
  becomes such a node, named ``<weight>_sparse``, at the head of its graph, as
  compact decoders are; onnx's shape inference cannot
  type a ``sparse_initializer`` feeding MatMul/Gemm/Conv, a Constant it can).
  onnx.checker (full check) accepts it; it is smaller than dense only above
  1 - itemsize/(itemsize + 8) sparsity (66.7% for float32);
* ``sparse-int32``: the same with INT32 indices: smaller (above 50% for
  float32) and ONNX Runtime loads it, but onnx.checker rejects it;
* ``compact``: the non-zero values plus packed gap codes and a small decoder
  of standard ONNX ops (:mod:`compact_code`, :mod:`compact_graph`) that ONNX
  Runtime constant-folds when it creates a session, so the optimized graph
  holds the ordinary dense weight; ``objective`` picks the code per tensor
  (smallest file, fastest start, or the fastest start near the bound);
* ``auto``: per tensor, the smallest of ``dense``, ``sparse`` and ``compact``
  (never larger than dense, always checker-valid).

ONNX Runtime densifies sparse initializers and folds compact decoders when it
loads a model: these formats cut file and download size, not inference time
or memory.  Entries whose bits are not all zero (``-0.0`` included) are kept
as values, so decoding is bit-exact.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from . import compact_choice, compact_code, compact_graph
from .compact_code import Objective
from .errors import ConfigError, MagpruneError
from .external_data import uses_external_data
from .model_io import expected_nbytes, iter_graphs, value_names
from .tensor_data import FLOAT_TYPES, TensorStore, np_dtype, numel


class Format(str, enum.Enum):
    DENSE = "dense"
    SPARSE = "sparse"
    SPARSE_INT32 = "sparse-int32"
    COMPACT = "compact"
    AUTO = "auto"


def parse_format(value) -> Format:
    try:
        return Format(value)
    except ValueError:
        raise ConfigError(f"format must be one of {', '.join(f.value for f in Format)}, got {value!r}") from None


def parse_objective(value) -> Objective:
    try:
        return Objective(value)
    except ValueError:
        raise ConfigError(f"optimize-for must be one of {', '.join(o.value for o in Objective)}, "
                          f"got {value!r}") from None


@dataclass(frozen=True)
class Encoded:
    """One tensor's encoding: the format chosen, its bytes before/after (data bytes:
    values and indices or codes; a compact tensor's decoder nodes and small constants are
    in ``overhead_bytes``), the information bound, and why a format was not used."""

    name: str
    format: str
    dense_bytes: int
    encoded_bytes: int
    bound_bytes: float | None = None
    overhead_bytes: int = 0
    code: str | None = None      # compact: which code (planes, symbols, mode)
    note: str | None = None      # why the asked-for format was not used


def _nonzero_positions(array: np.ndarray) -> np.ndarray:
    bits = array.reshape(-1).view(np.dtype(f"u{array.dtype.itemsize}"))
    return np.flatnonzero(bits)


def to_sparse(tensor: TensorProto, array: np.ndarray, index_type: int,
              name: str | None = None) -> onnx.SparseTensorProto:
    """COO of ``array``; its parts are named after ``name`` (the weight's name in the graph), default the tensor's."""
    name = tensor.name if name is None else name
    pos = _nonzero_positions(array)
    values = TensorProto(name=name, data_type=tensor.data_type, dims=[pos.size],
                         raw_data=np.ascontiguousarray(array.reshape(-1)[pos]).tobytes())
    idx_dtype = np.int64 if index_type == TensorProto.INT64 else np.int32
    indices = TensorProto(name=f"{name}_indices", data_type=index_type, dims=[pos.size],
                          raw_data=pos.astype(idx_dtype).tobytes())
    sparse = onnx.SparseTensorProto(values=values, indices=indices)
    sparse.dims.extend(tensor.dims)
    return sparse


def sparse_to_dense(sparse: onnx.SparseTensorProto) -> TensorProto:
    """The dense TensorProto a SparseTensorProto stands for (bit-exact, +0.0 elsewhere)."""
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


SPARSE_MIN_OPSET = 11  # a Constant's sparse_value attribute
#: format -> index type of its SparseTensorProto
_INDEX_TYPE: dict[Format, int] = {Format.SPARSE: TensorProto.INT64, Format.SPARSE_INT32: TensorProto.INT32}


def _graph_holding(model: onnx.ModelProto, tensor: TensorProto):
    """The GraphProto whose initializer list holds ``tensor``, or None."""
    return next((g for g in iter_graphs(model) if any(t is tensor for t in g.initializer)), None)


def _opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _compact_blocker(model: onnx.ModelProto, tensor: TensorProto, in_function: bool) -> str | None:
    """Why ``tensor`` cannot be stored compact, or None."""
    if not isinstance(tensor.name, str):  # protobuf hands back a name that is not valid UTF-8 as bytes
        return "compact: the tensor's name is not valid UTF-8"
    if in_function:
        return "compact: weights inside local functions stay as they are (functions have no initializers)"
    opset = _opset(model)
    if opset < compact_graph.MIN_OPSET:
        return f"compact: the model's opset {opset} is below {compact_graph.MIN_OPSET} (CumSum, Range)"
    if tensor.data_type == TensorProto.BFLOAT16 and opset < 13:
        return "compact: bfloat16 needs opset 13 (Cast to and from bfloat16)"
    itemsize = 4 if tensor.data_type == TensorProto.BFLOAT16 else np_dtype(tensor.data_type).itemsize
    if numel(tensor) * itemsize > compact_graph.FOLD_LIMIT_BYTES:
        return ("compact: the decoded tensor would exceed ONNX Runtime's 1 GiB constant-folding limit, "
                "so its decoder would run on every inference")
    return None


def _compact_candidate(model: onnx.ModelProto, tensor: TensorProto, array: np.ndarray, in_function: bool,
                       objective: Objective, names: set[str], value_name: str):
    """``((code, decoder, overhead bytes), None)``, or ``(None, why compact cannot be used)``; the
    decoder writes ``value_name`` (a Constant's output, whatever its tensor is called)."""
    note = _compact_blocker(model, tensor, in_function)
    if note is None and not isinstance(value_name, str):
        note = "compact: the weight's name is not valid UTF-8"
    if note is None and tensor.data_type == TensorProto.BFLOAT16 and np.isnan(array.astype(np.float32)).any():
        note = ("compact: bfloat16 decodes through float32, and ONNX Runtime's Cast back to bfloat16 "
                "does not keep NaN payloads")
    if note is not None:
        return None, note
    shaped = array.reshape(tuple(tensor.dims))
    plan = compact_code.blocking(shaped.shape, compact_code.decoded_itemsize(shaped.dtype))
    chosen = compact_choice.choose(shaped, objective, plan)
    code = compact_code.encode_blocked(shaped, chosen.alphabet, chosen.plan)
    if compact_graph.largest_intermediate(code) > compact_graph.FOLD_LIMIT_BYTES:
        return None, ("compact: a decoder intermediate would exceed ONNX Runtime's 1 GiB constant-folding "
                      "limit, so the decoder would run on every inference")
    decoder = compact_graph.decoder(code, value_name, tensor.data_type, names)
    return (code, decoder, _serialized(decoder, code)), None


def _serialized(decoder: compact_graph.Decoder,
                code: compact_code.CompactTensor | compact_code.BlockedTensor) -> int:
    """Bytes the decoder adds besides the codes and values (its nodes and small constants)."""
    small = sum(t.ByteSize() for t in decoder.initializers) - code.nbytes
    return small + sum(n.ByteSize() for n in decoder.nodes)


class _Site(NamedTuple):
    graph: object  # the GraphProto (or FunctionProto) holding the tensor, or None
    const_node: onnx.NodeProto | None  # the Constant holding it, or None for an initializer
    in_function: bool
    name: str  # the name the graph knows it by: a Constant's output (its tensor's own name may be empty)


def _site(model: onnx.ModelProto, tensor: TensorProto) -> _Site:
    """Where ``tensor`` is stored."""
    graph = _graph_holding(model, tensor)
    if graph is not None:
        return _Site(graph, None, False, tensor.name)
    for in_function in (False, True):  # the main graph and its subgraphs first, then local functions too
        for g in iter_graphs(model, functions=in_function):
            for node in g.node:
                if node.op_type == "Constant" and any(a.HasField("t") and a.t is tensor for a in node.attribute):
                    return _Site(g, node, in_function, node.output[0])
    return _Site(None, None, False, tensor.name)


def _shadowed_names(model: onnx.ModelProto) -> set[str]:
    """Names defined (initializer, input or node output) in more than one graph of the model."""
    seen: dict[str, int] = {}
    for g in iter_graphs(model):
        names = {t.name for t in g.initializer} | {i.name for i in g.input}
        names |= {o for n in g.node for o in n.output if o}
        for name in names:
            seen[name] = seen.get(name, 0) + 1
    return {name for name, count in seen.items() if count > 1}


def encode_tensors(model: onnx.ModelProto, tensors: list[TensorProto], fmt: Format, store: TensorStore,
                   overridable: Callable[[str], bool] = lambda _n: False,
                   objective: Objective = Objective.BALANCED) -> list[Encoded]:
    """Re-encode the given float tensors of ``model`` in place; returns what each became (in the
    order given).  Encoded weights go to the head of their graph in the order of their names, whatever
    order they come in, so pruning this tool's own (decoded) output again writes the same bytes."""
    sited, kept = [], []
    for i, tensor in enumerate(tensors):
        if tensor.data_type not in FLOAT_TYPES:  # quantized weights stay dense (their zero is the zero point)
            if fmt is not Format.DENSE:
                size = expected_nbytes(tensor) or 0
                kept.append((i, Encoded(tensor.name, Format.DENSE.value, size, size, note=(
                    f"{fmt.value}: a quantized weight stays dense (its pruned entries hold the zero point, not 0)"))))
            continue
        site = _site(model, tensor)
        if site.graph is None:  # pragma: no cover - every weight is an initializer or a Constant
            raise MagpruneError(f"cannot find where tensor '{tensor.name}' is stored")
        sited.append((site.name if isinstance(site.name, str) else "", i, tensor, site))
    encoder = _Encoder(model, fmt, store, overridable, objective)
    done = [(i, encoder.encode(tensor, site)) for _n, i, tensor, site in sorted(sited, key=lambda s: s[:2])]
    return [e for _i, e in sorted(done + kept, key=lambda d: d[0])]


class _Encoder:
    """Encodes one weight at a time into ``model``, keeping the names in use and each graph's next head slot."""

    def __init__(self, model: onnx.ModelProto, fmt: Format, store: TensorStore,
                 overridable: Callable[[str], bool], objective: Objective):
        self.model, self.fmt, self.store, self.overridable, self.objective = model, fmt, store, overridable, objective
        self.names: set[str] | None = None
        self.heads: dict[int, int] = {}
        self.sparse_ok = _opset(model) >= SPARSE_MIN_OPSET
        self.shadowed = _shadowed_names(model)

    def encode(self, tensor: TensorProto, site: "_Site") -> Encoded:
        if uses_external_data(tensor):  # pragma: no cover - callers read external data in first
            raise MagpruneError(f"tensor '{tensor.name}' is still external: read it in before encoding")
        fmt, graph, name = self.fmt, site.graph, site.name
        array = self.store.read(tensor)
        n, item = numel(tensor), array.dtype.itemsize
        nnz = int(_nonzero_positions(array).size)
        sizes = _sizes(n, nnz, item)
        bound = compact_code.bound_bytes(n, nnz, item)
        dense = Encoded(name, Format.DENSE.value, sizes[Format.DENSE], sizes[Format.DENSE], bound)
        if fmt is Format.DENSE:
            return dense
        if site.const_node is None and (self.overridable(tensor.name)
                                        or any(i.name == tensor.name for i in graph.input)):
            return replace(dense, note=f"{fmt.value}: an initializer that is also a graph input stays a plain "
                                       "initializer (a caller may feed it)")
        if site.const_node is None and tensor.name in self.shadowed:
            return replace(dense, note=f"{fmt.value}: another graph of the model defines the name "
                                       f"'{tensor.name}' too: an initializer may shadow it, a node output (a "
                                       "Constant or decoder) may not")
        compact, note = None, None
        if fmt in (Format.COMPACT, Format.AUTO) and n > 0:
            if self.names is None:
                self.names = value_names(self.model)
            compact, note = _compact_candidate(self.model, tensor, array, site.in_function, self.objective,
                                               self.names, name)
        if fmt is Format.AUTO:
            options = [(sizes[Format.DENSE], Format.DENSE)] + ([(sizes[Format.SPARSE], Format.SPARSE)]
                                                                if self.sparse_ok else [])
            if compact is not None:
                options.append((compact[0].nbytes + compact[2], Format.COMPACT))
            chosen = min(options, key=lambda o: o[0])[1]  # ties: the earlier (simpler) format
            note = note if compact is None else None  # why compact was not even a candidate
        elif fmt is Format.COMPACT:
            chosen = Format.COMPACT if compact is not None else Format.DENSE
        elif not self.sparse_ok:
            chosen, note = Format.DENSE, (f"{fmt.value}: a Constant's sparse_value needs opset {SPARSE_MIN_OPSET}, "
                                          f"the model has opset {_opset(self.model)}")
        elif fmt is Format.SPARSE_INT32 and graph is not self.model.graph:
            chosen, note = Format.DENSE, ("sparse-int32: ONNX Runtime checks the Constants of subgraphs and "
                                          "rejects INT32 indices there")
        else:
            chosen = fmt
        if chosen is Format.DENSE:
            return replace(dense, note=note)
        if chosen is Format.COMPACT:
            code, decoder, overhead = compact
            self._place(site, tensor, decoder.nodes, decoder.initializers)
            self.names.update(t.name for t in decoder.initializers)
            self.names.update(o for nd in decoder.nodes for o in nd.output)
            return Encoded(name, chosen.value, sizes[Format.DENSE], code.nbytes, bound, overhead, _code_label(code))
        sparse = to_sparse(tensor, array, _INDEX_TYPE[chosen], name)
        node = onnx.helper.make_node("Constant", [], [name], name=f"{name}_sparse", sparse_value=sparse)
        self._place(site, tensor, [node], [])  # other initializers keep their identity
        return Encoded(name, chosen.value, sizes[Format.DENSE], sizes[chosen], bound, note=note)

    def _place(self, site: "_Site", tensor: TensorProto, nodes: list, initializers: list) -> None:
        """Put ``nodes`` (a compact decoder, or a sparse Constant named ``<weight>_sparse``) in place of
        ``tensor``'s initializer or Constant, at the head of its graph after those placed before: its
        inputs are all constants, so it may run first, and where it goes then does not depend on where
        the weight was (a decoded model, whose weights are initializers, gets the same graph back)."""
        graph = site.graph
        if site.const_node is None:
            graph.initializer.remove(tensor)
        else:
            graph.node.remove(site.const_node)
        at = self.heads.get(id(graph), 0)
        self.heads[id(graph)] = at + len(nodes)
        for i, nd in enumerate(nodes):
            graph.node.insert(at + i, nd)
        if initializers:  # (a compact decoder: never in a local function, which has no initializers)
            graph.initializer.extend(initializers)


def _code_label(code: compact_code.CompactTensor | compact_code.BlockedTensor) -> str:
    a = code.alphabet
    words = f"{a.planes} symbol(s) of {a.size} per {a.word_bytes}-byte word"
    if isinstance(code, compact_code.BlockedTensor):
        sizes = code.blocking.sizes
        return (f"{a.mode.value}, {a.layout.value} layout, {len(sizes)} blocks of {min(sizes)}-{max(sizes)} "
                f"along axis {code.blocking.axis}, {code.fibers} fiber(s) in all, {words}")
    return f"{a.mode.value}, {a.layout.value} layout, {code.fibers} fiber(s) x {code.entries} entries, {words}"


def _decode_compact(graph: onnx.GraphProto) -> int:
    """Replace the compact decoders of ``graph`` (not its subgraphs) by initializers."""
    found = compact_graph.find_decoders(graph)
    if not found:
        return 0
    inits = {t.name: t for t in graph.initializer}
    used_elsewhere = {i for nd in graph.node if compact_graph.weight_of(nd) is None for i in nd.input}
    for weight, nodes in found.items():
        inputs = {i for nd in nodes for i in nd.input}
        consts = {}
        for name in inputs:
            if name in inits:
                consts[name] = numpy_helper.to_array(inits[name]) if inits[name].data_type != TensorProto.BFLOAT16 \
                    else np.frombuffer(inits[name].raw_data, dtype=np.uint16).reshape(tuple(inits[name].dims)) \
                    .view(np_dtype(TensorProto.BFLOAT16))
        try:
            value = compact_graph.evaluate(nodes, consts, weight)
        except (KeyError, ValueError) as e:
            raise MagpruneError(f"cannot decode the compact weight '{weight}': {e}") from e
        for nd in nodes:
            graph.node.remove(nd)
        for name in inputs:
            if name in inits and name not in used_elsewhere:
                graph.initializer.remove(inits.pop(name))
        elem = _elem_type(value)
        graph.initializer.append(onnx.helper.make_tensor(weight, elem, list(value.shape),
                                                         np.ascontiguousarray(value).tobytes(), raw=True))
    return len(found)


def _elem_type(value: np.ndarray) -> int:
    if value.dtype.name == "bfloat16":
        return TensorProto.BFLOAT16
    return onnx.helper.np_dtype_to_tensor_dtype(value.dtype)


def decode_compact(model: onnx.ModelProto) -> int:
    """Replace every compact decoder (in any graph) by the initializer it rebuilds; returns how many."""
    return sum(_decode_compact(g) for g in list(iter_graphs(model)))


def _own_sparse(node: onnx.NodeProto) -> bool:
    return (node.op_type == "Constant" and len(node.output) == 1 and node.name == f"{node.output[0]}_sparse"
            and any(a.name == "sparse_value" for a in node.attribute))


def has_own_encoding(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds weights this tool encoded (compact decoders or its sparse Constants)."""
    return any(compact_graph.weight_of(n) is not None or _own_sparse(n) for g in iter_graphs(model) for n in g.node)


def decoder_inputs(model: onnx.ModelProto) -> set[str]:
    """Names of the constants the compact decoders of ``model`` read (what decoding needs in memory)."""
    names: set[str] = set()
    for g in iter_graphs(model):
        for nodes in compact_graph.find_decoders(g).values():
            names.update(i for nd in nodes for i in nd.input)
    return names


def has_encoding(model: onnx.ModelProto) -> bool:
    """Whether ``model`` holds compact decoders or sparse tensors (initializers or Constants) anywhere."""
    if has_own_encoding(model):
        return True
    for g in iter_graphs(model, functions=True):
        if len(getattr(g, "sparse_initializer", [])):
            return True
        if any(n.op_type == "Constant" and any(a.name == "sparse_value" for a in n.attribute) for n in g.node):
            return True
    return False


def decode_own(model: onnx.ModelProto) -> int:
    """Decode what this tool wrote: compact decoders, and sparse Constants named ``<weight>_sparse``
    (other sparse tensors are left alone).  Returns how many weights were decoded."""
    count = decode_compact(model)
    for g in list(iter_graphs(model)):
        for node in list(g.node):
            if _own_sparse(node):
                sparse_attr = next(a for a in node.attribute if a.name == "sparse_value")
                dense = sparse_to_dense(sparse_attr.sparse_tensor)
                dense.name = node.output[0]
                g.node.remove(node)
                g.initializer.append(dense)
                count += 1
    return count


def decode_model(model: onnx.ModelProto) -> int:
    """Turn sparse and compact weights back into plain dense ones, in place (bit-exact):
    sparse initializers, graph-level sparse Constants and compact decoders become
    initializers, sparse Constants in local functions dense Constants.  Returns how many."""
    count = decode_compact(model)
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
