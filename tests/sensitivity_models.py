"""A tiny model with one layer known to be fragile, and its calibration data (seeded)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from conftest import make_model, vi


def robust(shape, seed):
    """Most entries tiny (pruning them costs little), a fifth of them large."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * 1e-3
    big = rng.random(shape) < 0.2
    w[big] = rng.standard_normal(int(big.sum()))
    return w.astype(np.float32)


def fragile(shape, seed):
    """Every entry about the same magnitude: any pruning removes real signal."""
    rng = np.random.default_rng(seed)
    return (np.sign(rng.standard_normal(shape)) * (1.0 + 0.01 * rng.random(shape))).astype(np.float32) * 0.3


def fragile_model() -> onnx.ModelProto:
    """x[N,16] -> A[16,32] -> Relu -> F[32,32] (fragile) -> Relu -> B[32,8] -> y."""
    inits = [numpy_helper.from_array(robust((16, 32), 1), "A"), numpy_helper.from_array(fragile((32, 32), 2), "F"),
             numpy_helper.from_array(robust((32, 8), 3), "B")]
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "F"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "B"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 8])], inits)


def calibration(n=64, seed=7) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 16)).astype(np.float32)}


def weights_of(path) -> dict[str, np.ndarray]:
    """The top-level initializers of the model file at ``path``."""
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def write(tmp_path):
    model = tmp_path / "frag.onnx"
    model.write_bytes(fragile_model().SerializeToString())
    calib = tmp_path / "frag_calib.npz"
    np.savez(calib, **calibration())
    return model, calib
