"""Latency, start-up, memory and size of one model, or of two compared A/B.

Timing is honest about noise: session creation and inference alternate
between the models (A/B/A/B, with the order flipped every round) on identical
inputs and session options with fixed threads, and every ratio comes with its
spread.  Peak memory at session creation is measured in a fresh process per
model.  On a GPU provider inputs and outputs stay on the device (I/O binding).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnx

from . import __version__
from .calibration import SyntheticSpec, effective_batch, model_inputs, open_calibration, synthetic_hint
from .discovery import find_weights
from .encoding import decode_model, decoder_inputs, has_encoding
from .graph_index import GraphIndex
from .model_io import count_params, internalize_external_data, iter_all_tensors, load_model
from .planning import quant_info
from .quantized import QuantShapeError, dequantize
from .progress import Progress
from .folding import FoldCheck, can_check_in_session, check_on_cpu, decoder_weights, optimized_model_path, \
    unfolded_decoders
from .runtime import BoundRunner, ModelRef, ProviderChoice, available_providers, create_session, resolve_providers
from .tensor_data import FLOAT_TYPES, TensorStore, dtype_name, numel
from .validate import RuntimeOptions, _graph_of, _label

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BenchOptions:
    runs: int = 50
    warmup: int = 5
    startup_repeats: int = 3
    measure_memory: bool = True


def _stats(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def _ratio_stats(num: Sequence[float], den: Sequence[float]) -> dict[str, float] | None:
    if not num or not den:
        return None
    r = np.asarray(num, dtype=np.float64) / np.asarray(den, dtype=np.float64)
    return {"median": float(np.median(r)), "p10": float(np.percentile(r, 10)), "p90": float(np.percentile(r, 90)),
            "n": int(r.size)}


def file_size(model: ModelRef) -> int | None:
    """Bytes on disk, the model file plus every external-data file it names."""
    if isinstance(model, (onnx.ModelProto, bytes)):
        return None
    path = Path(model)
    total = path.stat().st_size
    proto = _graph_of(model)
    seen = set()
    for t in iter_all_tensors(proto):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = next((e.value for e in t.external_data if e.key == "location"), None)
            if loc and loc not in seen:
                seen.add(loc)
                f = path.parent / loc
                if f.is_file():
                    total += f.stat().st_size
    return total


def parameter_counts(model: ModelRef) -> dict[str, Any]:
    """Elements and non-zeros of every floating-point constant, and in total, counted on the dense
    weights (sparse and compact weights decoded first); quantized weights count the entries off
    their zero point in ``quantized_nonzero``."""
    proto = _graph_of(model)
    base = None if isinstance(model, (onnx.ModelProto, bytes)) else Path(model).parent
    if has_encoding(proto):  # count the weights the session sees, not their stored values and codes
        if base is None:
            proto = onnx.ModelProto.FromString(proto.SerializeToString())
        else:  # decoding reads the decoders' constants and sparse parts; the rest stays in its files
            loaded = load_model(model)
            needed = decoder_inputs(loaded.proto)
            internalize_external_data(loaded, only=lambda t, sparse_part: sparse_part or t.name in needed)
            proto = loaded.proto
        decode_model(proto)
    store = TensorStore(base)
    tensors, nonzero = [], 0
    for t in iter_all_tensors(proto):
        n = numel(t)
        if t.data_type not in FLOAT_TYPES or n == 0:
            continue
        a = store.read(t, writable=False)
        nz = int(np.count_nonzero(a.astype(np.float32) if a.dtype.name == "bfloat16" else a))
        nonzero += nz
        tensors.append({"name": t.name, "dtype": dtype_name(t.data_type), "numel": n, "nonzero": nz})
    quantized = 0
    for w in find_weights(GraphIndex(proto), min_numel=0).weights:
        if w.quant is None:
            continue
        try:
            info = quant_info(w.quant, store)
            nz = int(np.count_nonzero(dequantize(store.read(w.tensor, writable=False), info)))
        except (QuantShapeError, ValueError):
            continue
        quantized += nz
        tensors.append({"name": w.name, "dtype": dtype_name(w.tensor.data_type), "numel": numel(w.tensor),
                        "nonzero": nz})
    return {"params": count_params(proto), "float_nonzero": nonzero, "quantized_nonzero": quantized,
            "tensors": tensors}


def _peak_rss_child(source: str, choice: ProviderChoice, threads: int | None) -> dict[str, int] | None:
    code = (
        "import json,sys,resource,onnxruntime as ort\n"
        "a=json.loads(sys.argv[1])\n"
        "def rss():\n"
        "    for l in open('/proc/self/status'):\n"
        "        if l.startswith('VmRSS:'): return int(l.split()[1])*1024\n"
        "base=rss()\n"
        "so=ort.SessionOptions()\n"
        "if a['threads']: so.intra_op_num_threads=a['threads']\n"
        "s=ort.InferenceSession(a['model'],sess_options=so,providers=a['providers'],provider_options=a['options'])\n"
        "print(json.dumps({'before':base,'peak':resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024,"
        "'after':rss()}))\n"
    )
    arg = json.dumps({"model": source, "providers": choice.providers, "options": choice.options, "threads": threads})
    try:
        proc = subprocess.run([sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0 or not sys.platform.startswith("linux"):
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass
class BenchReport:
    models: list[dict[str, Any]]
    providers_used: list[str]
    threads: int | None
    batch_size: int
    inputs: str
    comparison: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "tool": {"name": "onnx-magprune", "version": __version__},
                "command": "bench", "providers_used": self.providers_used, "threads": self.threads,
                "batch_size": self.batch_size, "inputs": self.inputs, "models": self.models,
                "comparison": self.comparison, "notes": self.notes}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def _lines(self, markdown: bool) -> list[str]:
        rows = [["model", "size", "params", "non-zero", "session create p50", "latency p50", "latency p90",
                 "RSS added by session"]]
        for m in self.models:
            rss = m.get("session_peak_rss")
            counts = m["params"]
            nonzero = counts["float_nonzero"] + counts.get("quantized_nonzero", 0)
            rows.append([m["model"], _mb(m["file_bytes"]), f"{counts['params']:,}",
                         f"{nonzero:,}", _ms(m["session_create_seconds"]["p50"]),
                         _ms(m["latency_seconds"]["p50"]), _ms(m["latency_seconds"]["p90"]),
                         _mb(rss["peak"] - rss["before"]) if rss else "-"])
        if markdown:
            out = ["## onnx-magprune bench", "", "| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
            out += ["| " + " | ".join(r) + " |" for r in rows[1:]]
        else:
            widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
            out = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        out.append("")
        out.append(f"providers: {', '.join(self.providers_used)}; threads: {self.threads or 'default'}; "
                   f"batch {self.batch_size}; inputs: {self.inputs}")
        c = self.comparison
        if c:
            out.append(f"second/first: latency {c['latency_ratio']['median']:.3f}x "
                       f"(p10 {c['latency_ratio']['p10']:.3f}, p90 {c['latency_ratio']['p90']:.3f}), "
                       f"session creation {c['session_create_ratio']['median']:.3f}x, "
                       f"size {_ratio(c.get('size_ratio'))}")
        out += [("- " if markdown else "note: ") + n for n in self.notes]
        return out

    def format_table(self) -> str:
        return "\n".join(self._lines(False))

    def to_markdown(self) -> str:
        return "\n".join(self._lines(True)) + "\n"


def _ms(s: float | None) -> str:
    return "-" if s is None else f"{s * 1000:.3f} ms"


def _mb(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.2f} MiB"


def _ratio(r: float | None) -> str:
    return "-" if r is None else f"{r:.3f}x"


def _same_weight_shapes(a: onnx.ModelProto, b: onnx.ModelProto) -> bool:
    shapes = lambda m: sorted((t.name, tuple(t.dims)) for t in m.graph.initializer)  # noqa: E731
    return shapes(a) == shapes(b)


def bench_models(
    models: Sequence[ModelRef],
    calibration: Any = None,
    *,
    runtime: RuntimeOptions = RuntimeOptions(batch_size=1),
    options: BenchOptions = BenchOptions(),
    synthetic: SyntheticSpec = SyntheticSpec(samples=1),
    quiet: bool = False,
) -> BenchReport:
    """Time one model, or two (the second compared with the first), on one input batch."""
    if not 1 <= len(models) <= 2:
        raise ValueError("bench takes one or two models")
    graphs = [_graph_of(m) for m in models]
    specs = model_inputs(graphs[0])
    if len(models) == 2 and [(s.name, s.dtype) for s in specs] != [(s.name, s.dtype) for s in model_inputs(graphs[1])]:
        from .calibration import CalibrationError

        raise CalibrationError("the two models have different inputs")
    calib = open_calibration(calibration, graphs[0], synthetic_spec=synthetic)
    batch_size = effective_batch(runtime.batch_size, specs)
    feeds = next(iter(calib.batches(batch_size))).feeds
    choice = resolve_providers(runtime.providers,
                               runtime.available if runtime.available is not None else available_providers(),
                               allow_fallback=runtime.allow_fallback, trt_sparsity=runtime.trt_sparsity,
                               device_id=runtime.device_id)
    threads = runtime.threads or os.cpu_count()
    create_times: list[list[float]] = [[] for _ in models]
    sessions = [None] * len(models)
    folds: list[FoldCheck | None] = []
    for m, g in zip(models, graphs):  # untimed: the first creation pays one-off costs (imports, page cache)
        decoders = decoder_weights(g)  # and shows whether ONNX Runtime folded the compact decoders
        in_session = bool(decoders) and can_check_in_session(choice.providers)
        with optimized_model_path(in_session) as opt:
            create_session(m, choice, threads=threads, optimized_model_path=opt)
            folds.append(FoldCheck(decoders, unfolded_decoders(opt), checked_on="the timed provider")
                         if in_session else None)
        if decoders and not in_session:
            folds[-1] = FoldCheck(decoders, check_on_cpu(m, threads), checked_on="a separate CPU session")
    for r in range(options.startup_repeats):
        order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
        for i in order:
            sessions[i], seconds = create_session(models[i], choice, threads=threads)
            create_times[i].append(seconds)
    runners = [BoundRunner(s, feeds, choice.device, runtime.device_id) for s in sessions]
    latencies: list[list[float]] = [[] for _ in models]
    # a model that cannot run on these inputs: say why synthetic ones may not fit
    with synthetic_hint(calib, model_inputs(graphs[0]), synthetic):
        for runner in runners:
            for _ in range(options.warmup):
                runner()
        with Progress("timing", options.runs, enabled=None if not quiet else False) as bar:
            for r in range(options.runs):
                order = range(len(models)) if r % 2 == 0 else reversed(range(len(models)))
                for i in order:
                    t0 = time.perf_counter()
                    runners[i]()
                    latencies[i].append(time.perf_counter() - t0)
                bar.update()
    rows = []
    notes_unfolded: list[str] = []
    for i, m in enumerate(models):
        rss = None
        if options.measure_memory:
            with tempfile.TemporaryDirectory() as tmp:
                source = _on_disk(m, Path(tmp))
                rss = _peak_rss_child(source, choice, threads)
        rows.append({
            "model": _label(m),
            "file_bytes": file_size(m),
            "serialized_bytes": graphs[i].ByteSize(),
            "params": parameter_counts(m),
            "session_create_seconds": _stats(create_times[i]),
            "latency_seconds": _stats(latencies[i]),
            "session_peak_rss": rss,
            "providers_used": list(sessions[i].get_providers()),
            "compact_decoders": folds[i].to_dict() if folds[i] is not None else None,
        })
        if folds[i] is not None and not folds[i].folded:
            notes_unfolded.append(f"{_label(m)}: ONNX Runtime did not fold the compact decoder(s) of "
                                  f"{', '.join(folds[i].unfolded)}; they run on every inference")
    comparison = None
    notes = [f"{options.runs} timed runs per model after {options.warmup} warm-up runs, interleaved A/B/A/B with "
             f"the order flipped every round; ratios are per round (median, p10, p90)"]
    if len(models) == 2:
        sizes = [rows[0]["file_bytes"], rows[1]["file_bytes"]]
        comparison = {
            "latency_ratio": _ratio_stats(latencies[1], latencies[0]),
            "session_create_ratio": _ratio_stats(create_times[1], create_times[0]),
            "size_ratio": sizes[1] / sizes[0] if all(sizes) else None,
        }
        if _same_weight_shapes(graphs[0], graphs[1]):
            notes.append(
                f"the two models have the same weight shapes: {', '.join(choice.providers)} run(s) zeros with "
                "dense kernels, so unstructured sparsity cannot change latency; expect a ratio of 1.0 within "
                "noise (ONNX Runtime also densifies sparse initializers when it loads a model)")
    notes += notes_unfolded
    if choice.dropped:
        notes.append(f"requested provider(s) {', '.join(choice.dropped)} unavailable: ran without them")
    if calib.synthetic:
        notes.append("inputs are synthetic (seeded); latency does not depend on values for these ops")
    return BenchReport(models=rows, providers_used=list(sessions[0].get_providers()), threads=threads,
                       batch_size=batch_size, inputs=calib.description, comparison=comparison, notes=notes)


def _on_disk(model: ModelRef, tmp: Path) -> str:
    if isinstance(model, onnx.ModelProto):
        path = tmp / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return str(path)
    if isinstance(model, bytes):
        path = tmp / "model.onnx"
        path.write_bytes(model)
        return str(path)
    return str(model)
