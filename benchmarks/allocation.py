"""Budget-driven sparsity: local vs global magnitude vs sensitivity allocation, at equal drift.

    python benchmarks/allocation.py [--quick] [--models mlp,cnn,minilm] [--write-readme]

Per model:

1. a sensitivity sweep (each prunable weight alone at each level, one ONNX
   Runtime session) on the *search* samples;
2. held-out drift (rel. L2 error of the model's main output, on samples the
   sweep and the search never saw) of local magnitude (every weight at S),
   global magnitude (one threshold) and the sensitivity allocation at S
   (Lagrange bisection over the curves), at several overall sparsities S;
   the same for the obs criterion (``allocation_variants``: one-shot OBS
   variants from the dense model's statistics): every weight at S ("obs
   local") and allocated from its own sweep ("obs allocated").  Its
   statistics come from other samples than its drift is measured on (the
   tool's ``--measure-fraction`` split; MiniLM: 128 more calibration
   sentences for the statistics, the drift on the 32 search sentences);
3. budgets: the held-out drift global magnitude gives at 50% and at 70%.  For
   each budget and method, the highest overall sparsity whose held-out drift
   stays within it (bisection on S, the same procedure for all three);
4. the tool's own path, ``prune --target-drift X`` (bisection against drift
   measured on the search samples), with the held-out drift of its result.

Data: digits models: ``models/digits_*_calib.npz`` samples [0, 300) search,
[300, 450) held out.  all-MiniLM-L6-v2 (``benchmarks/prepare.py``): the first
32 sentences of ``calib.npz`` search, the first 64 of ``eval.npz`` held out
(rel. L2 of ``last_hidden_state`` over real tokens: ``--drift-mask
attention_mask``, padding is not data); few sentences because every
evaluation is a full forward pass on 2 cores.

Prints JSON on stdout (progress on stderr), writes
``benchmarks/results/allocation.json`` and, with ``--write-readme``, the
README section between ``<!-- allocation:start -->`` and ``<!-- allocation:end -->``.
``--quick``: the digits models only, fewer levels.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
from readme_section import write_section  # noqa: E402 - benchmarks/ is on sys.path when run as a script
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from onnx_magprune.allocation import make_curve  # noqa: E402
from onnx_magprune.allocation_variants import CriterionSpace  # noqa: E402
from onnx_magprune.allocation_search import AllocationOptions, _global_levels, _local_levels, _Search, \
    allocate_model  # noqa: E402
from onnx_magprune.calibration import open_calibration, split_holdout  # noqa: E402
from onnx_magprune.config import PruneConfig  # noqa: E402
from onnx_magprune.drift import Metric  # noqa: E402
from onnx_magprune.evaluator import DriftEvaluator, DriftSpec  # noqa: E402
from onnx_magprune.methods import MethodOptions  # noqa: E402
from onnx_magprune.selection import target_count  # noqa: E402
from onnx_magprune.sensitivity import open_model, run_sweep  # noqa: E402
from onnx_magprune.validate import RuntimeOptions  # noqa: E402
from onnx_magprune.variants import PruningSpace  # noqa: E402

RESULTS = HERE / "results"
LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)
QUICK_LEVELS = (0.5, 0.7, 0.9, 0.95)
TABLE = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_TABLE = (0.5, 0.7, 0.9)
BUDGET_AT = (0.5, 0.7)
TOL = 0.0025
ALIASES = {"mlp": "digits_mlp", "cnn": "digits_cnn", "minilm": "minilm", "digits_mlp": "digits_mlp",
           "digits_cnn": "digits_cnn"}


def log(msg: str) -> None:
    print(f"[allocation] {msg}", file=sys.stderr, flush=True)


def batches(arrays: dict, lo: int, hi: int, bs: int = 32) -> list[dict]:
    return [{k: np.ascontiguousarray(v[i:min(i + bs, hi)]) for k, v in arrays.items()} for i in range(lo, hi, bs)]


def load(name: str) -> dict:
    if name == "minilm":
        from prepare import prepare

        p = prepare()
        calib = dict(np.load(p["calib"]))
        evals = dict(np.load(p["eval"]))
        return {"name": name, "path": Path(p["model"]), "output": "last_hidden_state", "mask": "attention_mask",
                "search": batches(calib, 0, 32), "held": batches(evals, 0, 64),
                "obs_stats": batches(calib, 32, 160), "obs_measure": batches(calib, 0, 32),
                "split": "search: calib.npz sentences [0, 32); held out: eval.npz sentences [0, 64); 64 tokens; "
                         "obs statistics: calib.npz sentences [32, 160), its drift measured on the search sentences"}
    data = dict(np.load(REPO / "models" / f"{name}_calib.npz"))
    data.pop("labels", None)
    n = len(next(iter(data.values())))
    return {"name": name, "path": REPO / "models" / f"{name}.onnx",
            "output": "probabilities" if name == "digits_mlp" else "logits",
            "search": batches(data, 0, 300), "held": batches(data, 300, n),
            "obs_stats": batches(data, 0, 210), "obs_measure": batches(data, 210, 300),
            "split": f"{name}_calib.npz: samples [0, 300) search, [300, {n}) held out; obs statistics [0, 210), "
                     "its drift measured on [210, 300)"}


def sparsity_at(drift_of, budget: float, s_max: float, known: list[tuple[float, float]]) -> tuple[float, float, int]:
    """The highest S with held-out drift <= budget (bisection, bracketed by the table's measurements)."""
    ok = [(s, d) for s, d in known if d <= budget]
    lo, d_lo = max(ok) if ok else (0.0, 0.0)
    bad = [s for s, d in known if d > budget and s > lo]
    hi = min(bad) if bad else s_max
    evals = 0
    if not bad:
        d = drift_of(hi)
        evals += 1
        if d <= budget:
            return hi, d, evals
    while hi - lo > TOL:
        mid = round((lo + hi) / 2, 6)
        d = drift_of(mid)
        evals += 1
        if d <= budget:
            lo, d_lo = mid, d
        else:
            hi = mid
    return lo, d_lo, evals


def run_model(m: dict, levels, table, n_threads: int) -> dict:
    log(f"{m['name']}: loading")
    proto, _ = open_model(m["path"])
    space = PruningSpace.build(proto, PruneConfig())
    pool = space.pool
    n = sum(space.numel(i) for i in pool)
    spec = DriftSpec(Metric.REL_L2, m["output"], mask_input=m.get("mask"))
    runtime = RuntimeOptions(threads=n_threads, batch_size=32)
    search_data = open_calibration(m["search"], proto)
    search_ev = DriftEvaluator(proto, space.names, search_data, spec, runtime)
    held_ev = DriftEvaluator(proto, space.names, open_calibration(m["held"], proto), spec, runtime)
    t0 = time.perf_counter()
    curves = run_sweep(space, search_ev, pool, levels, quiet=False)
    sweep_s = time.perf_counter() - t0
    sweep_evals = search_ev.evaluations
    log(f"{m['name']}: sweep {sweep_evals} evaluations in {sweep_s:.1f} s")
    wc = {i: make_curve(c.numel, c.levels, c.drift, c.bounds, quadrature=True) for i, c in zip(pool, curves)}
    search = _Search(space, search_ev, wc, True)
    s_alloc_max = sum(wc[i].k_hi for i in pool) / n
    # the calibrated criterion: one-shot OBS variants from the dense model's statistics on the search samples
    # (fitted on obs_stats, drift measured on obs_measure: what prune does with --measure-fraction)
    obs_tool = open_calibration(m["obs_stats"] + m["obs_measure"], proto)
    obs_fraction = len(m["obs_measure"]) / (len(m["obs_stats"]) + len(m["obs_measure"]))
    obs_stats_data, obs_measure_data = split_holdout(obs_tool, obs_fraction)
    if obs_stats_data.samples != len(m["obs_stats"]):  # (a list of feeds splits by batch)
        raise RuntimeError("the tool's split differs from the benchmark's")
    obs_method = MethodOptions(method="obs", calibration=obs_stats_data, holdout=0.0)
    t0 = time.perf_counter()
    ospace = CriterionSpace.build_for(proto, PruneConfig(), obs_method, obs_stats_data)
    if ospace.pool != pool:
        raise RuntimeError("the obs space found other weights")
    obs_ev = DriftEvaluator(proto, space.names, obs_measure_data, spec, runtime)
    ocurves = run_sweep(ospace, obs_ev, pool, levels, quiet=False)
    obs_sweep_s = time.perf_counter() - t0
    owc = {i: make_curve(c.numel, c.levels, c.drift, c.bounds, quadrature=True) for i, c in zip(pool, ocurves)}
    osearch = _Search(ospace, obs_ev, owc, True)
    o_alloc_max = sum(owc[i].k_hi for i in pool) / n
    log(f"{m['name']}: obs statistics + sweep in {obs_sweep_s:.1f} s")
    methods = {
        "local": (space, lambda s: _local_levels(space, pool, s)),
        "global": (space, lambda s: _global_levels(space, pool, s)),
        "allocated": (space, lambda s: search.allocation(target_count(min(s, s_alloc_max), n))),
        "obs local": (ospace, lambda s: _local_levels(ospace, pool, s)),
        "obs allocated": (ospace, lambda s: osearch.allocation(target_count(min(s, o_alloc_max), n))),
    }
    caps = {"allocated": s_alloc_max, "obs allocated": o_alloc_max}
    held_evals = {"n": 0}

    def held(method: str, s: float) -> float:
        held_evals["n"] += 1
        sp, levels_at = methods[method]
        return held_ev.drift(sp.overrides(levels_at(s)))

    rows = []
    for s in table:
        row = {"sparsity": s}
        for name in methods:
            row[name] = held(name, s) if s <= caps.get(name, 1.0) else None
        rows.append(row)
        log(f"{m['name']}: {s:.0%}: " + ", ".join(f"{k} {row[k]:.4f}" for k in methods if row[k] is not None))
    budgets = []
    for at in BUDGET_AT:
        ref = next((r for r in rows if r["sparsity"] == at), None)
        budget = ref["global"] if ref is not None else held("global", at)
        entry = {"budget": budget, "budget_from": f"global magnitude at {at:.0%}", "methods": {}}
        for name in methods:
            known = [(r["sparsity"], r[name]) for r in rows if r[name] is not None]
            s_max = min(caps.get(name, 0.99), 0.99)
            s, d, ev = sparsity_at(lambda x, name=name: held(name, x), budget, s_max, known)
            entry["methods"][name] = {"sparsity": s, "held_out_drift": d, "evaluations": ev}
        t1 = time.perf_counter()
        res = allocate_model(proto, PruneConfig(), AllocationOptions(
            calibration=search_data, target_drift=budget, metric="rel_l2", output=m["output"], holdout=0.0,
            levels=levels, runtime=runtime, mask_input=m.get("mask")), sweep=curves)
        lv = {space.names.index(k): v for k, v in res.levels.items()}
        entry["tool_target_drift"] = {
            "sparsity": res.report["pool_sparsity"], "search_drift": res.report["measured_drift"],
            "predicted_drift": res.report["predicted_drift"], "held_out_drift": held_ev.drift(space.overrides(lv)),
            "search_evaluations": res.report["evaluations"]["search"], "seconds": round(time.perf_counter() - t1, 2)}
        t1 = time.perf_counter()
        res = allocate_model(proto, PruneConfig(), AllocationOptions(
            calibration=obs_tool, target_drift=budget, metric="rel_l2", output=m["output"], holdout=0.0,
            levels=levels, runtime=runtime, mask_input=m.get("mask"), measure_fraction=obs_fraction),
            sweep=ocurves, method=obs_method)
        crit = res.report["criterion"]
        entry["tool_obs_target_drift"] = {
            "sparsity": res.report["pool_sparsity"], "search_drift": res.report["measured_drift"],
            "held_out_drift": held_ev.drift(res.arrays), "final": crit["final"],
            "one_shot_sparsity": crit["one_shot_sparsity"], "pipeline_runs": crit["pipeline_runs"],
            "search_evaluations": res.report["evaluations"]["search"], "seconds": round(time.perf_counter() - t1, 2)}
        g, a, loc = (entry["methods"][k]["sparsity"] for k in ("global", "allocated", "local"))
        entry["allocated_minus_global_pp"] = round(100 * (a - g), 2)
        entry["obs_allocated_minus_global_pp"] = round(100 * (entry["methods"]["obs allocated"]["sparsity"] - g), 2)
        entry["tool_obs_minus_global_pp"] = round(100 * (entry["tool_obs_target_drift"]["sparsity"] - g), 2)
        entry["global_minus_local_pp"] = round(100 * (g - loc), 2)
        budgets.append(entry)
        log(f"{m['name']}: budget {budget:.4f}: local {loc:.4f}, global {g:.4f}, allocated {a:.4f}, "
            f"obs allocated {entry['methods']['obs allocated']['sparsity']:.4f}, "
            f"tool {entry['tool_target_drift']['sparsity']:.4f}, "
            f"tool obs {entry['tool_obs_target_drift']['sparsity']:.4f}")
    return {"model": m["name"], "data": m["split"], "output": m["output"], "metric": "rel_l2",
            "drift_mask": m.get("mask"),
            "prunable_weights": len(pool), "prunable_params": n, "levels": list(levels),
            "sweep": {"evaluations": sweep_evals, "seconds": round(sweep_s, 2),
                      "evaluations_per_second": round(sweep_evals / sweep_s, 2), "sessions": 1},
            "obs_sweep": {"seconds": round(obs_sweep_s, 2), "statistics_passes": ospace.passes},
            "table": rows, "budgets": budgets, "held_out_evaluations": held_evals["n"],
            "allocation_max_sparsity": s_alloc_max, "obs_allocation_max_sparsity": o_alloc_max}


def targets(results: list[dict]) -> dict:
    entries = [(r["model"], b) for r in results for b in r["budgets"]]
    return {
        "allocated_10pp_above_global": {f"{m} @ {b['budget_from']}": b["allocated_minus_global_pp"] >= 10
                                        for m, b in entries},
        "obs_allocated_10pp_above_global": {f"{m} @ {b['budget_from']}": b["obs_allocated_minus_global_pp"] >= 10
                                            for m, b in entries},
        "tool_obs_10pp_above_global": {f"{m} @ {b['budget_from']}": b["tool_obs_minus_global_pp"] >= 10
                                       for m, b in entries},
        "global_at_least_local": {f"{m} @ {b['budget_from']}": b["global_minus_local_pp"] >= 0 for m, b in entries},
    }


def _f(x, d=4):
    return "-" if x is None else f"{x:.{d}f}"


def readme_section(result: dict) -> str:
    mach = result["machine"]
    lines = [f"Measured by `python benchmarks/allocation.py --write-readme` on {mach['cpu_model']}, "
             f"{mach['usable_cores']} cores, onnxruntime {mach['onnxruntime']}, {result['threads']} ORT threads, "
             f"{result['seconds']:.0f} s in all. Drift: relative L2 error of the main output on held-out samples "
             "(never used by the sweep or the search); larger is worse. Budgets: the held-out drift of global "
             "magnitude at 50% and 70%; each method's sparsity is the highest overall level whose held-out drift "
             "stays within the budget (bisection, the same for all three). The last column is the tool's own "
             "`prune --target-drift` (its budget holds on the search samples), with its held-out drift.", ""]
    for r in result["models"]:
        lines += [f"#### {r['model']}", "",
                  f"{r['prunable_params']:,} prunable parameters in {r['prunable_weights']} weights; {r['data']}; "
                  f"output `{r['output']}`"
                  + (f" over the positions `{r['drift_mask']}` marks (real tokens)" if r.get("drift_mask") else "")
                  + f". Sweep: {r['sweep']['evaluations']} evaluations in "
                  f"{r['sweep']['seconds']} s ({r['sweep']['evaluations_per_second']}/s, one session).", "",
                  "| overall sparsity | local | global | allocated | obs local | obs allocated |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {row['sparsity']:.0%} | {_f(row['local'])} | {_f(row['global'])} | {_f(row['allocated'])} | "
                  f"{_f(row['obs local'])} | {_f(row['obs allocated'])} |" for row in r["table"]]
        lines += ["", "| drift budget (held out) | local | global | allocated | allocated - global | "
                      "`prune --target-drift` (held-out drift) | obs allocated | obs allocated - global | "
                      "`prune --method obs --target-drift` (held-out drift) |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for b in r["budgets"]:
            mm, tool, tobs = b["methods"], b["tool_target_drift"], b["tool_obs_target_drift"]
            lines.append(f"| {b['budget']:.4f} ({b['budget_from']}) | {mm['local']['sparsity']:.1%} | "
                         f"{mm['global']['sparsity']:.1%} | {mm['allocated']['sparsity']:.1%} | "
                         f"{b['allocated_minus_global_pp']:+.1f} pp | {tool['sparsity']:.1%} "
                         f"({tool['held_out_drift']:.4f}) | {mm['obs allocated']['sparsity']:.1%} | "
                         f"{b['obs_allocated_minus_global_pp']:+.1f} pp | {tobs['sparsity']:.1%} "
                         f"({tobs['held_out_drift']:.4f}) |")
        lines += ["", f"obs: statistics (one pass) and sweep {r['obs_sweep']['seconds']} s. The tool's obs runs "
                  "(one-shot search, then the method's own pipeline raised the level): "
                  + "; ".join(f"{b['tool_obs_target_drift']['one_shot_sparsity']:.1%} -> "
                              f"{b['tool_obs_target_drift']['sparsity']:.1%} in "
                              f"{len(b['tool_obs_target_drift']['pipeline_runs'])} pipeline runs, "
                              f"{b['tool_obs_target_drift']['seconds']:.0f} s" for b in r["budgets"]) + ".", ""]
    t = result["targets"]
    met10 = [k for k, v in t["allocated_10pp_above_global"].items() if v]
    miss10 = [k for k, v in t["allocated_10pp_above_global"].items() if not v]
    gl = [k for k, v in t["global_at_least_local"].items() if not v]
    lines.append(f"Allocated (magnitude criterion) at least 10 points above global at the same budget: met for "
                 f"{len(met10)} of {len(met10) + len(miss10)} budgets"
                 + (f" (missed: {', '.join(miss10)})" if miss10 else "") + ". ")
    for key, what in (("obs_allocated_10pp_above_global", "Allocated with the obs criterion"),
                      ("tool_obs_10pp_above_global", "`prune --method obs --target-drift`")):
        miss = [k for k, v in t[key].items() if not v]
        lines[-1] += (f"{what}: met for {len(t[key]) - len(miss)} of {len(t[key])}"
                      + (f" (missed: {', '.join(miss)})" if miss else "") + ". ")
    lines[-1] += "Global at least as good as local: " + ("met everywhere." if not gl else
                                                           f"missed for {', '.join(gl)}.")
    return "\n".join(lines)


def write_readme(section: str) -> bool:
    return write_section(REPO / "README.md", "allocation", section, log)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None, help="comma-separated: mlp, cnn, minilm [default: all; quick: mlp,cnn]")
    ap.add_argument("--write-readme", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    names = [ALIASES[x.strip()] for x in (args.models or ("mlp,cnn" if args.quick else "mlp,cnn,minilm")).split(",")]
    levels, table = (QUICK_LEVELS, QUICK_TABLE) if args.quick else (LEVELS, TABLE)
    n_threads = args.threads or max(1, len(os.sched_getaffinity(0)))
    start = time.perf_counter()
    results = []
    for name in names:
        try:
            m = load(name)
        except Exception as e:  # noqa: BLE001 - report what can be measured
            log(f"skipping {name}: {e}")
            continue
        results.append(run_model(m, levels, table, n_threads))
    from prune_speed import machine

    result = {"benchmark": "allocation", "quick": args.quick, "machine": machine(), "threads": n_threads,
              "models": results, "targets": targets(results), "seconds": round(time.perf_counter() - start, 1)}
    RESULTS.mkdir(exist_ok=True)
    if not args.quick:
        (RESULTS / "allocation.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    if args.write_readme:
        if args.quick:
            log("--write-readme ignored with --quick")
        else:
            write_readme(readme_section(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
