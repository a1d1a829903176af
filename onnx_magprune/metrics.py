"""Drift metrics between a dense and a pruned model's outputs (pure numpy).

Every metric is accumulated batch by batch, so memory stays bounded however
large the calibration set is.  Sums are kept in float64.

Per output:

* ``max_abs_error``, ``mean_abs_error``;
* ``rel_l2``: ``||pruned - dense|| / ||dense||`` over the whole output;
* ``cosine``: cosine similarity of the whole output, and per sample (the
  first axis) its mean and min;
* ``top1_agreement``: for class-score-like outputs (floating point ``[N, C]``
  with C >= 2, or rank >= 2 outputs named like logits/scores/probabilities),
  how often the argmax over the last axis agrees;
* ``exact_match``: for integer and boolean outputs, the share of equal entries;
* ``nan_count`` / ``inf_count`` in dense and pruned outputs.

With labels, :class:`Accuracy` compares each model's predictions with them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def _f64(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def looks_like_class_scores(shape: tuple[int, ...], dtype: np.dtype, name: str = "") -> bool:
    """Floating point ``[N, C]`` with C >= 2, or any rank >= 2 output named like logits or scores
    (token logits ``[N, T, V]``); hidden states and embeddings are not class scores."""
    if not (dtype.kind == "f" or dtype.name == "bfloat16") or len(shape) < 2 or shape[-1] < 2:
        return False
    lowered = name.lower()
    return len(shape) == 2 or any(w in lowered for w in ("logit", "score", "prob"))


@dataclass
class OutputDrift:
    """Accumulates drift for one output."""

    name: str
    count: int = 0
    samples: int = 0
    kind: str | None = None  # "float" or "exact" (integer/bool), set by the first batch
    sum_abs: float = 0.0
    max_abs: float = 0.0
    sum_sq_diff: float = 0.0
    sum_sq_dense: float = 0.0
    sum_sq_pruned: float = 0.0
    dot: float = 0.0
    sample_cos_sum: float = 0.0
    sample_cos_min: float = math.inf
    sample_cos_count: int = 0
    top1_agree: int = 0
    top1_total: int = 0
    equal: int = 0
    nan_dense: int = 0
    nan_pruned: int = 0
    inf_dense: int = 0
    inf_pruned: int = 0
    shape: list[int] = field(default_factory=list)

    def update(self, dense: Any, pruned: Any) -> None:
        dense, pruned = np.asarray(dense), np.asarray(pruned)
        if dense.shape != pruned.shape:
            raise ValueError(f"output '{self.name}': dense shape {dense.shape} != pruned shape {pruned.shape}")
        kind = "float" if (dense.dtype.kind in "fc" or dense.dtype.name == "bfloat16") else "exact"
        if self.kind is None:
            self.kind, self.shape = kind, list(dense.shape)
        self.count += dense.size
        self.samples += dense.shape[0] if dense.ndim else 1
        if kind == "exact":
            self.equal += int(np.count_nonzero(dense == pruned))
            return
        d, p = _f64(dense), _f64(pruned)
        self.nan_dense += int(np.isnan(d).sum())
        self.nan_pruned += int(np.isnan(p).sum())
        self.inf_dense += int(np.isinf(d).sum())
        self.inf_pruned += int(np.isinf(p).sum())
        diff = np.abs(p - d)
        if diff.size:
            self.max_abs = max(self.max_abs, float(np.max(diff)))
        self.sum_abs += float(diff.sum())
        self.sum_sq_diff += float(np.square(diff).sum())
        self.sum_sq_dense += float(np.square(d).sum())
        self.sum_sq_pruned += float(np.square(p).sum())
        self.dot += float((d * p).sum())
        if d.ndim >= 1 and d.shape[0]:
            dd = d.reshape(d.shape[0], -1)
            pp = p.reshape(p.shape[0], -1)
            cos = _cosine_rows(dd, pp)
            self.sample_cos_sum += float(cos.sum())
            self.sample_cos_min = min(self.sample_cos_min, float(cos.min()))
            self.sample_cos_count += cos.size
        if looks_like_class_scores(dense.shape, dense.dtype, self.name):
            a, b = np.argmax(d, axis=-1), np.argmax(p, axis=-1)
            self.top1_agree += int(np.count_nonzero(a == b))
            self.top1_total += a.size

    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "shape": self.shape, "elements": self.count,
                               "samples": self.samples}
        if self.kind == "exact":
            out["exact_match"] = self.equal / self.count if self.count else None
            return out
        n = self.count
        out.update({
            "max_abs_error": self.max_abs if n else None,
            "mean_abs_error": self.sum_abs / n if n else None,
            "rel_l2": _safe_div(math.sqrt(self.sum_sq_diff), math.sqrt(self.sum_sq_dense)),
            "cosine": _cosine(self.dot, self.sum_sq_dense, self.sum_sq_pruned),
            "cosine_per_sample_mean": (self.sample_cos_sum / self.sample_cos_count
                                       if self.sample_cos_count else None),
            "cosine_per_sample_min": self.sample_cos_min if self.sample_cos_count else None,
            "top1_agreement": self.top1_agree / self.top1_total if self.top1_total else None,
            "nan_count": {"dense": self.nan_dense, "pruned": self.nan_pruned},
            "inf_count": {"dense": self.inf_dense, "pruned": self.inf_pruned},
        })
        return out


def _safe_div(a: float, b: float) -> float | None:
    if b == 0:
        return 0.0 if a == 0 else math.inf
    return a / b


def _cosine(dot: float, sq_a: float, sq_b: float) -> float | None:
    if sq_a == 0 and sq_b == 0:
        return 1.0  # both all-zero: identical
    if sq_a == 0 or sq_b == 0:
        return 0.0
    return dot / math.sqrt(sq_a * sq_b)


def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    dot = np.einsum("ij,ij->i", a, b)
    na, nb = np.einsum("ij,ij->i", a, a), np.einsum("ij,ij->i", b, b)
    both_zero = (na == 0) & (nb == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = dot / np.sqrt(na * nb)
    cos = np.where(both_zero, 1.0, cos)
    return np.where(((na == 0) | (nb == 0)) & ~both_zero, 0.0, cos)


@dataclass
class Accuracy:
    """Task accuracy of dense and pruned predictions against labels."""

    output: str
    correct_dense: int = 0
    correct_pruned: int = 0
    total: int = 0

    def update(self, dense: np.ndarray, pruned: np.ndarray, labels: np.ndarray) -> None:
        pd, pp = predictions(dense), predictions(pruned)
        labels = np.asarray(labels).reshape(-1)
        if pd.size != labels.size:
            raise ValueError(f"output '{self.output}' gives {pd.size} predictions for {labels.size} labels")
        self.correct_dense += int(np.count_nonzero(pd == labels))
        self.correct_pruned += int(np.count_nonzero(pp == labels))
        self.total += labels.size

    def result(self) -> dict[str, Any]:
        if not self.total:
            return {"output": self.output, "dense": None, "pruned": None, "drop": None, "samples": 0}
        dense, pruned = self.correct_dense / self.total, self.correct_pruned / self.total
        return {"output": self.output, "dense": dense, "pruned": pruned, "drop": dense - pruned,
                "samples": self.total}


def predictions(output: np.ndarray) -> np.ndarray:
    """Class predictions: argmax over the last axis of scores, or the output itself for labels."""
    output = np.asarray(output)
    if (output.dtype.kind == "f" or output.dtype.name == "bfloat16") and output.ndim >= 2:
        return np.argmax(output, axis=-1).reshape(-1)
    return output.reshape(-1)


def pick_label_output(outputs: dict[str, object]) -> str | None:
    """The output to score labels against, from one run's outputs: an integer output of rank 1
    (a label), else the first class-score output.  Non-tensor outputs (a ZipMap's sequence of
    maps) are never chosen."""
    arrays = {n: v for n, v in outputs.items() if isinstance(v, np.ndarray)}
    for name, v in arrays.items():
        if v.dtype.kind in "iu" and v.ndim == 1:
            return name
    for name, v in arrays.items():
        if looks_like_class_scores(v.shape, v.dtype) and v.ndim == 2:
            return name
    return None
