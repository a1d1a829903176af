"""Execution-provider choice with injected provider lists (no GPU needed), and CUDA when present."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from conftest import mlp
from onnx_magprune.runtime import (
    BoundRunner,
    RuntimeFailure,
    create_session,
    parse_providers,
    resolve_providers,
)

GPU_BOX = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_BOX = ["AzureExecutionProvider", "CPUExecutionProvider"]


def test_aliases_and_order():
    assert parse_providers("cuda, cpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert parse_providers(["TRT", "CUDAExecutionProvider"]) == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(RuntimeFailure, match="unknown execution provider 'gpu'"):
        parse_providers("gpu")


def test_available_gpu_providers_are_used_with_cpu_last():
    choice = resolve_providers("cuda", GPU_BOX, device_id=1)
    assert choice.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert choice.options == [{"device_id": 1}, {}]
    assert choice.device == "cuda" and choice.dropped == []


def test_tensorrt_sparsity_option():
    choice = resolve_providers("tensorrt,cuda,cpu", GPU_BOX, trt_sparsity=True)
    assert choice.options[0] == {"device_id": 0, "trt_sparsity_enable": True}
    with pytest.raises(RuntimeFailure, match="--trt-sparsity needs the TensorRT"):
        resolve_providers("cuda", GPU_BOX, trt_sparsity=True)


def test_unavailable_provider_is_an_error_unless_fallback():
    with pytest.raises(RuntimeFailure) as info:
        resolve_providers("cuda,cpu", CPU_BOX)
    msg = str(info.value)
    assert "CUDAExecutionProvider is not available" in msg and "--allow-fallback" in msg and "[gpu]" in msg
    choice = resolve_providers("cuda,cpu", CPU_BOX, allow_fallback=True)
    assert choice.providers == ["CPUExecutionProvider"] and choice.dropped == ["CUDAExecutionProvider"]
    assert choice.device == "cpu"


def test_bound_runner_on_cpu_matches_plain_run():
    choice = resolve_providers("cpu", ort.get_available_providers())
    sess, seconds = create_session(mlp(), choice, threads=1)
    assert seconds > 0
    x = {"x": np.ones((2, 32), np.float32)}
    runner = BoundRunner(sess, x, choice.device)
    runner()
    assert runner.binding is None


def test_unloadable_model_is_a_runtime_failure():
    m = mlp()
    m.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(RuntimeFailure, match="onnxruntime cannot load the in-memory model"):
        create_session(m, resolve_providers("cpu", ["CPUExecutionProvider"]))


@pytest.mark.skipif("CUDAExecutionProvider" not in ort.get_available_providers(), reason="no CUDA provider here")
def test_cuda_io_binding_runs():  # pragma: no cover - needs a GPU
    choice = resolve_providers("cuda", ort.get_available_providers())
    sess, _ = create_session(mlp(), choice)
    runner = BoundRunner(sess, {"x": np.ones((2, 32), np.float32)}, choice.device)
    runner()
    assert runner.binding is not None
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
