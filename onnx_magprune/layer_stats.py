"""Per-layer input statistics from calibration data, with one ONNX Runtime session.

The statistics model is the input model with every calibrated weight turned
into a graph input (so the same session runs the dense model, the partly
pruned model of a sequential pass, and every step of a schedule: the current
weights are simply fed) and with each layer's input activation exposed as an
extra graph output.  Batches are reduced on the fly to

* ``col_sq``: the sum of squares of each input feature (wanda's ``||X_j||^2``),
* ``hessian``: the sum ``X^T X`` (OBS), in float64,
* ``cross``: with ``StatsRequest.reference``, the sum ``X^T X_ref`` of the
  current model's rows against the reference (dense) model's rows for the
  same samples, so a layer can be re-fitted to the *dense* layer's output
  (the error of earlier, already pruned layers is corrected, not inherited),

so memory is bounded by one batch plus the statistics, never by the size of
the calibration set.

Layers that read the same tensor the same way (attention Q/K/V) share one
set of statistics.

With ``StatsRequest.row_weights``, a layer whose output reaches a
normalization over the last axis (:mod:`onnx_magprune.norm_sites`) has each
row weighted by ``1 / (σ² + ε)`` of that norm's input in the current run,
in every sum above: a re-fit then minimises the error after the norm.

Padding: when the model has an integer input whose name ends in
``attention_mask`` and an activation's leading shape equals that mask's
shape, rows whose mask is 0 are left out (padding tokens are not data).
Columns that are padding in every row of a batch (right padding) are cut
from the ``[batch, tokens, ...]`` feeds before the batch runs, when the
model's token dimension is dynamic and the first such batch proves that the
real rows' activations do not change (max. difference within
``TRIM_TOLERANCE`` of their scale); otherwise every batch runs as given.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

import numpy as np
import onnx

from .calibration import CalibrationSet, effective_batch, model_inputs
from .layer_view import LinearView
from .norm_sites import NormSite, norm_sites
from .progress import Progress
from .stats_graph import Stream, residual_inputs, settled, stats_proto, weight_dependencies
from .runtime import RuntimeFailure, _first_line


TRIM_TOLERANCE = 1e-4  # padding trimming: allowed max |Δ| of real rows, relative to their max |x|


@dataclass
class LayerStats:
    rows: int
    col_sq: np.ndarray
    hessian: np.ndarray | None = None
    masked_rows: int = 0  # padding rows left out
    cross: np.ndarray | None = None  # X^T X_ref: current rows against the reference model's rows
    residual: np.ndarray | None = None  # X^T (R_ref - R): rows against the residual stream's error [in, out]
    residual_of: str | None = None  # the residual stream R
    row_weights_of: str | None = None  # the norm input whose 1/(σ²+ε) weighted each row


@dataclass
class StatsRequest:
    """What to collect for one group of layers."""

    views: Mapping[str, LinearView]  # weight name -> view
    hessian: bool
    reference: bool = False  # also collect ``cross`` against the reference weights
    residuals: Mapping[str, Stream] = field(default_factory=dict)  # weight -> the residual stream it adds into
    row_weights: bool = False  # weight rows by the 1/(σ²+ε) of the normalization the layer's output reaches


def stats_key(view: LinearView) -> tuple:
    return (view.input_name, view.layout, view.trans_a, view.conv)


@dataclass
class _Acc:
    view: LinearView
    hessian: bool
    reference: bool = False
    rows: int = 0
    masked: int = 0
    col_sq: np.ndarray | None = None
    h: np.ndarray | None = None
    c: np.ndarray | None = None
    last_rows: np.ndarray | None = field(default=None, repr=False)
    last_scale: np.ndarray | None = field(default=None, repr=False)
    weighted_by: str | None = None  # the norm input whose row weights were applied to every batch
    out_width: int = 0  # the layer's output width (the norm input's last dimension), when weighted

    def _rows(self, x: np.ndarray, keep: np.ndarray | None, what: str = "") -> np.ndarray:
        rows = self.view.rows(x)
        if keep is not None:
            rows = rows[keep]
        rows = np.asarray(rows, dtype=np.float64)
        if not np.isfinite(rows).all():
            raise RuntimeFailure(f"the input of the layers reading '{self.view.input_name}' holds NaN/Inf "
                                 f"on the calibration data{what}")
        return rows

    def add(self, x: np.ndarray, row_mask: np.ndarray | None, x_ref: np.ndarray | None = None,
            scale: np.ndarray | None = None) -> None:
        """``scale``: per-row square roots of the row weights (all rows, before the mask), or None."""
        keep = None
        if row_mask is not None:
            keep = row_mask.reshape(-1) != 0
            self.masked += int(keep.size - np.count_nonzero(keep))
        rows = self._rows(x, keep)
        if scale is not None:
            scale = (scale[keep] if keep is not None else scale)[:, None]
            rows = rows * scale
        self.last_scale = scale
        self.last_rows = rows  # this batch's (weighted) rows, for a residual accumulator of the same layer
        self.rows += rows.shape[0]
        sq = np.einsum("ij,ij->j", rows, rows)
        self.col_sq = sq if self.col_sq is None else self.col_sq + sq
        if self.hessian:
            h = rows.T @ rows
            self.h = h if self.h is None else self.h + h
        if self.reference:
            ref = self._rows(x_ref, keep, " (in the dense model's run)")
            c = rows.T @ (ref * scale if scale is not None else ref)
            self.c = c if self.c is None else self.c + c

    def result(self, width: int) -> LayerStats:
        col_sq = self.col_sq if self.col_sq is not None else np.zeros(width)
        h = self.h if self.h is not None or not self.hessian else np.zeros((width, width))
        c = self.c if self.c is not None or not self.reference else np.zeros((width, width))
        return LayerStats(self.rows, col_sq, h, self.masked, c)


@dataclass
class _ResidualAcc:
    """``X^T (R_ref - R)`` for one weight whose output is added to the residual stream ``R``."""

    acc: _Acc
    stream: Stream
    width: int  # the layer's output width: the residual's last dimension must equal it
    d: np.ndarray | None = None
    valid: bool = True

    @property
    def name(self) -> str:
        return self.stream.name

    def add(self, x: np.ndarray, r: np.ndarray, r_ref: np.ndarray, side: np.ndarray,
            row_mask: np.ndarray | None) -> None:
        """Called after ``acc.add`` for the same batch: its ``last_rows`` are this batch's rows."""
        if not self.valid:
            return
        n_rows = self.acc.view.rows(x).shape[0]
        if (r.shape != r_ref.shape or r.shape != side.shape or not r.ndim or r.shape[-1] != self.width
                or r.size != n_rows * self.width):
            self.valid = False  # broadcast or reshaped otherwise: the residual's rows are not the layer's rows
            return
        keep = row_mask.reshape(-1) != 0 if row_mask is not None else None
        rows = self.acc.last_rows
        diff = (r_ref.astype(np.float64) - r.astype(np.float64)).reshape(-1, r.shape[-1])
        if keep is not None:
            diff = diff[keep]
        if self.acc.last_scale is not None:
            diff = diff * self.acc.last_scale
        d = rows.T @ diff
        self.d = d if self.d is None else self.d + d


def norm_row_spread(rows: np.ndarray, site: NormSite, keep_mask=None) -> np.ndarray:
    """``σ² + ε`` per row ``[n, width]`` of a norm's input (mean square for RMS norms): a row's
    squared error after the norm is its error over this.  A (nearly) constant row would take all
    the weight (BERT's ε is 1e-12): at least 1e-4 x the median real row's."""
    rows = np.asarray(rows, dtype=np.float64)
    spread = (rows.var(axis=1) if site.centered else np.mean(rows * rows, axis=1)) + site.epsilon
    real = spread[np.asarray(keep_mask).reshape(-1) != 0] if keep_mask is not None else spread
    floor = max(1e-4 * float(np.median(real)) if real.size else 0.0, np.finfo(np.float64).tiny)
    return np.maximum(spread, floor)


@dataclass
class StatsModel:
    """The statistics model and its one session (``sessions_created`` counts them, for tests)."""

    model: onnx.ModelProto
    weights: dict[str, np.ndarray]  # fed weights, stored layout and dtype
    views: dict[str, LinearView]
    calibration: CalibrationSet
    batch_size: int = 8
    threads: int | None = None
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    sessions_created: int = 0
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # stored shapes of viewed weights not fed
    _session: object = field(default=None, repr=False)
    _mask_input: str | None = None
    trimmed: bool | None = None  # None: not tried yet; False: off for good; True: cut for the names checked
    _residuals: dict[str, Stream] = field(default_factory=dict, repr=False)  # set in __post_init__
    _residual_deps: dict[str, set[str]] | None = field(default=None, repr=False)  # on first use
    # weights whose rows StatsRequest.row_weights may weight (the norm inputs become extra outputs
    # only for these, so other methods' statistics models stay exactly as they were)
    weighted: frozenset[str] = frozenset()
    extra_fetch: tuple[str, ...] = ()  # more tensors the statistics model outputs (fetch_rows)

    def _matrix_shape(self, name: str, view: LinearView) -> tuple[int, int]:
        """[out, in] of a viewed weight (fed, or not fed: quantized weights keep their stored form)."""
        w = self.weights.get(name)
        return view.to_matrix(w if w is not None else np.empty(self.shapes[name], np.uint8)).shape

    def __post_init__(self):
        # the weights as given (not copied: fed arrays are replaced by set_weight, never changed in place)
        self.reference = dict(self.weights)
        self._residuals = residual_inputs(self.model, self.views)
        self._norms = ({n: site for n, site in norm_sites(self.model, self.views).items() if n in self.weighted}
                       if self.weighted else {})
        self.proto = stats_proto(self.model, list(self.weights), self.views.values(),
                                 extra_outputs=sorted({n for s in self._residuals.values() for n in s}
                                                      | {site.tensor for site in self._norms.values()}
                                                      | set(self.extra_fetch)))
        specs = model_inputs(self.model)
        self.batch_size = effective_batch(self.batch_size, specs)
        self._mask_input = next((s.name for s in specs if s.name.endswith("attention_mask")
                                 and (np.issubdtype(s.dtype, np.integer) or s.dtype == np.bool_)), None)
        mask_spec = next((s for s in specs if s.name == self._mask_input), None)
        # the token axis must be dynamic in every input that has it
        self._trimmable = bool(mask_spec and mask_spec.shape and len(mask_spec.shape) == 2
                               and not isinstance(mask_spec.shape[1], int))
        self._static_token = {s.name for s in specs if s.shape and len(s.shape) >= 2 and isinstance(s.shape[1], int)}
        self._trim_checked: set[str] = set()  # fetched tensors whose real rows proved unchanged by trimming

    @property
    def mask_input(self) -> str | None:
        return self._mask_input

    def session(self):
        if self._session is None:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.log_severity_level = 3
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # numpy runs between batches
            if self.threads:
                so.intra_op_num_threads = self.threads
            try:
                self._session = ort.InferenceSession(self.proto.SerializeToString(), sess_options=so,
                                                     providers=list(self.providers))
            except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
                raise RuntimeFailure(f"onnxruntime cannot load the statistics model: {_first_line(e)}") from e
            self.sessions_created += 1
        return self._session

    @staticmethod
    def _run(sess, fetch: list[str], feeds: dict, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            outs = dict(zip(fetch, sess.run(fetch, feeds))) if fetch else {}
        except Exception as e:  # noqa: BLE001
            raise RuntimeFailure(f"onnxruntime failed to run the statistics model: {_first_line(e)}") from e
        outs.update(inputs)  # layers reading a graph input directly
        return outs

    def _trim(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray] | None:
        """``feeds`` without the trailing columns that are padding in every row, or None."""
        if not self._trimmable or self.trimmed is False:
            return None
        mask = feeds.get(self._mask_input)
        if mask is None or mask.ndim != 2:
            return None
        real = np.flatnonzero(mask.any(axis=0))
        last = int(real[-1]) + 1 if real.size else 1
        if last >= mask.shape[1]:
            return None
        out = {}
        for k, v in feeds.items():
            if v.ndim >= 2 and v.shape[:2] == mask.shape:
                if k in self._static_token:
                    return None
                out[k] = np.ascontiguousarray(v[:, :last])
            else:
                out[k] = v
        return out

    def _trim_matches(self, sess, fetch: list[str], full: dict, trimmed: dict, inputs) -> bool:
        """Whether cutting the padding columns leaves every real row's activation unchanged
        (a trimmed run that fails, e.g. on a Reshape to a fixed token count, means no)."""
        a = self._run(sess, fetch, full, inputs)
        try:
            b = self._run(sess, fetch, trimmed, inputs)
        except RuntimeFailure:
            return False
        mask = full[self._mask_input] != 0
        last = trimmed[self._mask_input].shape[1]
        for name in fetch:
            x, y = a[name], b[name]
            if x.shape[:2] != mask.shape or y.shape[:2] != (mask.shape[0], last) or x.shape[2:] != y.shape[2:]:
                return False
            xr = x[:, :last][mask[:, :last]].astype(np.float64)
            yr = y[mask[:, :last]].astype(np.float64)
            scale = float(np.max(np.abs(xr))) if xr.size else 0.0
            if xr.size and not float(np.max(np.abs(xr - yr))) <= TRIM_TOLERANCE * max(scale, 1e-30):
                return False
        return True

    def residual_streams(self, names: Iterable[str], finished: Iterable[str]) -> dict[str, Stream]:
        """The residual stream each of ``names`` adds into (:func:`~onnx_magprune.stats_graph.residual_inputs`),
        for those whose stream depends on no fed weight outside ``finished`` (:func:`settled`)."""
        if self._residual_deps is None:
            fitted = set(self.views) | set(self.weights)
            self._residual_deps = weight_dependencies(self.model, fitted) if self._residuals else {}
        names = set(names)
        return {k: r for k, r in settled(self._residuals, self._residual_deps, finished).items() if k in names}

    def _row_weight_sites(self, request: StatsRequest, accs: Mapping[tuple, "_Acc"]) -> dict[tuple, NormSite]:
        """Per statistics key, the norm its layers' outputs reach, when every weight sharing the key
        reaches the same one (Q/K/V share an input but reach no norm: unweighted)."""
        sites: dict[tuple, set] = {}
        named: dict[tuple, str] = {}  # a weight of each key, for the layer's output width
        for name, view in request.views.items():
            sites.setdefault(stats_key(view), set()).add(self._norms.get(name))
            named.setdefault(stats_key(view), name)
        found = {}
        for key, s in sites.items():
            site = next(iter(s))
            if len(s) == 1 and site is not None:
                found[key] = site
                accs[key].weighted_by = site.tensor
                accs[key].out_width = self._matrix_shape(named[key], request.views[named[key]])[0]
        return found

    def _row_scale(self, z: np.ndarray, site: NormSite, acc: "_Acc", lead: tuple, keep_mask) -> np.ndarray | None:
        """``sqrt(1 / (σ² + ε))`` per row of the norm input ``z`` (mean square for RMS norms), or None
        when ``z``'s rows are not the layer's rows (broadcast or reshaped otherwise) on the first batch;
        a later batch that does not match would leave the sums part weighted, so it is an error."""
        n_rows, width = int(np.prod(lead)) if lead else 1, acc.out_width
        if not z.ndim or z.shape[-1] != width or z.size != n_rows * width:
            if acc.rows:
                raise RuntimeFailure(f"the rows of '{site.tensor}' stopped matching the rows of the layers reading "
                                     f"'{acc.view.input_name}' after the first batch: cannot weight them")
            acc.weighted_by = None
            return None
        rows = np.asarray(z, dtype=np.float64).reshape(n_rows, width)
        if not np.isfinite(rows).all():
            raise RuntimeFailure(f"the normalization input '{site.tensor}' holds NaN/Inf on the calibration data")
        return 1.0 / np.sqrt(norm_row_spread(rows, site, keep_mask))

    def changed(self) -> bool:
        """Whether any fed weight differs from its reference (the weights as given)."""
        return any(not np.array_equal(self.weights[k], self.reference[k]) for k in self.weights)

    def set_weight(self, name: str, stored: np.ndarray) -> None:
        self.weights[name] = np.ascontiguousarray(stored) if np.ndim(stored) else np.array(stored)  # 0-d stays 0-d

    def fetch_rows(self, names: list[str], limit: int) -> dict[str, np.ndarray]:
        """Each tensor of ``names`` (graph inputs or ``extra_fetch``) on the calibration data with the
        current weights, as rows ``[n, last dim]`` (padding rows left out when its leading shape is the
        mask's), at most ``limit`` rows (the first ones)."""
        sess = self.session()
        inputs = {s.name for s in model_inputs(self.model)}
        fetch = [n for n in names if n not in inputs]
        parts: dict[str, list[np.ndarray]] = {n: [] for n in names}
        count = 0
        for batch in self.calibration.batches(self.batch_size):
            outs = self._run(sess, fetch, {**batch.feeds, **self.weights}, batch.feeds)
            mask = batch.feeds.get(self._mask_input) if self._mask_input else None
            for n in names:
                x = np.asarray(outs[n])
                keep = mask is not None and x.ndim >= 2 and x.shape[:mask.ndim] == mask.shape
                r = x.reshape(-1, x.shape[-1] if x.ndim else 1)
                if keep:
                    r = r[mask.reshape(-1) != 0]
                parts[n].append(r.astype(np.float32))
            count += len(parts[names[0]][-1])  # the limit counts the first tensor's rows
            if count >= limit:
                break
        return {n: np.concatenate(p)[:limit] if p else np.zeros((0, 0), np.float32) for n, p in parts.items()}

    def collect(self, request: StatsRequest, *, label: str = "statistics", quiet: bool = True) -> dict[str, LayerStats]:
        """Statistics for each weight of ``request`` (weights sharing an input share the object)."""
        accs: dict[tuple, _Acc] = {}
        for view in request.views.values():
            accs.setdefault(stats_key(view), _Acc(view, request.hessian, request.reference))
        inputs = {s.name for s in model_inputs(self.model)}
        res_accs = {name: _ResidualAcc(accs[stats_key(request.views[name])], r,
                                       self._matrix_shape(name, request.views[name])[0])
                    for name, r in request.residuals.items() if request.reference and name in request.views}
        norms = self._row_weight_sites(request, accs) if request.row_weights else {}
        fetch = sorted({k[0] for k in accs if k[0] not in inputs}
                       | ({n for r in res_accs.values() for n in r.stream}
                          | {site.tensor for site in norms.values()}) - inputs)
        sess = self.session()
        total = self.calibration.count_batches(self.batch_size)
        with Progress(label, total, enabled=False if quiet else None) as bar:
            for batch in self.calibration.batches(self.batch_size):
                data = batch.feeds
                cut = self._trim(data)
                if cut is not None and self.trimmed is not False and (
                        self.trimmed is None or not set(fetch) <= self._trim_checked):
                    # every tensor this request reads is checked once, on dense weights
                    ok = self._trim_matches(sess, fetch, {**data, **self.reference}, {**cut, **self.reference}, data)
                    self.trimmed = ok and self.trimmed is not False
                    if self.trimmed:
                        self._trim_checked |= set(fetch)
                if cut is not None and self.trimmed and set(fetch) <= self._trim_checked:
                    data = cut
                feeds = dict(data)
                feeds.update(self.weights)
                outs = self._run(sess, fetch, feeds, data)
                refs = None
                if request.reference:
                    feeds.update(self.reference)
                    refs = self._run(sess, fetch, feeds, data)
                mask = data.get(self._mask_input) if self._mask_input else None
                for key, acc in accs.items():
                    x = outs[key[0]]
                    lead = acc.view.leading_shape(x)
                    row_mask = mask if mask is not None and lead == tuple(mask.shape) else None
                    scale = None
                    if key in norms:
                        scale = self._row_scale(outs[norms[key].tensor], norms[key], acc, lead, row_mask)
                        if scale is None:  # the norm's rows are not the layer's rows: unweighted
                            del norms[key]
                    acc.add(x, row_mask, refs[key[0]] if refs is not None else None, scale)
                for racc in res_accs.values():
                    x = outs[racc.acc.view.input_name]
                    lead = racc.acc.view.leading_shape(x)
                    racc.add(x, outs[racc.name], refs[racc.name], outs[racc.stream.side],
                             mask if mask is not None and lead == tuple(mask.shape) else None)
                bar.update()
        result: dict[str, LayerStats] = {}
        done: dict[tuple, LayerStats] = {}
        for name, view in request.views.items():
            key = stats_key(view)
            if key not in done:
                width = self._matrix_shape(name, view)[1]
                done[key] = accs[key].result(width)
            result[name] = done[key]
            if accs[key].weighted_by is not None:
                result[name] = replace(result[name], row_weights_of=accs[key].weighted_by)
            racc = res_accs.get(name)
            if racc is not None and racc.valid and racc.d is not None:
                result[name] = replace(result[name], residual=racc.d, residual_of=racc.name)
        return result
