"""Pruned variants by a calibrated criterion, for budget-driven allocation
(``prune --method obs|wanda --target-drift X`` / ``--allocate sensitivity``).

The sweep and the search need every weight pruned to many levels, alone and in
combination.  The method's own pipeline (sequential stages, re-fits to the dense
output) re-collects statistics after every layer, far too slow for that.  The
variants here are *one-shot*: the statistics of the dense model are collected
once (one pass, one session), and each (weight, level) variant applies the
criterion to the dense weight alone with those statistics: OBS prunes and
re-fits the layer, Wanda ranks by |w|·‖x‖ (and re-fits with ``--refit``).
A weight no layer view covers (see :mod:`onnx_magprune.layer_view`) falls back
to magnitude, with the reason in :attr:`CriterionSpace.fallback`.

The counts are the space's exact counts (``round(s x n)`` of the finite
entries), so a level means the same number of zeros as for magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from .calibrated import LayerOutcome, _Runner
from .config import PruneConfig
from .layer_stats import LayerStats
from .methods import MethodOptions
from .quantized import prune_to_zero_point
from .selection import target_count
from .variants import PruningSpace


@dataclass
class CriterionSpace(PruningSpace):
    """A :class:`PruningSpace` whose variants are pruned by ``method``'s criterion."""

    method: MethodOptions | None = None
    fallback: dict[str, str] = field(default_factory=dict)  # weight name -> why it is pruned by magnitude
    passes: int = 0
    _runner: _Runner | None = field(default=None, repr=False)
    _stats: dict[int, LayerStats] = field(default_factory=dict, repr=False)
    _last: dict[int, tuple[int, np.ndarray, dict]] = field(default_factory=dict, repr=False)  # i -> (count, ...)
    _finite: dict[int, int] = field(default_factory=dict, repr=False)  # i -> finite entries of the dense weight

    @classmethod
    def build_for(cls, model: onnx.ModelProto, cfg: PruneConfig, method: MethodOptions,
                  calibration) -> "CriterionSpace":
        """``model`` holds its weights in memory; ``calibration`` is the search's sample set."""
        base = PruningSpace.build(model, cfg)
        space = cls(base.targets, base.values, base.skipped, base.keep_nonfinite, base.zeros_before, base.unfed,
                    method=method)
        runner = _Runner(model, base.targets, base.values, cfg, method, calibration)
        if [t.weight.name for t in runner.targets] != base.names:  # pragma: no cover - no pattern here
            raise RuntimeError("the criterion runner dropped weights")
        space._runner = runner
        space._stats = runner._collect(runner.calibrated, "statistics (dense model)") if runner.calibrated else {}
        space.passes = runner.passes
        space.fallback = {runner.targets[i].weight.name: why for i, why in enumerate(runner.fallback)
                          if why is not None}
        return space

    @property
    def stats_sessions(self) -> int:
        model = self._runner.stats_model if self._runner is not None else None
        return model.sessions_created if model is not None else 0

    def stored(self, i: int, sparsity: float) -> np.ndarray:
        runner = self._runner
        if runner is None or i not in self._stats:  # no statistics: the magnitude variant
            return super().stored(i, sparsity)
        t, tv = self.targets[i], self.values[i]
        dense = None
        if i not in self._finite:
            dense = runner._initial(t, tv)
            self._finite[i] = dense.size - int(np.count_nonzero(~np.isfinite(dense.astype(np.float32))))
        count = target_count(sparsity, self._finite[i])
        last = self._last.get(i)
        if last is not None and last[0] == count:  # the search measures the same variant more than once
            return last[1]
        runner.cur[i] = dense if dense is not None else runner._initial(t, tv)  # from the dense weight: one-shot
        runner.outcomes[i] = LayerOutcome(runner._criterion(i))
        runner._prune_layer(i, count, self._stats[i])
        final = runner.cur[i]
        out = final if tv.quant is None else prune_to_zero_point(tv.raw, final == 0, tv.quant)
        self._last[i] = (count, out, runner.outcomes[i].to_dict())
        return out

    def outcome(self, i: int, sparsity: float) -> dict:
        """What the criterion did to weight ``i`` at ``sparsity`` (the report's ``method`` entry)."""
        if self._runner is None or i not in self._stats:
            why = self.fallback.get(self.names[i], "no statistics")
            return {"criterion": "magnitude", "fallback": why}
        self.stored(i, sparsity)
        return dict(self._last[i][2])
