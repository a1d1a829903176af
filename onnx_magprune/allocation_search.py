"""Budget-driven sparsity: per-weight sparsities from sensitivity, verified on the real model.

1. Sweep (:mod:`onnx_magprune.sensitivity`): each weight of the pool alone at
   each level, on the calibration samples kept for the search (the last
   ``holdout`` fraction is left for the final validation).
2. Predict (:mod:`onnx_magprune.allocation`): Lagrange bisection over the curves.
3. Verify and correct with the combined model in the same session:
   ``--sparsity S``: the allocation at S is measured (and so is global
   magnitude at S: the lower measured drift wins).  ``--target-drift X``: the
   overall level is bisected against *measured* drift, each step re-allocated
   from the curves and guided by the prediction rescaled to the last
   measurement; the result is the highest level measured within X.
4. The chosen model is checked once more with plain sessions (weights as
   initializers, exactly what is written and validated); if that check is
   over the budget, the next lower measured level is taken.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, replace
from typing import Any

import onnx

from .allocation import WeightCurve, allocate, make_curve, max_zeros, min_zeros, predicted_cost, split_count, \
    to_cost, to_drift, zeros_for_cost
from .calibration import effective_batch, model_inputs, open_calibration, split_holdout
from .config import PruneConfig, Rule
from .drift import Metric, describe, parse_metric
from .errors import ConfigError, GateFailed
from .evaluator import DriftEvaluator, DriftSpec
from .methods import MethodOptions
from .runtime import available_providers, create_session, resolve_providers, run
from .selection import plan_global, target_count
from .sensitivity import DEFAULT_LEVELS, Curve, calibration_info, parse_levels, run_sweep, units
from .validate import RuntimeOptions
from .variants import PruningSpace, exact_level


class Allocate(str, enum.Enum):
    NONE = "none"
    SENSITIVITY = "sensitivity"


@dataclass(frozen=True)
class AllocationOptions:
    """``prune --target-drift X`` / ``prune --sparsity S --allocate sensitivity``."""

    calibration: Any = None
    target_drift: float | None = None
    allocate: Allocate = Allocate.SENSITIVITY
    metric: Metric = Metric.REL_L2
    output: str | None = None
    label_output: str | None = None
    labels: Any = None
    levels: tuple[float, ...] = DEFAULT_LEVELS
    holdout: float = 0.2
    max_samples: int | None = None
    runtime: RuntimeOptions = RuntimeOptions()
    jobs: int = 1
    tolerance: float = 0.005  # overall sparsity resolution of the measured bisection
    max_evaluations: int = 12  # combined-model evaluations of the search
    pipeline_runs: int = 4  # calibrated criteria: runs of the method's own pipeline (see _method_final)
    # calibrated criteria: the last fraction of the search samples measures drift, the rest feeds the
    # criterion's statistics (0: both on all of them, which over-prunes: re-fits look better in-sample)
    measure_fraction: float = 0.3
    tradeoff: bool = False  # also measure local / global / allocated at every level (for plots)
    plots: str | None = None  # directory for PNG plots (implies tradeoff)
    groups: tuple[str, ...] = ()  # name globs: the weights one glob matches share one sparsity
    mask_input: str | None = None  # see DriftSpec.mask_input
    quiet: bool = True

    def __post_init__(self):
        object.__setattr__(self, "allocate", _enum(Allocate, self.allocate, "allocate"))
        object.__setattr__(self, "metric", parse_metric(self.metric))
        object.__setattr__(self, "levels", parse_levels(self.levels))
        object.__setattr__(self, "groups", tuple(self.groups))
        if self.target_drift is not None:
            td = self.target_drift
            if isinstance(td, bool) or not isinstance(td, (int, float)) or not math.isfinite(td) or td < 0:
                raise ConfigError(f"target drift must be a finite number >= 0, got {td!r}")
        if self.calibration is None:
            what = "--target-drift" if self.target_drift is not None else "--allocate sensitivity"
            raise ConfigError(f"{what} needs calibration data: pass --calibration")
        if isinstance(self.holdout, bool) or not isinstance(self.holdout, (int, float)) or not 0 <= self.holdout < 1:
            raise ConfigError(f"holdout must be a fraction in [0, 1), got {self.holdout!r}")
        for name, low in (("jobs", 1), ("max_evaluations", 1), ("pipeline_runs", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {v!r}")
        if isinstance(self.measure_fraction, bool) or not isinstance(self.measure_fraction, (int, float)) \
                or not 0 <= self.measure_fraction < 1:
            raise ConfigError(f"measure_fraction must be a fraction in [0, 1), got {self.measure_fraction!r}")
        if not 0 < self.tolerance < 1:
            raise ConfigError(f"tolerance must be in (0, 1), got {self.tolerance!r}")

    @property
    def active(self) -> bool:
        return self.target_drift is not None or self.allocate is Allocate.SENSITIVITY

    def check(self, cfg: PruneConfig, method: MethodOptions | None) -> None:
        """Combinations that make no sense: one line each."""
        if self.target_drift is not None and cfg.sparsity is not None:
            raise ConfigError("--target-drift chooses the sparsity: drop --sparsity (or use --allocate sensitivity)")
        if self.target_drift is None and cfg.sparsity is None:
            raise ConfigError("--allocate sensitivity needs --sparsity S (or --target-drift X instead)")
        if method is not None and (method.pattern is not None or method.steps != 1):
            raise ConfigError("--target-drift / --allocate sensitivity choose unstructured per-weight sparsities "
                              "in one step: drop --pattern and --steps")
        if cfg.scope.value == "output":
            raise ConfigError("--target-drift / --allocate sensitivity choose a sparsity per weight: "
                              "--scope output does not apply")


def _enum(cls, value, where):
    try:
        return value if isinstance(value, cls) else cls(value)
    except ValueError:
        raise ConfigError(f"{where} must be one of {', '.join(repr(m.value) for m in cls)}, got {value!r}") from None


@dataclass
class AllocationResult:
    levels: dict[str, float]  # weight name -> sparsity (pool and fixed weights; 0.0 for weights it cannot feed)
    report: dict[str, Any]
    curves: list[Curve]
    held_out: Any = None  # the calibration samples the search never saw (for validation)
    tradeoff: dict[str, list[dict[str, float]]] | None = None
    # calibrated criteria: the chosen weights exactly as measured (name -> stored array), and per weight
    # what the criterion did; prune writes these instead of running the method again
    arrays: dict[str, Any] | None = None
    outcomes: dict[str, Any] | None = None


def escape_glob(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def with_allocation(cfg: PruneConfig, levels: dict[str, float]) -> PruneConfig:
    """``cfg`` with a fixed-sparsity rule per allocated weight, before the config's own rules."""
    rules = tuple(Rule(name=escape_glob(n), sparsity=s, origin="allocation") for n, s in levels.items())
    return replace(cfg, rules=rules + cfg.rules)


class _Search:
    """Allocation over sweep units (single weights, or ``--group`` globs whose members share one level)."""

    def __init__(self, space: PruningSpace, evaluator: DriftEvaluator, curves: dict[int, WeightCurve] | list,
                 quadrature: bool, units: list[list[int]] | None = None):
        self.space, self.evaluator, self.quadrature = space, evaluator, quadrature
        if units is None:  # one unit per weight, curves keyed by weight index
            units, curves = [[i] for i in curves], list(curves.values())
        self.units, self.ucurves = units, list(curves)
        self.pool = [i for u in units for i in u]
        self.fixed = space.fixed
        self.fixed_cost = 0.0
        self.steps: list[dict[str, Any]] = []

    @property
    def pool_numel(self) -> int:
        return sum(self.space.numel(i) for i in self.pool)

    def allocation(self, zeros: int) -> dict[int, float]:
        a = allocate(self.ucurves, zeros)
        out: dict[int, float] = {}
        for members, k in zip(self.units, a.counts):
            sizes = [self.space.numel(i) for i in members]
            counts = [k] if len(members) == 1 else split_count(k, sizes, [self.space.targets[i].bounds
                                                                          for i in members])
            out.update({i: exact_level(c, n) for i, c, n in zip(members, counts, sizes)})
        return out

    def unit_levels(self, levels: dict[int, float]) -> list[float]:
        out = []
        for members in self.units:
            n = sum(self.space.numel(i) for i in members)
            out.append(sum(round(levels[i] * self.space.numel(i)) for i in members) / n if n else 0.0)
        return out

    def predicted(self, levels: dict[int, float]) -> float:
        cost = predicted_cost(self.ucurves, self.unit_levels(levels))
        return to_drift(cost + self.fixed_cost, quadrature=self.quadrature)

    def measure(self, levels: dict[int, float], what: str) -> float:
        value = self.evaluator.drift(self.space.overrides({**self.fixed, **levels}))
        zeros = sum(round(levels[i] * self.space.numel(i)) for i in self.pool)
        self.steps.append({"what": what, "sparsity": zeros / self.pool_numel if self.pool_numel else 0.0,
                           "predicted_drift": self.predicted(levels), "measured_drift": value})
        return value

    def zeros_for(self, drift: float, scale: float) -> int:
        budget = to_cost(drift / scale if scale > 0 else drift, quadrature=self.quadrature) - self.fixed_cost
        return zeros_for_cost(self.ucurves, budget)


def _global_levels(space: PruningSpace, pool: list[int], sparsity: float) -> dict[int, float]:
    arrays = [space.values[i].source for i in pool]
    try:
        plans = plan_global(arrays, sparsity, bounds=[space.targets[i].bounds for i in pool],
                            keep_nonfinite=space.keep_nonfinite)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return {i: exact_level(p.pruned, space.numel(i)) for i, p in zip(pool, plans)}


def _local_levels(space: PruningSpace, pool: list[int], sparsity: float) -> dict[int, float]:
    out = {}
    for i in pool:
        lo, hi = space.targets[i].bounds
        n = space.numel(i)
        out[i] = exact_level(target_count(min(max(sparsity, lo), hi), n), n)
    return out


def _plain_drift(model: onnx.ModelProto, repl: dict[str, Any], evaluator: DriftEvaluator,
                 runtime: RuntimeOptions) -> float:
    """Drift of the model with the weights in ``repl`` replaced, run exactly as written (weights as initializers)."""
    from .evaluator import _Session, _State

    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    from onnx import numpy_helper

    for t in pruned.graph.initializer:
        if t.name in repl:
            t.CopyFrom(numpy_helper.from_array(repl[t.name], t.name))
    for node in pruned.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in repl:
            for a in node.attribute:
                if a.name == "value":
                    a.t.CopyFrom(numpy_helper.from_array(repl[node.output[0]], a.t.name))
    st = evaluator._session.state
    choice = resolve_providers(runtime.providers, runtime.available if runtime.available is not None
                               else available_providers(), allow_fallback=runtime.allow_fallback,
                               trt_sparsity=runtime.trt_sparsity, device_id=runtime.device_id)
    dense_sess, _ = create_session(model, choice, threads=runtime.threads)
    dense = [run(dense_sess, feeds, "the dense model") for feeds, _ in st.batches]
    plain = _Session(_State(pruned.SerializeToString(), list(choice.providers), list(choice.options),
                            runtime.threads, st.batches, dense, st.names, st.spec, st.label_output))
    evaluator.sessions_created += 2
    evaluator.evaluations += 1
    return plain.measure({}).drift


def allocate_model(model: onnx.ModelProto, cfg: PruneConfig, opts: AllocationOptions,
                   sweep: list[Curve] | None = None, method: MethodOptions | None = None) -> AllocationResult:
    """Per-weight sparsities for ``model`` (weights in memory) under ``cfg``'s rules and ``opts``.
    ``sweep``: curves of an earlier sweep of the same pool on the same data (skips the sweep).
    ``method``: a calibrated criterion (wanda, obs, --refit): the sweep and the search measure its
    one-shot variants (see allocation_variants), and the result carries the chosen weights."""
    start = time.perf_counter()
    calib = open_calibration(opts.calibration, model, labels=opts.labels, max_samples=opts.max_samples)
    fixed = effective_batch(1, model_inputs(model))  # the batch the model fixes, if any
    fit, held = split_holdout(calib, opts.holdout, batch=fixed)
    calibrated = method is not None and method.needs_calibration
    measure, stats = fit, None
    early_notes: list[str] = []
    if calibrated:
        from .allocation_variants import CriterionSpace

        # the criterion fits on the first samples and the drift is measured on the rest: measured on the
        # samples it fitted, a re-fit looks far better than it is (and the search would over-prune)
        stats, measure = split_holdout(fit, opts.measure_fraction, batch=fixed) if opts.measure_fraction > 0 \
            else (fit, fit)
        if measure is None:  # a single sample (or batch): nothing to split
            stats, measure = fit, fit
            early_notes.append("the search data is one sample (or batch), too little to split: the drift is "
                               "measured on the samples the criterion fitted, which is optimistic")
        space = CriterionSpace.build_for(model, cfg, replace(method, quiet=opts.quiet), stats)
    else:
        space = PruningSpace.build(model, cfg)
    pool = space.pool
    if not pool:
        raise ConfigError("nothing to allocate: every prunable weight is excluded or has a fixed sparsity")
    spec = DriftSpec(opts.metric, opts.output, opts.label_output, opts.mask_input)
    evaluator = DriftEvaluator(model, space.names, measure, spec, opts.runtime, jobs=opts.jobs)
    swept = units(space, pool, opts.groups)
    for name, members in swept:
        bounds = [space.targets[i].bounds for i in members]
        if max(b[0] for b in bounds) > min(b[1] for b in bounds):
            raise ConfigError(f"group '{name}': its weights' bounds do not overlap (a group shares one sparsity)")
    if sweep is not None and [c.name for c in sweep] == [name for name, _m in swept]:
        sweep_curves = sweep
    else:
        sweep_curves = run_sweep(space, evaluator, pool, opts.levels, groups=opts.groups, quiet=opts.quiet)
    sweep_evals, sweep_seconds = evaluator.evaluations, evaluator.seconds
    quadrature = opts.metric is Metric.REL_L2
    ucurves = [make_curve(c.numel, c.levels, c.drift, c.bounds, quadrature=quadrature) for c in sweep_curves]
    search = _Search(space, evaluator, ucurves, quadrature, units=[m for _n, m in swept])
    unit_of = {i: j for j, (_n, m) in enumerate(swept) for i in m}
    fixed = space.fixed
    if fixed:  # their cost, measured alone at their fixed level, enters every prediction
        values = evaluator.drifts([lambda i=i, s=s: space.overrides({i: s}) for i, s in fixed.items()])
        search.fixed_cost = sum(to_cost(max(v, 0.0), quadrature=quadrature) for v in values)
    n_pool = search.pool_numel
    curve_list = ucurves
    notes: list[str] = list(early_notes)
    chosen_by = "allocation"
    if opts.target_drift is None:
        k = target_count(cfg.sparsity, n_pool)
        lo_k, hi_k = min_zeros(curve_list), max_zeros(curve_list)
        if not lo_k <= k <= hi_k:
            raise ConfigError(f"sparsity {cfg.sparsity} needs {k} of {n_pool} weights zeroed, but the bounds and "
                              f"the highest swept level ({opts.levels[-1]}) allow {lo_k} to {hi_k}; "
                              "add higher --levels or relax the bounds")
        levels = search.allocation(k)
        measured = search.measure(levels, "allocated")
        g_measured = math.inf
        if not opts.groups:  # (global magnitude would not keep a group's members at one level)
            g_levels = _global_levels(space, pool, cfg.sparsity)
            g_measured = search.measure(g_levels, "global magnitude (same sparsity)")
        if g_measured < measured:
            levels, measured = g_levels, g_measured
            chosen_by = "global magnitude levels (criterion variants)" if calibrated else "global magnitude"
            notes.append("global magnitude measured lower drift than the allocation at this sparsity: it was used")
        feasible = [(k, levels, measured)]
    else:
        levels, measured, feasible = _target_search(search, opts, notes)
    final_levels, final_measured = levels, measured
    verified = _plain_drift(model, space.overrides({**fixed, **final_levels}), evaluator, opts.runtime)
    if opts.target_drift is not None:
        while verified > opts.target_drift and feasible:
            notes.append(f"the plain model measured {verified:.6g} > {opts.target_drift} at "
                         f"{_overall(space, pool, final_levels):.4f}: the next lower level was taken")
            _k, final_levels, final_measured = feasible.pop()
            verified = _plain_drift(model, space.overrides({**fixed, **final_levels}), evaluator, opts.runtime)
        if verified > opts.target_drift:
            raise GateFailed(f"--target-drift {opts.target_drift}: even the least pruning the config allows "
                             f"measures {verified:.6g} ({describe(opts.metric)}) on the calibration data")
    arrays = outcomes = criterion = None
    if calibrated:
        final = _method_final(model, cfg, search, final_levels, method, stats, opts, final_measured, verified)
        arrays, outcomes, criterion = final.arrays, final.outcomes, final.info
        final_levels, final_measured, verified = final.levels, final.measured, final.verified
    search_evals = evaluator.evaluations - sweep_evals
    tradeoff = None
    if opts.tradeoff or opts.plots:
        tradeoff = _tradeoff(search, space, pool, opts.levels)
    names = space.names
    chosen = {names[i]: final_levels[i] for i in pool}
    chosen.update({names[i]: s for i, s in fixed.items()})
    chosen.update({name: 0.0 for name in space.unfed})  # (a session cannot feed them: left unpruned; a name
    # shared with a fed weight made that one unfed too, see PruningSpace.build)
    ulevels = search.unit_levels(final_levels)
    weights = [{"name": names[i], "numel": space.numel(i), "sparsity": chosen[names[i]],
                "selection": "fixed" if i in fixed else "allocated",
                "group": swept[unit_of[i]][0] if i in unit_of and len(swept[unit_of[i]][1]) > 1 else None,
                "bounds": list(space.targets[i].bounds),
                "alone_predicted_drift": (to_drift(ucurves[unit_of[i]].cost_at(ulevels[unit_of[i]]),
                                                   quadrature=quadrature) if i in unit_of else None)}
               for i in range(len(names))]
    seconds = time.perf_counter() - start
    report = {
        "mode": "target-drift" if opts.target_drift is not None else "sparsity",
        "allocate": "sensitivity",
        "chosen_by": chosen_by,
        "metric": opts.metric.value,
        "metric_meaning": describe(opts.metric) + " (larger is worse)",
        "output": opts.output,
        "target_drift": opts.target_drift,
        "requested_sparsity": cfg.sparsity if opts.target_drift is None else None,
        "pool_sparsity": _overall(space, pool, final_levels),
        "predicted_drift": search.predicted(final_levels),
        "measured_drift": final_measured,
        "verified_drift": verified,
        "levels": list(opts.levels),
        "search_data": calibration_info(measure, evaluator),
        "held_out": held.description if held is not None else None,
        "weights": weights,
        "groups": list(opts.groups),
        "sensitivity": [{"name": c.name, "numel": c.numel, "levels": c.levels, "drift": c.drift,
                         "members": c.members} for c in sweep_curves],
        "search": search.steps,
        "tradeoff": tradeoff,
        "evaluations": {"sweep": sweep_evals, "search": search_evals,
                        "tradeoff": evaluator.evaluations - sweep_evals - search_evals,
                        "total": evaluator.evaluations, "dense_reference_runs": 2},
        "sessions": evaluator.sessions_created + (space.stats_sessions + sum(
            r.get("sessions", 0) for r in criterion["pipeline_runs"]) if criterion else 0),
        "seconds": {"total": round(seconds, 3), "sweep": round(sweep_seconds, 3),
                    "setup": round(evaluator.setup_seconds, 3)},
        "evaluations_per_second": round(sweep_evals / sweep_seconds, 2) if sweep_seconds > 0 else None,
        "plots": None,
        "notes": notes,
        "criterion": criterion,
    }
    return AllocationResult(chosen, report, sweep_curves, held, tradeoff, arrays, outcomes)


def _overall(space: PruningSpace, pool: list[int], levels: dict[int, float]) -> float:
    n = sum(space.numel(i) for i in pool)
    return sum(round(levels[i] * space.numel(i)) for i in pool) / n if n else 0.0


def _target_search(search: _Search, opts: AllocationOptions, notes: list[str]):
    """Bisect the overall level against measured drift; returns the best feasible allocation and the
    feasible ones below it (for the final check)."""
    budget = opts.target_drift
    curves = search.ucurves
    k_min, k_max = min_zeros(curves), max_zeros(curves)
    tol = max(1, int(opts.tolerance * search.pool_numel))
    feasible: list[tuple[int, dict[int, float], float]] = []
    lo_k, hi_k = None, k_max + 1  # lo_k: highest count measured within budget; hi_k: lowest over it
    scale = 1.0
    guess = search.zeros_for(budget, scale)  # the prediction
    for _ in range(opts.max_evaluations):
        levels = search.allocation(guess)
        m = search.measure(levels, "allocated")
        pred = search.predicted(levels)
        if m <= budget:
            if lo_k is None or guess > lo_k:
                lo_k = guess
                feasible.append((guess, levels, m))
        else:
            hi_k = min(hi_k, guess)
        if m > 0 and pred > 0:
            scale = m / pred
        low = lo_k if lo_k is not None else k_min
        if hi_k - low <= tol or (lo_k is not None and lo_k >= k_max):
            break
        if lo_k is None and guess <= k_min:
            break
        nxt = search.zeros_for(budget, scale)  # the prediction, rescaled to the last measurement
        if not (low + tol // 2 < nxt < hi_k - tol // 2) or nxt == guess:
            # no measured-feasible level yet: step down cautiously from the lowest failing one
            nxt = (low + hi_k) // 2 if lo_k is not None else max(k_min, hi_k - max(2 * tol, (hi_k - k_min) // 8))
        guess = nxt
    if lo_k is None:
        levels = search.allocation(k_min)
        m = search.measure(levels, "allocated (least the config allows)")
        if m > budget:
            raise GateFailed(f"--target-drift {budget}: even the least pruning the config allows measures "
                             f"{m:.6g} ({describe(opts.metric)}) on the calibration data")
        feasible.append((k_min, levels, m))
        notes.append("no pruning level above the config's minimum stays within the budget")
    k, levels, m = feasible.pop()
    if search.evaluator.evaluations and len(search.steps) >= opts.max_evaluations:
        notes.append(f"the search stopped after {opts.max_evaluations} evaluations (--max-evaluations)")
    return levels, m, feasible


def _tradeoff(search: _Search, space: PruningSpace, pool: list[int], levels) -> dict[str, list[dict[str, float]]]:
    """Measured drift vs overall sparsity for local, global and allocated pruning at every swept level."""
    curves = search.ucurves
    out: dict[str, list[dict[str, float]]] = {"local": [], "global": [], "allocated": []}
    n = search.pool_numel
    for s in levels:
        for name, lv in (("local", lambda: _local_levels(space, pool, s)),
                         ("global", lambda: _global_levels(space, pool, s)),
                         ("allocated", lambda: search.allocation(target_count(s, n)))):
            k = target_count(s, n)
            if name == "allocated" and not min_zeros(curves) <= k <= max_zeros(curves):
                continue
            try:
                chosen = lv()
            except ConfigError:  # the bounds do not allow this level
                continue
            drift = search.evaluator.drift(space.overrides({**search.fixed, **chosen}))
            out[name].append({"sparsity": _overall(space, pool, chosen), "drift": drift})
    return out


@dataclass
class _Final:
    arrays: dict[str, Any]
    outcomes: dict[str, dict]
    info: dict[str, Any]
    levels: dict[int, float]
    measured: float
    verified: float


def _pipeline(model: onnx.ModelProto, cfg: PruneConfig, names: list[str], levels: dict[int, float],
              method: MethodOptions, fit, quiet: bool):
    """The method's own run (sequential stages, re-fits to the dense output) at ``levels``, on a copy of
    ``model``: (name -> stored array of every weight with a level > 0, name -> outcome, run info)."""
    from .calibrated import run_calibrated
    from .tensor_data import TensorStore

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    by_name = {names[i]: s for i, s in levels.items()}
    cfg_levels = with_allocation(cfg, {n: s for n, s in by_name.items() if s > 0})
    # a weight at level 0 stays exactly dense: excluded, so the run does not re-fit it either
    zero = tuple(Rule(name=escape_glob(n), exclude=True, origin="allocation") for n, s in by_name.items() if s <= 0)
    cfg_levels = replace(cfg_levels, rules=zero + cfg_levels.rules)
    on_copy = PruningSpace.build(copy, cfg_levels)
    done = run_calibrated(copy, on_copy.targets, on_copy.values, cfg_levels, replace(method, quiet=quiet), fit,
                          TensorStore(None))
    after = PruningSpace.build(copy, cfg_levels)  # the weights as the run stored them
    arrays = {n: after.dense(j) for j, n in enumerate(after.names) if by_name.get(n, 0) > 0}
    outcomes = {t.weight.name: o.to_dict() for t, o in zip(done.targets, done.outcomes) if t.weight.name in arrays}
    return arrays, outcomes, done.info


def _method_final(model: onnx.ModelProto, cfg: PruneConfig, search: _Search, levels: dict[int, float],
                  method: MethodOptions, fit, opts: AllocationOptions, measured: float, verified: float) -> _Final:
    """The weights prune writes for a calibrated criterion.

    The search measured one-shot variants (see allocation_variants) and chose ``levels``
    (``measured``: their drift in the search's session; ``verified``: run as written).  The method's own pipeline is then run at those
    levels and kept when it measures no more drift (and, with --target-drift, stays within the
    budget when run as written).  It usually measures clearly less, so with --target-drift the
    overall level is raised by a short bisection on the pipeline's own measured drift
    (``opts.pipeline_runs`` runs in all).  Whatever is written is exactly what was measured."""
    space, evaluator = search.space, search.evaluator
    names, fixed = space.names, search.fixed
    one_shot = space.overrides({**fixed, **levels})  # (cached: the variants the search measured)
    one_shot_measured = measured
    info: dict[str, Any] = {
        "method": method.method.value,
        "variants": "one-shot: each weight pruned alone from the dense model's statistics (one pass)",
        "statistics": fit.description,
        "drift_measured_on": evaluator.calibration.description,
        "statistics_passes": space.passes,
        "fallback": dict(space.fallback),
        "one_shot_sparsity": _overall(space, search.pool, levels),
        "one_shot_drift": one_shot_measured,
        "holdout": opts.holdout,  # the allocation's split (statistics and search on the rest)
        "pipeline_runs": [],
    }
    budget = opts.target_drift
    best = _Final(one_shot, {names[i]: space.outcome(i, s) for i, s in {**fixed, **levels}.items() if s > 0},
                  info, levels, one_shot_measured, verified)
    lo_k = sum(round(levels[i] * space.numel(i)) for i in search.pool)
    hi_k = max_zeros(search.ucurves) + 1
    tol = max(1, int(opts.tolerance * search.pool_numel))
    k, trial = lo_k, levels
    for run_no in range(opts.pipeline_runs):
        arrays, outcomes, run_info = _pipeline(model, cfg, names, {**fixed, **trial}, method, fit, opts.quiet)
        drift = evaluator.drift(arrays)
        ok = drift <= (best.measured if run_no == 0 else budget)
        plain = None
        if ok:
            plain = _plain_drift(model, arrays, evaluator, opts.runtime)
            ok = budget is None or plain <= budget
        info.setdefault("warnings", list(run_info.get("warnings", [])))
        info["pipeline_runs"].append({"sparsity": _overall(space, search.pool, trial), "measured_drift": drift,
                                      "plain_drift": plain, "kept": ok,
                                      **{key: run_info[key] for key in ("passes", "sessions", "seconds")
                                         if key in run_info}})
        if ok:
            best = _Final(arrays, outcomes, info, trial, drift, plain)
            info["warnings"] = list(run_info.get("warnings", []))
            lo_k = k
        else:
            hi_k = k
        if budget is None or (run_no == 0 and not ok):
            break  # --sparsity S: the level is given; a pipeline worse than the variants: keep the variants
        predicted = search.predicted(trial)
        scale = drift / predicted if predicted > 0 else 1.0
        nxt = search.zeros_for(budget, scale)
        if not lo_k + tol // 2 < nxt < hi_k - tol // 2:
            nxt = (lo_k + hi_k) // 2
        if hi_k - lo_k <= tol or nxt <= lo_k:
            break
        k, trial = nxt, search.allocation(nxt)
    info["final"] = ("pipeline: the method's own run" if best.arrays is not one_shot
                     else "one-shot variants: the method's own run measured more drift")
    return best
