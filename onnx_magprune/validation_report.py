"""Quality gates and the validation report (JSON, Markdown, terminal table)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import check_fraction
from .errors import ConfigError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class GateResult:
    gate: str  # e.g. "max_rel_l2"
    threshold: float
    value: float | None
    passed: bool
    output: str | None  # the output it was measured on (None: labels/accuracy)


@dataclass(frozen=True)
class Gates:
    """Release gates; None means not checked.  Each gate must hold for every
    output it applies to (``max_rel_l2``/``min_cosine``: every floating-point
    output; ``min_top1``: every class-score output)."""

    max_rel_l2: float | None = None
    min_cosine: float | None = None
    min_top1: float | None = None
    max_accuracy_drop: float | None = None

    def __post_init__(self):
        for name in ("max_rel_l2", "min_cosine", "min_top1", "max_accuracy_drop"):
            value = getattr(self, name)
            if value is None:
                continue
            if name == "max_rel_l2":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                    raise ConfigError(f"{name} must be a non-negative number, got {value!r}")
            elif name == "min_cosine":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not -1 <= value <= 1:
                    raise ConfigError(f"{name} must be in [-1, 1], got {value!r}")
            else:
                check_fraction(value, name)

    @property
    def any(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def evaluate(self, outputs: list[dict[str, Any]], accuracy: dict[str, Any] | None) -> list[GateResult]:
        results = []
        for out in outputs:
            if out["kind"] != "float":
                continue
            if self.max_rel_l2 is not None:
                v = out["rel_l2"]
                results.append(GateResult("max_rel_l2", self.max_rel_l2, v, _ok(v, lambda x: x <= self.max_rel_l2),
                                          out["name"]))
            if self.min_cosine is not None:
                v = out["cosine"]
                results.append(GateResult("min_cosine", self.min_cosine, v, _ok(v, lambda x: x >= self.min_cosine),
                                          out["name"]))
            if self.min_top1 is not None and out.get("top1_agreement") is not None:
                v = out["top1_agreement"]
                results.append(GateResult("min_top1", self.min_top1, v, _ok(v, lambda x: x >= self.min_top1),
                                          out["name"]))
        if self.min_top1 is not None and not any(r.gate == "min_top1" for r in results):
            results.append(GateResult("min_top1", self.min_top1, None, False, None))
        if self.max_accuracy_drop is not None:
            v = accuracy["drop"] if accuracy else None
            results.append(GateResult("max_accuracy_drop", self.max_accuracy_drop, v,
                                      _ok(v, lambda x: x <= self.max_accuracy_drop),
                                      accuracy["output"] if accuracy else None))
        return results


def _ok(value: float | None, test) -> bool:
    return value is not None and not math.isnan(value) and bool(test(value))


@dataclass
class ValidationReport:
    tool_version: str
    dense: str
    pruned: str
    providers_requested: list[str]
    providers_used: dict[str, list[str]]
    calibration: dict[str, Any]
    batch_size: int
    outputs: list[dict[str, Any]]
    accuracy: dict[str, Any] | None
    gates: list[GateResult]
    seconds: float
    notes: list[str] = field(default_factory=list)
    decoders: dict[str, Any] | None = None  # compact decoders in the pruned model and whether ORT folded them

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "tool": {"name": "onnx-magprune", "version": self.tool_version},
            "command": "validate",
            "dense": self.dense,
            "pruned": self.pruned,
            "providers": {"requested": self.providers_requested, "used": self.providers_used},
            "calibration": self.calibration,
            "batch_size": self.batch_size,
            "outputs": self.outputs,
            "accuracy": self.accuracy,
            "gates": [asdict(g) for g in self.gates],
            "passed": self.passed,
            "seconds": self.seconds,
            "notes": self.notes,
            "compact_decoders": self.decoders,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"

    def format_table(self) -> str:
        return "\n".join(_lines(self, markdown=False))

    def to_markdown(self) -> str:
        return "\n".join(_lines(self, markdown=True)) + "\n"


def _json_default(value):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    raise TypeError(type(value).__name__)


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.2%}" if pct else f"{v:.4g}"
    return str(v)


def _table(rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        return out + ["| " + " | ".join(r) + " |" for r in rows[1:]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _lines(r: ValidationReport, markdown: bool) -> list[str]:
    verdict = "PASSED" if r.passed else "FAILED"
    head = "## onnx-magprune validation: " if markdown else "validation: "
    lines = [f"{head}{verdict if r.gates else 'no gates set'}", ""]
    cal = r.calibration
    lines.append(f"dense `{r.dense}` vs pruned `{r.pruned}` on {cal['description']} ({cal['samples']} samples, "
                 f"batch {r.batch_size}); providers used: {', '.join(r.providers_used.get('pruned', []))}"
                 if markdown else
                 f"dense {r.dense} vs pruned {r.pruned} on {cal['description']} ({cal['samples']} samples, "
                 f"batch {r.batch_size}); providers used: {', '.join(r.providers_used.get('pruned', []))}")
    lines.append("")
    rows = [["output", "rel L2", "cosine", "cos/sample mean", "cos/sample min", "max abs", "mean abs", "top-1 agree",
             "exact match", "NaN/Inf (pruned)"]]
    for o in r.outputs:
        if o["kind"] == "exact":
            rows.append([o["name"], "-", "-", "-", "-", "-", "-", "-", _fmt(o["exact_match"], True), "-"])
        else:
            rows.append([o["name"], _fmt(o["rel_l2"]), _fmt(o["cosine"]), _fmt(o["cosine_per_sample_mean"]),
                         _fmt(o["cosine_per_sample_min"]), _fmt(o["max_abs_error"]), _fmt(o["mean_abs_error"]),
                         _fmt(o["top1_agreement"], True), "-",
                         f"{o['nan_count']['pruned']}/{o['inf_count']['pruned']}"])
    lines += _table(rows, markdown)
    if r.accuracy:
        a = r.accuracy
        lines += ["", f"accuracy on labels (output {a['output']}): dense {_fmt(a['dense'], True)}, pruned "
                      f"{_fmt(a['pruned'], True)}, drop {_fmt(a['drop'], True)}"]
    if r.gates:
        lines += [""]
        rows = [["gate", "threshold", "value", "output", "result"]]
        rows += [[g.gate, _fmt(g.threshold), _fmt(g.value), g.output or "-", "pass" if g.passed else "FAIL"]
                 for g in r.gates]
        lines += _table(rows, markdown)
    if r.notes or cal.get("notes"):
        lines.append("")
        lines += [("- " if markdown else "note: ") + n for n in list(cal.get("notes", [])) + r.notes]
    return lines
