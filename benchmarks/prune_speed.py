#!/usr/bin/env python3
"""Speed and memory benchmark of global magnitude pruning (onnx_magprune).

Builds a synthetic ONNX model of chained MatMuls whose float32 weights
(default 24 x 2048x2048 = 100.7M, 403 MB) live in one external-data file,
prunes it globally at 90% and prints one JSON object to stdout:

* the pruning pass alone (``plan_global`` + ``apply_plan`` over arrays already
  in memory), interleaved in the same process with one plain memory copy of all
  weights, both as ``np.copyto`` into preallocated arrays and as
  ``arr.copy()`` (allocation and page faults included);
* a plain ``np.partition`` of all ``|w|`` concatenated, as a reference;
* the peak RSS of the pass in its own process (weights loaded + one pass);
* ``prune_file`` end to end (load, select, apply, copy and fsync the data
  file) with its peak RSS, in its own process per repeat;
* ``torch.nn.utils.prune.global_unstructured`` (L1Unstructured, amount 0.9)
  on the same tensors, when torch imports (skip with ``--no-torch``).

Every measurement that reports a peak RSS runs in a fresh subprocess (this
script re-invoked with ``--_child``), so each peak is its own.  The pass is
checked to zero exactly ``round(0.9 * N)`` weights, and to zero the smallest
ones (its threshold equals the ``np.partition`` k-th magnitude).

Targets (from the issue): the pass median within 5x the copy median, and peak
RSS under 2x the weight bytes.

Usage::

    python benchmarks/prune_speed.py              # ~100M weights
    python benchmarks/prune_speed.py --quick      # ~10M weights
    python benchmarks/prune_speed.py --params 200000000 --repeats 3 --no-torch

Progress goes to stderr; stdout is only the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"  # git-ignored
DATA_FILE = "weights.bin"
MODEL_FILE = "model.onnx"
PASS_TARGET_X = 5.0
RSS_TARGET_X = 2.0


def log(msg: str) -> None:
    print(f"[prune_speed] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# memory and timing helpers (used in the children)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes (Linux)."""
    out: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                    out[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    return out


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# ---------------------------------------------------------------------------
# building the model


def plan_layout(n_params: int, dim: int) -> list[dict]:
    """Square ``dim x dim`` weights, enough of them to hold ``n_params``."""
    count = max(1, math.ceil(n_params / (dim * dim)))
    layout, offset = [], 0
    for i in range(count):
        n = dim * dim
        layout.append({"name": f"W{i:03d}", "shape": [dim, dim], "n": n, "offset": offset})
        offset += n * 4
    return layout


def build_model(workdir: Path, layout: list[dict], seed: int) -> dict:
    """Write the weights (plain file writes, one tensor at a time, so memory
    stays at one tensor) and a model that references them as external data."""
    import onnx
    from onnx import TensorProto, helper

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    data_path = workdir / DATA_FILE
    with open(data_path, "wb") as f:
        for t in layout:
            assert f.tell() == t["offset"]
            w = rng.standard_normal(t["n"], dtype=np.float32)
            w *= np.float32(1.0 / math.sqrt(t["shape"][0]))
            f.write(memoryview(w))
        f.flush()
        os.fsync(f.fileno())
    t_data = time.perf_counter() - t0

    inits, nodes = [], []
    prev = "x"
    for i, t in enumerate(layout):
        tp = TensorProto()
        tp.name = t["name"]
        tp.data_type = TensorProto.FLOAT
        tp.dims.extend(t["shape"])
        tp.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", t["offset"]), ("length", t["n"] * 4)):
            entry = tp.external_data.add()
            entry.key, entry.value = key, str(value)
        inits.append(tp)
        out = "y" if i == len(layout) - 1 else f"h{i:03d}"
        nodes.append(helper.make_node("MatMul", [prev, t["name"]], [out], name=f"matmul{i:03d}"))
        prev = out
    d_in, d_out = layout[0]["shape"][0], layout[-1]["shape"][1]
    graph = helper.make_graph(
        nodes, "prune_speed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d_out])], initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model_path = workdir / MODEL_FILE
    model_path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(model_path))
    return {"seconds": time.perf_counter() - t0, "data_seconds": t_data,
            "model_path": str(model_path), "data_path": str(data_path)}


def selection_params(spec: dict):
    """The package's default SelectionParams, or with ``--threads`` applied."""
    import dataclasses

    from onnx_magprune.selection import DEFAULT_PARAMS

    if spec.get("threads") is None:
        return DEFAULT_PARAMS
    return dataclasses.replace(DEFAULT_PARAMS, threads=spec["threads"])


def load_weights(spec: dict) -> list[np.ndarray]:
    """Read every weight into its own in-memory (anonymous) array."""
    return [
        np.fromfile(spec["data_path"], dtype="<f4", count=t["n"], offset=t["offset"]).reshape(t["shape"])
        for t in spec["layout"]
    ]


def drop_page_cache(path: str) -> None:
    """Evict a (clean) file from the page cache, so the next read hits the disk
    (the hypervisor may still cache it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# children: each prints one JSON object on stdout


def child_timing(spec: dict) -> dict:
    """Pass vs copy, interleaved; partition reference; exactness checks."""
    from onnx_magprune.selection import apply_plan, plan_global, target_count

    sparsity, repeats = spec["sparsity"], spec["repeats"]
    params = selection_params(spec)
    rss_start = proc_status()
    t0 = time.perf_counter()
    pristine = load_weights(spec)
    load_s = time.perf_counter() - t0
    n = sum(a.size for a in pristine)
    k = target_count(sparsity, n)
    zeros_in_source = sum(a.size - int(np.count_nonzero(a)) for a in pristine)
    work = [np.empty_like(a) for a in pristine]
    for w in work:  # fault the pages in once: copyto then measures bandwidth only
        w.fill(0)
    mags = np.empty(n, np.float32)
    mags.fill(0)

    copyto_s, copy_s, pass_s, select_s, apply_s = [], [], [], [], []
    gather_s, partition_s = [], []
    zeros_after, thresholds, kth = [], [], []
    smallest_ok = None
    for r in range(repeats):
        # (1) one plain copy of all weights into preallocated arrays; these
        #     become the fresh arrays the pass prunes
        t0 = time.perf_counter()
        for src, dst in zip(pristine, work):
            np.copyto(dst, src)
        copyto_s.append(time.perf_counter() - t0)

        # (2) the pruning pass
        t0 = time.perf_counter()
        plans = plan_global(work, sparsity, params=params)
        t1 = time.perf_counter()
        stats = [apply_plan(w, p, params=params) for w, p in zip(work, plans)]
        t2 = time.perf_counter()
        select_s.append(t1 - t0)
        apply_s.append(t2 - t1)
        pass_s.append(t2 - t0)
        za = sum(s.zeros_after for s in stats)
        counted = sum(w.size - int(np.count_nonzero(w)) for w in work)
        if za != counted or sum(p.pruned for p in plans) != k:
            raise SystemExit(f"pass bookkeeping mismatch: stats {za}, counted {counted}, planned "
                             f"{sum(p.pruned for p in plans)}, k {k}")
        zeros_after.append(counted)
        thresholds.append(float(plans[0].threshold))
        if smallest_ok is None:  # every zeroed |w| <= T <= every kept |w|
            t = np.float32(plans[0].threshold)
            smallest_ok = all(
                (not (m := w == 0).any() or float(np.abs(s[m]).max()) <= t)
                and (m.all() or float(np.abs(s[~m]).min()) >= t)
                for s, w in zip(pristine, work)
            )

        # (3) one plain copy with allocation (arr.copy()), freed right away
        t0 = time.perf_counter()
        copies = [a.copy() for a in pristine]
        copy_s.append(time.perf_counter() - t0)
        del copies

        # (4) reference: np.partition of all |w| concatenated (in place)
        t0 = time.perf_counter()
        off = 0
        for a in pristine:
            np.abs(a.reshape(-1), out=mags[off : off + a.size])
            off += a.size
        t1 = time.perf_counter()
        mags.partition(k - 1)
        t2 = time.perf_counter()
        gather_s.append(t1 - t0)
        partition_s.append(t2 - t1)
        kth.append(float(mags[k - 1]))
        log(f"  repeat {r + 1}/{repeats}: copyto {copyto_s[-1]:.3f}s  pass {pass_s[-1]:.3f}s "
            f"(select {select_s[-1]:.3f} + apply {apply_s[-1]:.3f})  copy() {copy_s[-1]:.3f}s  "
            f"partition {partition_s[-1]:.3f}s")

    return {
        "n_params": int(n), "k": int(k), "zeros_in_source": int(zeros_in_source),
        "load_seconds": load_s,
        "copyto": copyto_s, "copy": copy_s, "pass": pass_s, "select": select_s, "apply": apply_s,
        "abs_gather": gather_s, "partition": partition_s,
        "zeros_after": zeros_after, "thresholds": thresholds, "partition_kth": kth,
        "selection_is_smallest": bool(smallest_ok),
        "rss_start": rss_start, "peak_rss_bytes": peak_rss_bytes(), "status_end": proc_status(),
    }


def child_pass_rss(spec: dict) -> dict:
    """Peak RSS of: interpreter + package + weights in memory + one pass."""
    from onnx_magprune.selection import apply_plan, plan_global

    params = selection_params(spec)
    base = proc_status()
    t0 = time.perf_counter()
    arrays = load_weights(spec)
    load_s = time.perf_counter() - t0
    loaded = proc_status()
    t0 = time.perf_counter()
    plans = plan_global(arrays, spec["sparsity"], params=params)
    stats = [apply_plan(a, p, params=params) for a, p in zip(arrays, plans)]
    pass_s = time.perf_counter() - t0
    return {
        "load_seconds": load_s, "pass_seconds": pass_s,
        "zeros_after": int(sum(s.zeros_after for s in stats)),
        "rss_after_import": base.get("VmRSS"), "rss_after_load": loaded.get("VmRSS"),
        "peak_rss_bytes": peak_rss_bytes(), "vm_hwm": proc_status().get("VmHWM"),
    }


def child_end_to_end(spec: dict) -> dict:
    """``prune_file`` wall time and peak RSS, with a per-phase breakdown taken
    by wrapping the functions ``onnx_magprune.api`` calls (package untouched)."""
    import onnx_magprune
    from onnx_magprune import api

    phases: dict[str, float] = {}
    rss_after: dict[str, dict] = {}

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
                rss_after[name] = proc_status()
        return wrapper

    from onnx_magprune import planning
    from onnx_magprune.tensor_data import TensorStore

    # phases overlap: tensors in external data are read and pruned ("apply") while the output
    # is written ("save"), one at a time
    for module, name, attr in ((api, "load_model", "load_model"), (api, "discover", "find_weights"),
                               (api, "select", "plan_targets"), (planning, "apply", "apply_plan"),
                               (api, "save", "stage_model"), (TensorStore, "read", "read")):
        if hasattr(module, attr):
            setattr(module, attr, timed(name, getattr(module, attr)))

    if spec.get("cold"):
        drop_page_cache(spec["data_path"])
    out_dir = Path(spec["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    dst = out_dir / "pruned.onnx"
    base = proc_status()
    t0 = time.perf_counter()
    report = onnx_magprune.prune_file(spec["model_path"], dst, spec["sparsity"], scope="global",
                                      params=selection_params(spec))
    wall = time.perf_counter() - t0
    peak = peak_rss_bytes()
    hwm = proc_status().get("VmHWM")

    # verify the written data file, one tensor at a time (after the peak was taken)
    import onnx

    model = onnx.load(str(dst), load_external_data=False)
    file_zeros = 0
    for init in model.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        arr = np.fromfile(dst.parent / info["location"], dtype="<f4", count=int(info["length"]) // 4,
                          offset=int(info.get("offset", 0)))
        file_zeros += arr.size - int(np.count_nonzero(arr))
    shutil.rmtree(out_dir)
    tot = report.totals
    return {
        "seconds": wall, "phases": phases,
        "rss_after_phase": {k: v.get("VmRSS") for k, v in rss_after.items()},
        "rss_anon_after_phase": {k: v.get("RssAnon") for k, v in rss_after.items()},
        "rss_file_after_phase": {k: v.get("RssFile") for k, v in rss_after.items()},
        "rss_after_import": base.get("VmRSS"),
        "peak_rss_bytes": peak, "vm_hwm": hwm,
        "prunable_params": tot.prunable_params, "target_zeros": tot.target_zeros,
        "zeros_after": tot.zeros_after, "zeros_in_output_file": int(file_zeros),
    }


def child_torch(spec: dict) -> dict:
    """torch.nn.utils.prune.global_unstructured on the same weights, each held
    by an nn.Linear whose weight is a Parameter over the numpy array."""
    import torch
    import torch.nn.utils.prune as prune

    base = proc_status()
    arrays = load_weights(spec)
    modules = []
    for a in arrays:
        rows, cols = a.shape
        m = torch.nn.Linear(rows, cols, bias=False, device="meta")
        # nn.Linear stores (out, in); same values, just the Linear layout
        m.weight = torch.nn.Parameter(torch.from_numpy(a).reshape(cols, rows))
        modules.append(m)
    params = [(m, "weight") for m in modules]
    t0 = time.perf_counter()
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=spec["sparsity"])
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    with torch.no_grad():
        zeros = int(sum(int((m.weight == 0).sum()) for m in modules))
    return {
        "seconds": seconds, "zeros_after": zeros, "threads": torch.get_num_threads(),
        "version": torch.__version__, "rss_after_import": base.get("VmRSS"), "peak_rss_bytes": peak,
    }


CHILDREN = {"timing": child_timing, "pass_rss": child_pass_rss, "end_to_end": child_end_to_end,
            "torch": child_torch}


def run_child(mode: str, spec_path: Path, extra: dict | None = None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", mode, "--_spec", str(spec_path)]
    if extra:
        cmd += ["--_extra", json.dumps(extra)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child '{mode}' failed with exit code {proc.returncode}")
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------
# machine description


def machine() -> dict:
    from importlib import metadata

    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass

    def version(pkg: str):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu, "cores": os.cpu_count(), "usable_cores": usable, "memory_bytes": mem,
        "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "onnx": version("onnx"), "onnxruntime": version("onnxruntime"),
        "torch": version("torch"), "onnx_magprune": version("onnx-magprune"),
    }


# ---------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=int, default=None,
                   help="minimum number of float32 weights (default 100,000,000; --quick: 10,000,000)")
    p.add_argument("--dim", type=int, default=None, help="weights are DIM x DIM (default 2048; --quick: 1024)")
    p.add_argument("--quick", action="store_true", help="~10M weights, for a fast smoke run")
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--repeats", type=int, default=5, help="interleaved copy/pass repeats (default 5)")
    p.add_argument("--e2e-repeats", type=int, default=3, help="prune_file runs, one process each (default 3)")
    p.add_argument("--torch-repeats", type=int, default=1, help="torch runs, one process each (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="SelectionParams.threads for the pass and prune_file (default: the package default; "
                        "0: one per core)")
    p.add_argument("--no-torch", action="store_true", help="skip torch even if it is installed")
    p.add_argument("--cold", action="store_true",
                   help="evict the data file from the page cache before each prune_file run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None,
                   help=f"where to build the model (default: a new temp dir under {CACHE})")
    p.add_argument("--keep", action="store_true", help="keep the built model and the work dir")
    p.add_argument("--write-readme", action="store_true",
                   help="also save benchmarks/results/prune_speed.json and rewrite the README's speed table")
    p.add_argument("--_child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--_spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--_extra", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def spec_params(threads) -> dict:
    import dataclasses

    return dataclasses.asdict(selection_params({"threads": threads}))


def torch_importable() -> bool:
    proc = subprocess.run([sys.executable, "-c", "import torch, torch.nn.utils.prune"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return proc.returncode == 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._child:
        spec = json.loads(args._spec.read_text())
        if args._extra:
            spec.update(json.loads(args._extra))
        json.dump(CHILDREN[args._child](spec), sys.stdout)
        return 0

    t_start = time.perf_counter()
    n_params = args.params or (10_000_000 if args.quick else 100_000_000)
    dim = args.dim or (1024 if args.quick else 2048)
    layout = plan_layout(n_params, dim)
    n = sum(t["n"] for t in layout)
    weight_bytes = n * 4

    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="prune_speed-", dir=args.workdir))
    else:
        CACHE.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="prune_speed-", dir=CACHE))
    try:
        log(f"building {len(layout)} x {dim}x{dim} float32 = {n:,} weights ({weight_bytes / 2**20:.0f} MiB) "
            f"in {workdir}")
        built = build_model(workdir, layout, args.seed)
        log(f"  built in {built['seconds']:.1f}s")
        spec = {"layout": layout, "sparsity": args.sparsity, "repeats": args.repeats,
                "model_path": built["model_path"], "data_path": built["data_path"],
                "out_dir": str(workdir / "out"), "cold": args.cold, "threads": args.threads}
        spec_path = workdir / "spec.json"
        spec_path.write_text(json.dumps(spec))

        log(f"timing: copy / pass / copy() / partition, interleaved x{args.repeats}")
        timing = run_child("timing", spec_path)
        log("pass peak RSS (own process)")
        pass_rss = run_child("pass_rss", spec_path)
        e2e = []
        for r in range(args.e2e_repeats):
            e2e.append(run_child("end_to_end", spec_path))
            log(f"  prune_file {r + 1}/{args.e2e_repeats}: {e2e[-1]['seconds']:.2f}s, "
                f"peak RSS {e2e[-1]['peak_rss_bytes'] / 2**20:.0f} MiB")
        torch_runs, torch_note = [], None
        if args.no_torch:
            torch_note = "skipped (--no-torch)"
        elif not torch_importable():
            torch_note = "torch is not installed"
        else:
            for r in range(args.torch_repeats):
                log(f"torch global_unstructured {r + 1}/{args.torch_repeats}")
                try:
                    torch_runs.append(run_child("torch", spec_path))
                except RuntimeError as e:  # e.g. killed for memory: report, keep the rest
                    torch_note = str(e)
                    log(f"  {e}")
                    break
                log(f"  {torch_runs[-1]['seconds']:.1f}s")
    finally:
        if args.keep:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    k = timing["k"]
    pass_sp = spread(timing["pass"])
    copy_sp = {"copyto": spread(timing["copyto"]), "copy": spread(timing["copy"])}
    ratios = {v: spread([p / c for p, c in zip(timing["pass"], timing[v])]) for v in ("copyto", "copy")}
    ratio_of_medians = {v: pass_sp["median"] / copy_sp[v]["median"] for v in ("copyto", "copy")}
    e2e_peak = max(r["peak_rss_bytes"] for r in e2e) if e2e else None
    rss_ratio = {"pass": pass_rss["peak_rss_bytes"] / weight_bytes,
                 "end_to_end": e2e_peak / weight_bytes if e2e_peak else None}
    exact = {
        "target_zeros": k,
        "zeros_in_source": timing["zeros_in_source"],
        "pass_zeros_after": timing["zeros_after"],
        "pass_exact": all(z == k for z in timing["zeros_after"]) and pass_rss["zeros_after"] == k,
        "pass_threshold_equals_partition_kth": all(
            t == p for t, p in zip(timing["thresholds"], timing["partition_kth"])),
        "pass_zeroes_the_smallest": timing["selection_is_smallest"],
        "end_to_end_exact": all(r["zeros_after"] == k and r["target_zeros"] == k and r["prunable_params"] == n
                                and r["zeros_in_output_file"] == k for r in e2e),
        "torch_zeros_after": [r["zeros_after"] for r in torch_runs] or None,
    }
    pass_ok = {v: ratio_of_medians[v] <= PASS_TARGET_X for v in ("copyto", "copy")}
    rss_ok = {"pass": rss_ratio["pass"] < RSS_TARGET_X,
              "end_to_end": rss_ratio["end_to_end"] < RSS_TARGET_X if e2e_peak else None}
    result = {
        "benchmark": "prune_speed",
        "machine": machine(),
        "config": {"sparsity": args.sparsity, "seed": args.seed, "tensors": len(layout), "shape": [dim, dim],
                   "dtype": "float32", "repeats": args.repeats, "e2e_repeats": args.e2e_repeats,
                   "torch_repeats": len(torch_runs), "page_cache": "cold" if args.cold else "warm",
                   "selection_params": spec_params(args.threads)},
        "n_params": n,
        "weight_bytes": weight_bytes,
        "build_seconds": built["seconds"],
        "load_seconds": timing["load_seconds"],
        "pass_seconds": pass_sp,
        "pass_select_seconds": spread(timing["select"]),
        "pass_apply_seconds": spread(timing["apply"]),
        "copy_seconds": copy_sp,
        "ratio_pass_to_copy": {v: {"of_medians": ratio_of_medians[v], "per_repeat": ratios[v]}
                               for v in ("copyto", "copy")},
        "partition_seconds": spread(timing["partition"]),
        "partition_abs_gather_seconds": spread(timing["abs_gather"]),
        "torch_seconds": statistics.median(r["seconds"] for r in torch_runs) if torch_runs else None,
        "torch": ({"seconds": [r["seconds"] for r in torch_runs], "threads": torch_runs[0]["threads"],
                   "version": torch_runs[0]["version"],
                   "peak_rss_bytes": max(r["peak_rss_bytes"] for r in torch_runs),
                   "rss_after_import": torch_runs[0]["rss_after_import"]}
                  if torch_runs else {"note": torch_note}),
        "end_to_end_seconds": spread([r["seconds"] for r in e2e]) if e2e else None,
        "end_to_end_phases_seconds": ({p: statistics.median(r["phases"].get(p, 0.0) for r in e2e)
                                       for p in e2e[0]["phases"]} if e2e else None),
        "peak_rss_bytes": {
            "pass": pass_rss["peak_rss_bytes"],
            "end_to_end": e2e_peak,
            "timing_process": timing["peak_rss_bytes"],
        },
        "rss_detail": {
            "pass_after_import": pass_rss["rss_after_import"],
            "pass_after_load": pass_rss["rss_after_load"],
            "pass_increment_over_loaded": pass_rss["peak_rss_bytes"] - pass_rss["rss_after_load"],
            "end_to_end_after_import": e2e[0]["rss_after_import"] if e2e else None,
            "end_to_end_rss_after_phase": e2e[0]["rss_after_phase"] if e2e else None,
            "end_to_end_rss_anon_after_phase": e2e[0]["rss_anon_after_phase"] if e2e else None,
            "end_to_end_rss_file_after_phase": e2e[0]["rss_file_after_phase"] if e2e else None,
            "timing_process_note": "holds pristine + working copy + |w| buffer, so not a target",
        },
        "rss_ratio_to_weight_bytes": rss_ratio,
        "rss_ratio_to_weight_bytes_above_import": {  # peak minus the RSS right after the imports
            "pass": (pass_rss["peak_rss_bytes"] - pass_rss["rss_after_import"]) / weight_bytes,
            "end_to_end": (max(r["peak_rss_bytes"] - r["rss_after_import"] for r in e2e) / weight_bytes
                           if e2e else None),
        },
        "exact": exact,
        "targets": {
            "pass_within_5x_copy": {"limit": PASS_TARGET_X, "ratio_of_medians": ratio_of_medians, "met": pass_ok},
            "peak_rss_under_2x_weight_bytes": {"limit": RSS_TARGET_X, "ratio": rss_ratio, "met": rss_ok},
            "all_met": bool(pass_ok["copyto"] and pass_ok["copy"] and rss_ok["pass"] and rss_ok["end_to_end"]
                            and exact["pass_exact"] and exact["end_to_end_exact"]),
        },
        "raw": {k2: timing[k2] for k2 in ("copyto", "copy", "pass", "select", "apply", "partition")}
               | {"end_to_end": [r["seconds"] for r in e2e]},
        "total_seconds": time.perf_counter() - t_start,
    }
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    if args.write_readme:
        write_results(result)
    return 0


README = Path(__file__).resolve().parent.parent / "README.md"
RESULTS = Path(__file__).resolve().parent / "results"
MARK_START, MARK_END = "<!-- prune-speed:start -->", "<!-- prune-speed:end -->"


def readme_block(r: dict) -> str:
    """The README's speed table, generated from one run's JSON (no number typed by hand)."""
    m, t = r["machine"], r["targets"]
    ms = lambda x: f"{x * 1000:.0f} ms"  # noqa: E731
    sec = lambda sp: f"{ms(sp['median'])} (min {ms(sp['min'])}, max {ms(sp['max'])})"  # noqa: E731
    rows = [
        ("weights", f"{r['n_params']:,} float32 ({r['weight_bytes'] / 2**20:.0f} MiB) in "
                    f"{r['config']['tensors']} external-data tensors, pruned globally at "
                    f"{r['config']['sparsity']:.0%}"),
        ("pruning pass (select + zero, in memory)", sec(r["pass_seconds"])),
        ("one copy, `np.copyto` into warm arrays", sec(r["copy_seconds"]["copyto"])),
        ("one copy, `arr.copy()` (allocation included)", sec(r["copy_seconds"]["copy"])),
        ("pass / copy (median of per-repeat ratios)",
         f"{r['ratio_pass_to_copy']['copyto']['per_repeat']['median']:.1f}x `copyto`, "
         f"{r['ratio_pass_to_copy']['copy']['per_repeat']['median']:.1f}x `copy()` (target 5x)"),
        ("`np.partition` of all \|w\| (needs a second full-size buffer)", sec(r["partition_seconds"])),
        ("`torch.nn.utils.prune.global_unstructured`",
         f"{r['torch_seconds']:.1f} s, peak RSS {r['torch']['peak_rss_bytes'] / r['weight_bytes']:.1f}x the weights"
         if r["torch_seconds"] else r["torch"].get("note", "not run")),
        ("`prune_file` end to end (read, prune, write, fsync)", sec(r["end_to_end_seconds"])
         if r["end_to_end_seconds"] else "not run"),
        ("peak RSS / weight bytes", f"pass {r['rss_ratio_to_weight_bytes']['pass']:.2f}, end to end "
                                    f"{r['rss_ratio_to_weight_bytes']['end_to_end']:.2f} (target < 2)"),
        ("exactly round(S x N) zeroed, the smallest ones", str(r["exact"]["pass_exact"] and
                                                               r["exact"]["end_to_end_exact"])),
    ]
    lines = [f"Measured by `python benchmarks/prune_speed.py --write-readme` on {m['cpu_model']}, "
             f"{m['cores']} cores, numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, "
             f"{r['config']['repeats']} interleaved repeats:", "", "| what | figure |", "|---|---|"]
    lines += [f"| {a} | {b} |" for a, b in rows]
    met = t["pass_within_5x_copy"]["met"]
    lines += ["", f"Pass within 5x of a copy: {'met' if met['copy'] else 'missed'} against `arr.copy()`, "
                  f"{'met' if met['copyto'] else 'missed'} against `copyto` into warm memory. "
                  f"Peak RSS under 2x the weights: "
                  f"{'met' if all(v for v in t['peak_rss_under_2x_weight_bytes']['met'].values()) else 'missed'}."]
    return "\n".join(lines)


def write_results(result: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prune_speed.json").write_text(json.dumps(result, indent=2) + "\n")
    text = README.read_text()
    start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
    README.write_text(text[:start] + "\n" + readme_block(result) + "\n" + text[end:])
    log(f"wrote {RESULTS / 'prune_speed.json'} and the README's speed table")


if __name__ == "__main__":
    sys.exit(main())
