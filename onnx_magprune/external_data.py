"""Defensive parsing of ONNX external-data references.

A tensor stored outside the model file names a ``location`` relative to the
model's directory plus an optional ``offset`` and ``length``.  Models come from
outside the team, so every reference is checked before a byte is read: the
location must be relative, must not climb out of the model's directory (also
not through a symlink: onnx learned this from CVE-2022-25882 and
CVE-2024-27318), and the byte range must lie inside the file and match the
tensor's size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from .errors import ExternalDataError

_KNOWN_KEYS = {"location", "offset", "length", "checksum", "basepath"}


@dataclass(frozen=True)
class ExternalRef:
    """Where one tensor's bytes live on disk."""

    location: str  # as written in the model
    path: Path  # resolved, inside the model directory
    offset: int
    length: int


def uses_external_data(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL


def _int_field(tensor_name: str, key: str, value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ExternalDataError(f"tensor '{tensor_name}': external data {key} {value!r} is not an integer") from None
    if number < 0:
        raise ExternalDataError(f"tensor '{tensor_name}': external data {key} {number} is negative")
    return number


def resolve_location(tensor_name: str, location: str, base_dir: Path) -> Path:
    if not location:
        raise ExternalDataError(f"tensor '{tensor_name}': external data has no location")
    if "\0" in location:
        raise ExternalDataError(f"tensor '{tensor_name}': external data location contains a NUL byte")
    posix, windows = PurePosixPath(location), PureWindowsPath(location)
    if posix.is_absolute() or windows.is_absolute() or windows.drive:
        raise ExternalDataError(f"tensor '{tensor_name}': external data location '{location}' is an absolute path")
    if ".." in posix.parts or ".." in windows.parts:
        raise ExternalDataError(f"tensor '{tensor_name}': external data location '{location}' contains '..'")
    root = base_dir.resolve()
    path = (root / location).resolve()
    if path != root and root not in path.parents:
        raise ExternalDataError(
            f"tensor '{tensor_name}': external data location '{location}' resolves outside the model directory"
        )
    if not path.is_file():
        raise ExternalDataError(f"tensor '{tensor_name}': external data file '{location}' does not exist")
    return path


def external_info(tensor: onnx.TensorProto) -> dict[str, str]:
    """The tensor's external-data entries as a dict, checked for duplicates and unknown keys."""
    name = tensor.name or "<unnamed>"
    info: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key in info:
            raise ExternalDataError(f"tensor '{name}': external data key '{entry.key}' is given twice")
        info[entry.key] = entry.value
    unknown = sorted(set(info) - _KNOWN_KEYS)
    if unknown:
        raise ExternalDataError(f"tensor '{name}': unknown external data key(s) {', '.join(unknown)}")
    return info


def parse_external_ref(tensor: onnx.TensorProto, base_dir: Path, nbytes: int | None) -> ExternalRef:
    """Check ``tensor``'s external-data entry against ``base_dir`` and the
    ``nbytes`` its shape and dtype need (``None``: not checked); return where its bytes are."""
    name = tensor.name or "<unnamed>"
    info = external_info(tensor)
    location = info.get("location", "")
    path = resolve_location(name, location, base_dir)
    offset = _int_field(name, "offset", info["offset"]) if "offset" in info else 0
    size = os.path.getsize(path)
    length = _int_field(name, "length", info["length"]) if "length" in info else size - offset
    if offset > size or offset + length > size:
        raise ExternalDataError(
            f"tensor '{name}': external data range [{offset}, {offset + length}) lies beyond the end of "
            f"'{location}' ({size} bytes)"
        )
    if nbytes is not None and length != nbytes:
        raise ExternalDataError(
            f"tensor '{name}': external data holds {length} bytes but its shape and type need {nbytes}"
        )
    return ExternalRef(location=location, path=path, offset=offset, length=length)
