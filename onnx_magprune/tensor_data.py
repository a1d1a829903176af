"""Read and write the values of a ``TensorProto`` as numpy arrays.

Values stay where the exporter put them: a tensor stored in ``raw_data`` is
written back to ``raw_data``, one stored in a typed field (``float_data``,
``int32_data`` for float16/bfloat16, ``double_data``) is written back there,
and one stored as external data is read through a copy-on-write memory map
and is read into memory (or mapped read-only, for inspection); its new bytes
are handed to the writer at save time, so nothing else in the model changes.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from .errors import ModelLoadError
from .external_data import ExternalRef, parse_external_ref, uses_external_data

FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
#: integer types quantized weights use; 4-bit ones are packed two per byte on disk
QUANT_TYPES = {TensorProto.INT8, TensorProto.UINT8, TensorProto.INT16, TensorProto.UINT16}
for _name in ("INT4", "UINT4"):
    if hasattr(TensorProto, _name):
        QUANT_TYPES.add(getattr(TensorProto, _name))
_PACKED_4BIT = {getattr(TensorProto, n) for n in ("INT4", "UINT4") if hasattr(TensorProto, n)}


def dtype_name(data_type: int) -> str:
    try:
        return TensorProto.DataType.Name(data_type).lower()
    except ValueError:
        return f"unknown({data_type})"


def np_dtype(data_type: int) -> np.dtype:
    """Little-endian numpy dtype of a float ONNX type (bfloat16 as onnx's ml_dtypes type)."""
    return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).newbyteorder("<")


def numel(tensor: TensorProto) -> int:
    return math.prod(tensor.dims)


def _typed_field(data_type: int) -> str:
    return {
        TensorProto.FLOAT: "float_data",
        TensorProto.DOUBLE: "double_data",
        TensorProto.FLOAT16: "int32_data",
        TensorProto.BFLOAT16: "int32_data",
    }[data_type]


class FileSource:
    """A float tensor stored as external data, read block by block (see
    :func:`onnx_magprune.selection.as_source`): selection over it needs no
    copy of the tensor in memory."""

    def __init__(self, ref: ExternalRef, dtype: np.dtype, size: int):
        self.ref, self.dtype, self.size = ref, dtype, size
        self._bits = np.dtype(f"<u{dtype.itemsize}")

    def read(self, start: int, stop: int) -> np.ndarray:
        stop = min(stop, self.size)
        raw = np.fromfile(self.ref.path, dtype=self._bits, count=stop - start,
                          offset=self.ref.offset + start * self.dtype.itemsize)
        if raw.size != stop - start:
            raise ModelLoadError(f"external data '{self.ref.location}' ended early")
        return raw.view(self.dtype)

    def take_strided(self, first: int, stride: int) -> np.ndarray:
        item = self.dtype.itemsize
        out = np.empty(len(range(first, self.size, stride)), self._bits)
        fd = os.open(self.ref.path, os.O_RDONLY)
        try:
            for j, i in enumerate(range(first, self.size, stride)):
                out[j] = int.from_bytes(os.pread(fd, item, self.ref.offset + i * item), "little")
        finally:
            os.close(fd)
        return out.view(self.dtype)


class TensorStore:
    """Reads float tensors of one model as writable arrays; writes them back.

    ``base_dir`` is the model's directory, needed for external data (``None``
    when the model came from memory: then external references are an error).
    """

    def __init__(self, base_dir: Path | None):
        self.base_dir = base_dir
        self.external_writes: list[tuple[ExternalRef, np.ndarray]] = []
        self._refs: dict[int, ExternalRef] = {}

    def read(self, tensor: TensorProto, *, writable: bool = True) -> np.ndarray:
        """The tensor's values.  ``writable=False`` may return a read-only
        memory map of external data instead of reading it into memory."""
        if tensor.data_type in QUANT_TYPES:
            return self._read_integer(tensor)
        if tensor.data_type not in FLOAT_TYPES:
            raise ModelLoadError(f"tensor '{tensor.name}' is {dtype_name(tensor.data_type)}, not floating point")
        dtype = np_dtype(tensor.data_type)
        shape = tuple(tensor.dims)
        n = numel(tensor)
        if uses_external_data(tensor):
            return self._read_external(tensor, dtype, shape, n, writable)
        if tensor.raw_data:
            if len(tensor.raw_data) != n * dtype.itemsize:
                raise ModelLoadError(
                    f"tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes but its shape {list(shape)} "
                    f"needs {n * dtype.itemsize}"
                )
            return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape).copy()
        field = getattr(tensor, _typed_field(tensor.data_type))
        if len(field) != n:
            raise ModelLoadError(
                f"tensor '{tensor.name}' holds {len(field)} values but its shape {list(shape)} needs {n}"
            )
        if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            return np.asarray(field, dtype=np.int64).astype(np.uint16).view(dtype).reshape(shape)
        return np.asarray(field, dtype=dtype).reshape(shape)

    def source(self, tensor: TensorProto):
        """What selection reads: a :class:`FileSource` for float external data
        (nothing read into memory), else the values themselves."""
        if tensor.data_type in FLOAT_TYPES and uses_external_data(tensor) and self.base_dir is not None:
            dtype = np_dtype(tensor.data_type)
            ref = parse_external_ref(tensor, self.base_dir, numel(tensor) * dtype.itemsize)
            self._refs[id(tensor)] = ref
            return FileSource(ref, dtype, numel(tensor))
        return self.read(tensor)

    def encode(self, tensor: TensorProto, array: np.ndarray) -> memoryview:
        """The bytes ``array`` has in ``tensor``'s external data (4-bit types packed)."""
        if tensor.data_type in QUANT_TYPES:
            return memoryview(numpy_helper.from_array(np.ascontiguousarray(array)).raw_data)
        return memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))

    def defer(self, tensor: TensorProto, produce) -> None:
        """Have the saver call ``produce()`` for ``tensor``'s new bytes while it
        writes the output, so only one tensor is in memory at a time."""
        self.external_writes.append((self._refs[id(tensor)], produce))

    def _read_integer(self, tensor: TensorProto) -> np.ndarray:
        """Quantized weights: decoded with onnx's own rules (4-bit unpacked to one value per byte)."""
        proxy = tensor
        if uses_external_data(tensor):
            if self.base_dir is None:
                raise ModelLoadError(
                    f"tensor '{tensor.name}' uses external data but the model was given without its file path")
            ref = parse_external_ref(tensor, self.base_dir, _packed_nbytes(tensor))
            self._refs[id(tensor)] = ref
            with open(ref.path, "rb") as f:
                f.seek(ref.offset)
                proxy = TensorProto(dims=tensor.dims, data_type=tensor.data_type, raw_data=f.read(ref.length))
        elif tensor.raw_data and len(tensor.raw_data) != _packed_nbytes(tensor):
            raise ModelLoadError(f"tensor '{tensor.name}' holds {len(tensor.raw_data)} bytes but its shape "
                                 f"{list(tensor.dims)} needs {_packed_nbytes(tensor)}")
        try:
            return np.array(numpy_helper.to_array(proxy))
        except (ValueError, TypeError) as e:
            raise ModelLoadError(f"tensor '{tensor.name}' cannot be decoded: {e}") from e

    def _read_external(self, tensor: TensorProto, dtype: np.dtype, shape, n: int, writable: bool) -> np.ndarray:
        if self.base_dir is None:
            raise ModelLoadError(
                f"tensor '{tensor.name}' uses external data but the model was given without its file path"
            )
        ref = parse_external_ref(tensor, self.base_dir, n * dtype.itemsize)
        self._refs[id(tensor)] = ref
        if n == 0:
            return np.empty(shape, dtype)
        bits = np.dtype(f"<u{dtype.itemsize}")
        try:
            if writable:  # one read() into memory: cheaper than copy-on-write page faults
                raw = np.fromfile(ref.path, dtype=bits, count=n, offset=ref.offset)
            else:
                raw = np.memmap(ref.path, dtype=bits, mode="r", offset=ref.offset, shape=(n,))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"tensor '{tensor.name}': cannot read external data '{ref.location}': {e}") from e
        if raw.size != n:
            raise ModelLoadError(f"tensor '{tensor.name}': external data '{ref.location}' ended early")
        return raw.view(dtype).reshape(shape)

    def write(self, tensor: TensorProto, array: np.ndarray) -> None:
        """Store ``array`` (same shape and dtype as read) as ``tensor``'s values."""
        if tensor.data_type in QUANT_TYPES:
            self._write_integer(tensor, array)
            return
        if uses_external_data(tensor):
            self.external_writes.append((self._refs[id(tensor)], array))
            return
        if tensor.raw_data or numel(tensor) == 0:
            tensor.raw_data = np.ascontiguousarray(array).tobytes()
            return
        name = _typed_field(tensor.data_type)
        field = getattr(tensor, name)
        del field[:]
        if tensor.data_type in (TensorProto.FLOAT16, TensorProto.BFLOAT16):
            field.extend(array.reshape(-1).view(np.uint16).astype(np.int32).tolist())
        else:
            field.extend(array.reshape(-1).tolist())

    def _write_integer(self, tensor: TensorProto, array: np.ndarray) -> None:
        packed = numpy_helper.from_array(np.ascontiguousarray(array)).raw_data  # onnx packs 4-bit types
        if uses_external_data(tensor):
            self.external_writes.append((self._refs[id(tensor)], np.frombuffer(packed, np.uint8)))
        elif tensor.raw_data or numel(tensor) == 0:
            tensor.raw_data = packed
        else:  # typed storage: int32_data holds the packed bytes of 4-bit types, else one value each
            del tensor.int32_data[:]
            if tensor.data_type in _PACKED_4BIT:
                tensor.int32_data.extend(np.frombuffer(packed, np.uint8).astype(np.int32).tolist())
            else:
                tensor.int32_data.extend(array.reshape(-1).astype(np.int32).tolist())


def _packed_nbytes(tensor: TensorProto) -> int:
    n = numel(tensor)
    if tensor.data_type in _PACKED_4BIT:
        return (n + 1) // 2
    return n * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
