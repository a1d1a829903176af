"""Pruned variants of a model's weights, exactly as ``prune`` would write them.

A :class:`PruningSpace` holds the prunable weights the config keeps (after
exclusions), their values, bounds and fixed sparsities, and turns a sparsity
per weight into the stored arrays (float weights with their smallest
``round(s x n)`` entries zeroed, quantized weights pruned to their zero
point): the same selection and the same bytes as a fixed-sparsity ``prune``.
Weights a session cannot be fed (inside subgraphs or functions, duplicated
names) are listed in ``unfed`` and left alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .config import NonFinite, PruneConfig
from .discovery import Skipped, find_weights
from .errors import NonFiniteWeightError
from .graph_index import GraphIndex
from .planning import Target, TargetValues, apply_rules, load_values
from .quantized import dequantize, prune_to_zero_point
from .selection import DEFAULT_PARAMS, NonFiniteValues, apply_plan, count_zeros, plan_local, target_count
from .tensor_data import TensorStore, dtype_name, numel


@dataclass
class PruningSpace:
    targets: list[Target]
    values: list[TargetValues]
    skipped: list[Skipped]
    keep_nonfinite: bool
    zeros_before: list[int]
    unfed: list[str] = field(default_factory=list)  # prunable weights a session cannot feed (left unpruned)

    @classmethod
    def build(cls, model: onnx.ModelProto, cfg: PruneConfig) -> "PruningSpace":
        """``model`` must hold its weights in memory (external data internalized)."""
        found = find_weights(GraphIndex(model), min_numel=cfg.min_numel, include_overridable=cfg.include_overridable)
        targets, skipped = apply_rules(found, cfg)
        fed, unfed = [], []
        why = {}
        for t in targets:
            v = t.weight.value
            if v.tensor is not None and v.tensor.data_type == onnx.TensorProto.BFLOAT16:
                unfed.append(t)
                why[id(t)] = ("a bfloat16 weight: onnxruntime's Python API cannot feed it, so sensitivity cannot "
                              "measure it and allocation leaves it unpruned")
            elif v.graph == "main" and v.kind in ("initializer", "constant") and not v.duplicate:
                fed.append(t)
            else:
                unfed.append(t)
                why[id(t)] = ("not a top-level initializer or Constant: sensitivity cannot feed it, so allocation "
                              "leaves it unpruned")
        # rules and reports go by name: a fed weight named like one inside a subgraph cannot be told apart
        clash = {t.weight.name for t in unfed}
        for t in [t for t in fed if t.weight.name in clash]:
            fed.remove(t)
            unfed.append(t)
            why[id(t)] = "a weight inside a subgraph has the same name, so allocation leaves both unpruned"
        for t in unfed:
            tensor = t.weight.tensor
            skipped.append(Skipped(t.weight.name, t.weight.value.where(), why[id(t)], dtype_name(tensor.data_type),
                                   tuple(tensor.dims)))
        kept, values, unfit = load_values(fed, TensorStore(None), stream=False)
        zeros = [count_zeros(tv.source) for tv in values]
        return cls(kept, values, skipped + unfit, cfg.nonfinite is NonFinite.KEEP, zeros,
                   [t.weight.name for t in unfed])

    @property
    def names(self) -> list[str]:
        return [t.weight.name for t in self.targets]

    def numel(self, i: int) -> int:
        return numel(self.targets[i].weight.tensor)

    @property
    def pool(self) -> list[int]:
        """Targets whose sparsity allocation chooses (not fixed by a rule)."""
        return [i for i, t in enumerate(self.targets) if t.selection != "fixed"]

    @property
    def fixed(self) -> dict[int, float]:
        return {i: t.sparsity for i, t in enumerate(self.targets) if t.selection == "fixed"}

    def stored(self, i: int, sparsity: float) -> np.ndarray:
        """Weight ``i`` with ``round(sparsity x n)`` of its entries pruned, in its stored dtype and layout."""
        t, tv = self.targets[i], self.values[i]
        source = tv.source if isinstance(tv.source, np.ndarray) else tv.source.read(0, tv.source.size)
        try:
            plan = plan_local(source, sparsity, keep_nonfinite=self.keep_nonfinite)
        except NonFiniteValues as e:
            raise NonFiniteWeightError(
                f"weight '{t.weight.name}' holds {e.count} NaN/Inf value(s); fix the model, exclude it, "
                f"or pass --nonfinite keep to leave such values unpruned") from e
        if tv.quant is None:
            values = np.array(tv.raw, copy=True)
            apply_plan(values, plan, params=DEFAULT_PARAMS)
            return values
        deq = dequantize(tv.raw, tv.quant)
        apply_plan(deq, plan, params=DEFAULT_PARAMS)
        return prune_to_zero_point(tv.raw, deq == 0, tv.quant)

    def dense(self, i: int) -> np.ndarray:
        return self.values[i].raw

    def overrides(self, sparsities: dict[int, float]) -> dict[str, np.ndarray]:
        """Feeds replacing each listed weight by its pruned variant (sparsity 0 leaves it out)."""
        return {self.targets[i].weight.name: self.stored(i, s) for i, s in sorted(sparsities.items()) if s > 0}


def exact_level(k: int, n: int) -> float:
    """A sparsity that selects exactly ``k`` of ``n`` entries (``target_count(level, n) == k``)."""
    if n == 0:
        return 0.0
    level = k / n
    if target_count(level, n) != k:  # pragma: no cover - float rounding of k / n never lands on a half
        raise AssertionError(f"level {level!r} does not select {k} of {n}")
    return level
