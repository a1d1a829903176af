"""End to end on the real models in models/ with ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnx_magprune as mp
from conftest import MODELS
from onnx_magprune.selection import target_count

CASES = [("digits_mlp", "X", "probabilities"), ("digits_cnn", "input", "logits")]


def scores(model: onnx.ModelProto, feed_name: str, output: str, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([output], {feed_name: x})[0]


@pytest.mark.parametrize("name,feed,output", CASES)
def test_zero_sparsity_is_bit_identical(name, feed, output):
    path = MODELS / f"{name}.onnx"
    pruned, report = mp.prune_model(path, sparsity=0.0)
    assert pruned.SerializeToString(deterministic=True) == onnx.load(path).SerializeToString(deterministic=True)
    assert report.totals.zeros_after == 0


@pytest.mark.parametrize("name,feed,output", CASES)
def test_global_pruning_keeps_accuracy_and_beats_local(name, feed, output):
    data = np.load(MODELS / f"{name}_calib.npz")
    x, labels = data[feed], data["labels"]
    dense = onnx.load(MODELS / f"{name}.onnx")
    dense_acc = (scores(dense, feed, output, x).argmax(1) == labels).mean()
    assert dense_acc > 0.97
    accs = {}
    for scope in ("global", "local"):
        pruned, report = mp.prune_model(dense, sparsity=0.8, scope=scope)
        onnx.checker.check_model(pruned, full_check=True)
        if scope == "global":
            assert report.totals.zeros_after == target_count(0.8, report.totals.prunable_params)
        else:
            assert all(t.zeros_after == target_count(0.8, t.numel) for t in report.tensors)
        accs[scope] = (scores(pruned, feed, output, x).argmax(1) == labels).mean()
    # measured: mlp 0.964 global / 0.878 local, cnn 0.976 / 0.591 (onnxruntime 1.32, CPU)
    assert accs["global"] > 0.95
    assert accs["global"] > accs["local"]


def test_cnn_weights_found():
    report = mp.inspect_model(MODELS / "digits_cnn.onnx")
    assert [(t.name, t.consumers) for t in report.tensors] == [
        ("conv1.weight", ["Conv"]), ("conv2.weight", ["Conv"]), ("fc1.weight", ["Gemm"]), ("fc2.weight", ["Gemm"])]
    assert len(report.skipped) == 8
