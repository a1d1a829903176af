"""Load a model (keeping external data external) and save it atomically.

Saving writes every file of the result (the model and any external-data files)
into a hidden staging directory beside the destination and renames them into
place only when all were written (and, for ``prune --calibration``, validated),
so a failed run leaves no output file.  External
data keeps its layout: each source data file is copied and only the bytes of
pruned tensors are overwritten at their offsets.  A data file is renamed only
where keeping its name would overwrite the input's own data file.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from .errors import MagpruneError, ModelLoadError, OutputError
from .external_data import ExternalRef, external_info, parse_external_ref, resolve_location, uses_external_data

_PROTOBUF_LIMIT = 2**31 - 1


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path | None  # the file it came from
    base_dir: Path | None  # where its external data is resolved
    data_files: frozenset = frozenset()  # its external data files as loaded (resolved), kept after they are read in


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """A *copy* of the model: the caller's object and file are never changed."""
    if isinstance(source, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(source)
        _check_model_shape(proto, "the model")
        return LoadedModel(proto, None, None)
    path = Path(source)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise ModelLoadError(f"cannot read model '{path}': it is a directory") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read model '{path}': {e.strerror or e}") from e
    if len(data) > _PROTOBUF_LIMIT:
        raise ModelLoadError(f"'{path}' is over 2 GiB; ONNX files that large must keep weights as external data")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(f"'{path}' is not an ONNX model (protobuf parse failed: {e})") from e
    _check_model_shape(proto, f"'{path}'")
    return LoadedModel(proto, path, path.parent, _data_files(proto, path.parent))


def _data_files(proto: onnx.ModelProto, base_dir: Path) -> frozenset:
    """The external data files ``proto`` refers to (resolved; bad references are reported later)."""
    files = set()
    for t in iter_all_tensors(proto):
        if uses_external_data(t):
            location = external_info(t).get("location", "")
            try:
                files.add(resolve_location(t.name, location, base_dir))
            except MagpruneError:
                continue
    return frozenset(files)


def _check_model_shape(proto: onnx.ModelProto, what: str) -> None:
    if not proto.HasField("graph"):
        raise ModelLoadError(f"{what} is not an ONNX model: it has no graph")
    if not proto.opset_import:
        raise ModelLoadError(f"{what} declares no opset (opset_import is empty)")


# ---------------------------------------------------------------------------
# walking every tensor


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    """``(tensor, is_part_of_a_sparse_tensor)`` for every tensor of a graph, recursively."""
    for t in graph.initializer:
        yield t, False
    for sparse in graph.sparse_initializer:
        yield sparse.values, True
        yield sparse.indices, True
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    for attr in node.attribute:
        if attr.HasField("t"):
            yield attr.t, False
        for t in attr.tensors:
            yield t, False
        sparse_tensors = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
        for sparse in sparse_tensors:
            yield sparse.values, True
            yield sparse.indices, True
        if attr.HasField("g"):
            yield from _graph_tensors(attr.g)
        for g in attr.graphs:
            yield from _graph_tensors(g)


def subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """The graphs held by ``node``'s attributes (If branches, Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.HasField("g"):
            yield attr.g
        yield from attr.graphs


def iter_graphs(model: onnx.ModelProto, *, functions: bool = False) -> Iterator:
    """The main graph and every graph nested in it (and local functions with their subgraphs,
    when ``functions``), parents before children."""
    stack = [model.graph] + (list(model.functions) if functions else [])
    while stack:
        g = stack.pop(0)
        yield g
        for node in g.node:
            stack.extend(subgraphs(node))


def _walk(model: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, bool]]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def iter_all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Every TensorProto of the model: initializers, sparse parts, attributes,
    subgraphs (recursively) and local functions."""
    return (t for t, _sparse in _walk(model))


def value_names(model: onnx.ModelProto) -> set[str]:
    """Every name any graph of the model (subgraphs and local functions included) uses or defines:
    a new name must avoid them all."""
    names = set()
    for g in iter_graphs(model, functions=True):
        names.update(t.name for t in getattr(g, "initializer", []))
        names.update(t.values.name for t in getattr(g, "sparse_initializer", []))
        names.update(v.name for v in getattr(g, "value_info", []))
        for v in list(g.input) + list(g.output):
            names.add(v if isinstance(v, str) else v.name)
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
    return names


def count_params(model: onnx.ModelProto) -> int:
    """Elements of every tensor of the model (initializers, attributes, subgraphs, local functions),
    a sparse tensor counted at its dense shape (not its stored values and indices)."""
    prod = math.prod
    total = 0
    for g in iter_graphs(model, functions=True):
        total += sum(prod(t.dims) for t in getattr(g, "initializer", []))
        total += sum(prod(t.dims) for t in getattr(g, "sparse_initializer", []))
        for node in g.node:
            for attr in node.attribute:
                dense = ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
                sparse = ([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []) + list(attr.sparse_tensors)
                total += sum(prod(t.dims) for t in dense + sparse)
    return total


def _sparse_parts(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The values and indices of every sparse tensor of the model."""
    return (t for t, sparse in _walk(model) if sparse)


def expected_nbytes(tensor: onnx.TensorProto) -> int | None:
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    n = 1
    for d in tensor.dims:
        n *= d
    bits = {onnx.TensorProto.INT4: 4, onnx.TensorProto.UINT4: 4}.get(tensor.data_type)
    if bits:
        return (n * bits + 7) // 8
    if dtype.kind in "OUSV" and dtype.name != "bfloat16":
        return None
    return n * dtype.itemsize


def check_external_data(loaded: LoadedModel) -> None:
    """Check every external-data reference (file, offset, length) without reading the bytes."""
    for tensor in iter_all_tensors(loaded.proto):
        if uses_external_data(tensor):
            if loaded.base_dir is None:
                raise ModelLoadError(f"tensor '{tensor.name}' uses external data but the model has no directory")
            parse_external_ref(tensor, loaded.base_dir, expected_nbytes(tensor))


def internalize_external_data(loaded: LoadedModel,
                              only: Callable[[onnx.TensorProto, bool], bool] | None = None) -> None:
    """Read every external tensor (or those ``only(tensor, is_sparse_part)`` picks) into ``raw_data``
    (checked references only)."""
    for tensor, sparse_part in _walk(loaded.proto):
        if not uses_external_data(tensor) or (only is not None and not only(tensor, sparse_part)):
            continue
        if loaded.base_dir is None:
            raise ModelLoadError(f"tensor '{tensor.name}' uses external data but the model has no directory")
        ref = parse_external_ref(tensor, loaded.base_dir, expected_nbytes(tensor))
        with open(ref.path, "rb") as f:
            f.seek(ref.offset)
            tensor.raw_data = f.read(ref.length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


# ---------------------------------------------------------------------------
# saving


def _plan_data_files(loaded: LoadedModel, output: Path, in_place: bool) -> dict[Path, str]:
    """Source data file -> location to write it under, next to ``output``: ``<output name>.<location>``
    (slashes flattened), so outputs sharing a directory never write each other's (or anyone's) data file."""
    sources: dict[Path, str] = {}
    for tensor in iter_all_tensors(loaded.proto):
        if uses_external_data(tensor):
            location = external_info(tensor).get("location", "")
            path = resolve_location(tensor.name, location, loaded.base_dir)
            sources.setdefault(path, location)
    out_dir = output.parent.resolve()
    taken: set[Path] = set()
    plan: dict[Path, str] = {}
    for src, location in sorted(sources.items()):
        target = location
        if not in_place:
            n = 1
            flat = location.replace("/", "_").replace("\\", "_")
            target = f"{output.name}.{flat}"
            while (out_dir / target).resolve() in sources or (out_dir / target).resolve() in taken:
                n += 1
                target = f"{output.name}.{n}.{flat}"
        taken.add((out_dir / target).resolve())
        plan[src] = target
    return plan


def _relocate(model: onnx.ModelProto, base_dir: Path, plan: dict[Path, str]) -> None:
    for tensor in iter_all_tensors(model):
        if uses_external_data(tensor):
            info = external_info(tensor)
            target = plan[resolve_location(tensor.name, info.get("location", ""), base_dir)]
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = target


def _temp_beside(final: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(name, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
    return Path(name)


def _write_data_file(src: Path, temp: Path, writes: list[tuple[ExternalRef, bytes | memoryview]]) -> None:
    """``src`` with the ``writes`` in place: unchanged ranges are copied, new
    ranges written, so every byte is written once."""
    writes = sorted(writes, key=lambda w: w[0].offset)
    with open(src, "rb") as fin, open(temp, "wb") as fout:
        pos = 0
        for ref, payload in writes:
            if ref.offset < pos:
                raise OutputError(f"external data ranges overlap in '{ref.location}'")
            fin.seek(pos)
            shutil.copyfileobj(_Limited(fin, ref.offset - pos), fout, 1 << 20)
            if callable(payload):  # produced now, so one tensor at a time is in memory
                payload = payload()
            fout.write(payload)
            pos = ref.offset + ref.length
        fin.seek(pos)
        shutil.copyfileobj(fin, fout, 1 << 20)
        fout.flush()
        os.fsync(fout.fileno())


class _Limited:
    """A read-only view of the next ``n`` bytes of a file."""

    def __init__(self, f, n: int):
        self.f, self.left = f, n

    def read(self, size: int = -1) -> bytes:
        if self.left <= 0:
            return b""
        size = self.left if size < 0 else min(size, self.left)
        data = self.f.read(size)
        self.left -= len(data)
        return data


@dataclass
class StagedModel:
    """An output written completely into a hidden directory beside its final
    place: ``path`` can be loaded (e.g. validated) before :meth:`commit`
    renames every file into place, or :meth:`discard` removes it all."""

    output: Path
    staging: Path
    files: list[str]  # relative to the output directory; data files first, the model last

    @property
    def path(self) -> Path:
        return self.staging / self.output.name

    def commit(self) -> Path:
        try:
            for rel in self.files:
                final = self.output.parent / rel
                final.parent.mkdir(parents=True, exist_ok=True)
                if final.exists():  # replacing a file keeps its permissions
                    os.chmod(self.staging / rel, final.stat().st_mode & 0o7777)
                os.replace(self.staging / rel, final)
        except OSError as e:
            raise OutputError(f"cannot write '{self.output}': {e.strerror or e}") from e
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
        return self.output

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)


def _check_output(output: Path) -> None:
    if not output.parent.resolve().is_dir():
        raise OutputError(f"output directory '{output.parent}' does not exist")
    if output.exists() and output.is_dir():
        raise OutputError(f"output '{output}' is a directory")


@contextmanager
def _staging(output: Path) -> Iterator[StagedModel]:
    """A fresh staging directory beside ``output``; removed, and the error made
    an :class:`OutputError`, if anything fails while it is filled."""
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".staging", dir=output.parent))
    except OSError as e:
        raise OutputError(f"cannot write in '{output.parent}': {e.strerror or e}") from e
    staged = StagedModel(output, staging, [])
    try:
        yield staged
    except (OSError, ValueError) as e:
        staged.discard()
        if isinstance(e, ValueError) and "2GB" in str(e).upper().replace(" ", ""):
            raise OutputError("the model is over 2 GiB; save it with external data") from e
        raise OutputError(f"cannot write '{output}': {getattr(e, 'strerror', None) or e}") from e
    except BaseException:
        staged.discard()
        raise


def _write_model_file(staged: StagedModel, model: onnx.ModelProto) -> None:
    """The model file, last; then ordinary permissions on every staged file
    (mkdtemp makes a private directory; outputs are ordinary files)."""
    with open(staged.path, "wb") as f:
        f.write(model.SerializeToString(deterministic=True))
        f.flush()
        os.fsync(f.fileno())
    staged.files.append(staged.output.name)
    umask = os.umask(0)
    os.umask(umask)
    for rel in staged.files:
        os.chmod(staged.staging / rel, 0o666 & ~umask)


def stage_model(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    external_writes: list[tuple[ExternalRef, object]] = (),
    overwrite: bool = False,
) -> StagedModel:
    """Write ``loaded.proto`` (and its external data, with ``external_writes``
    applied) into a staging directory next to ``output``."""
    output = Path(output)
    _check_output(output)
    in_place = loaded.path is not None and output.resolve() == loaded.path.resolve()
    if in_place and not overwrite:
        raise OutputError(f"refusing to overwrite the input model '{output}' (pass --overwrite to allow it)")
    plan = _plan_data_files(loaded, output, in_place) if loaded.base_dir is not None else {}
    if (output.resolve() in plan or output.resolve() in loaded.data_files) and not overwrite:
        raise OutputError(f"refusing to write the output over the input's external data file '{output}' "
                          "(pass --overwrite to allow it)")
    if any((output.parent / loc).resolve() == output.resolve() for loc in plan.values()):
        raise OutputError(f"the output '{output}' would be its own external data file; choose another name")
    by_source: dict[Path, list] = {src: [] for src in plan}
    for ref, payload in external_writes:
        if not callable(payload):
            payload = memoryview(np.ascontiguousarray(payload).reshape(-1).view("u1"))
        by_source[ref.path].append((ref, payload))
    model = loaded.proto
    if plan:
        model = onnx.ModelProto()
        model.CopyFrom(loaded.proto)
        _relocate(model, loaded.base_dir, plan)
    with _staging(output) as staged:
        for src, location in plan.items():
            (staged.staging / location).parent.mkdir(parents=True, exist_ok=True)
            _write_data_file(src, staged.staging / location, by_source[src])
            staged.files.append(location)
        _write_model_file(staged, model)
    return staged


def stage_repacked(loaded: LoadedModel, output: str | os.PathLike, *, overwrite: bool = False,
                   threshold: int = 1024) -> StagedModel:
    """Stage a model whose tensors are all in memory, moving every tensor of at
    least ``threshold`` bytes into one new data file ``<output>.data`` (a fresh
    layout: used when re-encoding changed which bytes are needed)."""
    output = Path(output)
    location = f"{output.name}.data"
    _check_output(output)
    if output.resolve() in loaded.data_files and not overwrite:
        raise OutputError(f"refusing to write the output over the input's external data file '{output}' "
                          "(pass --overwrite to allow it)")
    inputs = {loaded.path.resolve()} if loaded.path is not None else set()
    inputs |= set(loaded.data_files)
    if loaded.base_dir is not None:
        for t in iter_all_tensors(loaded.proto):
            if uses_external_data(t):
                inputs.add(resolve_location(t.name, external_info(t).get("location", ""), loaded.base_dir))
    if not overwrite and {output.resolve(), (output.parent / location).resolve()} & inputs:
        raise OutputError(f"refusing to overwrite the input model or its data with '{output}' "
                          "(pass --overwrite to allow it)")
    model = onnx.ModelProto()
    model.CopyFrom(loaded.proto)
    with _staging(output) as staged:
        offset = 0
        parts = list(_sparse_parts(model))  # kept inline: onnx cannot check them external; the list keeps
        sparse_parts = {id(t) for t in parts}  # the wrappers alive, so their ids stay unique
        with open(staged.staging / location, "wb") as data:
            for t in iter_all_tensors(model):
                if uses_external_data(t) or len(t.raw_data) < threshold or id(t) in sparse_parts:
                    continue
                pad = (-offset) % 64
                data.write(b"\0" * pad)
                offset += pad
                data.write(t.raw_data)
                length = len(t.raw_data)
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
                    t.external_data.add(key=key, value=value)
                offset += length
            data.flush()
            os.fsync(data.fileno())
        if offset:
            staged.files.append(location)
        else:
            (staged.staging / location).unlink()
        _write_model_file(staged, model)
    return staged


def save_model(
    loaded: LoadedModel,
    output: str | os.PathLike,
    *,
    external_writes: list[tuple[ExternalRef, object]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``loaded.proto`` and its external data to ``output`` atomically:
    everything is staged first, then renamed into place."""
    return stage_model(loaded, output, external_writes=external_writes, overwrite=overwrite).commit()


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (a report) through a temp file and a rename."""
    path = Path(path)
    if not path.parent.resolve().is_dir():
        raise OutputError(f"directory '{path.parent}' does not exist")
    temp = _temp_beside(path)
    try:
        temp.write_text(text, encoding="utf-8")
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        raise OutputError(f"cannot write '{path}': {e.strerror or e}") from e
