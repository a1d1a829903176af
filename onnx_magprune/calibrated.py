"""Criterion-driven pruning: wanda / obs scores, N:M patterns, per-output scope, schedules.

The plain magnitude path (:mod:`onnx_magprune.planning`) streams and keeps an
exact global threshold; this path runs whenever a criterion needs layer
structure (a :class:`~onnx_magprune.layer_view.LinearView`) or calibration
statistics.  Per step of the schedule:

1. counts: how many entries each weight loses (fixed / local: ``round(s*n)``;
   global: one pooled selection over the criterion's scores, bounds honoured;
   output: ``round(s*in)`` per output unit; N:M: ``(M-N)/M`` of each group);
2. stages: with ``sequential``, layers in dependency order, each stage's
   statistics collected on the model whose earlier layers are already pruned
   (and re-fitted); otherwise all layers from the dense model in one pass;
3. per layer: the mask from the scores (or OBS), then OBS reconstruction of
   the kept weights when re-fitting.

Counts are exact: a weight loses exactly its count, whatever the criterion.
Weights the criterion cannot see as a layer fall back to magnitude (with the
reason in the report); under an N:M pattern they are skipped instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .config import NonFinite, PruneConfig
from .discovery import Skipped
from .errors import ConfigError, NonFiniteWeightError
from .graph_index import GraphIndex
from .layer_stats import LayerStats, StatsModel, StatsRequest, stats_key
from .stats_graph import topological_stages
from .layer_view import LinearView, linear_view
from .methods import Method, MethodOptions
from .obs import ObsParams, dense_target, nm_mask, obs_prune, obs_saliency, output_error, wanda_scores
from .planning import Target, TargetValues
from .quantized import dequantize, prune_to_zero_point
from .selection import ApplyStats, plan_global, target_count
from .tensor_data import TensorStore, dtype_name


@dataclass
class LayerOutcome:
    """What the criterion did to one weight (in the report's ``method`` field)."""

    criterion: str
    pruned: int = 0
    refit: bool = False
    fallback: str | None = None
    stats_rows: int | None = None
    damp: float | None = None
    error_masked: float | None = None  # layer output error of plain masking, relative to the layer's output energy
    error_after: float | None = None  # the same after reconstruction
    matched_dense: bool | None = None  # re-fitted to the dense layer's output (earlier layers' error corrected)
    matched_residual: str | None = None  # ... and cancels the error of this residual stream it adds into
    selection: str | None = None  # "local" when --scope output had no layer view (the tensor's own count)

    def to_dict(self) -> dict:  # (selection is the report's tensors[].selection, not repeated here)
        return {k: v for k, v in self.__dict__.items() if v is not None and k != "selection"}


@dataclass
class CalibratedRun:
    targets: list[Target]
    values: list[TargetValues]
    outcomes: list[LayerOutcome]
    stats: list[ApplyStats]
    skipped: list[Skipped]
    info: dict = field(default_factory=dict)


def _final_level(t: Target, cfg: PruneConfig) -> float:
    if t.selection == "fixed":
        return t.sparsity
    lo, hi = t.bounds
    return min(max(cfg.sparsity, lo), hi) if t.selection != "global" else cfg.sparsity


def _cast_exact(values: np.ndarray, pruned: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` in ``dtype``, with pruned entries +0.0 and every kept entry non-zero
    (one that rounds to zero keeps the dtype's smallest magnitude), so counts stay exact."""
    out = values.astype(dtype)
    out[pruned] = 0
    lost = (out == 0) & ~pruned & (values != 0)  # a kept exact zero stays zero
    if lost.any():
        try:
            tiny = np.finfo(dtype).smallest_subnormal
        except (TypeError, ValueError):
            import ml_dtypes

            tiny = ml_dtypes.finfo(dtype).smallest_subnormal
        out[lost] = np.where(values[lost] < 0, -tiny, tiny).astype(dtype)
    return out


def _k_smallest(scores: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(scores.size, bool)
    if k:
        mask[np.argsort(scores, axis=None, kind="stable")[:k]] = True
    return mask.reshape(scores.shape)


def _rowwise_smallest(scores: np.ndarray, k: int) -> np.ndarray:
    mask = np.zeros(scores.shape, bool)
    if k:
        idx = np.argsort(scores, axis=1, kind="stable")[:, :k]
        np.put_along_axis(mask, idx, True, axis=1)
    return mask


def _quantiles(arrays: list[np.ndarray], kinds: list[str]) -> list[np.ndarray]:
    """Scores made comparable across criteria: each finite positive score replaced by its quantile
    among the positive scores of the same kind (stable order breaks ties), so one global cut prunes
    every kind's remaining weights to the same fraction while each kind's own ranking decides which
    go.  Scores of 0 (weights already zero) stay 0, so they are taken first whatever their kind."""
    out: list[np.ndarray] = [np.empty(0)] * len(arrays)
    for kind in sorted(set(kinds)):
        idx = [j for j, k in enumerate(kinds) if k == kind]
        flat = np.concatenate([arrays[j].ravel() for j in idx])
        live = np.isfinite(flat) & (flat != 0)
        order = np.argsort(flat[live], kind="stable")
        q = np.empty(order.size)
        q[order] = (np.arange(order.size) + 1.0) / max(order.size, 1)
        ranked = np.where(np.isfinite(flat), 0.0, np.inf)
        ranked[live] = q
        start = 0
        for j in idx:
            out[j] = ranked[start:start + arrays[j].size].reshape(arrays[j].shape)
            start += arrays[j].size
    return out


class _Runner:
    def __init__(self, proto, targets, values, cfg: PruneConfig, opts: MethodOptions, calibration):
        self.cfg, self.opts = cfg, opts
        self.keep_nonfinite = cfg.nonfinite is NonFinite.KEEP
        index = GraphIndex(proto)
        self.targets, self.values, self.skipped = [], [], []
        self.views: list[LinearView | None] = []
        self.fallback: list[str | None] = []
        output_scope = cfg.scope.value == "output"
        for t, tv in zip(targets, values):
            view, why = linear_view(t.weight, index)
            if view is not None and opts.pattern is not None:
                dims = tuple(t.weight.tensor.dims)
                if view.layout == "conv":  # groups run along the input channels, at each kernel position
                    width, what = int(dims[1]), "input channel count"
                else:
                    width, what = view.to_matrix(np.empty(dims, np.uint8)).shape[1], "reduction dimension"
                if width % opts.pattern.m:
                    view, why = None, f"its {what} ({width}) is not divisible by M={opts.pattern.m}"
            if view is None and opts.pattern is not None:
                tensor = t.weight.tensor
                self.skipped.append(Skipped(t.weight.name, t.weight.value.where(), f"pattern {opts.pattern}: {why}",
                                            dtype_name(tensor.data_type), tuple(tensor.dims)))
                continue
            self.targets.append(t)
            self.values.append(tv)
            self.views.append(view)
            if view is None:
                self.fallback.append(why if opts.needs_calibration or output_scope else None)
            elif view.unmeasured is not None and opts.needs_calibration:
                self.fallback.append(view.unmeasured)
            else:
                self.fallback.append(None)
        self.cur = [self._initial(t, tv) for t, tv in zip(self.targets, self.values)]
        self.zeros_before = [int(np.count_nonzero(c == 0)) for c in self.cur]
        self.outcomes = [LayerOutcome(self._criterion(i)) for i in range(len(self.targets))]
        self.calibrated = [i for i, v in enumerate(self.views)
                           if v is not None and v.unmeasured is None and opts.needs_calibration]
        self.stats_model = None
        if self.calibrated:
            # weights are fed to the statistics model as inputs, so later stages see earlier prunings;
            # not quantized ones (their stored values are integers) nor bfloat16 ones (onnxruntime's
            # Python API takes no bfloat16 arrays): those keep their dense values there
            unfed = {i for i in self.calibrated
                     if self.values[i].quant is not None or self.cur[i].dtype.name == "bfloat16"}
            fed = {self.targets[i].weight.name: self.cur[i] for i in self.calibrated if i not in unfed}
            self.stats_model = StatsModel(proto, fed, {self.targets[i].weight.name: self.views[i]
                                                       for i in self.calibrated},
                                          calibration, batch_size=opts.batch_size, threads=opts.threads,
                                          shapes={self.targets[i].weight.name: tuple(self.targets[i].weight.tensor.dims)
                                                  for i in unfed})
        self.finished: set[str] = set()  # weights fitted in earlier stages of this step
        self.passes = 0
        self.per_row = [0] * len(self.targets)
        self.warnings: list[str] = []

    def _initial(self, t: Target, tv: TargetValues) -> np.ndarray:
        values = tv.raw.copy() if tv.quant is None else dequantize(tv.raw, tv.quant).astype(np.float32)
        bad = int(values.size - np.count_nonzero(np.isfinite(values.astype(np.float32))))
        if bad and not self.keep_nonfinite:
            raise NonFiniteWeightError(
                f"weight '{t.weight.name}' holds {bad} NaN/Inf value(s); fix the model, exclude it, "
                "or pass --nonfinite keep to leave such values unpruned")
        return values

    def _criterion(self, i: int) -> str:
        if self.fallback[i] is not None:
            return "magnitude"
        return self.opts.method.value

    # -- statistics ---------------------------------------------------------

    def _collect(self, idx: list[int], label: str) -> dict[int, LayerStats]:
        """Statistics for ``idx``, in as many passes as the Hessian budget needs."""
        out: dict[int, LayerStats] = {}
        reference = self._match_dense()
        groups: list[list[int]] = [[]]
        used, seen = 0, set()
        for i in idx:
            view = self.views[i]
            key = stats_key(view)
            width = view.to_matrix(self.cur[i]).shape[1]
            cost = 8 * width * width if self.opts.needs_hessian and key not in seen else 0
            cost *= 2 if reference else 1
            if groups[-1] and used + cost > self.opts.stats_budget_bytes:
                groups.append([])
                used, seen = 0, set()
            groups[-1].append(i)
            used += cost
            seen.add(key)
        for group in groups:
            if not group:
                continue
            views = {self.targets[i].weight.name: self.views[i] for i in group}
            residuals = (self.stats_model.residual_streams(views, self.finished)
                         if reference and self.opts.match_residual else {})
            request = StatsRequest(views, hessian=self.opts.needs_hessian, reference=reference, residuals=residuals)
            got = self.stats_model.collect(request, label=label, quiet=self.opts.quiet)
            self.passes += 1
            for i in group:
                out[i] = got[self.targets[i].weight.name]
        return out

    def _match_dense(self) -> bool:
        """Collect the cross moments against the dense model: only when re-fitting to the dense
        output is asked for and some fed weight already differs from the dense one."""
        return self.opts.refits and self.opts.match_dense is not False and self.stats_model.changed()

    def _fit_target(self, i: int, zeros: np.ndarray, stats: LayerStats | None, damp: float) -> np.ndarray | None:
        """The dense-output target of weight ``i`` (see :func:`~onnx_magprune.obs.dense_target`),
        with its already-zero entries pruned (and compensated), or None when it does not apply."""
        name = self.targets[i].weight.name
        if (stats is None or stats.cross is None or self.fallback[i] is not None or self.values[i].quant is not None
                or name not in self.stats_model.reference):
            return None
        ref = self.views[i].to_matrix(self.stats_model.reference[name].astype(np.float64))
        residual = stats.residual if self.opts.match_residual else None
        fit = dense_target(ref, stats.hessian, stats.cross, damp, residual)
        if residual is not None:
            self.outcomes[i].matched_residual = stats.residual_of
        if zeros.any():
            fit = obs_prune(fit, stats.hessian, mask=zeros, params=ObsParams(self.opts.block_size, damp)).weights
        return fit

    # -- scores, masks ------------------------------------------------------

    def _matrix(self, i: int) -> np.ndarray:
        view = self.views[i]
        m = self.cur[i].astype(np.float64)
        return view.to_matrix(m) if view is not None else m.reshape(1, -1)

    def _scores(self, i: int, w: np.ndarray, stats: LayerStats | None) -> np.ndarray:
        if self._score_kind(i, stats) == "magnitude":
            s = np.abs(w)
        elif self.opts.method is Method.WANDA:
            s = wanda_scores(w, stats.col_sq)
        else:
            s = obs_saliency(w, stats.hessian, self._damp(i, stats))
        return np.ascontiguousarray(np.where(np.isfinite(w), s, np.inf))

    def _score_kind(self, i: int, stats: LayerStats | None) -> str:
        """The scale of :meth:`_scores` for weight ``i``: the criterion's, or plain magnitude."""
        if self.fallback[i] is not None or self.outcomes[i].criterion == "magnitude" or stats is None:
            return "magnitude"
        return self.opts.method.value

    def _note(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)

    def _damp(self, i: int, stats: LayerStats) -> float:
        """The relative dampening, raised when there are fewer rows than input features."""
        width = stats.col_sq.shape[0]
        base = self.opts.damp
        if stats.rows < width:
            return max(base, base * width / max(stats.rows, 1))
        return base

    def _counts(self, fraction: float, stats: dict[int, LayerStats]) -> list[int]:
        counts = [0] * len(self.targets)
        pool = []
        for i, t in enumerate(self.targets):
            n = self.cur[i].size
            finite = n - int(np.count_nonzero(~np.isfinite(self.cur[i].astype(np.float32))))
            if self.opts.pattern is not None:
                counts[i] = n - n * self.opts.pattern.n // self.opts.pattern.m
            elif t.selection == "global":
                pool.append(i)
            else:
                level = min(1.0, fraction * _final_level(t, self.cfg))
                counts[i] = target_count(level, finite)
                if t.selection == "output" and self.views[i] is not None:
                    rows, width = self.views[i].to_matrix(self.cur[i]).shape
                    self.per_row[i] = target_count(level, width)
                    counts[i] = rows * self.per_row[i]
        if pool:
            arrays = [self._scores(i, self._matrix(i), stats.get(i)) for i in pool]
            kinds = [self._score_kind(i, stats.get(i)) for i in pool]
            if len(set(kinds)) > 1:
                arrays = _quantiles(arrays, kinds)
                fell = [self.targets[i].weight.name for i, k in zip(pool, kinds) if k == "magnitude"]
                self._note(f"global selection: {len(fell)} weight(s) the {self.opts.method.value} criterion cannot "
                           f"score (e.g. '{fell[0]}', see tensors[].method.fallback) were ranked by magnitude among "
                           "themselves, to the same sparsity as the rest (scores of different criteria are not "
                           "comparable)")
            try:
                plans = plan_global(arrays, min(1.0, fraction * self.cfg.sparsity),
                                    bounds=[tuple(min(1.0, fraction * b) for b in self.targets[i].bounds)
                                            for i in pool], keep_nonfinite=True)
            except ValueError as e:
                raise ConfigError(str(e)) from e
            for i, p in zip(pool, plans):
                counts[i] = p.pruned
        return counts

    # -- one layer ----------------------------------------------------------

    def _prune_layer(self, i: int, count: int, stats: LayerStats | None) -> None:
        t, view, out = self.targets[i], self.views[i], self.outcomes[i]
        w = self._matrix(i)
        output_scope = t.selection == "output"
        pattern = self.opts.pattern
        obs = self.opts.method is Method.OBS and self.fallback[i] is None and stats is not None
        params = ObsParams(block_size=self.opts.block_size, damp=self._damp(i, stats) if stats else self.opts.damp)
        zeros = w == 0
        current = w  # score-based criteria rank the weights as they are; OBS and the re-fit use the target
        fit = self._fit_target(i, zeros, stats, params.damp) if self.opts.refits else None
        if fit is not None:  # errors below are measured against the fitted (dense-output) weights
            w = fit
            out.matched_dense = True
        already = int(np.count_nonzero(zeros))
        if not pattern and not output_scope and already >= count:  # the existing zeros meet the target
            res, mask = None, zeros
        elif obs and not output_scope:
            res = obs_prune(w, stats.hessian, count=None if pattern else count,
                            pattern=(pattern.n, pattern.m) if pattern else None, params=params)
            mask = res.mask
        else:
            scores = self._scores(i, current, stats)
            if pattern is not None:
                mask = nm_mask(scores, pattern.n, pattern.m)
            elif output_scope and view is not None:
                mask = _rowwise_smallest(scores, self.per_row[i])
            else:
                mask = _k_smallest(scores, count)
            res = None
        if (zeros & ~mask).any():  # weights already zero stay zero (re-fitting must not revive them)
            if not pattern and not output_scope:  # and the count stays exact: the rest by the criterion's score
                scores = self._scores(i, current, stats)
                scores[zeros] = -np.inf
                mask = _k_smallest(scores, count)
            else:
                mask = mask | zeros
            res = None
        if res is None and self.opts.refits and stats is not None and self.fallback[i] is None:
            res = obs_prune(w, stats.hessian, mask=mask, params=params)
        quantized = self.values[i].quant is not None
        if res is not None and not quantized:
            new = res.weights
            out.refit = True
        else:
            new = np.where(mask, 0.0, w)
        if stats is not None and stats.hessian is not None:
            energy = float(np.einsum("ij,jk,ik->", w, stats.hessian, w)) or 1.0
            out.error_masked = output_error(w, np.where(mask, 0.0, w), stats.hessian) / energy
            out.error_after = output_error(w, new, stats.hessian) / energy
        if stats is not None:
            out.stats_rows = stats.rows
            out.damp = params.damp if (obs or out.refit) else None
        stored = view.from_matrix(new, self.cur[i].shape) if view is not None else new.reshape(self.cur[i].shape)
        pruned = view.from_matrix(mask, self.cur[i].shape) if view is not None else mask.reshape(self.cur[i].shape)
        self.cur[i] = _cast_exact(stored, pruned, self.cur[i].dtype)
        out.pruned = int(np.count_nonzero(pruned))
        name = t.weight.name
        if self.stats_model is not None and name in self.stats_model.weights:
            self.stats_model.set_weight(name, self.cur[i])

    # -- the schedule -------------------------------------------------------

    def run(self) -> None:
        start = time.perf_counter()
        fractions = self.opts.fractions()
        stages = ([] if not self.calibrated else
                  topological_stages(self.stats_model.model, {self.targets[i].weight.name: self.views[i]
                                                              for i in self.calibrated})
                  if self.opts.sequential else [[self.targets[i].weight.name for i in self.calibrated]])
        by_name = {self.targets[i].weight.name: i for i in self.calibrated}
        stage_idx = [[by_name[n] for n in s] for s in stages]
        levels = []
        for step, fraction in enumerate(fractions, 1):
            label = f"step {step}/{len(fractions)}"
            need_pool = any(t.selection == "global" for t in self.targets) and self.calibrated
            pre = self._collect(self.calibrated, f"{label}: statistics") if need_pool else {}
            counts = self._counts(fraction, pre)
            levels.append(sum(counts) / max(1, sum(c.size for c in self.cur)))
            for i in range(len(self.targets)):
                if i not in by_name.values():
                    self._prune_layer(i, counts[i], None)
            self.finished = set()
            for s, idx in enumerate(stage_idx):
                reuse = pre and (not self.opts.sequential or s == 0)
                stats = {i: pre[i] for i in idx} if reuse else self._collect(idx, f"{label}: stage {s + 1}")
                for i in idx:
                    self._prune_layer(i, counts[i], stats[i])
                self.finished |= {self.targets[i].weight.name for i in idx}
        rows = [o.stats_rows for o in self.outcomes if o.stats_rows is not None]
        widths = {self.targets[i].weight.name: self.views[i].to_matrix(self.cur[i]).shape[1] for i in self.calibrated}
        if self.opts.needs_hessian and rows and min(rows) < max(widths.values(), default=0):
            self.warnings.append(
                f"the calibration data gives {min(rows)} activation rows for layers up to {max(widths.values())} "
                "inputs wide: their second-moment matrices are rank-deficient, so OBS may overfit the calibration "
                "data; the dampening was raised in proportion (use more calibration samples)")
        self.info = {
            "passes": self.passes, "stages": len(stage_idx), "steps": len(fractions),
            "step_sparsity": levels, "seconds": time.perf_counter() - start,
            "sessions": self.stats_model.sessions_created if self.stats_model else 0,
            "padding_mask_input": self.stats_model.mask_input if self.stats_model else None,
            "warnings": self.warnings,
        }


def run_calibrated(proto, targets: list[Target], values: list[TargetValues], cfg: PruneConfig,
                   opts: MethodOptions, calibration, store: TensorStore) -> CalibratedRun:
    """Prune ``targets`` with ``opts``'s criterion and write them through ``store``."""
    runner = _Runner(proto, targets, values, cfg, opts, calibration)
    runner.run()
    stats = []
    for i, (t, tv) in enumerate(zip(runner.targets, runner.values)):
        final = runner.cur[i]
        if tv.quant is None:
            store.write(t.weight.tensor, final)
        else:
            store.write(t.weight.tensor, prune_to_zero_point(tv.raw, final == 0, tv.quant))
        zeros_after = int(np.count_nonzero(final == 0))
        stats.append(ApplyStats(runner.zeros_before[i], zeros_after))
        if runner.fallback[i] is not None:
            runner.outcomes[i].fallback = runner.fallback[i]
        if t.selection == "output" and runner.views[i] is None:
            runner.outcomes[i].selection = "local"
    return CalibratedRun(runner.targets, runner.values, runner.outcomes, stats, runner.skipped, runner.info)


def apply_arrays(targets: list[Target], values: list[TargetValues], arrays, outcomes, store: TensorStore,
                 info: dict) -> CalibratedRun:
    """Write weights chosen elsewhere (budget-driven allocation with a calibrated criterion:
    name -> stored array, exactly as measured) through ``store``; a target without an array
    is left as it is.  ``outcomes``: name -> the report's ``method`` entry of that weight."""
    stats, outs = [], []
    for t, tv in zip(targets, values):
        name = t.weight.name
        zeros = (lambda a: int(np.count_nonzero((a if tv.quant is None else dequantize(a, tv.quant)) == 0)))
        before = zeros(tv.raw)
        final = arrays.get(name)
        if final is None:  # level 0 (chosen, or a weight the allocation cannot feed)
            stats.append(ApplyStats(before, before))
            outs.append(LayerOutcome("none", pruned=before, fallback="not pruned: its level is 0"))
            continue
        if final.shape != tv.raw.shape or final.dtype != tv.raw.dtype:
            raise ValueError(f"weight '{name}': chosen array {final.dtype}{final.shape} does not match the stored "
                             f"{tv.raw.dtype}{tv.raw.shape}")
        store.write(t.weight.tensor, final)
        after = zeros(final)
        stats.append(ApplyStats(before, after))
        outs.append(LayerOutcome(**{**outcomes.get(name, {"criterion": "allocation"}), "pruned": after}))
    return CalibratedRun(list(targets), list(values), outs, stats, [], dict(info))


__all__ = ["run_calibrated", "apply_arrays", "CalibratedRun", "LayerOutcome"]
