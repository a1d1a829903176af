"""PNG plots of sensitivity and allocation (the ``plot`` extra: matplotlib, imported lazily).

Without matplotlib nothing is drawn: every function returns None and the
same data stays in the JSON report.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

from .errors import OutputError

PLOT_HINT = "plots need matplotlib: pip install 'onnx-magprune[plot]' (the same data is in the JSON report)"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def matplotlib_available() -> bool:
    return _pyplot() is not None


def _save(fig, path: Path) -> str:
    path = Path(path)
    if not path.resolve().parent.is_dir():
        raise OutputError(f"directory '{path.parent}' does not exist")
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return str(path)


def sensitivity_plot(curves: Sequence[Any], path: str | os.PathLike, metric: str) -> str | None:
    """Per-weight sensitivity curves: drift when that weight alone is pruned to each level."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for c in curves:
        name, levels, drift = _get(c, "name"), _get(c, "levels"), _get(c, "drift")
        ax.plot([0.0, *levels], [0.0, *drift], marker="o", markersize=3, label=name)
    ax.set_xlabel("sparsity of that weight alone")
    ax.set_ylabel(f"drift ({metric}, larger is worse)")
    ax.set_title("sensitivity per weight")
    ax.grid(alpha=0.3)
    if len(curves) <= 16:
        ax.legend(fontsize=6, loc="upper left")
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def allocation_plot(weights: Sequence[dict], path: str | os.PathLike) -> str | None:
    """Bar chart of the sparsity chosen for each weight."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.3 * len(weights) + 2), 4.5))
    xs = range(len(weights))
    ax.bar(xs, [w["sparsity"] for w in weights], color=["#999" if w["selection"] == "fixed" else "#3a7" for w in weights])
    ax.set_xticks(list(xs), [w["name"] for w in weights], rotation=75, ha="right", fontsize=6)
    ax.set_ylim(0, 1)
    ax.set_ylabel("chosen sparsity")
    ax.set_title("per-weight sparsity (grey: fixed by the config)")
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def tradeoff_plot(series: dict[str, list[dict[str, float]]], path: str | os.PathLike, metric: str,
                  budget: float | None = None) -> str | None:
    """Measured drift vs overall sparsity for local, global and allocated pruning."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for name, points in series.items():
        if points:
            ax.plot([p["sparsity"] for p in points], [p["drift"] for p in points], marker="o", label=name)
    if budget is not None:
        ax.axhline(budget, color="k", linestyle="--", linewidth=0.8, label="budget")
    ax.set_xlabel("overall sparsity")
    ax.set_ylabel(f"measured drift ({metric})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        return _save(fig, Path(path))
    finally:
        plt.close(fig)


def write_allocation_plots(alloc, directory: str | os.PathLike, stem: str) -> dict[str, str] | None:
    """The three allocation plots in ``directory`` as ``<stem>.{sensitivity,allocation,tradeoff}.png``;
    None (and a note in the report) without matplotlib."""
    report = alloc.report
    if not matplotlib_available():
        report["notes"].append(PLOT_HINT)
        return None
    d = Path(directory)
    if not d.is_dir():
        raise OutputError(f"plot directory '{d}' does not exist")
    out = {"sensitivity": sensitivity_plot(report["sensitivity"], d / f"{stem}.sensitivity.png", report["metric"]),
           "allocation": allocation_plot(report["weights"], d / f"{stem}.allocation.png")}
    if report.get("tradeoff"):
        out["tradeoff"] = tradeoff_plot(report["tradeoff"], d / f"{stem}.tradeoff.png", report["metric"],
                                        report.get("target_drift"))
    return out


def _get(obj, key):
    return obj[key] if isinstance(obj, dict) else getattr(obj, key)
