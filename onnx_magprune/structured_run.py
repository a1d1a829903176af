"""Structured removal end to end: groups -> config -> counts -> selection/re-fit -> rewrite -> report.

Criteria (from :class:`~onnx_magprune.methods.MethodOptions`):

* ``magnitude``: the L1/L2 norm of each unit's producer weights (no data);
  ``--refit`` with calibration re-fits the consumer by least squares;
* ``wanda``: activation norm x outgoing weight norm on the calibration data,
  then the least-squares re-fit (on unless ``refit=False``);
* ``obs``: structured OBS on the consumer's input dimension (greedy removal
  with the optimal update of the kept rows and the bias; ``refit=False``
  keeps the OBS selection and leaves the kept rows as they were).

Counts: ``round(S x units)`` per group (local), or one budget over the
pooled groups (global): by per-weight norms without data, or by measured
drift curves with calibration (:mod:`onnx_magprune.structured_allocate`).

With ``sequential`` (the default) groups are handled stage by stage in
dataflow order, each stage's statistics collected on the model whose earlier
groups are already removed and re-fitted; the statistics model (one ONNX
Runtime session, weights fed as inputs) runs the *masked* model: removed
consumer rows are zero, which is exactly the removed model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import __version__
from .config import NonFinite, PruneConfig, Scope
from .errors import ConfigError, NonFiniteWeightError
from .layer_stats import LayerStats, StatsModel, StatsRequest, norm_row_spread
from .stats_graph import topological_stages
from .layer_view import ConvGeometry, LinearView
from .norm_sites import norm_sites
from .methods import Method, MethodOptions
from .obs import dense_target
from .report import PruneReport, Totals
from .selection import target_count
from .structured import Consumer, SkippedGroup, UnitGroup, find_groups
from .structured_allocate import allocate
from .structured_heads import find_head_groups
from .structured_probe import failed_checks
from .structured_refine import MIN_ROWS, Block, Chain, forward, refine
from .structured_refine_plan import RefinePlan, refine_plan
from .structured_refit import activation_scores, damping, lsq_refit, obs_remove, output_error
from .structured_rewrite import rewrite, tensor_protos
from .structured_select import global_counts, local_counts, norm_scores, smallest, unit_rows

# global scope with calibration: each group is measured alone at these multiples of the target fraction
# (up to its cap), so the curves reach well past the target: MiniLM's drift curves are convex, and an
# allocation beyond the last measured point once removed 1535 of a layer's 1536 units on a straight line
# (eight points, not four: on MiniLM at 50% the finer curves gave 0.9374 vs 0.9340 held-out token cosine;
# sixteen gave no more and took twice as long)
ALLOCATION_LEVELS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0)
ALLOCATION_HOLDOUT = 0.3  # ... fitted on the first 70% of the statistics samples, measured on the rest
SELECTION_DAMP = 0.1  # structured OBS selects units with this share of the re-fit's dampening
# "neurons" and "channels" are the same thing (output units of MatMul/Gemm, output channels of Conv);
# "heads" are the attention heads of multi-head attention blocks (structured_heads)
UNITS = ("neurons", "channels", "heads")


@dataclass(frozen=True)
class StructuredOptions:
    """``prune --structured neurons``: remove whole units (``sparsity`` = the fraction of units)."""

    unit: str = "neurons"
    norm: str = "l2"  # producer weight norm for the magnitude criterion: "l1" or "l2"
    min_units: int = 1  # units every group keeps
    # with calibration: weight each row of a layer whose output reaches a LayerNorm/RMSNorm by
    # 1/(σ²+ε) of the norm's input, so the re-fit minimises the error after the norm (norm_sites)
    norm_weighted: bool = True
    # with calibration: after the re-fit, Adam epochs over the calibration rows that also move the
    # producer's kept columns and bias (structured_refine); 0 leaves the re-fit as it is
    refine_epochs: int = 0
    refine_lr: float = 2.5e-3  # each step is this x the RMS of the block's weight matrix
    refine_rows: int = 1 << 16  # at most this many activation rows (the first ones) per group

    def __post_init__(self):
        if self.unit not in UNITS:
            raise ConfigError(f"structured unit must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if self.norm not in ("l1", "l2"):
            raise ConfigError(f"norm must be 'l1' or 'l2', got {self.norm!r}")
        if not isinstance(self.norm_weighted, bool):
            raise ConfigError(f"norm_weighted must be true or false, got {self.norm_weighted!r}")
        if isinstance(self.min_units, bool) or not isinstance(self.min_units, int) or self.min_units < 1:
            raise ConfigError(f"min_units must be an integer >= 1, got {self.min_units!r}")
        if isinstance(self.refine_epochs, bool) or not isinstance(self.refine_epochs, int) or self.refine_epochs < 0:
            raise ConfigError(f"refine_epochs must be an integer >= 0, got {self.refine_epochs!r}")
        if isinstance(self.refine_lr, bool) or not isinstance(self.refine_lr, (int, float)) \
                or not 0 < self.refine_lr < 1:
            raise ConfigError(f"refine_lr must be a number in (0, 1), got {self.refine_lr!r}")
        if isinstance(self.refine_rows, bool) or not isinstance(self.refine_rows, int) or self.refine_rows < 1:
            raise ConfigError(f"refine_rows must be an integer >= 1, got {self.refine_rows!r}")

    def to_dict(self) -> dict:
        return {"unit": self.unit, "norm": self.norm, "min_units": self.min_units,
                "norm_weighted": self.norm_weighted, "refine_epochs": self.refine_epochs,
                "refine_lr": self.refine_lr, "refine_rows": self.refine_rows}


@dataclass(frozen=True)
class _BiasedView(LinearView):
    """A consumer's input rows with a trailing constant-1 feature (for its bias)."""

    def rows(self, x: np.ndarray) -> np.ndarray:
        r = LinearView.rows(self, x)
        return np.concatenate([r, np.ones((r.shape[0], 1), dtype=r.dtype)], axis=1)


def _attr(node, name, default):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _view(c: Consumer, stored_shape, biased: bool) -> LinearView:
    cls = _BiasedView if biased else LinearView
    geometry = _conv_geometry(c.node, stored_shape) if c.layout == "conv" else None
    return cls(c.node.op_type, c.layout, c.input_name, c.node, trans_a=False, conv=geometry)


def _conv_geometry(node, dims) -> ConvGeometry:
    spatial = len(dims) - 2
    auto_pad = _attr(node, "auto_pad", b"NOTSET")
    return ConvGeometry(kernel=tuple(dims[2:]), strides=tuple(_attr(node, "strides", [1] * spatial)),
                        dilations=tuple(_attr(node, "dilations", [1] * spatial)),
                        pads=tuple(_attr(node, "pads", [0] * (2 * spatial))),
                        auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else str(auto_pad))


@dataclass
class _Group:
    group: UnitGroup
    selection: str  # "global", "local" or "fixed"
    level: float
    bounds: tuple[float, float]
    count: int = 0
    removed: np.ndarray | None = None
    info: dict | None = None
    curve: dict | None = None  # global scope with calibration: drift of the outputs vs units removed


def _params(model: onnx.ModelProto) -> int:
    from .model_io import count_params

    return count_params(model)


class StructuredRun:
    """One structured removal of ``proto`` (changed in place); :meth:`report` describes it."""

    def __init__(self, proto: onnx.ModelProto, cfg: PruneConfig, opts: StructuredOptions,
                 method: MethodOptions | None, statistics=None, *, source: str | None = None,
                 output: str | None = None, where: dict | None = None):
        start = time.perf_counter()
        self.cfg, self.opts, self.source, self.output = cfg, opts, source, output
        self.where = where
        method = method or MethodOptions()
        self.method = method
        if cfg.sparsity is None and not any(r.sparsity is not None for r in cfg.rules):
            raise ConfigError("no sparsity given: pass --sparsity (the fraction of units to remove)")
        if cfg.scope is Scope.OUTPUT:
            raise ConfigError("--scope output does not apply to structured removal: use global or local")
        if method.pattern is not None:
            raise ConfigError("--pattern and --structured are different kinds of structure: pick one")
        if method.steps != 1:
            raise ConfigError("structured removal runs in one step: drop --steps")
        self.criterion = {Method.MAGNITUDE: "norm", Method.WANDA: "activation", Method.OBS: "obs"}[method.method]
        self.refit = method.refit if method.refit is not None else method.method is not Method.MAGNITUDE
        self.calibrated = self.criterion != "norm" or self.refit
        if self.calibrated and statistics is None:
            raise ConfigError("calibration-aware structured removal needs calibration data: pass --calibration")
        if opts.refine_epochs and not self.refit:
            raise ConfigError("--refine-epochs refines the re-fitted layers: use it with --calibration and "
                              "--method obs or wanda (not with --no-refit)")
        self.proto = proto
        self.params_before = _params(proto)
        self.bytes_before = proto.ByteSize()
        if opts.unit == "heads":
            groups, skipped = find_head_groups(proto, include_overridable=cfg.include_overridable)
            failed = failed_checks(proto, groups, statistics)
            skipped += [SkippedGroup(g.site or g.producer, "Softmax" if g.site else g.producer_op, 0,
                                     f"attention heads: {failed[i]}")
                        for i, g in enumerate(groups) if i in failed]
            groups = [g for i, g in enumerate(groups) if i not in failed]
        else:
            groups, skipped = find_groups(proto, include_overridable=cfg.include_overridable)
        self.skipped: list[SkippedGroup] = list(skipped)
        self.groups: list[_Group] = []
        protos = tensor_protos(proto)
        self.protos = protos
        for g in groups:
            why = self._rule(g, protos)
            if isinstance(why, str):
                self.skipped.append(SkippedGroup(g.producer, g.producer_op, g.units, why))
            else:
                self.groups.append(why)
        self.values: dict[str, np.ndarray] = {}
        self.warnings: list[str] = []
        self.passes = 0
        self.stats_model = None
        self._dense_outputs = None
        self._counts()
        if self.calibrated and self.groups:
            self._calibrated(statistics)
        else:
            for gr in self.groups:
                scores = norm_scores(self._unit_rows(gr), opts.norm)
                gr.removed = smallest(scores, gr.count)
                gr.info = {"criterion": "norm", "refit": False}
        self.before = {name: tuple(protos[name].dims) for gr in self.groups for name in gr.group.tensors()}
        rewrite(proto, [(gr.group, gr.removed) for gr in self.groups], self.values, mode="remove")
        self.seconds = time.perf_counter() - start

    # -- config ---------------------------------------------------------------

    def _rule(self, g: UnitGroup, protos) -> _Group | str:
        from .tensor_data import numel

        rule = self.cfg.rule_for(g.producer, [g.producer_op])
        if rule is not None and rule.exclude:
            return f"excluded by {rule.describe()}"
        for c in g.consumers:
            crule = self.cfg.rule_for(c.weight, [c.node.op_type])
            if crule is not None and crule.exclude:
                return f"its consumer weight '{c.weight}' is excluded by {crule.describe()}"
        n = numel(protos[g.producer])
        if n < self.cfg.min_numel:
            return f"too small: its weight has {n} elements, below min_numel {self.cfg.min_numel}"
        if g.units <= self.opts.min_units:
            return f"it has {g.units} units, not more than min_units {self.opts.min_units}"
        for name in g.tensors():
            array = numpy_helper.to_array(protos[name])
            bad = int(array.size - np.count_nonzero(np.isfinite(array.astype(np.float32))))
            if bad and self.cfg.nonfinite is NonFinite.KEEP:
                return f"'{name}' holds {bad} NaN/Inf value(s) (--nonfinite keep leaves its group as it is)"
            if bad:
                raise NonFiniteWeightError(f"weight '{name}' holds {bad} NaN/Inf value(s); fix the model, exclude "
                                           "it, or pass --nonfinite keep to leave its group as it is")
        if rule is not None and rule.sparsity is not None:
            return _Group(g, "fixed", rule.sparsity, (0.0, 1.0))
        if self.cfg.sparsity is None:
            return "no sparsity for it (no --sparsity and no rule sets one)"
        bounds = rule.bounds if rule is not None else (0.0, 1.0)
        return _Group(g, self.cfg.scope.value, self.cfg.sparsity, bounds)

    # -- counts ---------------------------------------------------------------

    def _counts(self) -> None:
        local = [gr for gr in self.groups if gr.selection != "global"]
        levels = [min(max(gr.level, gr.bounds[0]), gr.bounds[1]) if gr.selection == "local" else gr.level
                  for gr in local]
        for gr, c in zip(local, local_counts([gr.group.units for gr in local], levels, self.opts.min_units)):
            gr.count = c
        self.pool = [gr for gr in self.groups if gr.selection == "global"]
        self.pool_target = target_count(self.cfg.sparsity, sum(gr.group.units for gr in self.pool)) \
            if self.pool else 0
        if self.pool and not self.calibrated:
            scores = [norm_scores(self._unit_rows(gr), self.opts.norm) for gr in self.pool]
            # relative to each layer's mean: raw norms follow a layer's scale (PyTorch initialises with
            # 1/sqrt(fan-in)), so one pooled ranking would empty the widest layers first
            self._apply_global([sc / m if (m := float(np.mean(sc))) > 0 else sc for sc in scores])

    def _apply_global(self, scores: list[np.ndarray]) -> None:
        counts = global_counts(scores, self.cfg.sparsity, [gr.bounds for gr in self.pool], self.opts.min_units)
        for gr, c in zip(self.pool, counts):
            gr.count = c
        if sum(counts) != self.pool_target:
            self.warnings.append(f"global selection removed {sum(counts)} units, not {self.pool_target}: "
                                 "bounds or min_units hold the rest")

    def _unit_rows(self, gr: _Group) -> np.ndarray:
        """``[units, fan]``: each unit's producer weights (for a head group, its Q, K and V columns)."""
        g = gr.group
        parts = [s for s in g.shrinks if s.role == "producer"] if g.kind == "heads" else [g.shrinks[0]]
        return np.concatenate([unit_rows(self._value(s.tensor), s.axis, s.block) for s in parts], axis=1)

    def _value(self, name: str) -> np.ndarray:
        if name not in self.values:
            return numpy_helper.to_array(self.protos[name])
        return self.values[name]

    # -- calibrated -----------------------------------------------------------

    def _layout(self, gr: _Group):
        """Consumers as one ``[in(+1), out]`` matrix, the unit -> feature map, and how to split it back."""
        g = gr.group
        value = self._value
        biased = all(c.bias is not None for c in g.consumers)
        mats, parts = [], []
        for c in g.consumers:
            stored = value(c.weight).astype(np.float64)
            m = self._views[c.weight].to_matrix(stored).T  # [in, out]
            if biased:
                b = value(c.bias).astype(np.float64).reshape(-1)
                if b.size == 1:
                    b = np.full(m.shape[1], b[0])
                m = np.concatenate([m, b[None, :]], axis=0)
            mats.append(m)
            parts.append((c, m.shape[1]))
        w = np.concatenate(mats, axis=1)
        c0 = g.consumers[0]
        cols = _unit_cols(g.units, c0, self._value(c0.weight).shape)
        return w, cols, parts, biased

    def _stored(self, w: np.ndarray, parts, biased: bool) -> dict[str, np.ndarray]:
        """The consumers' new stored values (weights, and biases when re-fitted) from ``w``."""
        out: dict[str, np.ndarray] = {}
        off = 0
        for c, n_out in parts:
            block = w[:, off:off + n_out]
            off += n_out
            mat = block[:-1] if biased else block
            out[c.weight] = self._views[c.weight].from_matrix(mat.T, self._value(c.weight).shape)
            if biased:
                shape = self._value(c.bias).shape
                if int(np.prod(shape)) != 1 or n_out == 1:  # a scalar bias cannot take per-output values
                    out[c.bias] = block[-1].reshape(shape)
        if self.stats_model is not None:
            out = {k: v.astype(self.stats_model.weights[k].dtype) if k in self.stats_model.weights else v
                   for k, v in out.items()}
        return out

    def _store(self, gr: _Group, w: np.ndarray, parts, biased: bool) -> None:
        for name, value in self._stored(w, parts, biased).items():
            self.values[name] = value
            if self.stats_model is not None and name in self.stats_model.weights:
                self.stats_model.set_weight(name, value)

    def _calibrated(self, statistics) -> None:
        self._views: dict[str, LinearView] = {}
        for gr in self.groups:
            biased = all(c.bias is not None for c in gr.group.consumers)
            for c in gr.group.consumers:
                self._views[c.weight] = _view(c, self._value(c.weight).shape, biased)
        fed = {}
        for gr in self.groups:
            for c in gr.group.consumers:
                fed[c.weight] = self._value(c.weight)
                if c.bias is not None:
                    fed[c.bias] = self._value(c.bias)
        self._plans: dict[str, RefinePlan | str] = {}
        if self.opts.refine_epochs:
            for gr in self.groups:
                plan = refine_plan(self.proto, gr.group)
                self._plans[gr.group.producer] = plan
                if isinstance(plan, RefinePlan):  # later layers must see the refined producers
                    fed[plan.producer] = self._value(plan.producer)
                    if plan.producer_bias is not None:
                        fed[plan.producer_bias] = self._value(plan.producer_bias)
        fed = {k: v for k, v in fed.items() if k in {t.name for t in self.proto.graph.initializer}
               or any(n.op_type == "Constant" and n.output and n.output[0] == k for n in self.proto.graph.node)}
        m = self.method
        first = {gr.group.consumers[0].weight: gr for gr in self.groups}
        weighted = self._weighted() if self.opts.norm_weighted else frozenset()
        self._sites = {w: site for w, site in norm_sites(self.proto, self._views).items() if w in weighted}
        fetch = sorted({p.x for p in self._plans.values() if isinstance(p, RefinePlan)}
                       | {site.tensor for site in self._sites.values()}) if self.opts.refine_epochs else []
        self.stats_model = StatsModel(self.proto, dict(fed), {w: self._views[w] for w in first},
                                      statistics, batch_size=m.batch_size, threads=m.threads,
                                      weighted=weighted, extra_fetch=tuple(fetch))
        self._finished: set[str] = set()  # consumer weights and biases fitted in earlier stages
        if self.pool:
            self._allocate()
        if m.sequential:
            stages = topological_stages(self.stats_model.model, {w: self._views[w] for w in first})
            order = [[first[w] for w in stage] for stage in stages]
        else:
            order = [list(self.groups)]
        for s, stage in enumerate(order):
            stats = self._collect(stage, f"stage {s + 1}/{len(order)}")
            for gr in stage:
                self._select_refit(gr, stats[gr.group.consumers[0].weight])
            for gr in stage:
                if self.opts.refine_epochs and gr.info and gr.info.get("refit"):
                    self._refine(gr)
            self._finished |= {name for gr in stage for c in gr.group.consumers for name in (c.weight, c.bias) if name}
        rows = [gr.info.get("stats_rows") for gr in self.groups if gr.info and gr.info.get("stats_rows")]
        widths = [gr.info.get("width") for gr in self.groups if gr.info and gr.info.get("width")]
        if rows and min(rows) < max(widths):
            self.warnings.append(
                f"the calibration data gives {min(rows)} activation rows for consumers up to {max(widths)} inputs "
                "wide: X^T X is rank-deficient, so the re-fit may overfit; the dampening was raised in proportion "
                "(use more calibration samples)")
        self.stats_info = {"passes": self.passes, "stages": len(order),
                           "sessions": self.stats_model.sessions_created,
                           "padding_mask_input": self.stats_model.mask_input}

    def _weighted(self) -> frozenset[str]:
        """First consumers of the groups whose consumers all reach one and the same norm: the
        statistics come from the first consumer and re-fit them all, so all must share the weights."""
        sites = norm_sites(self.proto, self._views)
        return frozenset(gr.group.consumers[0].weight for gr in self.groups
                         if len({sites.get(c.weight) for c in gr.group.consumers}) == 1
                         and sites.get(gr.group.consumers[0].weight) is not None)

    def _collect(self, groups: list[_Group], label: str) -> dict[str, LayerStats]:
        views = {gr.group.consumers[0].weight: self._views[gr.group.consumers[0].weight] for gr in groups}
        self.passes += 1
        reference = self.refit and self.method.match_dense is True and self.stats_model.changed()
        residuals = {}
        if reference and self.method.match_residual:
            single = {gr.group.consumers[0].weight for gr in groups if len(gr.group.consumers) == 1}
            residuals = self.stats_model.residual_streams(single, self._finished)
        request = StatsRequest(views, hessian=True, reference=reference, residuals=residuals,
                               row_weights=self.opts.norm_weighted)
        return self.stats_model.collect(request, label=label, quiet=self.method.quiet)

    def _allocate(self) -> None:
        """Global scope with calibration: per-group counts from the measured drift of the model's outputs
        with each group alone removed at a few levels (structured_allocate).  The removals are fitted on
        the first samples and the drift measured on the last ``ALLOCATION_HOLDOUT`` of them, so the
        curves show how each re-fit generalises rather than how well it fits."""
        from .calibration import CalibrationError, effective_batch, model_inputs, split_holdout

        sm = self.stats_model
        whole = sm.calibration
        try:
            fit, held = split_holdout(whole, ALLOCATION_HOLDOUT, batch=effective_batch(1, model_inputs(self.proto)))
        except CalibrationError:
            fit, held = whole, None
        sm.calibration = fit
        pre = self._collect(list(self.pool), "statistics (global allocation)")
        sm.calibration = held if held is not None else whole
        try:
            self._allocate_from(pre)
        finally:
            sm.calibration = whole
            self._dense_outputs = None

    def _allocate_from(self, pre: dict[str, LayerStats]) -> None:
        curves, floors, caps = [], [], []
        for gr in self.pool:
            units = gr.group.units
            cap = max(0, min(target_count(gr.bounds[1], units), units - self.opts.min_units))
            fraction = self.cfg.sparsity or 0.0
            ks = sorted({min(cap, target_count(min(1.0, m * fraction), units)) for m in ALLOCATION_LEVELS} - {0})
            st = pre[gr.group.consumers[0].weight]
            drifts = []
            for k in ks:
                _removed, new, _w, _cols, parts, biased, _damp = self._solve(gr, st, k)
                drifts.append(self._drift(self._stored(new, parts, biased)))
            curves.append((ks, drifts))
            caps.append(cap)
            floors.append(min(target_count(gr.bounds[0], units), cap))
        counts = allocate(curves, self.pool_target, floors, caps)
        for gr, c, (ks, ds) in zip(self.pool, counts, curves):
            gr.count = c
            gr.curve = {"removed": ks, "drift": ds}
        if sum(counts) != self.pool_target:
            self.warnings.append(f"global selection removed {sum(counts)} units, not {self.pool_target}: "
                                 "bounds or min_units hold the rest")

    def _drift(self, overrides: dict[str, np.ndarray]) -> float:
        """1 - cosine of the model's float outputs (real rows only) on the calibration data, with
        ``overrides`` fed instead of the current weights, against the model before removal."""
        sm = self.stats_model
        sess = sm.session()
        names = [o.name for o in self.proto.graph.output]
        first = self._dense_outputs is None
        if first:
            self._dense_outputs = []
        dot = ref = got = 0.0
        for i, batch in enumerate(sm.calibration.batches(sm.batch_size)):
            feeds = {**batch.feeds, **sm.weights}
            if first:
                self._dense_outputs.append(sm._run(sess, names, feeds, {}))
            outs = sm._run(sess, names, {**feeds, **overrides}, {})
            mask = batch.feeds.get(sm.mask_input) if sm.mask_input else None
            for name in names:
                y, yd = outs[name], self._dense_outputs[i][name]
                if not isinstance(y, np.ndarray) or not np.issubdtype(y.dtype, np.floating):
                    continue  # labels, and non-tensor outputs (a ZipMap's sequence of maps)
                if mask is not None and y.shape[:mask.ndim] == mask.shape:
                    y, yd = y[mask != 0], yd[mask != 0]
                y, yd = y.astype(np.float64).ravel(), yd.astype(np.float64).ravel()
                dot, ref, got = dot + y @ yd, ref + yd @ yd, got + y @ y
        self.passes += 1
        return float(1.0 - dot / np.sqrt(ref * got)) if ref > 0 and got > 0 else 0.0

    def _solve(self, gr: _Group, st: LayerStats, count: int):
        """Remove ``count`` units of ``gr`` by the criterion (and re-fit) on ``st``."""
        w, cols, parts, biased = self._layout(gr)
        h = st.hessian
        damp = damping(h, self.method.damp, st.rows)
        if st.cross is not None and self.refit:  # fit the dense output: earlier removals' error is corrected
            residual = st.residual if st.residual is not None and st.residual.shape == w.shape else None
            w = dense_target(w.T, h, st.cross, damp, residual).T
        if self.criterion == "obs":
            # select with a tenth of the dampening (a sharper H⁻¹ ranks units better), fit with all of it
            # (the ridge generalises better): MiniLM 50% held-out token cosine 0.9330 vs 0.9314 (local)
            removed, _ = obs_remove(h, w, cols, count, damp * SELECTION_DAMP)
            new = lsq_refit(h, w, cols, removed, damp) if self.refit else _zero_rows(w, cols, removed)
        else:
            if self.criterion == "activation":
                scores = activation_scores(st.col_sq, w, cols)
            else:
                scores = norm_scores(self._unit_rows(gr), self.opts.norm)
            removed = smallest(scores, count)
            new = lsq_refit(h, w, cols, removed, damp) if self.refit else _zero_rows(w, cols, removed)
        return removed, new, w, cols, parts, biased, damp

    def _select_refit(self, gr: _Group, st: LayerStats) -> None:
        if len({c.input_name for c in gr.group.consumers}) > 1:  # no single input to measure and re-fit on
            scores = norm_scores(self._unit_rows(gr), self.opts.norm)
            gr.removed = smallest(scores, gr.count)
            gr.info = {"criterion": "norm", "refit": False,
                       "fallback": "its consumers read the units through different ops"}
            return
        removed, new, w, cols, parts, biased, damp = self._solve(gr, st, gr.count)
        h = st.hessian
        energy = float(np.einsum("io,ij,jo->", w, h, w)) or 1.0
        masked = _zero_rows(w, cols, removed)
        gr.removed = removed
        gr.info = {"criterion": self.criterion, "refit": self.refit, "stats_rows": st.rows, "damp": damp,
                   "matched_dense": st.cross is not None and self.refit,
                   "rows_weighted_by": st.row_weights_of,
                   "width": h.shape[0], "bias_refit": biased and self.refit,
                   "error_masked": output_error(w, masked, h) / energy,
                   "error_after": output_error(w, new, h) / energy}
        self._store(gr, new, parts, biased)

    def _refine(self, gr: _Group) -> None:
        """Adam over the calibration rows on the producer's kept columns and bias and the consumer's
        kept rows and bias, against the dense block's output on the current model's inputs."""
        plan = self._plans.get(gr.group.producer)
        if not isinstance(plan, RefinePlan):
            gr.info["refine"] = {"skipped": plan or "no plan"}
            return
        g, c = gr.group, gr.group.consumers[0]
        kept = np.setdiff1d(np.arange(g.units), gr.removed)
        if not kept.size:
            gr.info["refine"] = {"skipped": "every unit is removed"}
            return
        site = self._sites.get(c.weight)
        names = [plan.x] + ([site.tensor] if site is not None else [])
        rows = self.stats_model.fetch_rows(names, self.opts.refine_rows)
        self.passes += 1
        original = lambda name: numpy_helper.to_array(self.protos[name])  # noqa: E731 - before removal
        # the producer ([in, units]) and its bias as earlier groups left them (their re-fits and refinements
        # change its input rows): with the consumer as it was, the block before this group's removal
        wp = self._value(plan.producer)
        wp = (wp if plan.unit_axis == 1 else wp.T).astype(np.float32)
        bp = self._value(plan.producer_bias).astype(np.float32).reshape(-1) if plan.producer_bias else None
        x = rows[plan.x].reshape(-1, wp.shape[0])
        if len(x) < MIN_ROWS:
            gr.info["refine"] = {"skipped": f"{len(x)} calibration rows, fewer than {MIN_ROWS}: too few to hold "
                                            "a tenth out and still fit"}
            return
        x = x.copy()
        x[:, self._cut_inputs(plan.producer)] = 0.0  # inputs an earlier group removes: they will not exist
        # per-unit constants as [units] (then [kept]), scalars as 0-d: the rows are 2-D
        full = {k: (v.reshape(-1) if v.size > 1 else v.reshape(())) for k, v in plan.constants.items()}
        cut = {k: (v[kept] if v.ndim else v) for k, v in full.items()}
        w_c0 = self._views[c.weight].to_matrix(original(c.weight)).T.astype(np.float32)  # [units, out]
        b_c0 = original(c.bias).astype(np.float32).reshape(-1) if c.bias is not None else None
        if b_c0 is not None and b_c0.size != w_c0.shape[1]:
            gr.info["refine"] = {"skipped": "its consumer bias is one value for every output"}
            return
        y = forward(Block(wp, bp, w_c0, b_c0), Chain(plan.start, plan.end, list(plan.chain), full), x)[0]
        z = rows[site.tensor] if site is not None else None
        weights = 1.0 / norm_row_spread(z, site) if z is not None and z.size and len(z) == len(x) else None
        w, cols, parts, biased = self._layout(gr)  # the re-fitted consumer
        feat = cols[kept, 0]
        start = Block(wp[:, kept], bp[kept] if bp is not None else None,
                      w[feat].astype(np.float32), w[-1].astype(np.float32) if biased else None)
        res = refine(start, Chain(plan.start, plan.end, list(plan.chain), cut), x, y, weights,
                     self.opts.refine_epochs, self.opts.refine_lr)
        gr.info["refine"] = {**res.to_dict(self.opts.refine_epochs), "row_weights": site.tensor if weights is not None
                             else None}
        if res.best_epoch == 0:
            return
        w = w.copy()
        w[feat] = res.block.wc
        if biased:
            w[-1] = res.block.bc
        self._store(gr, w, parts, biased)
        wp = self._value(plan.producer).copy()
        if plan.unit_axis == 1:
            wp[:, kept] = res.block.wp
        else:
            wp[kept, :] = res.block.wp.T
        updates = {plan.producer: wp}
        if plan.producer_bias:
            bp = self._value(plan.producer_bias).copy()
            bp.reshape(-1)[kept] = res.block.bp
            updates[plan.producer_bias] = bp
        for name, value in updates.items():
            self.values[name] = value
            if name in self.stats_model.weights:
                self.stats_model.set_weight(name, value.astype(self.stats_model.weights[name].dtype))

    def _cut_inputs(self, producer: str) -> np.ndarray:
        """Input features of ``producer`` that other groups remove (it is their consumer)."""
        feats = [np.zeros(0, np.int64)]
        for other in self.groups:
            if other.removed is None:
                continue
            for c in other.group.consumers:
                if c.weight == producer and c.layout != "conv":
                    cols = _unit_cols(other.group.units, c, self._value(c.weight).shape)
                    feats.append(cols[other.removed].reshape(-1))
        return np.unique(np.concatenate(feats))

    # -- report ---------------------------------------------------------------

    def structured_dict(self) -> dict:
        from .tensor_data import numel

        protos = tensor_protos(self.proto)
        groups = []
        for gr in self.groups:
            g = gr.group
            before = sum(int(np.prod(self.before[n])) for n in g.tensors())
            after = sum(numel(protos[n]) for n in g.tensors())
            item = lambda n: np.dtype(numpy_helper.to_array(protos[n]).dtype).itemsize  # noqa: E731
            groups.append({
                "producer": g.producer, "producer_op": g.producer_op,
                "consumers": [c.weight for c in g.consumers], "chain": g.chain, "tensors": g.tensors(),
                "co_producers": list(g.co_producers),
                "units_before": g.units, "units_after": g.units - len(gr.removed),
                "removed_units": [int(i) for i in gr.removed],
                "params_before": before, "params_after": after,
                "bytes_before": sum(int(np.prod(self.before[n])) * item(n) for n in g.tensors()),
                "bytes_after": sum(numel(protos[n]) * item(n) for n in g.tensors()),
                "selection": gr.selection, "target_sparsity": gr.level,
                "bounds": list(gr.bounds) if gr.bounds != (0.0, 1.0) else None,
                "drift_curve": gr.curve,
                **(gr.info or {}),
            })
        units_before = sum(g["units_before"] for g in groups)
        units_after = sum(g["units_after"] for g in groups)
        return {
            **self.opts.to_dict(), "criterion": self.criterion, "refit": self.refit,
            "scope": self.cfg.scope.value, "groups": groups,
            "skipped": [{"producer": s.producer, "producer_op": s.producer_op, "units": s.units, "reason": s.reason}
                        for s in self.skipped],
            "totals": {"units_before": units_before, "units_after": units_after,
                       "units_removed": units_before - units_after,
                       "target_removed": self.pool_target + sum(target_count(gr.level, gr.group.units)
                                                                for gr in self.groups if gr.selection != "global"),
                       "params_before": self.params_before, "params_after": _params(self.proto),
                       "model_bytes_before": self.bytes_before, "model_bytes_after": self.proto.ByteSize()},
            "seconds": self.seconds,
            "statistics_run": {**getattr(self, "stats_info", {}), **(self.where or {})} or None,
            "warnings": list(self.warnings),
        }

    def report(self) -> PruneReport:
        s = self.structured_dict()
        tot = s["totals"]
        changed = sum(g["params_before"] for g in s["groups"])
        after = sum(g["params_after"] for g in s["groups"])
        totals = Totals(prunable_params=changed, total_params=self.params_before, zeros_before=0, zeros_after=0,
                        sparsity=1.0 - after / changed if changed else 0.0, target_zeros=None)
        notes = [f"removed {tot['units_removed']:,} of {tot['units_before']:,} units in {len(s['groups'])} group(s): "
                 f"parameters {tot['params_before']:,} -> {tot['params_after']:,}, model "
                 f"{tot['model_bytes_before']:,} -> {tot['model_bytes_after']:,} bytes; the smaller layers run "
                 "faster on dense kernels (how much depends on the share of time they take)"]
        notes += s["warnings"]
        return PruneReport(command="prune", tool_version=__version__, input=self.source,
                           output=self.output, options=self.cfg.to_dict(), tensors=[], skipped=[], totals=totals,
                           notes=notes, method=None, structured=s)


def _zero_rows(w: np.ndarray, cols: np.ndarray, removed: np.ndarray) -> np.ndarray:
    out = np.array(w, dtype=np.float64, copy=True)
    out[cols[np.asarray(removed, dtype=np.int64)].reshape(-1)] = 0.0
    return out


def _unit_cols(units: int, c: Consumer, stored_shape) -> np.ndarray:
    """Features (columns of the consumer's ``[out, in]`` matrix view) of each unit."""
    if c.layout == "conv":
        kk = int(np.prod(stored_shape[2:]))
        return (np.arange(kk)[None, :] * units + np.arange(units)[:, None]).astype(np.int64)
    return (np.arange(units)[:, None] * c.block + np.arange(c.block)[None, :]).astype(np.int64)


__all__ = ["StructuredOptions", "StructuredRun"]
