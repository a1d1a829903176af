"""Calibration data: where feeds come from, checked against what the model expects.

Sources (all give batches of ``{input_name: array}`` plus optional labels):

* ``.npz``: one array per model input (batch on the first axis) and an
  optional ``labels`` array;
* a directory of ``<input name>.npy`` files (optionally ``labels.npy``),
  memory-mapped so large sets are read batch by batch;
* an ONNX test-data directory: ``input_0.pb``, ``input_1.pb``, ... as
  TensorProto, either directly or in ``test_data_set_*`` subdirectories (one
  feed per set);
* from Python, any iterable of feeds, or an object following ONNX Runtime's
  quantization ``CalibrationDataReader`` protocol (``get_next()`` returning a
  dict, then None);
* nothing: seeded synthetic inputs from the model's input types and shapes
  (see :class:`SyntheticSpec`).  Synthetic data is not calibration data, and
  every report says so.
"""

from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import MagpruneError
from .runtime import RuntimeFailure


class CalibrationError(MagpruneError):
    """Calibration data is unreadable or does not fit the model."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...] | None  # None: unknown rank; str/None entries: dynamic

    def describe(self) -> str:
        if self.shape is None:
            dims = "?"
        else:
            dims = ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in self.shape)
        return f"{self.name}: {self.dtype} [{dims}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (graph inputs that are not initializers)."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise CalibrationError(f"input '{vi.name}' is not a tensor (sequences and maps are not supported)")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type))
        shape = None
        if tt.HasField("shape"):
            shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        specs.append(InputSpec(vi.name, dtype, shape))
    return specs


@dataclass
class Batch:
    feeds: dict[str, np.ndarray]
    labels: np.ndarray | None = None


@dataclass
class CalibrationSet:
    """A re-iterable source of batches.  ``batches()`` may be called once per model run."""

    description: str
    synthetic: bool
    _make: Callable[[int], Iterator[Batch]]
    has_labels: bool = False
    samples: int | None = None
    notes: list[str] = field(default_factory=list)
    fixed_batches: bool = False  # each item is already a batch (feeds, ONNX test sets): batch_size is ignored

    def batches(self, batch_size: int) -> Iterator[Batch]:
        return self._make(batch_size)

    def count_batches(self, batch_size: int) -> int | None:
        if self.samples is None:
            return None
        return self.samples if self.fixed_batches else math.ceil(self.samples / batch_size)


# ---------------------------------------------------------------------------
# checking feeds against the model


def check_feeds(feeds: Mapping[str, Any], specs: Sequence[InputSpec], where: str) -> dict[str, np.ndarray]:
    """Arrays for exactly the model's inputs, or a one-line error saying what it expects."""
    expected = ", ".join(s.describe() for s in specs)
    names = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in feeds]
    extra = sorted(set(feeds) - names - {"labels"})
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unknown {', '.join(extra)}")
        raise CalibrationError(f"{where}: {'; '.join(parts)} (the model expects {expected})")
    out = {}
    for spec in specs:
        value = feeds[spec.name]
        if not isinstance(value, np.ndarray):
            try:
                value = np.asarray(value)
            except Exception as e:  # noqa: BLE001 - anything that is not array-like
                raise CalibrationError(f"{where}: input '{spec.name}' is not an array ({e})") from e
        if value.dtype != spec.dtype:
            raise CalibrationError(
                f"{where}: input '{spec.name}' is {value.dtype}, the model expects {spec.dtype} "
                f"(convert it, e.g. array.astype(np.{spec.dtype.name}))")
        if spec.shape is not None:
            if value.ndim != len(spec.shape):
                raise CalibrationError(
                    f"{where}: input '{spec.name}' has shape {list(value.shape)}, the model expects "
                    f"rank {len(spec.shape)} ({spec.describe()})")
            for axis, (got, want) in enumerate(zip(value.shape, spec.shape)):
                if isinstance(want, int) and want > 0 and got != want and not (axis == 0 and got % want == 0):
                    raise CalibrationError(
                        f"{where}: input '{spec.name}' has shape {list(value.shape)}, the model expects "
                        f"{spec.describe()} (axis {axis} must be "
                        + (f"a multiple of {want}: the model fixes its batch, samples are fed {want} at a time)"
                           if axis == 0 else f"{want})"))
        out[spec.name] = value
    return out


def _static_batch(specs: Sequence[InputSpec]) -> int | None:
    """A batch size the model fixes in its first axis (e.g. exported with batch 1)."""
    fixed = {s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0}
    return min(fixed) if fixed else None


def effective_batch(requested: int, specs: Sequence[InputSpec]) -> int:
    fixed = _static_batch(specs)
    return fixed if fixed is not None else requested


# ---------------------------------------------------------------------------
# sources


def _slice_batches(arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, n: int,
                   batch_size: int, limit: int | None) -> Iterator[Batch]:
    total = n if limit is None else min(n, limit)
    for start in range(0, total, batch_size):
        stop = min(start + batch_size, total)
        # (np.ascontiguousarray would make a 0-d array 1-d)
        yield Batch({k: np.ascontiguousarray(v[start:stop]) if v.ndim else np.array(v) for k, v in arrays.items()},
                    None if labels is None else np.asarray(labels[start:stop]))


def _first_axis(arrays: Mapping[str, np.ndarray], labels: np.ndarray | None, where: str) -> int:
    """The number of samples: the first axis every array shares.  A 0-d array (the value of a scalar
    input, such as a loop count) has no samples: it is fed whole with every batch; with nothing
    else, the data is one sample."""
    sizes = {k: v.shape[0] for k, v in arrays.items() if v.ndim}
    if arrays and not sizes:
        sizes = {"": 1}
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{k}: {s}" for k, s in sizes.items())
        raise CalibrationError(f"{where}: inputs disagree on the number of samples ({listing})")
    n = distinct.pop() if distinct else 0
    if labels is not None and len(labels) != n:
        raise CalibrationError(f"{where}: {len(labels)} labels for {n} samples")
    return n


def _array_source(arrays: dict[str, np.ndarray], labels: np.ndarray | None, specs: Sequence[InputSpec],
                  where: str, max_samples: int | None) -> CalibrationSet:
    check_feeds(arrays, specs, where)  # no copies: arrays (or memory maps) are only inspected
    n = _first_axis(arrays, labels, where)
    if n == 0:
        raise CalibrationError(f"{where}: no samples")
    samples = n if max_samples is None else min(n, max_samples)
    return CalibrationSet(
        description=where, synthetic=False,
        _make=lambda bs: _slice_batches(arrays, labels, n, bs, max_samples),
        has_labels=labels is not None, samples=samples)


def _load_labels(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "labels" not in z.files:
                    raise CalibrationError(f"labels file '{path}' has no 'labels' array")
                return z["labels"]
        return np.load(path, allow_pickle=False)
    except CalibrationError:
        raise
    except (OSError, ValueError) as e:
        raise CalibrationError(f"cannot read labels '{path}': {e}") from e


def from_npz(path: Path, specs: Sequence[InputSpec], *, labels: Path | None = None,
             max_samples: int | None = None) -> CalibrationSet:
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise CalibrationError(f"cannot read calibration file '{path}': {e}") from e
    label_array = data.pop("labels", None)
    if labels is not None:
        label_array = _load_labels(labels)
    return _array_source(data, label_array, specs, f"calibration '{path.name}'", max_samples)


def from_npy_dir(path: Path, specs: Sequence[InputSpec], *, labels: Path | None = None,
                 max_samples: int | None = None) -> CalibrationSet:
    arrays = {}
    for f in sorted(path.glob("*.npy")):
        try:
            arrays[f.stem] = np.load(f, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CalibrationError(f"cannot read '{f}': {e}") from e
    label_array = arrays.pop("labels", None)
    if labels is not None:
        label_array = _load_labels(labels)
    return _array_source(arrays, label_array, specs, f"calibration directory '{path.name}'", max_samples)


def _read_pb(path: Path) -> onnx.TensorProto:
    t = onnx.TensorProto()
    try:
        t.ParseFromString(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise CalibrationError(f"'{path}' is not a TensorProto: {e}") from e
    return t


def from_onnx_test_dir(path: Path, specs: Sequence[InputSpec], *, max_samples: int | None = None) -> CalibrationSet:
    sets = sorted((d for d in path.glob("test_data_set_*") if d.is_dir()),
                  key=lambda d: int(re.sub(r"\D", "", d.name) or 0))
    if not sets:
        sets = [path]
    feeds: list[dict[str, np.ndarray]] = []
    for d in sets:
        files = sorted(d.glob("input_*.pb"), key=lambda f: int(re.sub(r"\D", "", f.stem) or 0))
        if not files:
            raise CalibrationError(f"'{d}' holds no input_*.pb files")
        if len(files) != len(specs):
            raise CalibrationError(f"'{d}' holds {len(files)} inputs, the model expects {len(specs)} "
                                   f"({', '.join(s.describe() for s in specs)})")
        feed = {}
        for f, spec in zip(files, specs):
            t = _read_pb(f)
            name = t.name or spec.name
            try:
                feed[name] = numpy_helper.to_array(t)
            except Exception as e:  # noqa: BLE001
                raise CalibrationError(f"cannot decode '{f}': {e}") from e
        feeds.append(check_feeds(feed, specs, f"'{d.name}'"))
    if max_samples is not None:
        feeds = feeds[:max_samples]
    return CalibrationSet(description=f"ONNX test data '{path.name}' ({len(feeds)} sets)", synthetic=False,
                          _make=lambda bs: (Batch(f) for f in feeds), samples=len(feeds), fixed_batches=True)


def from_feeds(feeds: Iterable[Mapping[str, Any]] | Any, specs: Sequence[InputSpec], *,
               max_samples: int | None = None) -> CalibrationSet:
    """From an iterable of feed dicts or a ``CalibrationDataReader`` (read once, kept)."""
    items: list[dict[str, np.ndarray]] = []
    if hasattr(feeds, "get_next"):
        while (item := feeds.get_next()) is not None:
            items.append(item)
            if max_samples is not None and len(items) >= max_samples:
                break
        what = "CalibrationDataReader"
    else:
        for item in feeds:
            items.append(item)
            if max_samples is not None and len(items) >= max_samples:
                break
        what = "feeds"
    checked = []
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise CalibrationError(f"{what} item {i} is {type(item).__name__}, not a dict of input arrays")
        labels = item.get("labels")
        checked.append(Batch(check_feeds(item, specs, f"{what} item {i}"),
                             None if labels is None else np.asarray(labels)))
    if not checked:
        raise CalibrationError(f"{what} produced no feeds")
    has_labels = all(b.labels is not None for b in checked)
    return CalibrationSet(description=f"{what} ({len(checked)} feeds)", synthetic=False,
                          _make=lambda bs: iter(checked), has_labels=has_labels, samples=len(checked),
                          fixed_batches=True)


# ---------------------------------------------------------------------------
# synthetic


@dataclass(frozen=True)
class SyntheticSpec:
    """How synthetic inputs are made.  Dynamic dimensions take ``shapes[name]``
    when given, else ``samples`` for the first axis and ``dynamic_dim`` for the
    others.  Floats are standard normal, integers uniform in ``int_range``
    (half-open), booleans fair coins; all from ``numpy.random.default_rng(seed)``."""

    samples: int = 16
    dynamic_dim: int = 16
    int_range: tuple[int, int] = (0, 100)
    seed: int = 0
    shapes: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


def synthetic(specs: Sequence[InputSpec], spec: SyntheticSpec = SyntheticSpec()) -> CalibrationSet:
    unknown = sorted(set(spec.shapes) - {s.name for s in specs})
    if unknown:
        raise CalibrationError(f"--shape names unknown input(s) {', '.join(unknown)} "
                               f"(inputs: {', '.join(s.name for s in specs)})")
    rng = np.random.default_rng(spec.seed)
    arrays = {}
    for s in specs:
        if s.name in spec.shapes:
            shape = tuple(spec.shapes[s.name])
            if s.shape is not None and len(shape) != len(s.shape):
                raise CalibrationError(f"--shape {s.name}: rank {len(shape)}, the model expects {s.describe()}")
        elif s.shape is None:
            raise CalibrationError(f"input '{s.name}' has no known shape: give one with --shape {s.name}=...")
        else:
            shape = tuple(d if isinstance(d, int) and (d > 0 or (d == 0 and i > 0))  # a fixed 0 is enforced
                          else (spec.samples if i == 0 else spec.dynamic_dim)
                          for i, d in enumerate(s.shape))
        arrays[s.name] = _random(rng, s.dtype, shape, spec.int_range)
    if not arrays:
        raise CalibrationError("the model has no inputs to synthesise")
    lo, hi = spec.int_range
    note = (f"SYNTHETIC inputs (seed {spec.seed}; floats N(0,1), integers in [{lo}, {hi})): "
            "this is not calibration data, so drift says little about real inputs")
    firsts = {a.shape[0] for a in arrays.values() if a.ndim}
    fixed = all(s.name not in spec.shapes and s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0
                for s in specs if s.shape)
    if len(firsts) > 1 and fixed:  # fixed shapes with no common sample axis (e.g. a Scan's state and sequence)
        fixed_note = ("the model fixes every input's shape and they share no sample axis: one synthetic feed of "
                      "those shapes is used (--samples and --batch-size do not apply)")
        return CalibrationSet(description="synthetic (one fixed-shape feed)", synthetic=True,
                              _make=lambda bs: iter([Batch(dict(arrays))]), samples=1, notes=[note, fixed_note],
                              fixed_batches=True)
    n = _first_axis(arrays, None, "synthetic inputs")
    if n == 0:
        raise CalibrationError("the model has no inputs to synthesise")
    return CalibrationSet(description="synthetic", synthetic=True,
                          _make=lambda bs: _slice_batches(arrays, None, n, bs, None), samples=n, notes=[note])


@contextmanager
def synthetic_hint(calib: CalibrationSet, specs: Sequence[InputSpec], spec: SyntheticSpec) -> Iterator[None]:
    """Re-raise an onnxruntime failure inside with a hint when synthetic integers on ``calib`` may be
    the cause (an index input such as token_type_ids beyond its table)."""
    try:
        yield
    except RuntimeFailure as e:
        if not calib.synthetic or not any(s.dtype.kind in "iu" for s in specs):
            raise
        lo, hi = spec.int_range
        raise RuntimeFailure(f"{e} (the inputs are synthetic, integers drawn from [{lo}, {hi}): an index input "
                             "such as token_type_ids may need a narrower --int-range, e.g. 0,2, or pass "
                             "--calibration)") from e


def _random(rng: np.random.Generator, dtype: np.dtype, shape: tuple[int, ...], int_range) -> np.ndarray:
    if dtype.kind == "f" or dtype.name == "bfloat16":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind in "iu":
        lo, hi = int_range
        info = np.iinfo(dtype)
        return rng.integers(max(lo, info.min), min(hi, info.max + 1), size=shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, size=shape).astype(bool)
    raise CalibrationError(f"cannot synthesise inputs of type {dtype}; give calibration data")


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``name=1,128`` -> ("name", (1, 128))."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        shape = ()
    if not sep or not name or not shape or any(d <= 0 for d in shape):
        raise CalibrationError(f"--shape '{text}' must look like NAME=1,128 (positive integers)")
    return name, shape


# ---------------------------------------------------------------------------
# dispatch


def open_calibration(source: Any, model: onnx.ModelProto, *, labels: str | Path | None = None,
                     synthetic_spec: SyntheticSpec = SyntheticSpec(),
                     max_samples: int | None = None) -> CalibrationSet:
    """A :class:`CalibrationSet` for ``model`` from a path, Python feeds, or None (synthetic)."""
    specs = model_inputs(model)
    labels_path = Path(labels) if labels is not None else None
    if labels_path is not None and not labels_path.is_file():
        raise CalibrationError(f"labels file '{labels_path}' does not exist")
    if source is None:
        if labels_path is not None:
            raise CalibrationError("--labels needs --calibration data to go with it")
        return synthetic(specs, synthetic_spec)
    if isinstance(source, CalibrationSet):
        return source
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            if any(path.glob("*.npy")):
                return from_npy_dir(path, specs, labels=labels_path, max_samples=max_samples)
            if any(path.glob("input_*.pb")) or any(path.glob("test_data_set_*")):
                return from_onnx_test_dir(path, specs, max_samples=max_samples)
            raise CalibrationError(f"calibration directory '{path}' holds no .npy files and no ONNX test data")
        if not path.exists():
            raise CalibrationError(f"calibration data '{path}' does not exist")
        if path.suffix == ".npz":
            return from_npz(path, specs, labels=labels_path, max_samples=max_samples)
        raise CalibrationError(f"calibration data '{path}' must be a .npz file or a directory")
    return from_feeds(source, specs, max_samples=max_samples)


def samples_in(batch: Batch) -> int:
    """Samples in ``batch``: the first axis of its first array that has one (0-d arrays are fed whole)."""
    first = next((v for v in batch.feeds.values() if np.ndim(v)), None)
    return int(first.shape[0]) if first is not None else 1


def split_holdout(calib: CalibrationSet, fraction: float, *, batch: int = 1) -> tuple[CalibrationSet,
                                                                                   CalibrationSet | None]:
    """``(fit, held_out)``: the first samples for statistics, the last ``fraction`` of them
    (rounded half up, at least one when ``fraction > 0``) kept apart for validation.  Sources
    whose items are whole batches (Python feeds, ONNX test data) are split by item.  ``batch``:
    the batch size the model fixes (its samples come in multiples of it); both parts keep whole
    batches of it."""
    whole = calib.fixed_batches
    size_of = (lambda _b: 1) if whole else samples_in
    n = calib.samples
    if n is None:
        n = sum(size_of(b) for b in calib.batches(64))
    step = 1 if whole else max(1, int(batch))
    held = min(n - step, max(step, step * math.floor(fraction * n / step + 0.5))) if fraction > 0 else 0
    if n - held < 1 or held < 0:
        raise CalibrationError(f"{calib.description}: {n} sample(s) cannot be split into statistics and a holdout"
                               + (f" in whole batches of {step} (the model fixes its batch)" if step > 1 else ""))
    unit = "batches" if whole else "samples"

    def part(lo: int, hi: int, what: str) -> CalibrationSet:
        def make(batch_size: int) -> Iterator[Batch]:
            offset = 0
            for batch in calib.batches(batch_size):
                size = size_of(batch)
                a, b = max(lo, offset), min(hi, offset + size)
                if a < b:
                    if whole:
                        yield batch
                    else:
                        sl = slice(a - offset, b - offset)
                        yield Batch({k: v[sl] if v.ndim else v for k, v in batch.feeds.items()},
                                    None if batch.labels is None else batch.labels[sl])
                offset += size
                if offset >= hi:
                    break

        return CalibrationSet(description=f"{calib.description} ({what}: {unit} {lo}..{hi - 1} of {n})",
                              synthetic=calib.synthetic, _make=make, has_labels=calib.has_labels,
                              samples=hi - lo, notes=list(calib.notes), fixed_batches=whole)

    if held == 0:
        return calib, None
    return part(0, n - held, "statistics"), part(n - held, n, "holdout")
