"""Rows weighted by the normalization a layer's output reaches (norm_sites + StatsRequest.row_weights)."""

import numpy as np
import pytest
from onnx import helper, numpy_helper

from conftest import make_model, run_ort, tensor_by_name, vi, weight
from onnx_magprune.api import prune_model
from onnx_magprune.calibration import open_calibration
from onnx_magprune.discovery import find_weights
from onnx_magprune.graph_index import GraphIndex
from onnx_magprune.layer_stats import StatsModel, StatsRequest
from onnx_magprune.layer_view import linear_view
from onnx_magprune.methods import MethodOptions
from onnx_magprune.norm_sites import NormSite, norm_sites
from onnx_magprune.structured_run import StructuredOptions

EPS = float(np.float32(1e-5))  # the attribute is a float32


def _norm_nodes(kind: str):
    """The norm reading ``s`` and writing ``y``, and its extra initializers."""
    gamma = numpy_helper.from_array(np.linspace(0.5, 1.5, 8).astype(np.float32), "g")
    beta = numpy_helper.from_array(np.full(8, 0.1, np.float32), "be")
    if kind == "layernorm":
        return [helper.make_node("LayerNormalization", ["s", "g", "be"], ["y"], axis=-1, epsilon=EPS)], [gamma, beta]
    if kind == "layernorm_axis0":
        return [helper.make_node("LayerNormalization", ["s", "g0", "be0"], ["y"], axis=0, epsilon=EPS)], [
            numpy_helper.from_array(np.ones((64, 8), np.float32), "g0"),
            numpy_helper.from_array(np.zeros((64, 8), np.float32), "be0")]
    if kind == "rms":
        return [helper.make_node("RMSNormalization", ["s", "g"], ["y"], axis=-1, epsilon=EPS)], [gamma]
    if kind == "decomposed":  # what torch.onnx writes below opset 17
        axes = numpy_helper.from_array(np.array([-1], np.int64), "axes")
        two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
        eps = numpy_helper.from_array(np.array(EPS, np.float32), "eps")
        nodes = [helper.make_node("ReduceMean", ["s", "axes"], ["mu"]), helper.make_node("Sub", ["s", "mu"], ["c"]),
                 helper.make_node("Pow", ["c", "two"], ["c2"]), helper.make_node("ReduceMean", ["c2", "axes"], ["var"]),
                 helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
                 helper.make_node("Div", ["c", "sd"], ["n"]), helper.make_node("Mul", ["n", "g"], ["ng"]),
                 helper.make_node("Add", ["ng", "be"], ["y"])]
        return nodes, [axes, two, eps, gamma, beta]
    if kind == "none":
        return [helper.make_node("Relu", ["s"], ["y"])], []
    raise ValueError(kind)


def _block(kind: str = "layernorm"):
    """y = Norm(x + relu(x @ W1 + b1) @ W2 + b2): a post-norm transformer feed-forward block."""
    inits = [numpy_helper.from_array(weight(shape, seed), name) for name, shape, seed in
             (("W1", (8, 16), 1), ("b1", (16,), 2), ("W2", (16, 8), 3), ("b2", (8,), 4))]
    norm, extra = _norm_nodes(kind)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"], ["h1"]),
             helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["f0"]),
             helper.make_node("Add", ["f0", "b2"], ["f"]), helper.make_node("Add", ["x", "f"], ["s"]), *norm]
    shape = [64, 8] if kind == "layernorm_axis0" else ["N", 8]
    return make_model(nodes, [vi("x", shape)], [vi("y", shape)], inits + extra, opset=23 if kind == "rms" else 17)


def _views(model, names=("W1", "W2")):
    index = GraphIndex(model)
    weights = {w.name: w for w in find_weights(index, min_numel=1).weights}
    return {n: linear_view(weights[n], index)[0] for n in names}


@pytest.mark.parametrize("kind, want", [
    ("layernorm", NormSite("s", True, EPS)),
    ("rms", NormSite("s", False, EPS)),
    ("decomposed", NormSite("s", True, 0.0)),  # its ε sits in a later Add: rows of normal scale do not notice
    ("layernorm_axis0", None),  # normalises across rows, not within each
    ("none", None),
])
def test_norm_sites_follow_the_bias_and_the_residual_add_to_a_last_axis_norm(kind, want):
    sites = norm_sites(_block(kind), _views(_block(kind)))
    assert sites.get("W2") == want
    assert "W1" not in sites  # its output goes through a Relu first


def _inputs(n=64, seed=7):
    """Rows of ordinary scale, and every 8th row 40x larger (the [CLS]/[SEP] tokens of a transformer)."""
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    x[::8] *= 40.0
    return x


def test_the_statistics_weight_each_row_by_the_inverse_variance_of_the_norm_input():
    model = _block()
    views = _views(model, ("W2",))
    fed = {"W2": tensor_by_name(model, "W2")}
    x = _inputs()
    sm = StatsModel(model, fed, views, open_calibration([{"x": x[:32]}, {"x": x[32:]}], model),
                    weighted=frozenset({"W2"}))
    got = sm.collect(StatsRequest(views, hessian=True, row_weights=True))["W2"]
    plain = sm.collect(StatsRequest(views, hessian=True))["W2"]
    t = {n: tensor_by_name(model, n).astype(np.float64) for n in ("W1", "b1", "W2", "b2")}
    x64 = x.astype(np.float64)
    h = np.maximum(x64 @ t["W1"] + t["b1"], 0)
    s = x64 + h @ t["W2"] + t["b2"]
    w = 1.0 / (s.var(axis=1) + EPS)
    assert got.row_weights_of == "s" and plain.row_weights_of is None
    np.testing.assert_allclose(got.hessian, (h * w[:, None]).T @ h, rtol=1e-4)
    np.testing.assert_allclose(got.col_sq, (h * h * w[:, None]).sum(axis=0), rtol=1e-4)
    np.testing.assert_allclose(plain.hessian, h.T @ h, rtol=1e-4)


def _post_norm_error(model, pruned, x) -> float:
    return float(np.linalg.norm(run_ort(pruned, {"x": x})[0] - run_ort(model, {"x": x})[0]))


def test_weighted_removal_reproduces_the_normalised_output_better():
    model = _block()
    x = _inputs(256)
    errors, reports = {}, {}
    for weighted in (True, False):
        pruned, rep = prune_model(model, 0.5, structured=StructuredOptions(norm_weighted=weighted), min_numel=1,
                                  method=MethodOptions(method="obs", calibration=[{"x": x}], holdout=0.0, damp=1e-6))
        errors[weighted] = _post_norm_error(model, pruned, x)
        reports[weighted] = rep.structured
    groups = {w: {g["producer"]: g for g in r["groups"]} for w, r in reports.items()}
    assert groups[True]["W1"]["rows_weighted_by"] == "s"
    assert groups[False]["W1"]["rows_weighted_by"] is None
    assert reports[True]["norm_weighted"] is True and reports[False]["norm_weighted"] is False
    assert groups[True]["W1"]["units_after"] == groups[False]["W1"]["units_after"] == 8
    # the unweighted fit spends itself on the 40x rows, whose error the norm divides by 40
    assert errors[True] < 0.9 * errors[False], errors  # measured 0.78x


@pytest.mark.parametrize("flag, weighted", [([], "s"), (["--unweighted"], None)])
def test_cli_norm_weighting_flag_reaches_the_report(tmp_path, flag, weighted):
    import json

    import onnx
    from click.testing import CliRunner

    from onnx_magprune.cli import main

    src, calib, out = tmp_path / "m.onnx", tmp_path / "c.npz", tmp_path / "o.onnx"
    onnx.save(_block(), src)
    np.savez(calib, x=_inputs(64))
    r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--structured", "neurons", "--sparsity", "0.5",
                                  "--min-numel", "1", "--calibration", str(calib), "--holdout", "0", "--json", *flag])
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)["structured"]
    assert s["norm_weighted"] is (weighted is not None)
    assert {g["producer"]: g["rows_weighted_by"] for g in s["groups"]} == {"W1": weighted}


def _two_consumers():
    """W1's neurons feed W2 (then + x, LayerNorm) and W3 (a graph output): only W2 reaches the norm."""
    model = _block()
    model.graph.initializer.append(numpy_helper.from_array(weight((16, 4), 9), "W3"))
    model.graph.node.append(helper.make_node("MatMul", ["h", "W3"], ["z"]))
    model.graph.output.append(vi("z", ["N", 4]))
    return model


def test_a_group_whose_consumers_reach_different_places_is_not_weighted():
    x = _inputs(128)
    _, rep = prune_model(_two_consumers(), 0.5, structured=StructuredOptions(), min_numel=1,
                         method=MethodOptions(method="obs", calibration=[{"x": x}], holdout=0.0))
    (group,) = rep.structured["groups"]
    assert group["consumers"] == ["W2", "W3"] and group["units_after"] == 8
    assert group["rows_weighted_by"] is None  # W3's re-fit must not be weighted by W2's norm


def _two_blocks():
    """Two post-norm feed-forward blocks in a row (the second reads the first's normalised output)."""
    first = _block()
    inits = [numpy_helper.from_array(weight(shape, seed), name) for name, shape, seed in
             (("V1", (8, 16), 11), ("c1", (16,), 12), ("V2", (16, 8), 13), ("c2", (8,), 14))]
    nodes = [helper.make_node("MatMul", ["y", "V1"], ["k0"]), helper.make_node("Add", ["k0", "c1"], ["k1"]),
             helper.make_node("Relu", ["k1"], ["k"]), helper.make_node("MatMul", ["k", "V2"], ["e0"]),
             helper.make_node("Add", ["e0", "c2"], ["e"]), helper.make_node("Add", ["y", "e"], ["s2"]),
             helper.make_node("LayerNormalization", ["s2", "g", "be"], ["y2"], axis=-1, epsilon=EPS)]
    graph = first.graph
    return make_model([*graph.node, *nodes], [vi("x", ["N", 8])], [vi("y2", ["N", 8])],
                      [*graph.initializer, *inits])


def test_row_weights_survive_a_residual_match_and_stay_out_of_other_statistics_models():
    x = _inputs(128)
    opts = MethodOptions(method="obs", calibration=[{"x": x[:64]}, {"x": x[64:]}], holdout=0.0, match_dense=True)
    _, rep = prune_model(_two_blocks(), 0.5, "local", structured=StructuredOptions(), min_numel=1, method=opts)
    groups = {g["producer"]: g for g in rep.structured["groups"]}
    assert groups["W1"]["rows_weighted_by"] == "s"
    assert groups["V1"]["rows_weighted_by"] == "s2" and groups["V1"]["matched_dense"] is True
    # only the weights listed in ``weighted`` get their norm input as an extra output
    model = _two_blocks()
    views = _views(model, ("W2", "V2"))
    fed = {n: tensor_by_name(model, n) for n in views}
    calib = open_calibration([{"x": x}], model)
    outputs = lambda sm: {o.name for o in sm.proto.graph.output}  # noqa: E731
    assert not {"s", "s2"} & outputs(StatsModel(model, fed, views, calib))
    assert {"s", "s2"} & outputs(StatsModel(model, fed, views, calib, weighted=frozenset({"V2"}))) == {"s2"}
