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

import numpy as np

from .config import NonFinite, PruneConfig, Rule
from .discovery import Discovery, QuantRef, Skipped, Weight
from .errors import ConfigError, NonFiniteWeightError
from .quantized import QuantInfo, QuantShapeError, dequantize, prune_to_zero_point
from .selection import ArrayPlan, NonFiniteValues, SelectionParams, plan_global, plan_local
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


def plan_targets(targets: list[Target], arrays: list[np.ndarray], cfg: PruneConfig,
                 params: SelectionParams) -> list[ArrayPlan]:
    """The selection for every target (``arrays`` hold their values, in order)."""
    keep = cfg.nonfinite is NonFinite.KEEP
    plans: list[ArrayPlan | None] = [None] * len(targets)
    pool = [i for i, t in enumerate(targets) if t.selection == "global"]
    current: list[int] = []  # the targets of the selection under way, to name a NaN's tensor
    try:
        for i, t in enumerate(targets):
            current = [i]
            if t.selection == "fixed":
                plans[i] = plan_local(arrays[i], t.sparsity, keep_nonfinite=keep, params=params)
            elif t.selection == "local":
                lo, hi = t.bounds
                plans[i] = plan_local(arrays[i], min(max(t.sparsity, lo), hi), keep_nonfinite=keep, params=params)
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
    """One target's values: ``raw`` as stored; ``values`` what selection ranks
    and zeroes (``raw`` itself for float weights, the dequantized float64 copy
    for quantized ones)."""

    raw: np.ndarray
    values: np.ndarray
    quant: QuantInfo | None = None


def _quant_info(ref: QuantRef, store: TensorStore) -> QuantInfo:
    scale = store.read(ref.scale.tensor)
    zp = store.read(ref.zero_point.tensor) if ref.zero_point is not None else None
    return QuantInfo(scale=scale, zero_point=zp, axis=ref.axis, block_size=ref.block_size, via=ref.via)


def load_values(targets: list[Target], store: TensorStore, *, writable: bool
                ) -> tuple[list[Target], list[TargetValues], list[Skipped]]:
    """Read every target; quantized weights whose scale does not fit are skipped with the reason."""
    kept, values, skipped = [], [], []
    for t in targets:
        raw = store.read(t.weight.tensor, writable=writable)
        if t.weight.quant is None:
            kept.append(t)
            values.append(TargetValues(raw, raw))
            continue
        try:
            info = _quant_info(t.weight.quant, store)
            deq = dequantize(raw, info)
        except QuantShapeError as e:
            tensor = t.weight.tensor
            skipped.append(Skipped(t.weight.name, t.weight.value.where(), f"its {t.weight.quant.via} {e}",
                                   dtype_name(tensor.data_type), tuple(tensor.dims)))
            continue
        kept.append(t)
        values.append(TargetValues(raw, deq, info))
    return kept, values, skipped


def store_values(target: Target, tv: TargetValues, store: TensorStore) -> None:
    """Write a pruned target back: float weights as they are, quantized ones
    with every pruned entry at its zero point."""
    if tv.quant is None:
        store.write(target.weight.tensor, tv.values)
    else:
        store.write(target.weight.tensor, prune_to_zero_point(tv.raw, tv.values == 0, tv.quant))
