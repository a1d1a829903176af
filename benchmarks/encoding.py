"""Sparse encodings compared: file size vs the information bound, exactness, start-up and latency.

    python benchmarks/encoding.py [--quick] [--no-minilm] [--write-readme]

Models:

* a seeded synthetic chain of MatMuls, ``x[1, D] @ W1 @ ... @ WL`` (default
  4 weights of 4096x4096; ``--quick``: 2 of 1024x1024), built twice: float32
  and float16 (float16 weights *and* input);
* all-MiniLM-L6-v2 exported by ``benchmarks/prepare.py`` (skipped with
  ``--no-minilm`` or when it cannot be prepared).

Each is pruned with ``onnx_magprune.prune_file`` (global magnitude) into every
format: ``dense``, ``sparse`` (INT64 COO), ``sparse-int32``, ``auto`` and
``compact`` with ``optimize_for`` = ``size``, ``balanced`` (the default) and
``startup``.  Per (model, dtype, sparsity) it records:

1. **Sizes**: bytes on disk (the model plus any external data file) of each
   file; the dense file zipped with zlib (level 9) and lzma (preset 9); and the
   information bound = sum over pruned weights of ``bound_bytes(n, nonzero,
   itemsize)`` (values + n*H(s)/8) + every other byte of the dense file.  For
   files larger than ``ZIP_SAMPLE`` (the 4x4096^2 chain) compressing the whole
   file with lzma takes minutes per file, so the zipped sizes are *estimated*:
   the compression ratio of a contiguous slice of ``ZIP_SAMPLE`` bytes from the
   start of the file times the file size (the chain's weights are i.i.d., so
   the ratio is stationary); the JSON says which.  Not measured for MiniLM.
2. **Exactness**: ONNX Runtime (CPU) outputs of the sparse, sparse-int32, auto
   and compact files vs the dense pruned file on the same seeded input, bit for
   bit; ``onnx.checker`` (full check) on the checker-valid formats;
   ``decode_file`` of each compact file compared initializer by initializer
   (bytes, dtype, shape) with the dense file; and whether ONNX Runtime folded
   the decoders (``SessionOptions.optimized_model_filepath`` +
   ``folding.unfolded_decoders``).
3. **Start-up**: session-creation wall time (and process CPU time, and the
   memory session creation takes at its peak) of each compact file vs the dense pruned file, A/B/A/B
   interleaved, each session created in a new Python process, as a service
   starting (``--in-process``: all in this process, where one file's freed
   memory warms the heap for the next) (1 warm-up pair, then ``--pairs`` pairs;
   files in page cache), with default threads and with
   ``intra_op_num_threads=1``; median ratio and the min/max of the per-pair
   ratios, and the minor page faults.  At 90% and 50%.
4. **Latency**: ``run`` of compact vs dense sessions on the same input, A/B
   interleaved (chain: batch 1; MiniLM: batch 8 from ``calib.npz``).
5. **Noise floor**: at each start-up point, the dense file against a
   byte-identical copy of itself (A/A), start-up (default threads) and
   latency measured the same way.

Prints the JSON on stdout, writes ``benchmarks/results/encoding.json`` and,
with ``--write-readme``, rewrites the section of the top-level README.md
between ``<!-- encoding:start -->`` and ``<!-- encoding:end -->`` (only when
both markers exist).  Progress goes to stderr.  Files go to a temporary
directory under ``benchmarks/.cache/encoding/`` and are deleted as it goes.
"""

from __future__ import annotations

import argparse
import gc
import json
import lzma
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
from readme_section import write_section  # noqa: E402 - benchmarks/ is on sys.path when run as a script
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import onnx_magprune as mp  # noqa: E402
from onnx_magprune.compact_code import bound_bytes, nonzero_mask  # noqa: E402
from onnx_magprune.folding import decoder_weights, unfolded_decoders  # noqa: E402
from prune_speed import machine  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / ".cache" / "encoding"

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
STARTUP_SPARSITIES = (0.9, 0.5)
OBJECTIVES = ("size", "balanced", "startup")
# (label, prune_file format, optimize_for)
FORMATS = (("dense", "dense", None), ("sparse", "sparse", None), ("sparse-int32", "sparse-int32", None),
           ("compact-size", "compact", "size"), ("compact-balanced", "compact", "balanced"),
           ("compact-startup", "compact", "startup"), ("auto", "auto", None))
CHECKER_VALID = ("dense", "sparse", "auto", "compact-size", "compact-balanced", "compact-startup")
SIZE_TARGET = 1.10
STARTUP_TARGETS = {0.9: 1.5, 0.5: 2.0}
ZIP_SAMPLE = 8 << 20
SEED = 20261124
LATENCY_PAIRS = 20
CHILD_TIMEOUT = 600  # seconds for one session creation in a new process
MINILM_BATCH = 8


def log(msg: str) -> None:
    print(f"[encoding] {msg}", file=sys.stderr, flush=True)


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------
# models


def build_chain(path: Path, dtype: str, layers: int, dim: int, seed: int = SEED) -> None:
    """x[1, dim] @ W1 @ ... @ W_layers, weights N(0, 1/dim), seeded; float16: weights and input."""
    np_dt = np.float16 if dtype == "float16" else np.float32
    elem = TensorProto.FLOAT16 if dtype == "float16" else TensorProto.FLOAT
    rng = np.random.default_rng(seed)
    inits, nodes, prev = [], [], "x"
    for i in range(1, layers + 1):
        w = (rng.standard_normal((dim, dim), dtype=np.float32) / np.sqrt(dim)).astype(np_dt)
        inits.append(numpy_helper.from_array(w, f"W{i}"))
        out = "y" if i == layers else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [out], name=f"matmul{i}"))
        prev = out
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", elem, [1, dim])],
                              [helper.make_tensor_value_info("y", elem, [1, dim])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="encoding-bench")
    onnx.save(model, str(path))


def chain_feed(dtype: str, dim: int) -> dict:
    np_dt = np.float16 if dtype == "float16" else np.float32
    return {"x": np.random.default_rng(SEED + 1).standard_normal((1, dim), dtype=np.float32).astype(np_dt)}


# --------------------------------------------------------------------------
# helpers


def dir_bytes(d: Path) -> int:
    """Bytes of every file in ``d``: the model and any external data file written next to it."""
    return sum(p.stat().st_size for p in d.iterdir() if p.is_file())


def warm(d: Path) -> None:
    """Write back the files just written (so that does not happen during a timing) and read them into
    the page cache."""
    if hasattr(os, "sync"):
        os.sync()
    for p in d.iterdir():
        if p.is_file():
            with open(p, "rb") as f:
                while f.read(1 << 24):
                    pass


def zipped(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(ZIP_SAMPLE) if size > ZIP_SAMPLE else f.read()
    out = {"estimated": size > ZIP_SAMPLE, "sample_bytes": len(data)}
    for name, fn in (("zlib9", lambda b: zlib.compress(b, 9)), ("lzma9", lambda b: lzma.compress(b, preset=9))):
        t0 = time.perf_counter()
        n = len(fn(data))
        out[name] = int(round(n * size / len(data)))
        out[f"{name}_seconds"] = time.perf_counter() - t0
    return out


def all_tensors(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node tensors of every graph, by name (raw arrays)."""
    out, stack = {}, [model.graph]
    while stack:
        g = stack.pop()
        for t in g.initializer:
            out[t.name] = numpy_helper.to_array(t)
        for node in g.node:
            for a in node.attribute:
                if a.name == "value" and a.HasField("t"):
                    out[node.output[0]] = numpy_helper.to_array(a.t)
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    return out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and np.ascontiguousarray(a).view(np.uint8).tobytes() == np.ascontiguousarray(b).view(np.uint8).tobytes())


def session(path: Path, n_threads: int | None = None, optimized: str | None = None) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if n_threads:
        so.intra_op_num_threads = n_threads
    if optimized:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def summary(a: list[float], b: list[float]) -> dict:
    ratios = [y / x for x, y in zip(a, b)]
    return {"dense_median": statistics.median(a), "compact_median": statistics.median(b),
            "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "pairs": len(ratios)}


#: one session creation in a fresh interpreter: wall and CPU seconds, user and system seconds and the
#: minor page faults it took (``getrusage``; not on Windows), and the memory it took at its peak
#: (VmHWM, reset just before, minus VmRSS before; Linux; ru_maxrss would include the parent's at fork)
_CHILD = """
import json, sys, time
import onnxruntime as ort
try:
    import resource
except ImportError:  # not on Windows
    resource = None

def usage():
    return None if resource is None else resource.getrusage(resource.RUSAGE_SELF)

def status(key):
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except (OSError, StopIteration):
        return None

so = ort.SessionOptions()
so.log_severity_level = 3
if int(sys.argv[2]):
    so.intra_op_num_threads = int(sys.argv[2])
try:  # reset VmHWM to the current RSS (Linux >= 4.0), so the import's peak does not count
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:
    pass
rss0 = status("VmRSS")
u0 = usage()
c0, t0 = time.process_time(), time.perf_counter()
s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
t1, c1 = time.perf_counter(), time.process_time()
u1 = usage()
peak = status("VmHWM")
print(json.dumps({"wall": t1 - t0, "cpu": c1 - c0,
                  "user": None if u0 is None else u1.ru_utime - u0.ru_utime,
                  "system": None if u0 is None else u1.ru_stime - u0.ru_stime,
                  "page_faults": None if u0 is None else u1.ru_minflt - u0.ru_minflt,
                  "peak_memory": None if peak is None or rss0 is None else peak - rss0}))
"""


def create_session_fresh(path: Path, n_threads: int | None) -> dict:
    """Create one session in a new Python process (as a service starting), return its timings."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(path), str(n_threads or 0)], capture_output=True,
                         text=True, timeout=CHILD_TIMEOUT)
    if out.returncode != 0:
        raise RuntimeError(f"session creation of {path} failed in a new process (exit {out.returncode}): "
                           f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def create_session_here(path: Path, n_threads: int | None) -> dict:
    gc.collect()
    c0, t0 = time.process_time(), time.perf_counter()
    s = session(path, n_threads)
    t1, c1 = time.perf_counter(), time.process_time()
    del s
    return {"wall": t1 - t0, "cpu": c1 - c0}


def startup_ab(dense: Path, compact: Path, n_threads: int | None, pairs: int, fresh: bool = True) -> dict:
    """Session creation, A/B/A/B: 1 warm-up pair, then ``pairs`` pairs (wall and process CPU, and in a
    new process user and system time, minor page faults and the peak memory session creation adds).
    ``fresh``: each session in a new process, so neither file's allocations leave the other a warm
    heap; else all in this process."""
    create = create_session_fresh if fresh else create_session_here
    got: dict = {"a": [], "b": []}
    for i in range(pairs + 1):
        for key, path in (("a", dense), ("b", compact)):
            r = create(path, n_threads)
            if i:
                got[key].append(r)
    out = {"threads": n_threads or "default", "fresh_process": fresh,
           "wall": summary([r["wall"] for r in got["a"]], [r["wall"] for r in got["b"]]),
           "cpu": summary([r["cpu"] for r in got["a"]], [r["cpu"] for r in got["b"]])}
    for k in ("user", "system", "page_faults", "peak_memory"):
        if fresh and all(r.get(k) is not None for r in got["a"] + got["b"]):
            out[k] = summary([r[k] for r in got["a"]], [r[k] for r in got["b"]])
    return out


def latency_ab(dense: Path, compact: Path, feed: dict, pairs: int = LATENCY_PAIRS) -> dict:
    sa, sb = session(dense), session(compact)
    for _ in range(3):
        sa.run(None, feed)
        sb.run(None, feed)
    a, b = [], []
    for _ in range(pairs):
        for sess, acc in ((sa, a), (sb, b)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            acc.append(time.perf_counter() - t0)
    return summary(a, b)


# --------------------------------------------------------------------------
# one (model, dtype, sparsity)


def weight_bound(dense_path: Path, names: list[str]) -> dict:
    model = onnx.load(str(dense_path))
    arrays = all_tensors(model)
    pruned_dense, bound, rows = 0, 0.0, []
    for name in names:
        arr = arrays[name]
        nz = int(nonzero_mask(arr).sum())
        b = bound_bytes(arr.size, nz, arr.dtype.itemsize)
        pruned_dense += arr.nbytes
        bound += b
        rows.append({"name": name, "numel": int(arr.size), "nonzero": nz, "bound_bytes": b})
    file_bytes = dir_bytes(dense_path.parent)
    return {"bound_bytes": bound + (file_bytes - pruned_dense), "weights_bound_bytes": bound,
            "weights_dense_bytes": pruned_dense, "other_bytes": file_bytes - pruned_dense, "weights": len(rows)}


def run_outputs(path: Path, feed: dict, optimized: str | None = None) -> list[np.ndarray]:
    s = session(path, optimized=optimized)
    out = s.run(None, feed)
    del s
    return out


def one_point(src: Path, work: Path, label: str, dtype: str, s: float, feed: dict, formats, problems: list,
              startup: bool, pairs: int, zips: bool, fresh: bool = True) -> dict:
    row = {"model": label, "dtype": dtype, "sparsity": s, "files": {}, "encode_seconds": {}, "codes": {},
           "exactness": {}}
    paths: dict[str, Path] = {}

    def problem(fmt: str, what: str) -> None:
        p = {"model": label, "dtype": dtype, "sparsity": s, "format": fmt, "error": what}
        problems.append(p)
        log(f"  PROBLEM: {p}")

    for fmt_label, fmt, objective in formats:
        d = work / fmt_label
        d.mkdir(parents=True, exist_ok=True)
        out = d / "model.onnx"
        kw = {"format": fmt}
        if objective:
            kw["optimize_for"] = objective
        try:
            t0 = time.perf_counter()
            rep = mp.prune_file(src, out, s, "global", overwrite=True, **kw)
            row["encode_seconds"][fmt_label] = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - record and go on
            problem(fmt_label, f"prune_file failed: {type(e).__name__}: {e}")
            row["exactness"][fmt_label] = {"error": traceback.format_exc()}
            continue
        paths[fmt_label] = out
        row["files"][fmt_label] = dir_bytes(d)
        if fmt_label == "dense":
            row["achieved_sparsity"] = rep.totals.sparsity
            row["pruned_weights"] = [t.name for t in rep.tensors]
        if fmt in ("compact", "auto"):
            row["codes"][fmt_label] = [{"name": t.name, "format": t.format, "code": t.code,
                                        "stored_bytes": t.stored_bytes, "overhead_bytes": t.overhead_bytes,
                                        "bound_bytes": t.bound_bytes} for t in rep.tensors]
        log(f"  {fmt_label}: {row['files'][fmt_label]:,} bytes in {row['encode_seconds'][fmt_label]:.1f}s")
    if "dense" not in paths:
        return row
    dense = paths["dense"]
    row.update(weight_bound(dense, row["pruned_weights"]))
    if zips:
        z = zipped(dense)
        row["files"]["dense-zlib9"], row["files"]["dense-lzma9"] = z["zlib9"], z["lzma9"]
        row["zip"] = z
    row["ratio_to_bound"] = {k: v / row["bound_bytes"] for k, v in row["files"].items()}

    # exactness
    ref = run_outputs(dense, feed)
    dense_tensors = all_tensors(onnx.load(str(dense)))
    for fmt_label, path in paths.items():
        if fmt_label == "dense":
            continue
        ex: dict = {}
        try:
            with tempfile.TemporaryDirectory(dir=work, prefix="opt-") as opt:
                optimized = str(Path(opt) / "optimized.onnx")
                got = run_outputs(path, feed, optimized)
                ex["outputs_bit_identical"] = len(got) == len(ref) and all(same_bits(a, b) for a, b in zip(ref, got))
                if not ex["outputs_bit_identical"]:
                    problem(fmt_label, "ONNX Runtime outputs differ from the dense pruned file's: max abs diff "
                            + str([float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                                   for a, b in zip(ref, got)]))
                if fmt_label.startswith("compact") or fmt_label == "auto":
                    decoders = decoder_weights(onnx.load(str(path), load_external_data=False))
                    left = unfolded_decoders(optimized)
                    ex["decoders"] = len(decoders)
                    ex["unfolded"] = left
                    ex["folded"] = not left
                    if left:
                        problem(fmt_label, f"decoders not folded by ONNX Runtime: {left}")
        except Exception as e:  # noqa: BLE001
            ex["error"] = f"{type(e).__name__}: {e}"
            problem(fmt_label, f"ONNX Runtime: {ex['error']}")
        if fmt_label in CHECKER_VALID:
            try:
                onnx.checker.check_model(str(path), full_check=True)
                ex["checker"] = "ok"
            except Exception as e:  # noqa: BLE001
                ex["checker"] = f"{type(e).__name__}: {e}"
                problem(fmt_label, f"onnx.checker (full_check): {ex['checker']}")
        if fmt_label.startswith("compact") or fmt_label == "auto":
            back = work / f"{fmt_label}-decoded.onnx"
            try:
                mp.decode_file(path, back, overwrite=True)
                got_t = all_tensors(onnx.load(str(back)))
                bad = sorted(n for n in dense_tensors if n not in got_t or not same_bits(dense_tensors[n], got_t[n]))
                extra = sorted(set(got_t) - set(dense_tensors))
                ex["decode_bit_exact"] = not bad and not extra
                if bad or extra:
                    problem(fmt_label, f"decode_file round trip differs: mismatched {bad[:5]}, extra {extra[:5]}")
            except Exception as e:  # noqa: BLE001
                ex["decode_bit_exact"] = False
                problem(fmt_label, f"decode_file failed: {type(e).__name__}: {e}")
            finally:
                for p in work.glob(back.name + "*"):
                    p.unlink()
        row["exactness"][fmt_label] = ex
    log("  exactness: " + ", ".join(f"{k} {'ok' if v.get('outputs_bit_identical') else 'DIFF'}"
                                    + ("" if v.get("folded", True) else " UNFOLDED")
                                    + ("" if v.get("decode_bit_exact", True) else " DECODE-MISMATCH")
                                    for k, v in row["exactness"].items()))

    # start-up and latency
    if startup:
        row["startup"], row["latency"] = {}, {}
        for d in paths.values():
            warm(d.parent)
        control = work / "dense-copy"  # A/A: the noise floor of the ratios, measured the same way
        try:
            shutil.copytree(dense.parent, control, dirs_exist_ok=True)
            warm(control)
            row["control"] = {"startup": startup_ab(dense, control / dense.name, None, pairs, fresh),
                              "latency": latency_ab(dense, control / dense.name, feed)}
            log(f"  A/A dense vs its copy: start-up {row['control']['startup']['wall']['ratio_median']:.2f}x, "
                f"latency {row['control']['latency']['ratio_median']:.3f}x")
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, OSError) as e:  # record and go on
            problem("dense-copy", f"A/A measurement failed: {type(e).__name__}: {e}")
        finally:
            shutil.rmtree(control, ignore_errors=True)
        for objective in OBJECTIVES:
            key = f"compact-{objective}"
            if key not in paths:
                continue
            try:
                row["startup"][key] = [startup_ab(dense, paths[key], None, pairs, fresh),
                                       startup_ab(dense, paths[key], 1, pairs, fresh)]
                row["latency"][key] = latency_ab(dense, paths[key], feed)
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as e:  # record and go on
                row["startup"].pop(key, None)
                problem(key, f"start-up measurement failed: {type(e).__name__}: {e}")
                continue
            st = row["startup"][key]
            log(f"  start-up {key}: {st[0]['wall']['ratio_median']:.2f}x (default threads, "
                f"{st[0]['wall']['dense_median'] * 1e3:.0f} -> {st[0]['wall']['compact_median'] * 1e3:.0f} ms), "
                f"{st[1]['wall']['ratio_median']:.2f}x (1 thread); latency "
                f"{row['latency'][key]['ratio_median']:.3f}x")
    for d in paths.values():
        shutil.rmtree(d.parent, ignore_errors=True)
    return row


# --------------------------------------------------------------------------
# targets and Markdown


def targets(result: dict) -> dict:
    rows = result["chain"]
    size = {}
    for objective in OBJECTIVES:
        key = f"compact-{objective}"
        rs = [r["ratio_to_bound"][key] for r in rows if key in r.get("ratio_to_bound", {})]
        worst = max(rs) if rs else None
        size[objective] = {"worst_ratio": worst, "met": worst is not None and worst <= SIZE_TARGET
                           and len(rs) == len(rows)}
    startup = []
    for r in rows + result.get("minilm", []):
        for key, runs in (r.get("startup") or {}).items():
            limit = STARTUP_TARGETS.get(r["sparsity"])
            for run in runs:
                startup.append({"model": r["model"], "dtype": r["dtype"], "sparsity": r["sparsity"],
                                "format": key, "threads": run["threads"], "ratio": run["wall"]["ratio_median"],
                                "limit": limit, "met": limit is not None and run["wall"]["ratio_median"] <= limit})
    exact = [dict(model=r["model"], dtype=r["dtype"], sparsity=r["sparsity"], format=k, **v)
             for r in rows + result.get("minilm", []) for k, v in r["exactness"].items()]
    lat = [r["latency"][k]["ratio_median"] for r in rows + result.get("minilm", []) for k in (r.get("latency") or {})]
    return {
        "size_within_1.10x_bound": size,
        "exact": all(e.get("outputs_bit_identical") and e.get("folded", True) and e.get("decode_bit_exact", True)
                     and e.get("checker", "ok") == "ok" for e in exact) and bool(exact),
        "startup": startup,
        "startup_met_by_objective": {o: {str(s): all(x["met"] for x in startup if x["format"] == f"compact-{o}"
                                                     and x["sparsity"] == s)
                                         for s in STARTUP_TARGETS} for o in OBJECTIVES},
        "latency_ratio_range": [min(lat), max(lat)] if lat else None,
    }


def _mb(x) -> str:
    return "-" if x is None else f"{x / 1e6:.2f}"


def size_table(rows: list[dict], zips: bool) -> list[str]:
    cols = [("dense", "dense"), ("dense-zlib9", "dense + zlib 9"), ("dense-lzma9", "dense + lzma 9"),
            ("sparse", "INT64 COO"), ("sparse-int32", "INT32 COO"), ("compact-size", "compact size"),
            ("compact-balanced", "compact balanced"), ("compact-startup", "compact startup"), ("auto", "auto")]
    if not zips:
        cols = [c for c in cols if "zip" not in c[0] and "lzma" not in c[0] and "zlib" not in c[0]]
    head = ["dtype", "sparsity"] + [c[1] for c in cols] + ["bound"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["dtype"], f"{r['sparsity']:.0%}"]
        for key, _ in cols:
            v = r["files"].get(key)
            ratio = r.get("ratio_to_bound", {}).get(key)
            cells.append("-" if v is None else f"{_mb(v)} ({ratio:.3f}x)")
        cells.append(_mb(r.get("bound_bytes")))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _timing_cells(run: dict, lat: dict) -> tuple[list[str], str]:
    """The measured cells of one start-up row (times, ratios, CPU, memory, faults) and its latency cell."""
    w, rss, flt = run["wall"], run.get("peak_memory"), run.get("page_faults")
    return [f"{w['dense_median'] * 1e3:.0f}", f"{w['compact_median'] * 1e3:.0f}",
            f"{w['ratio_median']:.2f} [{w['ratio_min']:.2f}, {w['ratio_max']:.2f}]",
            f"{run['cpu']['ratio_median']:.2f}" + ("" if "system" not in run else
                                                    f" ({run['user']['ratio_median']:.2f} / "
                                                    f"{run['system']['ratio_median']:.2f})"),
            "-" if rss is None else f"{rss['dense_median'] / 1e6:.0f} / {rss['compact_median'] / 1e6:.0f}",
            "-" if flt is None else f"{flt['dense_median'] / 1e3:.0f} / {flt['compact_median'] / 1e3:.0f}"], \
        f"{lat['ratio_median']:.3f} [{lat['ratio_min']:.2f}, {lat['ratio_max']:.2f}]"


def startup_table(rows: list[dict]) -> list[str]:
    head = ["model", "dtype", "sparsity", "optimize_for", "threads", "dense ms", "compact ms",
            "wall ratio median [min, max]", "CPU ratio median (user / system)", "peak memory MB dense / compact",
            "page faults k dense / compact", "target", "latency ratio [min, max]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        point = [r["model"], r["dtype"], f"{r['sparsity']:.0%}"]
        control = r.get("control")
        if control:
            cells, lat = _timing_cells(control["startup"], control["latency"])
            lines.append("| " + " | ".join(point + ["A/A: dense vs its copy", "default"] + cells + ["-", lat]) + " |")
        for key, runs in (r.get("startup") or {}).items():
            limit = STARTUP_TARGETS.get(r["sparsity"])
            for run in runs:
                ratio = run["wall"]["ratio_median"]
                met = "-" if limit is None else (f"<= {limit}x: " + ("yes" if ratio <= limit else "**no**"))
                cells, lat = _timing_cells(run, r["latency"][key])
                lines.append("| " + " | ".join(point + [key.split("-", 1)[1], str(run["threads"])] + cells
                                               + [met, lat]) + " |")
    return lines


def readme_section(result: dict) -> str:
    mach = result["machine"]
    c = result["config"]
    cmd = "python benchmarks/encoding.py" + (" --quick" if result["quick"] else "")
    t = result["targets"]
    size_txt = "; ".join(f"{o}: worst {v['worst_ratio']:.3f}x ({'met' if v['met'] else 'not met'})"
                         for o, v in t["size_within_1.10x_bound"].items() if v["worst_ratio"] is not None)
    su = t["startup_met_by_objective"]
    lines = [
        f"Generated by `{cmd}` on {mach['cpu_model']}, {mach['cores']} cores, onnxruntime {mach['onnxruntime']}, "
        f"numpy {mach['numpy']}; {result['seconds'] / 60:.1f} minutes in all. Synthetic model: a seeded chain "
        f"x[1, {c['dim']}] @ W1..W{c['layers']}, each {c['dim']}x{c['dim']}, float32 and float16 (weights and "
        "input), pruned by `prune_file` (global magnitude) into each format. Sizes are bytes on disk (MB = 1e6) "
        "with the ratio to the information bound in parentheses; the bound is, per pruned weight, value bytes + "
        "n·H(s)/8, plus every other byte of the dense file. "
        + ("Zipped sizes are estimated from the compression ratio of the first "
           f"{c['zip_sample_bytes'] >> 20} MiB of the dense file (lzma over the whole file takes minutes). "
           if any(r.get("zip", {}).get("estimated") for r in result["chain"]) else "")
        + "ONNX Runtime densifies every encoding when it creates the session, so these formats cut file and "
        "download size, not memory or inference time.", "",
        f"Compact within {SIZE_TARGET:.2f}x of the bound at every sparsity, float32 and float16: {size_txt}. "
        f"Outputs of sparse, sparse-int32, auto and compact bit-identical to dense, decoders folded, checker and "
        f"`decode` round trip: {'all pass' if t['exact'] else '**failures, see problems in the JSON**'}.", "",
        "#### Sizes", "",
    ] + size_table(result["chain"], True) + [""]
    if result.get("minilm"):
        lines += ["all-MiniLM-L6-v2 (from `benchmarks/prepare.py`), global magnitude (zipped sizes not measured):",
                  ""] + size_table(result["minilm"], False) + [""]
    lines += ["#### Start-up and latency", "",
              "Session creation of the compact file vs the dense pruned file, A/B/A/B, "
              + ("each session in a new Python process, as a service starting "
                 if c.get("startup_fresh_process") else "all in one process ")
              + f"({c['pairs']} pairs after 1 warm-up pair, files in page cache), median of the per-pair ratios "
              "[min, max]; CPU ratio from `time.process_time`"
              + ("; peak memory: the most resident memory session creation added to the process (its peak "
                 "minus its resident size before), median; page faults: minor page faults during session "
                 "creation (`ru_minflt`), median; user / system: the ratios of user and of system CPU time "
                 "(`getrusage`), medians"
                 if c.get("startup_fresh_process") else "")
              + ". Latency: `run` on the same input, "
              f"{LATENCY_PAIRS} A/B pairs, default threads (chain: batch 1; MiniLM: batch {MINILM_BATCH}). "
              + ("The A/A rows time the dense file against a byte-identical copy of itself the same way, in "
                 "the same run: how far from 1.00 noise (and running second) moves a ratio. "
                 if any(r.get("control") for r in result["chain"] + result.get("minilm", [])) else "")
              + "Targets: at most 1.5x at 90% and 2.0x at 50%. Met at every compact row (both thread settings): "
              + "; ".join(f"{o}: 90% {'yes' if su[o]['0.9'] else 'no'}, 50% {'yes' if su[o]['0.5'] else 'no'}"
                          for o in OBJECTIVES) + ".", ""]
    lines += startup_table(result["chain"] + result.get("minilm", [])) + [""]
    return "\n".join(lines)


def write_readme(section: str) -> bool:
    return write_section(REPO / "README.md", "encoding", section, log)


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 weights of 1024x1024, 3 start-up pairs")
    p.add_argument("--layers", type=int, default=None, help="weights in the chain (default 4; --quick 2)")
    p.add_argument("--dim", type=int, default=None, help="weight side (default 4096; --quick 1024)")
    p.add_argument("--pairs", type=int, default=None, help="A/B start-up pairs after the warm-up pair (default 11)")
    p.add_argument("--no-minilm", action="store_true", help="skip all-MiniLM-L6-v2")
    p.add_argument("--in-process", action="store_true",
                   help="create the start-up sessions in this process instead of one new process each")
    p.add_argument("--write-readme", action="store_true",
                   help="rewrite the section between the encoding markers of README.md (if it has them)")
    args = p.parse_args(argv)
    layers = args.layers or (2 if args.quick else 4)
    dim = args.dim or (1024 if args.quick else 4096)
    pairs = args.pairs or (3 if args.quick else 11)
    t0 = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    problems: list = []
    result = {"benchmark": "encoding", "quick": args.quick, "machine": machine(), "threads": threads(),
              "config": {"layers": layers, "dim": dim, "seed": SEED, "sparsities": list(SPARSITIES),
                         "startup_sparsities": list(STARTUP_SPARSITIES), "pairs": pairs, "warmup_pairs": 1,
                         "latency_pairs": LATENCY_PAIRS, "zip_sample_bytes": ZIP_SAMPLE, "scope": "global",
                         "startup_fresh_process": not args.in_process,
                         "size_target": SIZE_TARGET, "startup_targets": {str(k): v for k, v in STARTUP_TARGETS.items()}},
              "chain": [], "minilm": [], "problems": problems}
    with tempfile.TemporaryDirectory(dir=WORK, prefix="run-") as tmp:
        tmp = Path(tmp)
        for dtype in ("float32", "float16"):
            src = tmp / f"chain-{dtype}.onnx"
            build_chain(src, dtype, layers, dim)
            feed = chain_feed(dtype, dim)
            for s in SPARSITIES:
                log(f"chain {layers}x{dim}^2 {dtype} at {s:.0%}")
                formats = FORMATS if s in STARTUP_SPARSITIES else [f for f in FORMATS if f[0] != "auto"]
                result["chain"].append(one_point(src, tmp / f"{dtype}-{s}", f"chain {layers}x{dim}^2", dtype, s,
                                                 feed, formats, problems, s in STARTUP_SPARSITIES, pairs, True,
                                                 not args.in_process))
            src.unlink()
        if not args.no_minilm:
            try:
                from prepare import prepare

                prep = prepare()
            except Exception as e:  # noqa: BLE001 - run on what can be prepared
                log(f"skipping all-MiniLM-L6-v2: {e}")
                prep = None
            if prep is not None:
                calib = dict(np.load(prep["calib"]))
                feed = {k: v[:MINILM_BATCH] for k, v in calib.items()}
                for s in STARTUP_SPARSITIES:
                    log(f"all-MiniLM-L6-v2 at {s:.0%}")
                    result["minilm"].append(one_point(Path(prep["model"]), tmp / f"minilm-{s}", "all-MiniLM-L6-v2",
                                                      "float32", s, feed, FORMATS, problems, True, pairs, False,
                                                      not args.in_process))
    result["seconds"] = time.perf_counter() - t0
    result["targets"] = targets(result)
    result["errors"] = len(problems)
    result["markdown"] = readme_section(result)
    (RESULTS / "encoding.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {(RESULTS / 'encoding.json').relative_to(REPO)}")
    log("\n" + result["markdown"])
    if args.write_readme:
        write_readme(result["markdown"])
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    log(f"done in {result['seconds']:.0f}s ({len(problems)} problems)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
