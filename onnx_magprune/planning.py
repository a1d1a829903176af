"""Planning: which sparsity each weight gets, and the exact selection for each.

Config rules turn the discovered weights into targets: excluded (a skip
reason), a fixed sparsity, or a member of the global pool (or, in local scope,
its own pool) with optional bounds.  Selection itself is the pure-numpy
:mod:`onnx_magprune.selection`; this module reads each target's values (the
dequantized values for quantized weights), maps selection errors back to the
tensors' names, and writes pruned values back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .config import NonFinite, PruneConfig, Rule
from .discovery import Discovery, QuantRef, Skipped, Weight
from .errors import ConfigError, NonFiniteWeightError
from .quantized import DequantizedSource, QuantInfo, QuantShapeError, dequantize, prune_to_zero_point
from .selection import (
    ApplyStats,
    ArrayPlan,
    NonFiniteValues,
    SelectionParams,
    apply_plan,
    plan_global,
    plan_local,
)
from .tensor_data import TensorStore, dtype_name


@dataclass
class Target:
    """A weight and how its sparsity is chosen."""

    weight: Weight
    selection: str  # "global", "local" or "fixed"
    sparsity: float | None
    bounds: tuple[float, float] = (0.0, 1.0)


def apply_rules(found: Discovery, cfg: PruneConfig) -> tuple[list[Target], list[Skipped]]:
    """Targets for the weights the config keeps; skips for the ones it excludes."""
    targets: list[Target] = []
    skipped = list(found.skipped)
    for w in found.weights:
        rule: Rule | None = cfg.rule_for(w.name, w.consumers())
        if rule is not None and rule.exclude:
            t = w.tensor
            skipped.append(Skipped(w.name, w.value.where(), f"excluded by {rule.describe()}",
                                   dtype_name(t.data_type), tuple(t.dims)))
        elif rule is not None and rule.sparsity is not None:
            targets.append(Target(w, "fixed", rule.sparsity))
        else:
            bounds = rule.bounds if rule is not None else (0.0, 1.0)
            targets.append(Target(w, cfg.scope.value, cfg.sparsity, bounds))
    return targets, skipped


def plan_targets(targets: list[Target], arrays: list, cfg: PruneConfig,
                 params: SelectionParams) -> list[ArrayPlan]:
    """The selection for every target (``arrays``: their values or block sources, in order)."""
    keep = cfg.nonfinite is NonFinite.KEEP
    plans: list[ArrayPlan | None] = [None] * len(targets)
    pool = [i for i, t in enumerate(targets) if t.selection == "global"]
    current: list[int] = []  # the targets of the selection under way, to name a NaN's tensor
    try:
        for i, t in enumerate(targets):
            current = [i]
            if t.selection == "global":
                continue
            lo, hi = t.bounds
            sparsity = t.sparsity if t.selection == "fixed" else min(max(t.sparsity, lo), hi)
            one = arrays[i] if isinstance(arrays[i], np.ndarray) else arrays[i].read(0, arrays[i].size)
            plans[i] = plan_local(one, sparsity, keep_nonfinite=keep, params=params)  # one tensor in memory
        if pool:
            current = pool
            pooled = plan_global([arrays[i] for i in pool], cfg.sparsity, bounds=[targets[i].bounds for i in pool],
                                 keep_nonfinite=keep, params=params)
            for i, p in zip(pool, pooled):
                plans[i] = p
    except NonFiniteValues as e:
        name = targets[current[e.array_index]].weight.name
        raise NonFiniteWeightError(
            f"weight '{name}' holds {e.count} NaN/Inf value(s); fix the model, exclude it, "
            f"or pass --nonfinite keep to leave such values unpruned"
        ) from e
    except ValueError as e:
        raise ConfigError(str(e)) from e
    return plans  # type: ignore[return-value]


@dataclass
class TargetValues:
    """What selection reads for one target (``source``: the array itself, a
    :class:`~onnx_magprune.tensor_data.FileSource` for external data, or a
    :class:`~onnx_magprune.quantized.DequantizedSource`), and how to apply."""

    source: object
    raw: np.ndarray | None = None  # in-memory values (None: read from the file when applied)
    quant: QuantInfo | None = None


def quant_info(ref: QuantRef, store: TensorStore) -> QuantInfo:
    scale = store.read(ref.scale.tensor)
    zp = store.read(ref.zero_point.tensor) if ref.zero_point is not None else None
    return QuantInfo(scale=scale, zero_point=zp, axis=ref.axis, block_size=ref.block_size, via=ref.via)


def shared_external_bytes(targets: list[Target], all_tensors, base_dir) -> list[tuple[Target, str]]:
    """Targets whose external bytes overlap a tensor that is not pruned (pruning
    them would change it too), with that tensor's name."""
    from .external_data import external_info, resolve_location, uses_external_data

    def span(t):
        info = external_info(t)
        path = resolve_location(t.name, info.get("location", ""), base_dir)
        start = int(info.get("offset", 0))
        return path, start, start + int(info.get("length", 0) or 0)

    if base_dir is None:
        return []
    mine = {id(t.weight.tensor) for t in targets}
    others = [(t.name, *span(t)) for t in all_tensors if uses_external_data(t) and id(t) not in mine]
    clashes = []
    for t in targets:
        if not uses_external_data(t.weight.tensor):
            continue
        path, a, b = span(t.weight.tensor)
        hit = next((name for name, p, c, d in others if p == path and a < d and c < b), None)
        if hit is not None:
            clashes.append((t, hit))
    return clashes


def load_values(targets: list[Target], store: TensorStore, *, stream: bool
                ) -> tuple[list[Target], list[TargetValues], list[Skipped]]:
    """What selection reads for every target.  With ``stream``, float weights
    in external data stay in their files until they are applied.  Quantized
    weights whose scale does not fit are skipped with the reason."""
    kept, values, skipped = [], [], []
    for t in targets:
        tensor = t.weight.tensor
        if t.weight.quant is None:
            source = store.source(tensor) if stream else store.read(tensor)
            raw = source if isinstance(source, np.ndarray) else None
            kept.append(t)
            values.append(TargetValues(source, raw))
            continue
        raw = store.read(tensor)
        try:
            info = quant_info(t.weight.quant, store)
            source = DequantizedSource(raw, info)
        except QuantShapeError as e:
            skipped.append(Skipped(t.weight.name, t.weight.value.where(), f"its {t.weight.quant.via} {e}",
                                   dtype_name(tensor.data_type), tuple(tensor.dims)))
            continue
        kept.append(t)
        values.append(TargetValues(source, raw, info))
    return kept, values, skipped


def apply_target(target: Target, tv: TargetValues, plan: ArrayPlan, store: TensorStore,
                 params: SelectionParams, done: Callable[[ApplyStats], None]) -> None:
    """Zero ``plan``'s entries of one target and hand the result to ``store``:
    float weights as they are, quantized ones with pruned entries at their
    zero point.  Weights still in their files are pruned while the output is
    written (one tensor in memory at a time); ``done`` receives the stats."""
    tensor = target.weight.tensor

    def pruned_values() -> np.ndarray:
        if tv.quant is None:
            values = tv.raw if tv.raw is not None else store.read(tensor)
            done(apply_plan(values, plan, params=params))
            return values
        deq = dequantize(tv.raw, tv.quant)
        done(apply_plan(deq, plan, params=params))
        return prune_to_zero_point(tv.raw, deq == 0, tv.quant)

    if tv.raw is None:
        store.defer(tensor, lambda: store.encode(tensor, pruned_values()))
    else:
        store.write(tensor, pruned_values())
