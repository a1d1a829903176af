"""The pruning report: a value object, its JSON form and a terminal table.

JSON keys are documented in the README; ``schema_version`` changes only when
a documented key changes meaning or disappears.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TensorReport:
    name: str
    where: str
    consumers: list[str]
    shape: list[int]
    dtype: str
    numel: int
    zeros_before: int
    zeros_after: int
    sparsity: float  # zeros_after / numel
    threshold: float | None  # entries with |w| below it were zeroed (plus ties); None when not pruned
    selection: str  # "global", "local", "fixed" or "none" (inspect)
    target_sparsity: float | None
    bounds: list[float] | None = None
    quantization: str | None = None  # e.g. "per-axis (axis 1) via DequantizeLinear"; None for float weights
    format: str = "dense"  # how the pruned tensor is stored: dense, sparse, sparse-int32 or compact
    stored_bytes: int | None = None  # its bytes in that format (values + indices or codes); None for inspect
    bound_bytes: float | None = None  # information bound: value bytes + numel*H(sparsity)/8
    overhead_bytes: int | None = None  # compact: the decoder's nodes and small constants
    code: str | None = None  # compact: which code was chosen
    format_note: str | None = None  # why the asked-for format was not used for this tensor
    method: dict | None = None  # criterion details (wanda/obs/N:M/output scope): see README


@dataclass(frozen=True)
class SkippedReport:
    name: str
    where: str
    reason: str
    dtype: str
    shape: list[int]


@dataclass(frozen=True)
class Totals:
    prunable_params: int  # elements of the weights in `tensors`
    total_params: int  # elements of every initializer and Constant tensor
    zeros_before: int
    zeros_after: int
    sparsity: float  # zeros_after / prunable_params
    target_zeros: int | None  # the exact count the options asked for (None for inspect)


@dataclass
class PruneReport:
    command: str  # "prune" or "inspect"
    tool_version: str
    input: str | None
    output: str | None
    options: dict[str, Any]
    tensors: list[TensorReport]
    skipped: list[SkippedReport]
    totals: Totals
    notes: list[str] = field(default_factory=list)
    validation: Any = None  # a ValidationReport when prune ran with calibration data
    method: dict | None = None  # the criterion's options and run (None for plain magnitude)
    structured: dict | None = None  # --structured: groups removed/skipped (see README); tensors is then empty
    allocation: dict | None = None  # --target-drift / --allocate sensitivity: sweep, search, chosen sparsities
    files: dict | None = None  # bytes on disk: input and output, each with its external data files

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "onnx-magprune", "version": self.tool_version},
            "command": self.command,
            "input": self.input,
            "output": self.output,
            "options": self.options,
            "tensors": [asdict(t) for t in self.tensors],
            "skipped": [asdict(s) for s in self.skipped],
            "totals": asdict(self.totals),
            "notes": list(self.notes),
            "method": self.method,
            "structured": self.structured,
            "allocation": self.allocation,
            "files": self.files,
            "validation": self.validation.to_dict() if self.validation is not None else None,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"

    def format_table(self, *, all_skipped: bool = False) -> str:
        return "\n".join(_table_lines(self, all_skipped))


def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _columns(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        out.append("  ".join(cells).rstrip())
    return out


def _table_lines(report: PruneReport, all_skipped: bool) -> list[str]:
    lines: list[str] = []
    if report.structured is not None:
        from .structured_report import structured_lines

        lines += structured_lines(report.structured)
        lines += [f"note: {n}" for n in report.notes]
        if report.validation is not None:
            lines += ["", report.validation.format_table()]
        return lines
    pruning = report.command == "prune"
    head = ["weight", "op", "shape", "dtype", "numel", "zeros"]
    head += ["sparsity", "threshold", "selection"] if pruning else ["sparsity"]
    encoded = pruning and any(t.format != "dense" for t in report.tensors)
    if encoded:
        head.append("stored as")
    head.append("where")
    rows = [head]
    for t in report.tensors:
        zeros = f"{_fmt_int(t.zeros_before)} -> {_fmt_int(t.zeros_after)}" if pruning else _fmt_int(t.zeros_before)
        row = [t.name, ",".join(t.consumers), "x".join(map(str, t.shape)) or "()", t.dtype, _fmt_int(t.numel), zeros]
        if pruning:
            threshold = "-" if t.threshold is None else f"{t.threshold:.4g}"
            row += [f"{t.sparsity:.2%}", threshold, t.selection]
        else:
            row += [f"{t.sparsity:.2%}"]
        if encoded:
            bound = f", bound {t.bound_bytes:,.0f} B" if t.bound_bytes is not None and t.format != "dense" else ""
            row.append(f"{t.format} ({t.stored_bytes:,} B{bound})")
        rows.append(row + [t.where])
    if report.tensors:
        lines += _columns(rows, right={4, 5, 6, 7} if pruning else {4, 5, 6})
    else:
        lines.append("no prunable weights found")
    shown = [s for s in report.skipped if all_skipped or _worth_showing(s)]
    hidden = len(report.skipped) - len(shown)
    if report.skipped:
        lines += ["", f"skipped ({len(report.skipped)}):"]
        if shown:
            lines += ["  " + r for r in _columns([["tensor", "shape", "dtype", "reason"]] + [
                [s.name, "x".join(map(str, s.shape)) or "()", s.dtype, s.reason] for s in shown
            ], right=set())]
        if hidden:
            lines.append(f"  ... and {hidden} small non-float or 0/1-D constants (shapes, indices; --all to list)")
    tot = report.totals
    lines += ["", f"prunable params: {_fmt_int(tot.prunable_params)} of {_fmt_int(tot.total_params)} total"]
    if pruning:
        lines.append(
            f"zeros: {_fmt_int(tot.zeros_before)} -> {_fmt_int(tot.zeros_after)} "
            f"(sparsity {tot.sparsity:.2%}; asked for {_fmt_int(tot.target_zeros or 0)})"
        )
    else:
        lines.append(f"zeros already: {_fmt_int(tot.zeros_before)} ({tot.sparsity:.2%})")
    if report.files and report.files.get("output_bytes") is not None:
        f = report.files
        before = f"{_fmt_int(f['input_bytes'])} B -> " if f.get("input_bytes") is not None else ""
        lines.append(f"on disk (with external data): {before}{_fmt_int(f['output_bytes'])} B")
    lines += [f"note: {n}" for n in report.notes]
    if report.validation is not None:
        lines += ["", report.validation.format_table()]
    return lines


def _worth_showing(s: SkippedReport) -> bool:
    """Hide the noise of shape/index constants from the terminal (never from JSON)."""
    numel = 1
    for d in s.shape:
        numel *= d
    floating = s.dtype in ("float", "float16", "bfloat16", "double")
    return floating or (len(s.shape) >= 2 and numel >= 16)
