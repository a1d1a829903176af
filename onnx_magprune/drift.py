"""Drift as one number, "larger is worse", from the validator's per-output metrics.

* ``rel_l2``: ``||pruned - dense|| / ||dense||`` as is;
* ``cosine``: ``1 - cosine`` of the whole output;
* ``top1``: ``1 - top-1 agreement`` (class-score outputs only);
* ``accuracy``: the accuracy drop against labels (dense minus pruned; negative when pruning helped).

Integer and boolean outputs count as ``1 - exact match`` for every metric
but ``accuracy``.  Over several outputs the worst one counts, unless
``output`` names one.  NaN counts as infinitely bad.
"""

from __future__ import annotations

import enum
import math
from typing import Any, Sequence

from .errors import ConfigError


class Metric(str, enum.Enum):
    REL_L2 = "rel_l2"
    COSINE = "cosine"
    TOP1 = "top1"
    ACCURACY = "accuracy"


def parse_metric(value: "Metric | str") -> Metric:
    try:
        return value if isinstance(value, Metric) else Metric(value)
    except ValueError:
        raise ConfigError(f"metric must be one of {', '.join(m.value for m in Metric)}, got {value!r}") from None


def _bad(x: float | None) -> float:
    return math.inf if x is None or math.isnan(x) else float(x)


def output_drift(metric: Metric, out: dict[str, Any]) -> float | None:
    """One output's drift under ``metric`` (None: the metric does not apply to it)."""
    if out.get("kind") == "exact":
        return None if metric is Metric.ACCURACY else _bad(1.0 - out["exact_match"]
                                                            if out.get("exact_match") is not None else None)
    if metric is Metric.REL_L2:
        return _bad(out.get("rel_l2"))
    if metric is Metric.COSINE:
        cos = out.get("cosine")
        return _bad(None if cos is None else 1.0 - cos)
    if metric is Metric.TOP1:
        top1 = out.get("top1_agreement")
        return None if top1 is None else _bad(1.0 - top1)
    return None


def drift_value(metric: Metric, outputs: Sequence[dict[str, Any]], accuracy: dict[str, Any] | None,
                output: str | None = None) -> float:
    """The drift of one evaluation: the worst output's, or ``output``'s."""
    if metric is Metric.ACCURACY:
        if accuracy is None or accuracy.get("drop") is None:
            raise ConfigError("--metric accuracy needs labels: a 'labels' array in the calibration data or --labels")
        return _bad(accuracy["drop"])
    names = [o["name"] for o in outputs]
    if output is not None:
        if output not in names:
            raise ConfigError(f"no output named '{output}' (outputs: {', '.join(names)})")
        outputs = [o for o in outputs if o["name"] == output]
    values = [v for v in (output_drift(metric, o) for o in outputs) if v is not None]
    if not values:
        what = f"output '{output}'" if output else "no output"
        raise ConfigError(f"--metric {metric.value} does not apply: {what} is a class-score output "
                          "(floating point [N, C]); use --metric rel_l2 or cosine")
    return max(values)


def describe(metric: Metric) -> str:
    return {Metric.REL_L2: "relative L2 error", Metric.COSINE: "1 - cosine similarity",
            Metric.TOP1: "1 - top-1 agreement", Metric.ACCURACY: "accuracy drop"}[metric]
