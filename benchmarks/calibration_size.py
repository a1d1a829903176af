"""How the drift of structured removal falls as the calibration set grows (all-MiniLM-L6-v2).

    python benchmarks/calibration_size.py [--quick] [--write-readme]

Removes 50% of the feed-forward neurons of all 6 layers with
``--structured neurons --method obs`` (structured OBS + least-squares re-fit,
as in ``structured.py``), ``--scope local`` and ``--scope global``, with
statistics from the first N sentences of ``calib_large.npz``
(``benchmarks/prepare.py``: the 256 sentences of ``calib.npz``, then those of
``benchmarks/data/calibration_sentences.txt``), for N = 256 and all (2,455),
and with ``--refine-epochs 4`` (Adam refinement of each FFN block after the
re-fit, ``structured_refine``) at local scope.
Drift is always measured on ``eval.npz`` (230 sentences that no calibration set
contains): cosine of ``last_hidden_state`` over real tokens and of the
mean-pooled sentence embeddings.  Latency as in ``structured.py`` (dense and
pruned A/B interleaved in one process, same threads and inputs); runs whose
layers keep the same neuron counts are timed once.

Prints JSON on stdout (progress on stderr), writes
``benchmarks/results/calibration_size.json`` and, with ``--write-readme``, the
README section between ``<!-- calibration-size:start -->`` and
``<!-- calibration-size:end -->``.  ``--quick``: local scope only, fewer
timing rounds.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from methods import TokenReference, threads  # noqa: E402
from prune_speed import machine  # noqa: E402
from structured import DAMP, TARGET, WORK, _prune, _rounds, ab_latency, finish, generated_by  # noqa: E402

# (sentences, scope, refine epochs); None: all of calib_large.npz
RUNS = ((256, "local", 0), (256, "global", 0), (None, "local", 0), (None, "global", 0),
        (256, "local", 4), (None, "local", 4))
QUICK_RUNS = ((256, "local", 0), (None, "local", 0), (None, "local", 4))
DAMP_LARGE = 0.03  # dampening with the large set: more rows need less ridge (MiniLM local: 0.9434 vs 0.9424 at 0.1)
BATCHES = (1, 8, 32)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def log(msg: str) -> None:
    print(f"[calibration-size] {msg}", file=sys.stderr, flush=True)


def _subset(calib_large: Path, n: int | None, dest: Path) -> tuple[Path, int]:
    """The first ``n`` rows of ``calib_large`` (all for None) as an npz feed file, and its row count."""
    data = dict(np.load(calib_large))
    total = len(data["input_ids"])
    n = total if n is None else n
    if n > total:
        raise ValueError(f"{calib_large} has {total} sentences, fewer than {n}")
    np.savez(dest, **{k: v[:n] for k, v in data.items()})
    return dest, n


def run(quick: bool, n_threads: int, tmp: Path) -> dict:
    from prepare import prepare

    p = prepare()
    path, evals, large = Path(p["model"]), Path(p["eval"]), Path(p["calib_large"])
    ref = TokenReference(path, evals)
    data = dict(np.load(evals))
    result = {"model": "all-MiniLM-L6-v2", "level": TARGET["level"], "evaluation": "eval.npz (230 sentences)",
              "calibration": "the first N sentences of calib_large.npz", "rows": []}
    timed: dict[tuple, dict] = {}  # neurons kept per layer -> latency
    for size, scope, epochs in (QUICK_RUNS if quick else RUNS):
        calib, n = _subset(large, size, tmp / f"calib-{size or 'all'}.npz")
        damp = DAMP if size == 256 else DAMP_LARGE
        out = tmp / f"minilm-{n}-{scope}-{epochs}.onnx"
        log(f"{n} sentences, {scope} scope, damp {damp}, {epochs} refine epochs")
        rep, seconds = _prune(path, out, TARGET["level"], "obs", scope, calib, n_threads, damp=damp,
                              refine_epochs=epochs)
        groups = rep.structured["groups"]
        kept = tuple(g["units_after"] for g in groups)
        row = {"sentences": n, "scope": scope, "damp": damp, "refine_epochs": epochs, "prune_seconds": seconds,
               "kept": list(kept), "stats_rows": [g.get("stats_rows") for g in groups],
               "refine": [g.get("refine") for g in groups], **ref.compare(out)}
        log(f"  {seconds:.0f}s, real-token cosine {row['real_token_cosine']:.4f}")
        if kept not in timed:
            timed[kept] = {}
            for b in BATCHES:
                feeds = {k: data[k][:b] for k in INPUTS}
                timed[kept][str(b)] = ab_latency(path, out, feeds, n_threads, _rounds(b, quick, True))
                log(f"  batch {b}: speedup {timed[kept][str(b)]['speedup_median']:.3f}")
        else:
            row["latency_note"] = "same neurons kept per layer as an earlier row: timed once"
        row["latency"] = timed[kept]
        result["rows"].append(row)
        out.unlink(missing_ok=True)
        calib.unlink(missing_ok=True)
    most = max(r["sentences"] for r in result["rows"])
    result["targets"] = []
    for r in (x for x in result["rows"] if x["sentences"] == most):
        speed, cos = r["latency"]["8"]["speedup_median"], r["real_token_cosine"]
        result["targets"].append({"sentences": most, "scope": r["scope"], "refine_epochs": r["refine_epochs"],
                                  "speedup_batch8": speed,
                                  "speedup_batch8_fastest": r["latency"]["8"]["speedup_of_fastest"],
                                  "cosine": cos, "met": speed >= TARGET["speedup_batch8"] and cos >= TARGET["cosine"]})
    return result


def readme_section(result: dict) -> str:
    lines = [generated_by("calibration_size.py", result) + f". all-MiniLM-L6-v2, {TARGET['level']:.0%} of the "
             "feed-forward neurons of all 6 layers removed by `--structured neurons --method obs --calibration "
             f"FIRST_N.npz` (structured OBS + least-squares re-fit, as in the table above; `--damp {DAMP}` with "
             f"256 sentences, `--damp {DAMP_LARGE}` with more), optionally `--refine-epochs E` (Adam over the "
             "calibration rows on each block's kept producer and consumer weights and biases, keeping the epoch "
             "with the least error on a held-out tenth of the rows), where FIRST_N.npz is the first N sentences "
             "of `calib_large.npz` (the 256 of `calib.npz`, then the "
             "sentences of `benchmarks/data/calibration_sentences.txt`). Cosine on the same 230 evaluation "
             "sentences throughout, which no calibration set contains. Speedup: dense / pruned latency, A/B "
             "interleaved, median [p10, p90]; rows that keep the same neurons per layer are timed once.", "",
             "| calibration sentences | scope | refine epochs | token / sentence cosine | neurons kept per layer | "
             "speedup b1 | speedup b8 | speedup b32 | prune s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lat = r["latency"]
        cells = [f"{lat[b]['speedup_median']:.2f}x [{lat[b]['speedup_p10']:.2f}, {lat[b]['speedup_p90']:.2f}]"
                 for b in ("1", "8", "32")]
        lines.append(f"| {r['sentences']} | {r['scope']} | {r['refine_epochs']} | {r['real_token_cosine']:.4f} / "
                     f"{r['sentence_embedding_cosine']['mean']:.4f} | {'/'.join(map(str, r['kept']))} | "
                     f"{' | '.join(cells)} | {r['prune_seconds']:.0f} |")
    for t in result["targets"]:
        lines += ["", f"Target ({TARGET['level']:.0%} of FFN neurons removed, batch 8 >= {TARGET['speedup_batch8']}x, "
                      f"token cosine >= {TARGET['cosine']}) with {t['sentences']} calibration sentences, "
                      f"{t['scope']} scope, {t['refine_epochs']} refine epochs: measured "
                      f"{t['speedup_batch8']:.2f}x (fastest run against fastest run: "
                      f"{t['speedup_batch8_fastest']:.2f}x) and {t['cosine']:.4f}: "
                      f"**{'met' if t['met'] else 'not met'}**."]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="local scope only, fewer timing rounds")
    ap.add_argument("--write-readme", action="store_true", help="rewrite the README section between the markers")
    args = ap.parse_args(argv)
    n_threads = threads()
    t0 = time.perf_counter()
    head = {"benchmark": "calibration_size", "quick": args.quick, "machine": machine(), "threads": n_threads,
            "load_average_start": list(os.getloadavg())}
    WORK.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=WORK) as tmp:
        result = {**head, **run(args.quick, n_threads, Path(tmp))}
    return finish(result, t0, "calibration_size", readme_section, args.write_readme)


if __name__ == "__main__":
    sys.exit(main())
