"""Refinement of a shrunk two-layer block by gradient descent (``--refine-epochs``), pure numpy.

After structured removal and the least-squares re-fit of the consumer, a block
``y = act(x W_p + b_p) W_c + b_c`` (producer ``W_p`` [in, kept], consumer
``W_c`` [kept, out]) still differs from the dense block it replaces.  The
re-fit is optimal for the consumer alone; :func:`refine` also moves the
producer's kept columns and bias, minimising the (row-weighted) squared
error to the dense block's output on the calibration rows with Adam, in
float32, seeded.  The last tenth of the rows is held out: the parameters of
the epoch with the least held-out error are kept, and the starting point when
no epoch beats it, so refinement can only lower the held-out error.

The activation is the chain of elementwise ONNX nodes between the producer
and the consumer (GELU in its Erf or Tanh form, Relu, SiLU, ...), run by
:class:`Chain` with forward-mode derivatives (each value carries its
derivative with respect to the producer's output, elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np

#: elementwise ops the chain interpreter can differentiate
CHAIN_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu",
                       "Pow", "Sqrt", "Neg", "Identity", "Exp", "Softplus", "Cast"})
HELD_OUT = 0.1  # share of the rows that choose the epoch
MIN_ROWS = 50  # fewer rows: no refinement (a tenth of them cannot judge the epochs)
BATCH = 512
SEED = 0
_SQRT_2PI = np.sqrt(2.0 * np.pi)


@dataclass(frozen=True)
class ChainNode:
    op: str
    inputs: tuple[str, ...]
    output: str
    attrs: Mapping[str, object] = field(default_factory=dict)


@dataclass
class Chain:
    """The elementwise nodes from ``start`` (the producer's output, after its bias) to ``end``
    (the consumer's input), in topological order; ``constants`` by name (already cut to the kept
    units where they are per-unit)."""

    start: str
    end: str
    nodes: list[ChainNode]
    constants: dict[str, np.ndarray]

    def __call__(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(value, d value / d z) at the end, for ``z`` at the start (elementwise)."""
        env: dict[str, tuple[np.ndarray, np.ndarray | None]] = {self.start: (z, np.ones_like(z))}
        for n in self.nodes:
            args = [env[i] if i in env else (self.constants[i], None) for i in n.inputs]
            env[n.output] = _apply(n, args)
        v, d = env[self.end]
        return v, (d if d is not None else np.zeros_like(v))


def _apply(n: ChainNode, args):
    (a, da) = args[0]
    b, db = args[1] if len(args) > 1 else (None, None)
    op = n.op
    if op == "Add":
        return a + b, _plus(da, db)
    if op == "Sub":
        return a - b, _plus(da, None if db is None else -db)
    if op == "Mul":
        return a * b, _plus(None if da is None else da * b, None if db is None else a * db)
    if op == "Div":
        return a / b, _plus(None if da is None else da / b, None if db is None else -a * db / (b * b))
    if op in ("Identity", "Cast"):
        return a, da
    if op == "Neg":
        return -a, None if da is None else -da
    if op == "Erf":
        from scipy.special import erf

        return erf(a).astype(a.dtype), _chain(da, 2.0 / np.sqrt(np.pi) * np.exp(-a * a))
    if op == "Tanh":
        t = np.tanh(a)
        return t, _chain(da, 1.0 - t * t)
    if op == "Sigmoid":
        s = _sigmoid(a)
        return s, _chain(da, s * (1.0 - s))
    if op == "Relu":
        return np.maximum(a, 0), _chain(da, (a > 0).astype(a.dtype))
    if op == "LeakyRelu":
        alpha = float(n.attrs.get("alpha", 0.01))
        return np.where(a > 0, a, alpha * a), _chain(da, np.where(a > 0, 1.0, alpha).astype(a.dtype))
    if op == "Exp":
        e = np.exp(a)
        return e, _chain(da, e)
    if op == "Softplus":
        return np.logaddexp(0, a).astype(a.dtype), _chain(da, _sigmoid(a))
    if op == "Sqrt":
        r = np.sqrt(a)
        return r, _chain(da, 0.5 / np.where(r > 0, r, np.inf))
    if op == "Pow":
        if db is not None:
            raise ValueError("Pow with a varying exponent")
        return a ** b, _chain(da, b * a ** (b - 1))
    if op == "Gelu":
        if n.attrs.get("approximate", "none") == "tanh":
            k = np.sqrt(2.0 / np.pi)
            u = k * (a + 0.044715 * a ** 3)
            t = np.tanh(u)
            return 0.5 * a * (1 + t), _chain(da, 0.5 * (1 + t) + 0.5 * a * (1 - t * t) * k * (1 + 3 * 0.044715 * a * a))
        from scipy.special import erf

        cdf = 0.5 * (1 + erf(a / np.sqrt(2.0)))
        return (a * cdf).astype(a.dtype), _chain(da, cdf + a * np.exp(-0.5 * a * a) / _SQRT_2PI)
    raise ValueError(f"no derivative for {op}")


def _sigmoid(a):
    return 0.5 * (1.0 + np.tanh(0.5 * a))


def _plus(x, y):
    if x is None:
        return y
    return x if y is None else x + y


def _chain(d, local):
    return None if d is None else d * local.astype(d.dtype)


@dataclass
class Block:
    """The parameters refinement moves (float32): producer ``wp`` [in, k] and ``bp`` [k] (None
    without a producer bias), consumer ``wc`` [k, out] and ``bc`` [out] (None without a bias)."""

    wp: np.ndarray
    bp: np.ndarray | None
    wc: np.ndarray
    bc: np.ndarray | None

    def names(self) -> list[str]:
        return [k for k in ("wp", "bp", "wc", "bc") if getattr(self, k) is not None]

    def copy(self) -> "Block":
        return Block(*(None if v is None else v.copy() for v in (self.wp, self.bp, self.wc, self.bc)))


@dataclass(frozen=True)
class RefineResult:
    block: Block
    rows: int
    held_out_rows: int
    error_before: float  # held-out weighted squared error, relative to the target's weighted energy
    error_after: float
    best_epoch: int  # 0: no epoch beat the start

    def to_dict(self, epochs: int) -> dict:
        return {"epochs": epochs, "rows": self.rows, "held_out_rows": self.held_out_rows,
                "error_before": self.error_before, "error_after": self.error_after, "best_epoch": self.best_epoch}


def forward(block: Block, chain: Callable, x: np.ndarray):
    z = x @ block.wp
    if block.bp is not None:
        z = z + block.bp
    h, dh = chain(z)
    y = h @ block.wc
    if block.bc is not None:
        y = y + block.bc
    return y, h, dh


def _error(block: Block, chain, x, y, w) -> float:
    if not len(x):
        return 0.0
    yp = forward(block, chain, x)[0]
    energy = float((w[:, None] * y.astype(np.float64) ** 2).sum())
    return float((w[:, None] * (yp - y).astype(np.float64) ** 2).sum()) / energy if energy > 0 else 0.0


def refine(block: Block, chain: Callable, x: np.ndarray, y: np.ndarray, row_weights: np.ndarray | None,
           epochs: int, lr: float) -> RefineResult:
    """Adam on the weighted squared error of ``forward(block, chain, x)`` against ``y``.  ``lr`` is
    relative: each parameter's step is ``lr`` x the RMS of its block's weight matrix."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    n = len(x)
    w = np.ones(n, np.float32) if row_weights is None else np.asarray(row_weights, np.float32)
    w = w / max(float(w.mean()), np.finfo(np.float32).tiny)
    held = max(1, int(round(n * HELD_OUT)))
    fit = n - held
    xf, yf, wf = x[:fit], y[:fit], w[:fit]
    xh, yh, wh = x[fit:], y[fit:], w[fit:]
    cur = block.copy()
    start = best_err = _error(cur, chain, xh, yh, wh)
    best, best_epoch = cur.copy(), 0
    if n < MIN_ROWS:
        epochs = 0
    names = cur.names()
    scale = {"wp": _rms(cur.wp), "bp": _rms(cur.wp), "wc": _rms(cur.wc), "bc": _rms(cur.wc)}
    m = {k: np.zeros_like(getattr(cur, k)) for k in names}
    v = {k: np.zeros_like(getattr(cur, k)) for k in names}
    rng = np.random.default_rng(SEED)
    energy = float((wf[:, None] * yf.astype(np.float64) ** 2).mean()) or 1.0
    t = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(fit)
        for s in range(0, fit, BATCH):
            idx = np.sort(order[s:s + BATCH])
            xb, yb, wb = xf[idx], yf[idx], wf[idx][:, None]
            yp, h, dh = forward(cur, chain, xb)
            g = (2.0 / (len(idx) * yb.shape[1] * energy)) * wb * (yp - yb)
            grads = {"wc": h.T @ g}
            if cur.bc is not None:
                grads["bc"] = g.sum(axis=0)
            gz = (g @ cur.wc.T) * dh
            grads["wp"] = xb.T @ gz
            if cur.bp is not None:
                grads["bp"] = gz.sum(axis=0)
            t += 1
            for k in names:
                gk = grads[k].astype(np.float32)
                m[k] = 0.9 * m[k] + 0.1 * gk
                v[k] = 0.999 * v[k] + 0.001 * gk * gk
                step = (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.999 ** t)) + 1e-12)
                setattr(cur, k, (getattr(cur, k) - np.float32(lr * scale[k]) * step).astype(np.float32))
        err = _error(cur, chain, xh, yh, wh)
        if np.isfinite(err) and err < best_err:
            best, best_err, best_epoch = cur.copy(), err, epoch
    return RefineResult(best, n, held, start, best_err, best_epoch)


def _rms(a: np.ndarray) -> float:
    r = float(np.sqrt(np.mean(np.square(a, dtype=np.float64)))) if a.size else 0.0
    return r if r > 0 else 1.0


__all__ = ["MIN_ROWS", "CHAIN_OPS", "Chain", "ChainNode", "Block", "RefineResult", "refine", "forward"]
