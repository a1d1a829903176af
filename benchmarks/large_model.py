"""Large-model benchmark: prune a ~3 GB external-data model with the CLI.

Builds (seeded) a chain of MatMuls whose float32 weights total about 3 GB in
one external-data file, then runs ``onnx-magprune prune`` on it in a fresh
process per run (global and local scope) and prints JSON: wall time, peak RSS
(VmHWM), RSS right after the imports, and the issue's target, peak RSS under
1.5x the largest single tensor plus the model's protobuf skeleton (what is
reached is reported either way; the interpreter's own baseline is reported
separately because it alone is tens of MB).  Also checks the output: exactly
round(S x N) zeros, and a second run byte-identical.

    python benchmarks/large_model.py [--gb 3.0] [--dim 4096] [--sparsity 0.9] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from prepare import sha256  # noqa: E402
from prune_speed import build_model, machine, plan_layout  # noqa: E402

CHILD = r"""
import json, resource, sys, time
def rss(key):
    for line in open('/proc/self/status'):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
import onnx_magprune
from onnx_magprune.cli import main
after_import = rss('VmRSS:')
t0 = time.perf_counter()
try:
    main(sys.argv[1:], standalone_mode=False)
    code = 0
except SystemExit as e:
    code = e.code
wall = time.perf_counter() - t0
print(json.dumps({"code": code, "seconds": wall, "peak_rss": rss('VmHWM:'), "rss_after_import": after_import}))
"""


def run_cli(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def count_zeros(model_path: Path) -> int:
    import onnx

    from onnx_magprune.tensor_data import TensorStore

    m = onnx.load(str(model_path), load_external_data=False)
    store = TensorStore(model_path.parent)
    return sum(int(np.count_nonzero(store.read(t, writable=False) == 0)) for t in m.graph.initializer)


def write_readme(r: dict) -> None:
    """The README's large-model table, generated from one run's JSON."""
    mib = lambda b: f"{b / 2**20:,.0f} MiB"  # noqa: E731
    lines = [f"`python benchmarks/large_model.py --write-readme` on {r['machine']['cpu_model']}, "
             f"{r['machine']['cores']} cores: {r['n_params']:,} float32 weights ({r['weight_bytes'] / 1e9:.2f} GB) "
             f"in {r['tensors']} external-data tensors, pruned at {r['sparsity']:.0%}. Target: peak RSS under "
             f"1.5x the largest tensor plus the protobuf skeleton = {mib(r['target_peak_rss_bytes'])}.", "",
             "| scope | wall time | peak RSS | of which the interpreter and imports | peak / target | exact |",
             "|---|---|---|---|---|---|"]
    for scope, run in r["runs"].items():
        lines.append(f"| {scope} | {run['seconds']:.1f} s | {mib(run['peak_rss'])} | {mib(run['rss_after_import'])} "
                     f"| {run['peak_rss_over_target']:.2f} (above imports: "
                     f"{run['peak_rss_above_import_over_target']:.2f}) | "
                     f"{run['zeros_after'] == run['target_zeros'] == run['zeros_in_file']} |")
    lines += ["", f"A second run wrote byte-identical files: {r['byte_identical_rerun']}."]
    readme = HERE.parent / "README.md"
    text = readme.read_text()
    start = text.index("<!-- large-model:start -->") + len("<!-- large-model:start -->")
    end = text.index("<!-- large-model:end -->")
    readme.write_text(text[:start] + "\n" + "\n".join(lines) + "\n" + text[end:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=3.0, help="weight bytes in GB (default 3.0)")
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--write-readme", action="store_true",
                   help="also save benchmarks/results/large_model.json and rewrite the README's large-model table")
    p.add_argument("--from-json", type=Path, default=None, help="only rewrite the README from a saved result")
    args = p.parse_args()
    if args.from_json:
        write_readme(json.loads(args.from_json.read_text()))
        return 0
    layout = plan_layout(int(args.gb * 1e9 / 4), args.dim)
    n = sum(t["n"] for t in layout)
    work = Path(tempfile.mkdtemp(prefix="large_model-", dir=HERE / ".cache" if (HERE / ".cache").is_dir() else None))
    try:
        print(f"[large_model] building {len(layout)} x {args.dim}x{args.dim} float32 ({n * 4 / 1e9:.2f} GB)",
              file=sys.stderr)
        built = build_model(work, layout, seed=0)
        model = Path(built["model_path"])
        skeleton = model.stat().st_size
        largest = max(t["n"] for t in layout) * 4
        target = 1.5 * largest + skeleton
        runs = {}
        for scope in ("global", "local"):
            out = work / f"out-{scope}" / "pruned.onnx"
            out.parent.mkdir()
            print(f"[large_model] prune --scope {scope}", file=sys.stderr)
            r = run_cli(["prune", str(model), "-o", str(out), "--sparsity", str(args.sparsity), "--scope", scope,
                         "-q", "--report", str(out.parent / "report.json")])
            report = json.loads((out.parent / "report.json").read_text())
            r["zeros_after"] = report["totals"]["zeros_after"]
            r["target_zeros"] = report["totals"]["target_zeros"]
            r["zeros_in_file"] = count_zeros(out)
            r["peak_rss_over_target"] = r["peak_rss"] / target
            r["peak_rss_above_import_over_target"] = (r["peak_rss"] - r["rss_after_import"]) / target
            runs[scope] = r
        again = work / "again" / "pruned.onnx"
        again.parent.mkdir()
        run_cli(["prune", str(model), "-o", str(again), "--sparsity", str(args.sparsity), "-q"])
        first = work / "out-global" / "pruned.onnx"
        deterministic = all(sha256(a) == sha256(b) for a, b in (
            (first, again), (first.parent / "pruned.onnx.weights.bin", again.parent / "pruned.onnx.weights.bin")))
        result = {
            "benchmark": "large_model", "machine": machine(), "n_params": n, "weight_bytes": n * 4,
            "tensors": len(layout), "largest_tensor_bytes": largest, "skeleton_bytes": skeleton,
            "target_peak_rss_bytes": target, "sparsity": args.sparsity, "runs": runs,
            "byte_identical_rerun": deterministic,
            "exact": all(r["zeros_after"] == r["target_zeros"] == r["zeros_in_file"] for r in runs.values()),
        }
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
        if args.write_readme:
            (HERE / "results").mkdir(exist_ok=True)
            (HERE / "results" / "large_model.json").write_text(json.dumps(result, indent=2) + "\n")
            write_readme(result)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
