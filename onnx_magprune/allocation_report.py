"""The allocation section of a prune report: terminal lines and Markdown (with plot links)."""

from __future__ import annotations

import os
from typing import Any


def _f(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def allocation_lines(a: dict[str, Any]) -> list[str]:
    ev = a["evaluations"]
    head = (f"allocation ({a['mode']}): {a['metric_meaning']}"
            + (f", budget {a['target_drift']}" if a.get("target_drift") is not None else
               f", sparsity {a['requested_sparsity']}"))
    lines = [head,
             f"  pool sparsity {a['pool_sparsity']:.4f}; drift predicted {_f(a['predicted_drift'])}, "
             f"measured {_f(a['measured_drift'])}, plain-model check {_f(a['verified_drift'])} "
             f"(on {a['search_data']['description']})",
             f"  {ev['total']} model evaluations ({ev['sweep']} sweep, {ev['search']} search, {ev['tradeoff']} tradeoff), "
             f"{a['sessions']} ONNX Runtime session(s), {a['seconds']['total']:.1f} s; chosen by {a['chosen_by']}"]
    lines += [f"  {line}" for line in criterion_lines(a.get("criterion"))]
    width = max((len(w["name"]) for w in a["weights"]), default=6)
    for w in a["weights"]:
        tag = " (fixed)" if w["selection"] == "fixed" else ""
        lines.append(f"  {w['name'].ljust(width)}  {w['sparsity']:.4f}{tag}")
    lines += [f"  note: {n}" for n in a["notes"]]
    return lines


def criterion_lines(c: dict[str, Any] | None) -> list[str]:
    """A calibrated criterion's search: the one-shot level, each pipeline run, what was written."""
    if not c:
        return []
    runs = "; ".join(f"{r['sparsity']:.4f} measured {_f(r['measured_drift'])}" + (" kept" if r["kept"] else "")
                     for r in c["pipeline_runs"])
    out = [f"criterion {c['method']}: one-shot variants {c['one_shot_sparsity']:.4f} "
           f"(drift {_f(c['one_shot_drift'])}); pipeline runs: {runs or 'none'}",
           f"written: {c['final']}"]
    if c.get("fallback"):
        out.append(f"magnitude instead for {len(c['fallback'])} weight(s) (see criterion.fallback)")
    return out


def allocation_markdown(a: dict[str, Any], markdown_path: str | None = None) -> str:
    """Markdown; plots are linked relative to ``markdown_path``'s directory."""
    out = ["", "## Allocation", "",
           f"Mode **{a['mode']}**, metric `{a['metric']}` ({a['metric_meaning']})"
           + (f", budget **{a['target_drift']}**" if a.get("target_drift") is not None else
              f", requested sparsity **{a['requested_sparsity']}**") + ".", "",
           "| pool sparsity | predicted drift | measured drift | plain-model check | evaluations | sessions |",
           "|---|---|---|---|---|---|",
           f"| {a['pool_sparsity']:.4f} | {_f(a['predicted_drift'])} | {_f(a['measured_drift'])} | "
           f"{_f(a['verified_drift'])} | {a['evaluations']['total']} | {a['sessions']} |", "",
           *([f"{line}  " for line in criterion_lines(a.get("criterion"))] + [""] if a.get("criterion") else []),
           "| weight | params | sparsity | selection |", "|---|---|---|---|"]
    out += [f"| `{w['name']}` | {w['numel']:,} | {w['sparsity']:.4f} | {w['selection']} |" for w in a["weights"]]
    plots = a.get("plots") or {}
    if plots:
        base = os.path.dirname(os.path.abspath(markdown_path)) if markdown_path else None
        out.append("")
        for name, path in plots.items():
            if path:
                rel = os.path.relpath(path, base) if base else path
                out.append(f"![{name}]({rel})")
    out += [""] + [f"* {n}" for n in a["notes"]]
    return "\n".join(out) + "\n"
