"""The Python API: inspect and prune a model.

Data flows one way: load (model_io) -> index the graph (graph_index) -> find
weights (discovery) -> apply config rules and select (planning, selection) ->
zero in place (selection) -> save atomically (model_io) -> report.
"""

from __future__ import annotations

import os
from pathlib import Path
from dataclasses import replace
from typing import TYPE_CHECKING, NamedTuple, Sequence

import onnx

from . import __version__
from .config import PruneConfig, Scope
from .discovery import find_weights
from .errors import ConfigError, GateFailed
from .graph_index import GraphIndex
from .model_io import (
    LoadedModel,
    count_params,
    internalize_external_data,
    iter_all_tensors,
    load_model,
    stage_model,
    stage_repacked,
)
from .discovery import Skipped
from .calibrated import apply_arrays, run_calibrated
from .calibration import effective_batch, model_inputs, open_calibration, split_holdout
from .encoding import Format, Objective, decode_model, decode_own, has_own_encoding, encode_tensors, parse_format, parse_objective
from .methods import MethodOptions
from .planning import apply_rules, apply_target, load_values, plan_targets, shared_external_bytes
from .report import PruneReport, SkippedReport, TensorReport, Totals
from .selection import DEFAULT_PARAMS, ApplyStats, SelectionParams, count_zeros
from .tensor_data import TensorStore, dtype_name, numel
from .validate import ValidationRequest

if TYPE_CHECKING:  # imported lazily at run time (they import this module's neighbours)
    from .allocation_search import AllocationOptions
    from .structured_run import StructuredOptions

ModelSource = str | os.PathLike | onnx.ModelProto


class _Counted(NamedTuple):
    threshold: float | None
    pruned: int


class PruneResult(NamedTuple):
    model: onnx.ModelProto
    report: PruneReport


def _config(config: PruneConfig | None, **overrides) -> PruneConfig:
    try:
        return (config or PruneConfig()).with_overrides(**overrides)
    except TypeError as e:  # an unknown keyword option
        raise ConfigError(str(e).replace("with_overrides()", "option")) from e


def _load(source: ModelSource) -> LoadedModel:
    """Load a model; compact and sparse weights this tool wrote (an earlier run's output) are
    decoded back to plain initializers first, so they can be found, pruned and re-encoded.
    Sparse tensors from elsewhere are left alone (and skipped, with their reason)."""
    loaded = load_model(source)
    if has_own_encoding(loaded.proto):  # an output of this tool
        internalize_external_data(loaded)
        decode_own(loaded.proto)
    return loaded


def _files(loaded: LoadedModel, staged) -> dict:
    """Bytes on disk of the input and of the output just written, each with its external data files."""
    def size(p: Path) -> int:
        try:
            return p.stat().st_size
        except OSError:
            return 0
    inputs = ([loaded.path] if loaded.path is not None else []) + sorted(loaded.data_files)
    outputs = [staged.output.parent / rel for rel in staged.files]
    return {"input_bytes": sum(size(p) for p in inputs) if loaded.path is not None else None,
            "input_files": len(inputs), "output_bytes": sum(size(p) for p in outputs), "output_files": len(outputs)}


def _left_behind(loaded: LoadedModel, staged) -> list[str]:
    """Notes for the input's external data files an in-place output no longer uses (they are left
    where they are: other models may share them)."""
    if loaded.path is None or staged.output.resolve() != loaded.path.resolve():
        return []
    written = {(staged.output.parent / rel).resolve() for rel in staged.files}
    return [f"the input's external data file '{p.name}' is no longer used by the overwritten model; "
            "it was left in place" for p in sorted(loaded.data_files) if p not in written]


def _external(loaded: LoadedModel) -> bool:
    """Whether the input keeps (or kept, before it was read in) weights in external data files."""
    return bool(loaded.data_files) or _has_external_data(loaded)


def _has_external_data(loaded: LoadedModel) -> bool:
    from .external_data import uses_external_data

    return any(uses_external_data(t) for t in iter_all_tensors(loaded.proto))


def _dense_bytes(tensor: onnx.TensorProto) -> int:
    from .model_io import expected_nbytes

    return expected_nbytes(tensor) or 0


def _total_params(model: onnx.ModelProto) -> int:
    return count_params(model)


class _Run:
    """One inspect or prune run: planned at once, reported by :meth:`report`
    once every target was applied (streamed targets are applied while the
    output is written)."""

    def __init__(self, loaded: LoadedModel, store: TensorStore, cfg: PruneConfig, params: SelectionParams,
                 *, prune: bool, output: str | None, stream: bool = False,
                 method: MethodOptions | None = None, statistics=None, chosen=None):
        self.loaded, self.cfg, self.prune, self.output = loaded, cfg, prune, output
        if method is None and cfg.scope is Scope.OUTPUT:  # per output unit needs the layer views
            method = MethodOptions()
        self.method = method if method is not None and not method.is_plain(cfg.scope is Scope.OUTPUT) else None
        self.outcomes = None
        self.method_info = None
        found = find_weights(GraphIndex(loaded.proto), min_numel=cfg.min_numel,
                             include_overridable=cfg.include_overridable)
        targets, skipped = apply_rules(found, cfg)
        for t, other in shared_external_bytes(targets, list(iter_all_tensors(loaded.proto)), loaded.base_dir):
            targets.remove(t)
            tensor = t.weight.tensor
            skipped.append(Skipped(t.weight.name, t.weight.value.where(),
                                   f"shares its external data bytes with '{other}', which is not pruned",
                                   dtype_name(tensor.data_type), tuple(tensor.dims)))
        pattern = self.method is not None and self.method.pattern is not None
        if prune and cfg.sparsity is None and not pattern and any(t.selection != "fixed" for t in targets):
            raise ConfigError("no sparsity given: pass --sparsity (or sparsity= in Python, or in the config file)")
        self.targets, self.values, unfit = load_values(
            targets, store, stream=(stream and self.method is None) or not prune)
        self.skipped = skipped + unfit
        self.stats: list[ApplyStats | None] = [None] * len(self.targets)
        self.plans = None
        if prune and chosen is not None:  # weights a calibrated allocation chose and measured
            done = apply_arrays(self.targets, self.values, chosen.arrays, chosen.outcomes, store,
                                {"chosen_by": "allocation", **chosen.report.get("criterion", {})})
        elif prune and self.method is not None:
            done = run_calibrated(loaded.proto, self.targets, self.values, cfg, self.method, statistics, store)
        if prune and (chosen is not None or self.method is not None):
            self.targets, self.values, self.stats = done.targets, done.values, list(done.stats)
            self.skipped += done.skipped
            self.outcomes = done.outcomes
            self.method_info = done.info
            self.plans = [_Counted(None, o.pruned) for o in done.outcomes]
        elif prune:
            self.plans = plan_targets(self.targets, [tv.source for tv in self.values], cfg, params)
            for i, (t, tv) in enumerate(zip(self.targets, self.values)):
                apply_target(t, tv, self.plans[i], store, params, lambda st, i=i: self._done(i, st))
        else:
            for i, tv in enumerate(self.values):
                zeros = count_zeros(tv.source, params=params)
                self.stats[i] = ApplyStats(zeros, zeros)

    def _done(self, i: int, stats: ApplyStats) -> None:
        self.stats[i] = stats

    def encode(self, fmt: Format, objective: Objective = Objective.BALANCED) -> None:
        """Store the pruned float weights in ``fmt`` (after they were applied)."""
        self.total_params = _total_params(self.loaded.proto)  # before the weights turn into codes
        self.encoded = {e.name: e for e in encode_tensors(
            self.loaded.proto, [t.weight.tensor for t in self.targets], fmt, TensorStore(self.loaded.base_dir),
            objective=objective)}
        self.fmt = fmt

    def report(self) -> PruneReport:
        rows = []
        encoded = getattr(self, "encoded", {})
        for i, (t, tv) in enumerate(zip(self.targets, self.values)):
            tensor, stats, n = t.weight.tensor, self.stats[i], numel(t.weight.tensor)
            if stats is None:  # pragma: no cover - every target is applied before reporting
                raise RuntimeError(f"weight '{t.weight.name}' was not applied")
            rows.append(TensorReport(
                name=t.weight.name, where=t.weight.value.where(), consumers=t.weight.consumers(),
                shape=list(tensor.dims), dtype=dtype_name(tensor.data_type), numel=n,
                zeros_before=stats.zeros_before, zeros_after=stats.zeros_after,
                sparsity=stats.zeros_after / n if n else 0.0,
                threshold=self.plans[i].threshold if self.prune else None,
                selection=(self.outcomes and self.outcomes[i].selection or t.selection) if self.prune else "none",
                target_sparsity=t.sparsity if self.prune else None,
                bounds=list(t.bounds) if self.prune and t.bounds != (0.0, 1.0) else None,
                quantization=tv.quant.describe() if tv.quant is not None else None,
                format=encoded[t.weight.name].format if t.weight.name in encoded else "dense",
                stored_bytes=(encoded[t.weight.name].encoded_bytes if t.weight.name in encoded
                              else _dense_bytes(tensor)) if self.prune else None,
                bound_bytes=encoded[t.weight.name].bound_bytes if t.weight.name in encoded else None,
                overhead_bytes=encoded[t.weight.name].overhead_bytes or None if t.weight.name in encoded else None,
                code=encoded[t.weight.name].code if t.weight.name in encoded else None,
                format_note=encoded[t.weight.name].note if t.weight.name in encoded else None,
                method=self.outcomes[i].to_dict() if self.outcomes is not None else None,
            ))
        if encoded and all(e.format == "dense" for e in encoded.values()):
            why = ("see tensors[].format_note" if any(e.note for e in encoded.values())
                   else "sparse or compact would not be smaller here")
            note = (f"every weight stayed dense ({why}): the file is not "
                    "smaller and ONNX Runtime's dense kernels run it at the same speed")
        elif encoded:
            note = ("sparse and compact formats cut file and download size only: ONNX Runtime densifies sparse "
                    "initializers and constant-folds compact decoders when it loads the model (session start "
                    "takes longer), so memory and inference speed are as dense")
        else:
            note = None
        report = _assemble(self.loaded, self.cfg, rows, self.skipped, self.prune, self.output,
                           sum(p.pruned for p in self.plans) if self.prune else None,
                           total_params=getattr(self, "total_params", None))
        if note:
            report.notes = [note if n.startswith("zeros are stored densely") else n for n in report.notes]
        if self.method is not None:
            report.method = {**self.method.to_dict(), **(self.method_info or {})}
            report.notes += list((self.method_info or {}).get("warnings", []))
        return report


def _assemble(loaded: LoadedModel, cfg: PruneConfig, rows: list[TensorReport], skipped, prune: bool,
              output: str | None, target_zeros: int | None, total_params: int | None = None) -> PruneReport:
    prunable = sum(r.numel for r in rows)
    zb, za = sum(r.zeros_before for r in rows), sum(r.zeros_after for r in rows)
    if total_params is None:
        total_params = _total_params(loaded.proto)
    totals = Totals(prunable_params=prunable, total_params=total_params, zeros_before=zb, zeros_after=za,
                    sparsity=za / prunable if prunable else 0.0, target_zeros=target_zeros)
    notes = []
    if prune:
        notes.append("zeros are stored densely (format 'dense'): the file is not smaller and ONNX Runtime's "
                     "dense kernels run it at the same speed")
    return PruneReport(
        command="prune" if prune else "inspect",
        tool_version=__version__,
        input=str(loaded.path) if loaded.path is not None else None,
        output=output,
        options=cfg.to_dict(),
        tensors=rows,
        skipped=[SkippedReport(s.name, s.where, s.reason, s.dtype, list(s.shape)) for s in skipped],
        totals=totals,
        notes=notes,
    )


def _statistics(loaded: LoadedModel, method: MethodOptions | None, validation: ValidationRequest | None):
    """The calibration samples for statistics and the validation request, moved to the held-out samples."""
    if method is None or not method.needs_calibration:
        return None, validation, None
    labels = validation.labels if validation is not None and validation.calibration is method.calibration else None
    calib = open_calibration(method.calibration, loaded.proto, labels=labels, max_samples=method.max_samples)
    fit, held = split_holdout(calib, method.holdout, batch=effective_batch(1, model_inputs(loaded.proto)))
    where = {"statistics": fit.description, "statistics_samples": fit.samples,
             "holdout_samples": held.samples if held is not None else 0}
    if validation is not None:
        if held is not None:
            validation = replace(validation, calibration=held, labels=None, max_samples=None)
            where["validated_on"] = held.description
        else:
            where["validated_on"] = "the statistics samples themselves (holdout 0: optimistic)"
    return fit, validation, where


def _structured(loaded: LoadedModel, cfg: PruneConfig, structured, method: MethodOptions | None, fit, where,
                fmt: Format, output: str | None):
    """Remove whole units (``--structured``); the returned run's ``report()`` describes it."""
    from .structured_run import StructuredRun

    if fmt not in (Format.DENSE, Format.AUTO):
        raise ConfigError("--structured writes smaller dense weights: use --format dense (or auto)")
    internalize_external_data(loaded)
    return StructuredRun(loaded.proto, cfg, structured, method, fit, output=output, where=where,
                         source=str(loaded.path) if loaded.path is not None else None)


def _check_allocation(structured, allocation) -> None:
    if structured is not None and allocation is not None and allocation.active:
        raise ConfigError("--target-drift / --allocate sensitivity choose unstructured sparsities: drop --structured")


def _allocated(loaded: LoadedModel, cfg: PruneConfig, method: MethodOptions | None,
               allocation: "AllocationOptions | None", validation: ValidationRequest | None):
    """``--target-drift`` / ``--allocate sensitivity``: per-weight sparsities as fixed rules (see
    allocation_search); validation moves to the samples the search never saw."""
    if allocation is None or not allocation.active:
        return cfg, None, validation
    from .allocation_search import allocate_model, with_allocation

    allocation.check(cfg, method)
    internalize_external_data(loaded)
    alloc = allocate_model(loaded.proto, cfg, allocation, method=method)
    if validation is not None and alloc.held_out is not None:
        validation = replace(validation, calibration=alloc.held_out, labels=None, max_samples=None)
    return with_allocation(cfg, alloc.levels), alloc, validation


def _chosen(alloc, where):
    """A calibrated allocation's chosen weights (written as measured, the method is not run again),
    and where the statistics came from (the allocation's search samples, then)."""
    if alloc is None or alloc.arrays is None:
        return None, where
    held = alloc.report.get("held_out")
    return alloc, {"statistics": alloc.report["criterion"]["statistics"],
                   "validated_on": held or "the statistics samples themselves (holdout 0: optimistic)"}


def inspect_model(
    model: ModelSource,
    *,
    config: PruneConfig | None = None,
    exclude: Sequence[str] = (),
    min_numel: int | None = None,
    include_overridable: bool | None = None,
) -> PruneReport:
    """What can be pruned, and what is skipped and why.  Nothing is changed."""
    loaded = _load(model)
    cfg = _config(config, exclude=exclude, min_numel=min_numel, include_overridable=include_overridable)
    return _Run(loaded, TensorStore(loaded.base_dir), cfg, DEFAULT_PARAMS, prune=False, output=None).report()


def prune_model(
    model: ModelSource,
    sparsity: float | None = None,
    scope: Scope | str | None = None,
    *,
    config: PruneConfig | None = None,
    params: SelectionParams = DEFAULT_PARAMS,
    method: MethodOptions | None = None,
    structured: "StructuredOptions | None" = None,
    allocation: "AllocationOptions | None" = None,
    **options,
) -> PruneResult:
    """Prune a model in memory.  Returns ``(model, report)``; the input object
    or file is never modified.  External data is read into the returned model
    (use :func:`prune_file` to keep it external, e.g. for models over 2 GiB).

    ``options`` override ``config``: ``exclude`` (name globs), ``min_numel``,
    ``nonfinite`` ("error" or "keep"), ``include_overridable``; see
    :meth:`PruneConfig.with_overrides`.
    """
    fmt = parse_format(options.pop("format", "dense"))
    objective = parse_objective(options.pop("optimize_for", "balanced"))
    loaded = _load(model)
    internalize_external_data(loaded)
    cfg = _config(config, sparsity=sparsity, scope=scope, **options)
    fit, _, where = _statistics(loaded, method, None)
    _check_allocation(structured, allocation)
    if structured is not None:  # whole units removed: see structured_run
        return PruneResult(loaded.proto, _structured(loaded, cfg, structured, method, fit, where, fmt, None).report())
    cfg, alloc, _ = _allocated(loaded, cfg, method, allocation, None)
    chosen, where = _chosen(alloc, where)
    run = _Run(loaded, TensorStore(None), cfg, params, prune=True, output=None, method=method, statistics=fit,
               chosen=chosen)
    if fmt is not Format.DENSE:
        run.encode(fmt, objective)
    report = run.report()
    if report.method is not None and where:
        report.method.update(where)
    if alloc is not None:
        report.allocation = alloc.report
    return PruneResult(loaded.proto, report)


def prune_file(
    source: str | os.PathLike,
    output: str | os.PathLike,
    sparsity: float | None = None,
    scope: Scope | str | None = None,
    *,
    config: PruneConfig | None = None,
    overwrite: bool = False,
    params: SelectionParams = DEFAULT_PARAMS,
    validation: ValidationRequest | None = None,
    method: MethodOptions | None = None,
    structured: "StructuredOptions | None" = None,
    allocation: "AllocationOptions | None" = None,
    **options,
) -> PruneReport:
    """Prune the model file ``source`` into ``output``, atomically.  External
    data stays external, with its layout (offsets) unchanged.  ``options`` as
    for :func:`prune_model`.

    With ``validation``, the staged output is validated against ``source``
    before it is put in place; when a gate fails nothing is written and
    :class:`GateFailed` is raised (its ``report`` holds the full report)."""
    fmt = parse_format(options.pop("format", "dense"))
    objective = parse_objective(options.pop("optimize_for", "balanced"))
    loaded = _load(source)
    cfg = _config(config, sparsity=sparsity, scope=scope, **options)
    # external data stays external; once read in (compact weights decoded at load) it goes to a fresh file
    external = _external(loaded)
    repack = external and (fmt is not Format.DENSE or not _has_external_data(loaded))
    fit, validation, where = _statistics(loaded, method, validation)
    _check_allocation(structured, allocation)
    if fit is not None and external:  # the statistics model runs from memory
        internalize_external_data(loaded)
        repack = True
    if allocation is not None and allocation.active and external:  # the search runs from memory
        repack = True
    if repack:  # re-encoding changes which bytes are needed: read everything, write a fresh data file
        internalize_external_data(loaded)
    cfg, alloc, validation = _allocated(loaded, cfg, method, allocation, validation)
    chosen, where = _chosen(alloc, where)
    store = TensorStore(loaded.base_dir if not repack else None)
    if structured is not None:  # shapes change: the whole model is rewritten in memory
        repack = repack or external
        run = _structured(loaded, cfg, structured, method, fit, where, fmt, str(output))
    else:
        run = _Run(loaded, store, cfg, params, prune=True, output=str(output), stream=not repack, method=method,
                   statistics=fit, chosen=chosen)
        if fmt is not Format.DENSE:
            run.encode(fmt, objective)
    staged = (stage_repacked(loaded, output, overwrite=overwrite) if repack else
              stage_model(loaded, output, external_writes=store.external_writes, overwrite=overwrite))
    try:
        report = run.report()
        if report.method is not None and where:
            report.method.update(where)
        if alloc is not None:
            report.allocation = alloc.report
        if validation is not None:
            report.validation = validation.run(source, staged.path)
            report.validation.pruned = str(output)
            if not report.validation.passed:
                failed = [g for g in report.validation.gates if not g.passed]
                raise GateFailed(f"{len(failed)} quality gate(s) failed ({', '.join(g.gate for g in failed)}); "
                                 f"'{output}' was not written", report=report)
        if alloc is not None:
            if allocation.plots:
                from .plots import write_allocation_plots

                report.allocation["plots"] = write_allocation_plots(
                    alloc, allocation.plots, os.path.splitext(os.path.basename(os.fspath(output)))[0])
    except BaseException:
        staged.discard()
        raise
    staged.commit()
    report.files = _files(loaded, staged)
    report.notes += _left_behind(loaded, staged)
    return report


def encode_file(source: str | os.PathLike, output: str | os.PathLike, fmt: Format | str, *,
                overwrite: bool = False, **options) -> PruneReport:
    """Re-encode the weights of an already-pruned model (no pruning) into ``output``."""
    fmt = parse_format(fmt)
    objective = parse_objective(options.pop("optimize_for", "balanced"))
    loaded = _load(source)
    options.setdefault("nonfinite", "keep")  # nothing is pruned: NaN/Inf values are stored as they are
    cfg = _config(None, sparsity=0.0, **options)
    repack = _external(loaded)
    if repack:
        internalize_external_data(loaded)
    run = _Run(loaded, TensorStore(None if repack else loaded.base_dir), cfg, DEFAULT_PARAMS, prune=True,
               output=str(output))
    run.encode(fmt, objective)
    report = run.report()
    report.command = "encode"
    staged = stage_repacked(loaded, output, overwrite=overwrite) if repack else \
        stage_model(loaded, output, overwrite=overwrite)
    staged.commit()
    report.files = _files(loaded, staged)
    report.notes += _left_behind(loaded, staged)
    return report


def decode_file(source: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = False) -> int:
    """Turn sparse initializers, sparse Constants and compact weights back into plain dense tensors
    (bit-exact)."""
    loaded = load_model(source)
    repack = _has_external_data(loaded)
    if repack:
        internalize_external_data(loaded)
    count = decode_model(loaded.proto)
    (stage_repacked(loaded, output, overwrite=overwrite) if repack else
     stage_model(loaded, output, overwrite=overwrite)).commit()
    return count
