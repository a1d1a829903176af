"""Quantized weights: ranked by dequantized magnitude, pruned to the zero point; scales never pruned."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import MODELS, vi
from onnx_magprune.quantized import QuantInfo, QuantShapeError, dequantize, prune_to_zero_point
from onnx_magprune.selection import target_count


def qdq_model(q, scale, zp=None, axis=1, block_size=0, opset=21):
    attrs = {"axis": axis}
    if block_size:
        attrs["block_size"] = block_size
    inputs = ["Wq", "Ws"] + (["Wz"] if zp is not None else [])
    nodes = [helper.make_node("DequantizeLinear", inputs, ["W"], **attrs),
             helper.make_node("MatMul", ["x", "W"], ["y"])]
    inits = [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(scale, "Ws")]
    if zp is not None:
        inits.append(numpy_helper.from_array(zp, "Wz"))
    g = helper.make_graph(nodes, "g", [vi("x", [1, q.shape[0]])], [vi("y", [1, q.shape[1]])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 10
    return m


def init_of(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def dequantized_by_ort(model, x):
    """The DequantizeLinear output as ONNX Runtime computes it (exposed as an extra graph output)."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, None))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(["W"], {"x": x})[0]


def test_per_channel_int8_with_zero_points():
    rng = np.random.default_rng(0)
    q = rng.integers(-128, 128, (64, 32)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 32).astype(np.float32)
    zp = rng.integers(-5, 6, 32).astype(np.int8)
    model = qdq_model(q, scale, zp)
    pruned, report = mp.prune_model(model, sparsity=0.6)
    info = QuantInfo(scale, zp, axis=1)
    deq_before, q_after = dequantize(q, info), init_of(pruned, "Wq")
    deq_after = dequantize(q_after, info)
    n = q.size
    assert int(np.count_nonzero(deq_after == 0)) == target_count(0.6, n) == report.totals.zeros_after
    zeroed = (deq_after == 0) & (deq_before != 0)
    assert np.all(q_after[zeroed] == np.broadcast_to(zp, q.shape)[zeroed])  # set to the zero point
    kept = deq_after != 0
    assert np.array_equal(q_after[kept], q[kept])
    assert np.abs(deq_before[kept]).min() >= np.abs(deq_before[zeroed]).max()  # by dequantized magnitude
    np.testing.assert_array_equal(init_of(pruned, "Ws"), scale)  # scale and zero point untouched
    np.testing.assert_array_equal(init_of(pruned, "Wz"), zp)
    t = report.tensors[0]
    assert t.dtype == "int8" and t.quantization == "per-axis (axis 1) via DequantizeLinear"
    x = rng.standard_normal((1, 64)).astype(np.float32)
    np.testing.assert_allclose(dequantized_by_ort(pruned, x), deq_after, rtol=1e-6, atol=0)
    assert np.count_nonzero(dequantized_by_ort(pruned, x) == 0) == report.totals.zeros_after


def test_uint8_per_tensor_and_int4_blocked():
    rng = np.random.default_rng(1)
    q = rng.integers(0, 256, (32, 16)).astype(np.uint8)
    pruned, report = mp.prune_model(qdq_model(q, np.array(0.02, np.float32), np.array(128, np.uint8), opset=17),
                                    sparsity=0.5)
    assert np.count_nonzero(init_of(pruned, "Wq") == 128) >= target_count(0.5, q.size)
    assert report.totals.zeros_after == target_count(0.5, q.size)
    # int4, blocks of 8 along axis 0: the scale is a [4, 16] float tensor shaped like a weight
    q4 = rng.integers(-8, 8, (32, 16)).astype(np.int8)
    q4t = helper.make_tensor("Wq", TensorProto.INT4, [32, 16], q4.ravel().tolist())
    scale = rng.uniform(0.01, 0.1, (4, 16)).astype(np.float32)
    model = qdq_model(q4, scale, axis=0, block_size=8)
    model.graph.initializer[0].CopyFrom(q4t)
    pruned, report = mp.prune_model(model, sparsity=0.5, min_numel=16)
    assert [t.name for t in report.tensors] == ["Wq"]
    assert any(s.name == "Ws" and s.reason.startswith("quantization scale or zero point") for s in report.skipped)
    q_after = numpy_helper.to_array(pruned.graph.initializer[0]).astype(np.int8)
    deq = dequantize(q_after, QuantInfo(scale, None, axis=0, block_size=8))
    assert np.count_nonzero(deq == 0) == target_count(0.5, q4.size)
    assert pruned.graph.initializer[0].data_type == TensorProto.INT4
    onnx.checker.check_model(pruned, full_check=True)
    x = rng.standard_normal((1, 32)).astype(np.float32)
    np.testing.assert_allclose(dequantized_by_ort(pruned, x), deq, rtol=1e-6, atol=0)


def test_weight_shaped_float_scales_beside_integer_weights_are_never_pruned():
    # exporters keep [vocab, 1] / [1, hidden] float scales next to int8 weights (e.g. blocked or
    # dynamic quantization): big enough and 2-D, but they feed scale slots and Muls, never weights
    rng = np.random.default_rng(2)
    q = rng.integers(-127, 128, (512, 64)).astype(np.int8)
    row_scale = rng.uniform(0.01, 0.1, (512, 1)).astype(np.float32)
    col_scale = rng.uniform(0.5, 1.5, (1, 64)).astype(np.float32)
    nodes = [helper.make_node("DequantizeLinear", ["Wq", "S"], ["W"], axis=1, block_size=64),
             helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Mul", ["h", "C"], ["y"])]
    g = helper.make_graph(nodes, "g", [vi("x", [1, 512])], [vi("y", [1, 64])],
                          [numpy_helper.from_array(q, "Wq"), numpy_helper.from_array(row_scale, "S"),
                           numpy_helper.from_array(col_scale, "C")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    pruned, report = mp.prune_model(m, sparsity=0.9, min_numel=16)
    assert [t.name for t in report.tensors] == ["Wq"]
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons["S"] == "quantization scale or zero point: DequantizeLinear input 1"
    assert reasons["C"].startswith("also feeds a non-weight input: Mul")
    np.testing.assert_array_equal(init_of(pruned, "S"), row_scale)
    np.testing.assert_array_equal(init_of(pruned, "C"), col_scale)


def test_unscaled_and_unsupported_integer_weights_say_why():
    q = np.ones((64, 32), np.int8)
    nodes = [helper.make_node("MatMulInteger", ["x", "Wq"], ["y"])]
    g = helper.make_graph(nodes, "g", [vi("x", [1, 64], TensorProto.INT8)], [vi("y", [1, 32], TensorProto.INT32)],
                          [numpy_helper.from_array(q, "Wq")])
    report = mp.inspect_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert report.skipped[0].reason == ("int8 weight of MatMulInteger: its output is not Cast and then scaled by "
                                        "a Mul, where the scale would be read, so it is not pruned")
    tiny = qdq_model(np.ones((8, 9), np.int8), np.ones(9, np.float32))  # 72 elements: size, not dtype, is why
    assert mp.inspect_model(tiny).skipped[0].reason == "too small: 72 elements, below min_numel 128"
    bad = qdq_model(np.ones((64, 32), np.int8), np.ones(7, np.float32))  # per-axis scale that does not fit
    report = mp.inspect_model(bad)
    assert report.tensors == []
    assert report.skipped[-1].reason == "its DequantizeLinear per-axis scale of shape [7] does not fit axis 1 of [64, 32]"


def test_quantized_helpers():
    q = np.array([[1, 2], [3, 4]], np.int8)
    info = QuantInfo(np.array([1.0, 0.5], np.float32), np.array([1, 2], np.int8), axis=1)
    np.testing.assert_array_equal(dequantize(q, info), [[0.0, 0.0], [2.0, 1.0]])
    out = prune_to_zero_point(q, np.array([[False, False], [True, False]]), info)
    np.testing.assert_array_equal(out, [[1, 2], [1, 4]])
    with pytest.raises(QuantShapeError):
        dequantize(q, QuantInfo(np.ones(3, np.float32), None, axis=0))


@pytest.mark.parametrize("fmt", ["QDQ", "QOperator"])
def test_onnxruntime_quantized_cnn(tmp_path, fmt):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    data = np.load(MODELS / "digits_cnn_calib.npz")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": data["input"][i:i + 8]} for i in range(0, 64, 8)])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "q.onnx"
    quantize_static(str(MODELS / "digits_cnn.onnx"), str(out), Reader(), per_channel=True,
                    quant_format=getattr(QuantFormat, fmt))
    pruned, report = mp.prune_model(out, sparsity=0.5)
    assert [t.dtype for t in report.tensors] == ["int8"] * 4
    assert report.totals.zeros_after == target_count(0.5, report.totals.prunable_params)
    onnx.checker.check_model(pruned, full_check=True)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    acc = (sess.run(None, {"input": data["input"]})[0].argmax(1) == data["labels"]).mean()
    assert acc > 0.97  # measured: 0.982 (QDQ) and 0.984 (QOperator) at 50%; float model 0.987
    scales = {t.name for t in onnx.load(out).graph.initializer if t.name.endswith("_scale")}
    assert scales and not scales & {t.name for t in report.tensors}


@pytest.mark.parametrize("per_channel", [False, True])
def test_onnxruntime_dynamic_quantization(tmp_path, per_channel):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from conftest import mlp

    (tmp_path / "f.onnx").write_bytes(mlp((64, 128, 32)).SerializeToString())
    quantize_dynamic(str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), weight_type=QuantType.QInt8,
                     per_channel=per_channel)
    quantized = onnx.load(tmp_path / "q.onnx")
    pruned, report = mp.prune_model(quantized, sparsity=0.5, min_numel=16)
    assert [(t.name, t.consumers, t.quantization) for t in report.tensors] == [
        (name, ["MatMulInteger"], f"{'per-axis (axis 1)' if per_channel else 'per-tensor'} via MatMulInteger")
        for name in ("W0_quantized", "W1_quantized")]
    n = 64 * 128 + 128 * 32
    assert report.totals.zeros_after == target_count(0.5, n)
    kept, dropped = [], []
    for name in ("W0", "W1"):
        q, p = init_of(quantized, f"{name}_quantized"), init_of(pruned, f"{name}_quantized")
        zp, scale = init_of(quantized, f"{name}_zero_point"), init_of(quantized, f"{name}_scale")
        magnitude = np.abs((q.astype(np.float64) - zp) * scale)  # the weight as MatMulInteger's scale Mul sees it
        is_zp = p == zp
        assert np.array_equal(p[~is_zp], q[~is_zp])  # kept entries untouched, pruned ones at the zero point
        kept.append(magnitude[~is_zp & (q != zp)]), dropped.append(magnitude[is_zp & (q != zp)])
    assert np.concatenate(dropped).max() <= np.concatenate(kept).min()  # one global threshold on dequantized |w|
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
    assert sess.run(None, {"x": np.ones((2, 64), np.float32)})[0].shape == (2, 32)


def test_matmulinteger_scales_that_cannot_be_read_say_why():
    q = numpy_helper.from_array(np.ones((64, 32), np.int8), "Wq")

    def model(scale_inputs, inits):
        nodes = [helper.make_node("MatMulInteger", ["x", "Wq"], ["acc"]),
                 helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                 helper.make_node("Mul", scale_inputs, ["s"]),
                 helper.make_node("Mul", ["accf", "s"], ["y"])]
        g = helper.make_graph(nodes, "g", [vi("x", [1, 64], TensorProto.UINT8)], [vi("y", [1, 32])], [q] + inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    two = model(["a", "b"], [numpy_helper.from_array(np.array(0.1, np.float32), n) for n in ("a", "b")])
    assert mp.inspect_model(two).skipped[0].reason == (
        "int8 weight of MatMulInteger: the Mul that scales its output multiplies two constants: which is the "
        "weight's scale is unknown, so it is not pruned")
    wrong = model(["a", "b"], [numpy_helper.from_array(np.ones(7, np.float32), "b")])
    wrong.graph.input.append(vi("a", []))
    assert mp.inspect_model(wrong).skipped[0].reason == (
        "int8 weight of MatMulInteger: the scale of shape [7] is neither per tensor nor per output column, "
        "so it is not pruned")


def test_a_zero_scale_channel_keeps_its_bytes_and_formats_say_why_quantized_weights_stay_dense(tmp_path):
    rng = np.random.default_rng(7)
    q = rng.integers(-128, 128, (64, 32)).astype(np.int8)
    scale = rng.uniform(0.01, 0.1, 32).astype(np.float32)
    scale[3] = 0.0  # a dead channel: every entry dequantizes to 0 whatever its byte
    zp = rng.integers(-5, 6, 32).astype(np.int8)
    model = qdq_model(q, scale, zp)
    same, _ = mp.prune_model(model, sparsity=0.0)
    assert np.array_equal(init_of(same, "Wq"), q)  # sparsity 0 changes nothing
    pruned, report = mp.prune_model(model, sparsity=0.5, format="sparse")
    changed = init_of(pruned, "Wq") != q
    assert not changed[:, 3].any()  # already 0: its bytes stay
    assert report.totals.zeros_after == target_count(0.5, q.size)
    t = report.tensors[0]
    assert t.format == "dense"
    assert t.format_note == "sparse: a quantized weight stays dense (its pruned entries hold the zero point, not 0)"


def test_bench_counts_the_dense_weights_of_compact_and_quantized_models(tmp_path):
    from onnx_magprune.bench import parameter_counts

    rng = np.random.default_rng(8)
    w = rng.standard_normal((64, 32)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g", [vi("x", [1, 64])],
                          [vi("y", [1, 32])], [numpy_helper.from_array(w, "W")])
    dense = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    for fmt in ("dense", "sparse", "compact"):
        out = tmp_path / f"{fmt}.onnx"
        onnx.save(dense, tmp_path / "m.onnx")
        mp.prune_file(tmp_path / "m.onnx", out, 0.9, format=fmt, overwrite=True)
        counts = parameter_counts(str(out))
        assert (counts["params"], counts["float_nonzero"]) == (2048, 2048 - target_count(0.9, 2048)), fmt
    q = rng.integers(-128, 128, (64, 32)).astype(np.int8)
    model = qdq_model(q, np.full(32, 0.05, np.float32), np.zeros(32, np.int8))
    pruned, _ = mp.prune_model(model, sparsity=0.75)
    counts = parameter_counts(pruned)
    assert counts["quantized_nonzero"] == int(np.count_nonzero(init_of(pruned, "Wq"))) == 2048 - 1536


def test_output_scope_and_pattern_on_qlinearconv_use_its_layout():
    rng = np.random.default_rng(15)
    w = rng.integers(-120, 120, (8, 4, 3, 3)).astype(np.int8)
    w[w == 0] = 1  # no entry starts at its zero point
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "xs"), numpy_helper.from_array(np.array(128, np.uint8), "xz"),
             numpy_helper.from_array(w, "Wq"), numpy_helper.from_array(np.full(8, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(8, np.int8), "wz"), numpy_helper.from_array(np.array(0.1, np.float32), "ys"),
             numpy_helper.from_array(np.array(128, np.uint8), "yz")]
    node = helper.make_node("QLinearConv", ["x", "xs", "xz", "Wq", "ws", "wz", "ys", "yz"], ["y"], pads=[1, 1, 1, 1])
    g = helper.make_graph([node], "g", [vi("x", [1, 4, 6, 6], TensorProto.UINT8)], [vi("y", None, TensorProto.UINT8)],
                          inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    pruned, report = mp.prune_model(model, sparsity=0.5, scope="output")
    zeros = init_of(pruned, "Wq") == 0
    assert report.tensors[0].selection == "output"
    assert np.array_equal(zeros.reshape(8, -1).sum(axis=1), [18] * 8)  # round(0.5 * 36) per output channel
    from onnx_magprune.methods import MethodOptions

    pruned, _ = mp.prune_model(model, method=MethodOptions(pattern="2:4"))
    zeros = init_of(pruned, "Wq") == 0
    assert np.array_equal(zeros.sum(axis=1), np.full((8, 3, 3), 2))  # along the input channels
    ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
