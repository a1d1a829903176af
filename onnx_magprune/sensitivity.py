"""Layer sensitivity: the drift each weight causes when it alone is pruned to each level.

One ONNX Runtime session for the whole sweep (:class:`~onnx_magprune.evaluator.DriftEvaluator`:
weights are overridable initializers, dense outputs computed once); each
evaluation feeds one pruned weight.  ``jobs > 1`` spreads evaluations over
worker processes (one session each).
"""

from __future__ import annotations

import fnmatch
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import onnx

from . import __version__
from .calibration import CalibrationSet, open_calibration
from .config import PruneConfig, check_fraction
from .drift import Metric, describe, parse_metric
from .errors import ConfigError
from .evaluator import DriftEvaluator, DriftSpec
from .model_io import internalize_external_data, load_model
from .validate import RuntimeOptions
from .variants import PruningSpace

DEFAULT_LEVELS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95)


def parse_levels(levels: "str | Sequence[float]") -> tuple[float, ...]:
    """``"0.3,0.5"`` or a sequence -> sorted distinct levels in (0, 1]."""
    if isinstance(levels, str):
        try:
            items = [float(x) for x in levels.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(f"levels must be comma-separated fractions, got {levels!r}") from None
    else:
        items = list(levels)
    values = sorted({check_fraction(x, "levels") for x in items})
    if not values or values[0] <= 0.0:
        raise ConfigError("levels must be fractions in (0, 1], at least one")
    return tuple(values)


@dataclass(frozen=True)
class SweepOptions:
    """How the sweep runs: the levels, the drift metric, the runtime, parallel processes."""

    levels: tuple[float, ...] = DEFAULT_LEVELS
    metric: Metric = Metric.REL_L2
    output: str | None = None
    label_output: str | None = None
    runtime: RuntimeOptions = RuntimeOptions()
    jobs: int = 1
    groups: tuple[str, ...] = ()  # name globs: the weights one glob matches are swept as one unit
    mask_input: str | None = None  # see DriftSpec.mask_input
    quiet: bool = True

    def __post_init__(self):
        object.__setattr__(self, "levels", parse_levels(self.levels))
        object.__setattr__(self, "groups", tuple(self.groups))
        object.__setattr__(self, "metric", parse_metric(self.metric))
        if isinstance(self.jobs, bool) or not isinstance(self.jobs, int) or self.jobs < 1:
            raise ConfigError(f"jobs must be an integer >= 1, got {self.jobs!r}")

    @property
    def spec(self) -> DriftSpec:
        return DriftSpec(self.metric, self.output, self.label_output, self.mask_input)


@dataclass
class Curve:
    """One weight's sensitivity: drift when it alone is pruned to each level (level 0: drift 0)."""

    name: str
    numel: int
    share: float  # of the swept parameters
    zeros_before: int
    selection: str  # "global"/"local" (allocation chooses) or "fixed" (a config rule fixes it)
    bounds: tuple[float, float]
    levels: list[float]
    drift: list[float]
    members: list[str] | None = None  # a group (--group GLOB): its weights, pruned together to each level


@dataclass
class SensitivityReport:
    input: str | None
    metric: str
    output: str | None
    levels: list[float]
    calibration: dict[str, Any]
    curves: list[Curve]
    skipped: list[dict[str, Any]]
    evaluations: int  # pruned variants evaluated (the dense reference run is not counted)
    seconds: float  # wall time of the sweep (setup + evaluations)
    setup_seconds: float  # session creation and the dense reference outputs
    eval_seconds: float  # the evaluations themselves
    sessions: int
    jobs: int
    providers: list[str]
    plots: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def evaluations_per_second(self) -> float:
        return self.evaluations / self.eval_seconds if self.eval_seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "tool": {"name": "onnx-magprune", "version": __version__},
            "command": "sensitivity",
            "input": self.input,
            "metric": self.metric,
            "metric_meaning": describe(Metric(self.metric)) + " (larger is worse)",
            "output": self.output,
            "levels": self.levels,
            "calibration": self.calibration,
            "weights": [{**asdict(c), "bounds": list(c.bounds)} for c in self.curves],
            "skipped": self.skipped,
            "evaluations": self.evaluations,
            "sessions": self.sessions,
            "jobs": self.jobs,
            "providers": self.providers,
            "seconds": round(self.seconds, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "eval_seconds": round(self.eval_seconds, 3),
            "evaluations_per_second": round(self.evaluations_per_second, 2),
            "plots": self.plots,
            "notes": list(self.notes),
        }

    def to_json(self, *, timings: bool = True) -> str:
        d = self.to_dict()
        if not timings:  # byte-identical across runs
            for k in ("seconds", "setup_seconds", "eval_seconds", "evaluations_per_second"):
                d[k] = None
        return json.dumps(d, indent=2) + "\n"

    def format_table(self) -> str:
        lv = self.levels
        head = ["weight", "params", "share"] + [f"{x:.0%}" for x in lv]
        rows = [head]
        for c in self.curves:
            by = dict(zip(c.levels, c.drift))
            rows.append([c.name, f"{c.numel:,}", f"{c.share:.1%}"] + [_fmt(by.get(x)) for x in lv])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = [f"sensitivity: {describe(Metric(self.metric))} when one weight alone is pruned "
                 f"({self.calibration.get('description')}, {self.calibration.get('samples')} samples)"]
        lines += ["  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
                  for r in rows]
        lines.append(f"{self.evaluations} evaluations at {self.evaluations_per_second:.1f}/s; {self.seconds:.2f} s in all "
                     f"(setup {self.setup_seconds:.2f} s); {self.sessions} ONNX Runtime session(s), jobs={self.jobs}")
        if self.skipped:
            lines.append(f"{len(self.skipped)} constant(s) not swept (too small, excluded or not feedable): "
                         "see the JSON report")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


    def to_markdown(self, markdown_path: str | None = None) -> str:
        """A Markdown table of the curves, with the plot (if any) linked relative to ``markdown_path``."""
        lv = self.levels
        out = [f"# Sensitivity: {describe(Metric(self.metric))} (larger is worse)", "",
               f"Each weight alone pruned to each level; {self.calibration.get('description')}, "
               f"{self.calibration.get('samples')} samples. {self.evaluations} evaluations in {self.seconds:.2f} s "
               f"({self.evaluations_per_second:.1f}/s), {self.sessions} ONNX Runtime session(s).", "",
               "| weight | params | share | " + " | ".join(f"{x:.0%}" for x in lv) + " |",
               "|---|---|---|" + "---|" * len(lv)]
        for c in self.curves:
            by = dict(zip(c.levels, c.drift))
            out.append(f"| `{c.name}` | {c.numel:,} | {c.share:.1%} | " + " | ".join(_fmt(by.get(x)) for x in lv) + " |")
        for name, path in (self.plots or {}).items():
            base = os.path.dirname(os.path.abspath(markdown_path)) if markdown_path else None
            out += ["", f"![{name}]({os.path.relpath(path, base) if base else path})"]
        out += [""] + [f"* {n}" for n in self.notes]
        return "\n".join(out) + "\n"


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def units(space: PruningSpace, indices: Sequence[int], groups: Sequence[str] = ()) -> list[tuple[str, list[int]]]:
    """Sweep units: the weights the first matching glob of ``groups`` catches form one unit (named by
    the glob, placed at its first member); every other weight is a unit alone."""
    out: list[tuple[str, list[int]]] = []
    where: dict[str, int] = {}
    for i in indices:
        name = space.targets[i].weight.name
        glob = next((g for g in groups if fnmatch.fnmatchcase(name, g)), None)
        if glob is None:
            out.append((name, [i]))
        elif glob in where:
            out[where[glob]][1].append(i)
        else:
            where[glob] = len(out)
            out.append((glob, [i]))
    return out


def run_sweep(space: PruningSpace, evaluator: DriftEvaluator, indices: Sequence[int], levels: Sequence[float], *,
              groups: Sequence[str] = (), quiet: bool = True) -> list[Curve]:
    """Curves for the weights ``indices`` of ``space`` (or their ``groups``), each pruned alone to every level."""
    swept = units(space, indices, groups)
    tasks = [(members, s) for _name, members in swept for s in levels]
    values = evaluator.drifts([lambda m=m, s=s: space.overrides({i: s for i in m}) for m, s in tasks],
                              label="sensitivity", quiet=quiet)
    total = sum(space.numel(i) for i in indices) or 1
    curves = []
    for j, (name, members) in enumerate(swept):
        ts = [space.targets[i] for i in members]
        n = sum(space.numel(i) for i in members)
        bounds = (max(t.bounds[0] for t in ts), min(t.bounds[1] for t in ts))
        drift = values[j * len(levels):(j + 1) * len(levels)]
        curves.append(Curve(name, n, n / total, sum(space.zeros_before[i] for i in members), ts[0].selection,
                            bounds, list(levels), [float(d) for d in drift],
                            [t.weight.name for t in ts] if len(members) > 1 or name != ts[0].weight.name else None))
    return curves


def open_model(model) -> tuple[onnx.ModelProto, str | None]:
    loaded = load_model(model)
    internalize_external_data(loaded)
    return loaded.proto, (str(loaded.path) if loaded.path is not None else None)


def sensitivity_sweep(
    model,
    calibration: Any,
    *,
    config: PruneConfig | None = None,
    options: SweepOptions = SweepOptions(),
    labels: str | os.PathLike | None = None,
    max_samples: int | None = None,
) -> SensitivityReport:
    """Prune each prunable weight alone to each level and measure drift on ``calibration``.

    ``config`` decides which weights are swept (its exclusions apply); weights
    with a fixed sparsity are swept too (marked ``selection: fixed``)."""
    if calibration is None:
        raise ConfigError("sensitivity needs calibration data: pass --calibration")
    start = time.perf_counter()
    proto, path = open_model(model)
    calib = open_calibration(calibration, proto, labels=labels, max_samples=max_samples)
    space = PruningSpace.build(proto, config or PruneConfig())
    if not space.targets:
        first = next((s for s in space.skipped if s.name in space.unfed), None)  # weights it cannot feed
        raise ConfigError("no prunable weights to sweep" + (f": e.g. '{first.name}' {first.reason}" if first else "")
                          + " (see `onnx-magprune inspect`)")
    evaluator = DriftEvaluator(proto, space.names, calib, options.spec, options.runtime, jobs=options.jobs)
    curves = run_sweep(space, evaluator, range(len(space.targets)), options.levels, groups=options.groups,
                       quiet=options.quiet)
    seconds = time.perf_counter() - start
    return SensitivityReport(
        input=path, metric=options.metric.value, output=options.output, levels=list(options.levels),
        calibration=calibration_info(calib, evaluator), curves=curves,
        skipped=[{"name": s.name, "where": s.where, "reason": s.reason} for s in space.skipped],
        evaluations=evaluator.evaluations, seconds=seconds, setup_seconds=evaluator.setup_seconds,
        eval_seconds=evaluator.seconds, sessions=evaluator.sessions_created, jobs=options.jobs, providers=evaluator.providers_used)


def calibration_info(calib: CalibrationSet, evaluator: DriftEvaluator) -> dict[str, Any]:
    return {"description": calib.description, "synthetic": calib.synthetic, "samples": evaluator.samples,
            "batch_size": evaluator.batch_size, "label_output": evaluator._session.state.label_output,
            "drift_mask": evaluator.spec.mask_input}
