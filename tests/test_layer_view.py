"""LinearView: each layout's [out, in] matrix and input rows reproduce the op's own maths (via ONNX Runtime)."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, run_ort, vi
from onnx_magprune.api import prune_model
from onnx_magprune.discovery import find_weights
from onnx_magprune.graph_index import GraphIndex
from onnx_magprune.layer_view import linear_view
from onnx_magprune.methods import MethodOptions


def _weight_and_view(model, name="W"):
    index = GraphIndex(model)
    w = next(w for w in find_weights(index, min_numel=1).weights if w.name == name)
    return w, linear_view(w, index)


LAYOUTS = {
    # name: (node, weight shape, input shape, output shape)
    "matmul_b": (helper.make_node("MatMul", ["x", "W"], ["y"]), (6, 5), (2, 3, 6), (2, 3, 5)),
    "matmul_a": (helper.make_node("MatMul", ["W", "x"], ["y"]), (5, 6), (2, 6, 3), (2, 5, 3)),
    "gemm_b": (helper.make_node("Gemm", ["x", "W"], ["y"]), (6, 5), (4, 6), (4, 5)),
    "gemm_bt": (helper.make_node("Gemm", ["x", "W"], ["y"], transB=1), (5, 6), (4, 6), (4, 5)),
    "gemm_bt_ta": (helper.make_node("Gemm", ["x", "W"], ["y"], transA=1, transB=1), (5, 6), (6, 4), (4, 5)),
    "conv": (helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 1], pads=[1, 0, 1, 2], dilations=[1, 2]),
             (5, 3, 3, 2), (2, 3, 7, 6), None),
    "conv_same": (helper.make_node("Conv", ["x", "W"], ["y"], auto_pad="SAME_UPPER"), (4, 2, 3, 3), (1, 2, 5, 5),
                  None),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matrix_and_rows_reproduce_the_op(layout):
    node, wshape, xshape, yshape = LAYOUTS[layout]
    rng = np.random.default_rng(3)
    W = rng.standard_normal(wshape).astype(np.float32)
    x = rng.standard_normal(xshape).astype(np.float32)
    model = make_model([node], [vi("x", list(xshape))], [vi("y", None)], [numpy_helper.from_array(W, "W")])
    y = run_ort(model, {"x": x})[0]
    _, (view, why) = _weight_and_view(model)
    assert why is None and view.layout == layout.replace("_ta", "").replace("_same", "")
    m = view.to_matrix(W)
    rows = view.rows(x)
    assert rows.shape[1] == m.shape[1]  # the reduction axis lines up
    got = rows.astype(np.float64) @ m.T.astype(np.float64)  # [n, out]
    if layout == "matmul_a":
        want = np.swapaxes(y, -1, -2).reshape(-1, y.shape[-2])
    elif layout.startswith("conv"):
        want = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1])
    else:
        want = y.reshape(-1, y.shape[-1])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.array_equal(view.from_matrix(m, W.shape), W)  # the round trip is exact


@pytest.mark.parametrize("layout,axis_check", [
    ("matmul_b", lambda W: W.reshape(-1, 4, W.shape[1])),  # [K, N]: groups along K (axis 0)
    ("gemm_bt", lambda W: W.reshape(W.shape[0], -1, 4)),  # [N, K]: groups along axis 1
])
def test_two_four_groups_run_along_the_reduction_axis(layout, axis_check):
    shapes = {"matmul_b": ((8, 6), (3, 8)), "gemm_bt": ((6, 8), (3, 8))}
    wshape, xshape = shapes[layout]
    node = helper.make_node("MatMul", ["x", "W"], ["y"]) if layout == "matmul_b" else \
        helper.make_node("Gemm", ["x", "W"], ["y"], transB=1)
    W = np.random.default_rng(5).standard_normal(wshape).astype(np.float32)
    model = make_model([node], [vi("x", list(xshape))], [vi("y", None)], [numpy_helper.from_array(W, "W")])
    pruned, report = prune_model(model, min_numel=1, method=MethodOptions(pattern="2:4"))
    P = numpy_helper.to_array(pruned.graph.initializer[0])
    groups = axis_check(P)
    zeros_per_group = (groups == 0).sum(axis=1 if layout == "matmul_b" else 2)
    assert (zeros_per_group == 2).all()
    assert report.totals.zeros_after == W.size // 2
    # the kept two are the two largest |w| of each group
    kept = np.sort(np.abs(axis_check(W)), axis=1 if layout == "matmul_b" else 2)
    assert np.isclose(np.sort(np.abs(groups), axis=1 if layout == "matmul_b" else 2), np.where(
        np.arange(4).reshape((1, 4, 1) if layout == "matmul_b" else (1, 1, 4)) >= 2, kept, 0)).all()


def test_conv_two_four_groups_run_along_input_channels():
    W = np.random.default_rng(6).standard_normal((3, 8, 2, 2)).astype(np.float32)
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], [vi("x", [1, 8, 4, 4])], [vi("y", None)],
                       [numpy_helper.from_array(W, "W")])
    pruned, _ = prune_model(model, min_numel=1, method=MethodOptions(pattern="2:4"))
    P = numpy_helper.to_array(pruned.graph.initializer[0])
    groups = P.reshape(3, 2, 4, 2, 2)  # input channels in groups of 4, per output channel and kernel position
    assert ((groups == 0).sum(axis=2) == 2).all()


@pytest.mark.parametrize("build,reason", [
    (lambda W: make_model([helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("MatMul", ["y", "W"], ["z"])],
                          [vi("x", [2, 8])], [vi("z", None)], [numpy_helper.from_array(W, "W")]), "feeds 2 ops"),
    (lambda W: make_model([helper.make_node("Transpose", ["W"], ["Wt"]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
                          [vi("x", [2, 8])], [vi("y", None)], [numpy_helper.from_array(W, "W")]), "through Transpose"),
    (lambda W: make_model([helper.make_node("Gemm", ["W", "x"], ["y"])], [vi("x", [8, 2])], [vi("y", None)],
                          [numpy_helper.from_array(W, "W")]),
     "a Gemm weight in slot A has no linear-layer view (calibrated criteria, output scope and N:M patterns need "
     "MatMul, Gemm or Conv)"),
])
def test_layouts_without_a_view_say_why(build, reason):
    W = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
    model = build(W)
    index = GraphIndex(model)
    w = find_weights(index, min_numel=1).weights[0]
    view, why = linear_view(w, index)
    assert view is None and reason in why


def test_pattern_skips_indivisible_and_unviewable_weights_with_reasons():
    W = np.random.default_rng(2).standard_normal((6, 4)).astype(np.float32)  # K = 6: not divisible by 4
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [2, 6])], [vi("y", None)],
                       [numpy_helper.from_array(W, "W")])
    pruned, report = prune_model(model, min_numel=1, method=MethodOptions(pattern="2:4"))
    assert report.tensors == []
    assert [s.reason for s in report.skipped] == ["pattern 2:4: its reduction dimension (6) is not divisible by M=4"]
    assert np.array_equal(numpy_helper.to_array(pruned.graph.initializer[0]), W)


def test_pattern_on_a_conv_needs_its_input_channels_divisible_by_m():
    """2:4 groups run along the input channels at each kernel position: I=6 cannot hold them even
    though I*kH*kW = 24 is divisible by 4; I=8 can, and every group of 4 channels keeps exactly 2."""
    rng = np.random.default_rng(3)
    for channels, ok in ((6, False), (8, True)):
        W = rng.standard_normal((4, channels, 2, 2)).astype(np.float32)
        model = make_model([helper.make_node("Conv", ["x", "W"], ["y"])], [vi("x", [1, channels, 5, 5])],
                           [vi("y", None)], [numpy_helper.from_array(W, "W")])
        pruned, report = prune_model(model, min_numel=1, method=MethodOptions(pattern="2:4"))
        if not ok:
            assert [s.reason for s in report.skipped] == [
                "pattern 2:4: its input channel count (6) is not divisible by M=4"]
            continue
        zeros = numpy_helper.to_array(pruned.graph.initializer[0]) == 0  # [O, I, kH, kW]
        per_group = zeros.reshape(4, 2, 4, 2, 2).sum(axis=2)  # groups of 4 consecutive input channels
        assert np.array_equal(per_group, np.full((4, 2, 2, 2), 2))


def test_grouped_conv_output_scope_and_pattern_use_its_layout_and_calibrated_criteria_fall_back():
    rng = np.random.default_rng(7)
    W = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)  # group=2: 8 output channels, 4 inputs each
    model = make_model([helper.make_node("Conv", ["x", "W"], ["y"], group=2, pads=[1, 1, 1, 1])],
                       [vi("x", ["N", 8, 6, 6])], [vi("y", None)], [numpy_helper.from_array(W, "W")])
    pruned, report = prune_model(model, 0.5, "output", min_numel=1)
    zeros = numpy_helper.to_array(pruned.graph.initializer[0]) == 0
    assert report.tensors[0].selection == "output"
    assert np.array_equal(zeros.reshape(8, -1).sum(axis=1), [18] * 8)  # round(0.5 * 36) per output channel
    pruned, _ = prune_model(model, min_numel=1, method=MethodOptions(pattern="2:4"))
    zeros = numpy_helper.to_array(pruned.graph.initializer[0]) == 0
    assert np.array_equal(zeros.sum(axis=1), np.full((8, 3, 3), 2))  # 2 of the 4 inputs per position
    x = rng.standard_normal((20, 8, 6, 6)).astype(np.float32)
    _, report = prune_model(model, 0.5, "local", min_numel=1,
                            method=MethodOptions(method="wanda", calibration=[{"x": x}], holdout=0.0))
    assert report.tensors[0].method["criterion"] == "magnitude"
    assert report.tensors[0].method["fallback"].startswith("a grouped convolution (group=2): its layer statistics")
