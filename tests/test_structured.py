"""Structured removal (--structured neurons): groups, skips, exact equivalence with the masked model."""

import hashlib

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, make_model, mlp, run_ort, tensor_by_name, vi
from onnx_magprune.api import prune_model
from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig, Rule
from onnx_magprune.errors import ConfigError, NonFiniteWeightError
from onnx_magprune.methods import MethodOptions
from onnx_magprune.structured import find_groups
from onnx_magprune.structured_rewrite import rewrite
from onnx_magprune.structured_run import StructuredOptions

TOL = dict(rtol=1e-5, atol=1e-5)  # removed vs masked: the same sums without the zero terms (float32 rounding)
S = StructuredOptions()


def _init(a, name):
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _w(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def ffn(gelu="erf", hidden=16, width=8):
    """PyTorch's FFN export: MatMul -> Add(bias, x) -> Gelu -> MatMul -> Add, then a residual Add."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["m1"], name="up"),
             helper.make_node("Add", ["b1", "m1"], ["h"], name="up_bias")]
    consts = [helper.make_node("Constant", [], [n], value=helper.make_tensor(n, TensorProto.FLOAT, [], [v]))
              for n, v in (("half", 0.5), ("one", 1.0), ("sqrt2", 1.4142135), ("c3", 0.044715), ("k", 0.7978846),
                           ("three", 3.0))]
    if gelu == "erf":
        nodes += [helper.make_node("Div", ["h", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
                  helper.make_node("Add", ["e", "one"], ["e1"]), helper.make_node("Mul", ["h", "e1"], ["g0"]),
                  helper.make_node("Mul", ["g0", "half"], ["g"])]
    else:  # tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
        nodes += [helper.make_node("Pow", ["h", "three"], ["h3"]), helper.make_node("Mul", ["h3", "c3"], ["h3c"]),
                  helper.make_node("Add", ["h", "h3c"], ["inner"]), helper.make_node("Mul", ["inner", "k"], ["ik"]),
                  helper.make_node("Tanh", ["ik"], ["t"]), helper.make_node("Add", ["t", "one"], ["t1"]),
                  helper.make_node("Mul", ["h", "t1"], ["g0"]), helper.make_node("Mul", ["g0", "half"], ["g"])]
    nodes += [helper.make_node("MatMul", ["g", "W2"], ["m2"], name="down"),
              helper.make_node("Add", ["b2", "m2"], ["f"], name="down_bias"),
              helper.make_node("Add", ["f", "x"], ["y"], name="residual")]
    inits = [_init(_w((width, hidden), 1), "W1"), _init(_w((hidden,), 2), "b1"),
             _init(_w((hidden, width), 3), "W2"), _init(_w((width,), 4), "b2")]
    return make_model(consts + nodes, [vi("x", ["B", "T", width])], [vi("y", ["B", "T", width])], inits)


def cnn():
    """Conv -> BatchNormalization -> Relu -> Conv -> Relu -> MaxPool -> Flatten -> Gemm(transB=1) -> Relu -> Gemm."""
    nodes = [helper.make_node("Conv", ["x", "C1", "c1b"], ["a"], pads=[1, 1, 1, 1], name="conv1"),
             helper.make_node("BatchNormalization", ["a", "g", "be", "mu", "var"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["r"]),
             helper.make_node("Conv", ["r", "C2", "c2b"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("MaxPool", ["r2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Flatten", ["p"], ["fl"], axis=1),
             helper.make_node("Gemm", ["fl", "F1", "f1b"], ["h"], transB=1, name="fc1"),
             helper.make_node("Relu", ["h"], ["hr"]),
             helper.make_node("Gemm", ["hr", "F2", "f2b"], ["logits"], transB=1, name="fc2")]
    rng = np.random.default_rng(5)
    inits = [_init(_w((6, 2, 3, 3), 1), "C1"), _init(_w((6,), 2), "c1b"),
             _init(rng.uniform(0.5, 1.5, 6), "g"), _init(_w((6,), 3), "be"), _init(_w((6,), 4), "mu"),
             _init(rng.uniform(0.5, 2.0, 6), "var"),
             _init(_w((8, 6, 3, 3), 6), "C2"), _init(_w((8,), 7), "c2b"),
             _init(_w((12, 8 * 4 * 4), 8), "F1"), _init(_w((12,), 9), "f1b"),
             _init(_w((5, 12), 10), "F2"), _init(_w((5,), 11), "f2b")]
    return make_model(nodes, [vi("x", ["N", 2, 8, 8])], [vi("logits", ["N", 5])], inits)


def _masked(model, rep):
    """The masked-but-not-removed reference, built independently: consumer input slices of removed units zeroed."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    groups, _ = find_groups(m)
    by_producer = {g.producer: g for g in groups}
    plans = [(by_producer[g["producer"]], np.array(g["removed_units"], dtype=np.int64))
             for g in rep.structured["groups"]]
    return rewrite(m, plans, mode="mask")


def _check_equal(model, pruned, rep, feeds):
    masked = _masked(model, rep)
    for a, b in zip(run_ort(masked, feeds), run_ort(pruned, feeds)):
        np.testing.assert_allclose(b, a, **TOL)
    onnx.checker.check_model(pruned, full_check=True)


# --- patterns: removed == masked -------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["local", "global"])
def test_mlp_chain_removed_matches_masked(scope):
    model = mlp((8, 16, 12, 4))
    pruned, rep = prune_model(model, 0.5, scope, structured=S, min_numel=0)
    groups = rep.structured["groups"]
    assert [g["producer"] for g in groups] == ["W0", "W1"]
    assert sum(g["units_before"] - g["units_after"] for g in groups) == 14  # round(0.5 * 28)
    if scope == "local":
        assert tensor_by_name(pruned, "W0").shape == (8, 8) and tensor_by_name(pruned, "b0").shape == (8,)
        assert tensor_by_name(pruned, "W1").shape == (8, 6) and tensor_by_name(pruned, "W2").shape == (6, 4)
    assert [(s["producer"], s["reason"]) for s in rep.structured["skipped"]] == [
        ("W2", "it reaches the graph output 'y'")]
    x = _w((5, 8), 42)
    _check_equal(model, pruned, rep, {"x": x})


@pytest.mark.parametrize("gelu", ["erf", "tanh"])
def test_pytorch_ffn_removed_matches_masked(gelu):
    model = ffn(gelu)
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    (g,) = rep.structured["groups"]
    assert g["producer"] == "W1" and g["consumers"] == ["W2"] and g["units_before"] == 16 and g["units_after"] == 8
    assert set(g["tensors"]) == {"W1", "b1", "W2"}
    assert tensor_by_name(pruned, "W1").shape == (8, 8) and tensor_by_name(pruned, "b1").shape == (8,)
    assert tensor_by_name(pruned, "W2").shape == (8, 8)
    assert g["params_before"] == 8 * 16 + 16 + 16 * 8 and g["params_after"] == 8 * 8 + 8 + 8 * 8
    reasons = {s["producer"]: s["reason"] for s in rep.structured["skipped"]}
    assert reasons == {"W2": "it reaches a residual Add 'residual' with another branch ('x')"}
    _check_equal(model, pruned, rep, {"x": _w((2, 3, 8), 7)})


def test_conv_bn_relu_conv_and_flatten_gemm_match_masked():
    model = cnn()
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    got = {g["producer"]: (g["units_before"], g["units_after"], g["chain"]) for g in rep.structured["groups"]}
    assert got == {"C1": (6, 3, ["BatchNormalization", "Relu"]), "C2": (8, 4, ["Relu", "MaxPool", "Flatten"]),
                   "F1": (12, 6, ["Relu"])}
    assert tensor_by_name(pruned, "C1").shape == (3, 2, 3, 3) and tensor_by_name(pruned, "var").shape == (3,)
    assert tensor_by_name(pruned, "C2").shape == (4, 3, 3, 3)
    assert tensor_by_name(pruned, "F1").shape == (6, 4 * 16)  # Flatten: 16 features per channel
    assert tensor_by_name(pruned, "F2").shape == (5, 6)  # Gemm transB=1: input dim is axis 1
    assert rep.structured["skipped"] == [{"producer": "F2", "producer_op": "Gemm", "units": 5,
                                          "reason": "it reaches the graph output 'logits'"}]
    _check_equal(model, pruned, rep, {"x": _w((3, 2, 8, 8), 9)})


def test_gemm_transb_removal_cuts_the_right_axes():
    W = _w((6, 4), 1)  # Gemm transB=1: [out, in]
    V = _w((3, 6), 2)
    nodes = [helper.make_node("Gemm", ["x", "W", "b"], ["h"], transB=1),
             helper.make_node("Sigmoid", ["h"], ["s"]),
             helper.make_node("Gemm", ["s", "V"], ["y"], transB=1)]
    model = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 3])],
                       [_init(W, "W"), _init(_w((6,), 3), "b"), _init(V, "V")])
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    removed = rep.structured["groups"][0]["removed_units"]
    kept = [i for i in range(6) if i not in removed]
    np.testing.assert_array_equal(tensor_by_name(pruned, "W"), W[kept])
    np.testing.assert_array_equal(tensor_by_name(pruned, "V"), V[:, kept])
    norms = np.linalg.norm(W, axis=1)
    assert sorted(removed) == sorted(np.argsort(norms, kind="stable")[:3].tolist())
    _check_equal(model, pruned, rep, {"x": _w((4, 4), 5)})


def test_l1_norm_ranks_by_absolute_sum():
    W = np.array([[3.0, 0.1, 1.0, 1.0], [0.0, 0.1, 1.0, 1.0], [0.0, 2.0, 1.0, -1.0]], np.float32)  # [in 3, out 4]
    # unit 0: l1 3, l2 3; unit 1: l1 2.2, l2 ~2.0; unit 2: l1 3, l2 1.73; unit 3: l1 3, l2 1.73
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "V"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 3])], [vi("y", ["N", 2])], [_init(W, "W"), _init(_w((4, 2), 1), "V")])
    _, l1 = prune_model(model, 0.25, "local", structured=StructuredOptions(norm="l1"), min_numel=0)
    _, l2 = prune_model(model, 0.25, "local", structured=StructuredOptions(norm="l2"), min_numel=0)
    assert l1.structured["groups"][0]["removed_units"] == [1]
    assert l2.structured["groups"][0]["removed_units"] == [2]  # ties (2, 3) break to the lower index


# --- skips -------------------------------------------------------------------------------------------


def _one(nodes, inits, outputs=("y",), inputs=(("x", ["N", 4]),)):
    model = make_model(nodes, [vi(n, s) for n, s in inputs], [vi(o, None) for o in outputs], inits)
    groups, skipped = find_groups(model)
    return {g.producer for g in groups}, {s.producer: s.reason for s in skipped}


def test_skip_reasons_are_exact():
    W, V = _init(_w((4, 6), 1), "W"), _init(_w((6, 4), 2), "V")
    shape = helper.make_tensor("shape", TensorProto.INT64, [3], [0, 2, 3])
    cases = {
        "reshape": ([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Reshape", ["h", "shape"], ["y"],
                                                                                          name="heads")],
                    [W, shape], "it reaches Reshape 'heads' (e.g. a split into attention heads): the channel layout "
                                "changes"),
        "concat": ([helper.make_node("MatMul", ["x", "W"], ["h"]),
                    helper.make_node("Concat", ["h", "h"], ["c"], axis=-1, name="cat"),
                    helper.make_node("MatMul", ["c", "V2"], ["y"])],
                   [W, _init(_w((12, 4), 3), "V2")], "it reaches Concat 'cat': other tensors share its channel axis"),
        "split": ([helper.make_node("MatMul", ["x", "W"], ["h"]),
                   helper.make_node("Split", ["h"], ["y", "y2"], axis=-1, num_outputs=2, name="sp")],
                  [W], "it reaches Split 'sp': it cuts the channel axis at fixed sizes"),
        "output": ([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
                   [W], "it reaches the graph output 'y'"),
        "residual": ([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["x", "W3"], ["k"]),
                      helper.make_node("Add", ["h", "k"], ["s"], name="res"),
                      helper.make_node("MatMul", ["s", "V"], ["y"])],
                     [W, _init(_w((4, 6), 4), "W3"), V], "it reaches a residual Add 'res' with another branch ('k')"),
        "shape": ([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Shape", ["h"], ["sh"], name="s"),
                   helper.make_node("MatMul", ["h", "V"], ["y"])], [W, V], "its shape is read by Shape 's'"),
    }
    for name, (nodes, inits, reason) in cases.items():
        outputs = ("y", "y2") if name == "split" else ("y", "sh") if name == "shape" else ("y",)
        model = make_model(nodes, [vi("x", ["N", 4])], [vi(o, None) for o in outputs], inits, opset=18)
        _groups, skipped = find_groups(model)
        assert {s.producer: s.reason for s in skipped}["W"] == reason, name


def test_shared_weights_and_constants_are_skipped():
    W, V = _init(_w((4, 6), 1), "W"), _init(_w((6, 4), 2), "V")
    shared = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("MatMul", ["x", "W"], ["h2"]),
                         helper.make_node("Add", ["h", "h2"], ["s"]), helper.make_node("MatMul", ["s", "V"], ["y"])],
                        [vi("x", ["N", 4])], [vi("y", None)], [W, V])
    _g, skipped = find_groups(shared)
    assert skipped[0].reason == "its weight 'W' is shared by 2 ops"
    scale = _init(_w((6,), 5), "scale")
    two = make_model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "scale"], ["a"]),
                      helper.make_node("MatMul", ["a", "V"], ["y"]), helper.make_node("MatMul", ["x", "W4"], ["k"]),
                      helper.make_node("Mul", ["k", "scale"], ["y2"])],
                     [vi("x", ["N", 4])], [vi("y", None), vi("y2", None)], [W, V, scale, _init(_w((4, 6), 6), "W4")])
    groups, skipped = find_groups(two)
    assert not groups
    assert {s.producer: s.reason for s in skipped}["W"] == (
        "the per-channel constant 'scale' is also read by Mul input 1")


def test_subgraph_use_is_skipped():
    W, V = _init(_w((4, 6), 1), "W"), _init(_w((6, 4), 2), "V")
    branch = helper.make_graph([helper.make_node("MatMul", ["h", "V"], ["z"])], "then", [], [vi("z", None)])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch)]
    model = make_model(nodes, [vi("x", ["N", 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", None)], [W, V])
    _g, skipped = find_groups(model)
    assert skipped[0].reason.startswith("'h' is read inside a subgraph")


def test_layers_the_search_does_not_take_are_listed_with_the_reason():
    inner = helper.make_graph([helper.make_node("MatMul", ["x", "U"], ["z"], name="inner")], "then", [],
                              [vi("z", None)], [_init(_w((4, 3), 3), "U")])
    bf16 = helper.make_tensor("B", TensorProto.BFLOAT16, [4, 5], np.zeros(20, np.uint16).tobytes(), raw=True)
    nodes = [helper.make_node("Cast", ["B"], ["Bf"], name="to_float", to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "Bf"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner)]
    model = make_model(nodes, [vi("x", ["N", 4]), vi("cond", [], TensorProto.BOOL)], [vi("y", None), vi("h", None)],
                       [bf16])
    _g, skipped = find_groups(model)
    assert [(s.producer, s.producer_op, s.units, s.reason) for s in skipped] == [
        ("B", "MatMul", 5, "its weight reaches MatMul 'mm' through Cast 'to_float': only weights the layer reads "
                           "directly are cut"),
        ("U", "MatMul", 3, "it is inside a subgraph (main/If 'y'.else_branch): only the top-level graph is searched"),
        ("U", "MatMul", 3, "it is inside a subgraph (main/If 'y'.then_branch): only the top-level graph is searched")]


# --- config, counts, determinism -------------------------------------------------------------------


def test_min_units_and_global_vs_local_counts():
    model = mlp((8, 16, 12, 4))
    _, rep = prune_model(model, 0.9, "local", structured=StructuredOptions(min_units=3), min_numel=0)
    assert [g["units_after"] for g in rep.structured["groups"]] == [3, 3]  # round(0.9*16)=14 capped at 13, 11 -> 9
    _, glob = prune_model(model, 0.5, "global", structured=S, min_numel=0)
    assert sum(g["units_before"] - g["units_after"] for g in glob.structured["groups"]) == 14
    assert all(g["selection"] == "global" for g in glob.structured["groups"])


def gpt2_conv1d_mlp(shared_bias=False):
    """GPT-2's MLP as its TorchScript export writes it: Conv1D is view(-1, C) -> addmm (Gemm) -> view(*x.size()[:-1], nf),
    with the sizes read by Shape at run time (leading dims, and the activation's own last dim)."""
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    inits = [_init(_w((8, 16), 1), "W1"), _init(_w((16,), 2), "b1"), _init(_w((16, 8), 3), "W2"), _init(_w((8,), 4), "b2"),
             i64("flat8", [-1, 8]), i64("nf16", [16]), i64("nf8", [8]), i64("zero", 0), i64("one", 1), i64("ax0", [0]),
             i64("minus1", [-1]), i64("minus1b", [-1]), i64("end", [2 ** 63 - 1]), i64("zero_ax", [0]), i64("zero2", 0),
             i64("one2", 1), i64("ax0b", [0]), i64("ax0c", [0]), i64("ax0d", [0]), i64("ax0e", [0])]
    nodes = [
        helper.make_node("Shape", ["x"], ["sx"]),
        helper.make_node("Gather", ["sx", "zero"], ["n"], axis=0), helper.make_node("Unsqueeze", ["n", "ax0"], ["un"]),
        helper.make_node("Gather", ["sx", "one"], ["t"], axis=0), helper.make_node("Unsqueeze", ["t", "ax0b"], ["ut"]),
        helper.make_node("Reshape", ["x", "flat8"], ["x2"]),
        helper.make_node("Gemm", ["x2", "W1", "b1"], ["h2"]),
        helper.make_node("Concat", ["un", "ut", "nf16"], ["shape_h"], axis=0),
        helper.make_node("Reshape", ["h2", "shape_h"], ["h"]),
        helper.make_node("Tanh", ["h"], ["a"]),
        helper.make_node("Shape", ["a"], ["sa"]),  # x.size()[:-1] for the output view: leading dims only
        helper.make_node("Gather", ["sa", "zero2"], ["n2"], axis=0), helper.make_node("Unsqueeze", ["n2", "ax0c"], ["un2"]),
        helper.make_node("Gather", ["sa", "one2"], ["t2"], axis=0), helper.make_node("Unsqueeze", ["t2", "ax0d"], ["ut2"]),
        helper.make_node("Shape", ["a"], ["sa_last"]),  # x.size(-1) for view(-1, x.size(-1))
        helper.make_node("Slice", ["sa_last", "minus1b", "end", "zero_ax"], ["last"]),
        helper.make_node("Concat", ["minus1", "last"], ["shape_a2"], axis=0),
        helper.make_node("Reshape", ["a", "shape_a2"], ["a2"]),
        helper.make_node("Gemm", ["a2", "W2", "b2"], ["y2"]),
        helper.make_node("Concat", ["un2", "ut2", "nf8"], ["shape_y"], axis=0),
        helper.make_node("Reshape", ["y2", "shape_y"], ["y"]),
    ]
    return make_model(nodes, [vi("x", ["N", "T", 8])], [vi("y", ["N", "T", 8])], inits)


def test_gpt2_conv1d_reshapes_are_followed_and_their_sizes_cut():
    model = gpt2_conv1d_mlp()
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    groups = rep.structured["groups"]
    assert [(g["producer"], g["units_after"], g["chain"]) for g in groups] == [("W1", 8, ["Reshape", "Tanh", "Reshape"])]
    assert tensor_by_name(pruned, "nf16").tolist() == [8] and tensor_by_name(pruned, "W2").shape == (8, 8)
    assert tensor_by_name(pruned, "flat8").tolist() == [-1, 8] and tensor_by_name(pruned, "nf8").tolist() == [8]
    _check_equal(model, pruned, rep, {"x": _w((2, 3, 8), 42)})
    # the size constant also read by another Reshape (exporters fold equal constants across layers):
    # the cut Reshape gets its own lowered copy, the other keeps 16
    other = gpt2_conv1d_mlp()
    other.graph.node.append(helper.make_node("Identity", ["nf16"], ["spare"]))  # another reader of nf16
    other.graph.output.append(vi("spare", [1], TensorProto.INT64))
    pruned, rep = prune_model(other, 0.5, "local", structured=S, min_numel=0)
    assert [g["units_after"] for g in rep.structured["groups"]] == [8]
    assert tensor_by_name(pruned, "nf16").tolist() == [16]
    concat = next(n for n in pruned.graph.node if n.output[0] == "shape_h")  # read by h alone: edited in place
    assert concat.input[-1] == "nf16__h" and tensor_by_name(pruned, "nf16__h").tolist() == [8]
    taken = onnx.ModelProto.FromString(other.SerializeToString())  # a name already declared is not reused
    taken.graph.value_info.append(vi("nf16__h", [1], TensorProto.INT64))
    pruned_taken, _ = prune_model(taken, 0.5, "local", structured=S, min_numel=0)
    assert next(n for n in pruned_taken.graph.node if n.output[0] == "shape_h").input[-1] == "nf16__h_1"
    onnx.checker.check_model(pruned, full_check=True)
    _check_equal(other, pruned, rep, {"x": _w((2, 4, 8), 42)})
    # a target read through a Cast by others too: no private copy, the reason says why
    shared_cast = gpt2_conv1d_mlp()
    at = next(i for i, n in enumerate(shared_cast.graph.node) if n.output[0] == "h")
    shared_cast.graph.node[at].input[1] = "shape_h_cast"
    shared_cast.graph.node.insert(at, helper.make_node("Cast", ["shape_h"], ["shape_h_cast"], to=TensorProto.INT64))
    shared_cast.graph.node.append(helper.make_node("Identity", ["nf16"], ["spare"]))
    _, rep = prune_model(shared_cast, 0.5, "local", structured=S, min_numel=0)
    assert rep.structured["groups"] == []
    assert rep.structured["skipped"][0]["reason"] == (
        "it reaches Reshape 'h', which keeps the units as the last axis, but its target shape's unit count 'nf16' "
        "is also read by Identity input 0: cutting it would change that too")


def test_a_tensordot_style_reshape_with_allowzero_and_an_int32_target_behind_a_cast_is_cut():
    """tf2onnx's Dense on [B, T, C]: Reshape(x, [-1, C]) -> MatMul -> Reshape(h, Cast(Concat(Gather(
    Cast(Shape(x)), [0, 1]) as int32, [units]))); dynamo writes allowzero=1 on such reshapes."""
    i32 = lambda name, v: numpy_helper.from_array(np.array(v, np.int32), name)  # noqa: E731
    i64 = lambda name, v: numpy_helper.from_array(np.array(v, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("MatMul", ["x2", "W1"], ["h2"]),
             helper.make_node("Shape", ["x"], ["sx"]),
             helper.make_node("Cast", ["sx"], ["sx32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["sx32", "lead_axes"], ["lead32"], axis=0),
             helper.make_node("Concat", ["lead32", "units"], ["t32"], axis=0),
             helper.make_node("Cast", ["t32"], ["t64"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["h2", "t64"], ["h"], allowzero=1),
             helper.make_node("Relu", ["h"], ["a"]),
             # the next Dense: its output shape from Gather(Cast(Shape(a)), [0, 1]): leading axes only
             helper.make_node("Shape", ["a"], ["sa"]),
             helper.make_node("Cast", ["sa"], ["sa32"], to=TensorProto.INT32),
             helper.make_node("Gather", ["sa32", "lead_axes"], ["lead_a"], axis=0),
             helper.make_node("Concat", ["lead_a", "out8"], ["ta32"], axis=0),
             helper.make_node("Cast", ["ta32"], ["ta64"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["a", "flat16"], ["a2"]),
             helper.make_node("MatMul", ["a2", "W2"], ["y2"]),
             helper.make_node("Reshape", ["y2", "ta64"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", "T", 8])], [vi("y", ["N", "T", 8])],
                       [_init(_w((8, 16), 1), "W1"), _init(_w((16, 8), 2), "W2"), i64("flat", [-1, 8]),
                        i32("units", [16]), i64("flat16", [-1, 16]),
                        i64("lead_axes", [0, 1]), i32("out8", [8])])
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    (group,) = rep.structured["groups"]
    assert group["producer"] == "W1" and group["units_after"] == 8
    assert tensor_by_name(pruned, "flat16").tolist() == [-1, 8] and tensor_by_name(pruned, "W2").shape == (8, 8)
    reads_units = onnx.ModelProto.FromString(model.SerializeToString())
    reads_units.graph.initializer.append(i64("axes02", [0, 2]))  # a Gather that reads the units' axis
    next(n for n in reads_units.graph.node if n.output[0] == "lead_a").input[1] = "axes02"
    _, rep2 = prune_model(reads_units, 0.5, "local", structured=S, min_numel=0)
    assert rep2.structured["groups"] == [] and rep2.structured["skipped"][0]["reason"] == \
        "its shape is read by Shape 'sa'"
    units = next(t for t in pruned.graph.initializer if t.name == "units")
    assert units.data_type == TensorProto.INT32 and numpy_helper.to_array(units).tolist() == [8]
    _check_equal(model, pruned, rep, {"x": _w((2, 3, 8), 43)})


@pytest.mark.parametrize("gate_first", [True, False])
def test_gated_feed_forward_pairs_are_cut_together(gate_first):
    """LLaMA's SwiGLU: down(silu(x W_gate) * (x W_up + b_up)); the two producers' units meet in a Mul."""
    gate = [helper.make_node("MatMul", ["x", "Wg"], ["g"]), helper.make_node("Sigmoid", ["g"], ["sg"]),
            helper.make_node("Mul", ["g", "sg"], ["silu"])]
    up = [helper.make_node("MatMul", ["x", "Wu"], ["u0"]), helper.make_node("Add", ["u0", "bu"], ["u"])]
    nodes = (gate + up if gate_first else up + gate) + [helper.make_node("Mul", ["silu", "u"], ["h"]),
                                                      helper.make_node("MatMul", ["h", "Wd"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])],
                       [_init(_w((8, 16), 1), "Wg"), _init(_w((8, 16), 2), "Wu"), _init(_w((16,), 3), "bu"),
                        _init(_w((16, 8), 4), "Wd")])
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    (group,) = rep.structured["groups"]
    first, second = ("Wg", "Wu") if gate_first else ("Wu", "Wg")
    assert group["producer"] == first and group["co_producers"] == [second]
    assert set(group["tensors"]) == {"Wg", "Wu", "bu", "Wd"}
    assert group["units_after"] == 8 and second not in {s["producer"] for s in rep.structured["skipped"]}
    assert [tensor_by_name(pruned, n).shape for n in ("Wg", "Wu", "bu", "Wd")] == [(8, 8), (8, 8), (8,), (8, 8)]
    _check_equal(model, pruned, rep, {"x": _w((5, 8), 42)})


def test_a_producer_bias_read_elsewhere_stops_its_group():
    """Exporters that merge equal (zero) biases read one Gemm's C through Identity in another layer."""
    nodes = [helper.make_node("Gemm", ["x", "W0", "b0"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W1"], ["y"]), helper.make_node("Identity", ["b0"], ["b0_copy"])]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4]), vi("b0_copy", None)],
                       [_init(_w((8, 16), 1), "W0"), _init(_w((16,), 2), "b0"), _init(_w((16, 4), 3), "W1")])
    _, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    assert rep.structured["groups"] == []
    assert rep.structured["skipped"][0]["reason"] == "its bias 'b0' is also read by Identity input 0"


def test_global_without_data_compares_layers_relative_to_their_own_scale():
    model = mlp((8, 32, 32, 4))
    for t in model.graph.initializer:
        if t.name == "W1":  # a layer whose weights are all 100x smaller: it must not be the one emptied
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 0.01, "W1"))
    _, rep = prune_model(model, 0.5, "global", structured=S, min_numel=0)
    removed = {g["producer"]: g["units_before"] - g["units_after"] for g in rep.structured["groups"]}
    assert sum(removed.values()) == 32 and 8 <= removed["W1"] <= 24, removed


def test_overridable_weights_get_their_graph_input_shapes_cut_too():
    model = mlp((8, 16, 4))
    for t in model.graph.initializer:  # old IR style: every initializer is also a graph input
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0, include_overridable=True)
    assert [g["units_after"] for g in rep.structured["groups"]] == [8]
    declared = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
    assert declared["W0"] == [8, 8] and declared["b0"] == [8] and declared["W1"] == [8, 4]
    _check_equal(mlp((8, 16, 4)), pruned, rep, {"x": _w((5, 8), 42)})  # full check; onnxruntime loads it


def test_nonfinite_weights_stop_or_skip_their_group():
    model = mlp((8, 16, 12, 4))
    w1 = numpy_helper.to_array(model.graph.initializer[2]).copy()  # W1: produces group W1, consumes group W0
    w1[3, 5] = np.nan
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w1, "W1"))
    with pytest.raises(NonFiniteWeightError, match=r"weight 'W1' holds 1 NaN/Inf value\(s\)"):
        prune_model(model, 0.5, "local", structured=S, min_numel=0)
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0, nonfinite="keep")
    assert rep.structured["groups"] == []
    assert {s["producer"]: s["reason"] for s in rep.structured["skipped"]} == {
        "W0": "'W1' holds 1 NaN/Inf value(s) (--nonfinite keep leaves its group as it is)",
        "W1": "'W1' holds 1 NaN/Inf value(s) (--nonfinite keep leaves its group as it is)",
        "W2": "it reaches the graph output 'y'"}


def test_exclusions_and_fixed_rules_are_honoured():
    model = mlp((8, 16, 12, 4))
    _, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0, exclude=["W0"])
    assert [g["producer"] for g in rep.structured["groups"]] == ["W1"]
    reasons = {s["producer"]: s["reason"] for s in rep.structured["skipped"]}
    assert reasons["W0"] == "excluded by --exclude (name='W0')"
    _, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0, exclude=["W2"])
    reasons = {s["producer"]: s["reason"] for s in rep.structured["skipped"]}
    assert reasons["W1"] == "its consumer weight 'W2' is excluded by --exclude (name='W2')"
    cfg = PruneConfig(rules=(Rule(name="W1", sparsity=0.25),))
    _, rep = prune_model(model, 0.5, "local", config=cfg, structured=S, min_numel=0)
    by = {g["producer"]: g for g in rep.structured["groups"]}
    assert by["W1"]["selection"] == "fixed" and by["W1"]["units_after"] == 9 and by["W0"]["units_after"] == 8


def test_bad_options_are_config_errors():
    model = mlp()
    with pytest.raises(ConfigError, match="no sparsity"):
        prune_model(model, structured=S)
    with pytest.raises(ConfigError, match="--scope output"):
        prune_model(model, 0.5, "output", structured=S)
    with pytest.raises(ConfigError, match="--pattern"):
        prune_model(model, 0.5, structured=S, method=MethodOptions(pattern="2:4"))
    with pytest.raises(ConfigError, match="dense"):
        prune_model(model, 0.5, structured=S, format="sparse")
    with pytest.raises(ConfigError, match="norm"):
        StructuredOptions(norm="l3")
    with pytest.raises(ConfigError, match="min_units"):
        StructuredOptions(min_units=0)


def test_cli_end_to_end_is_deterministic_and_leaves_input_alone(tmp_path):
    src = MODELS / "digits_mlp.onnx"
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}.onnx"
        r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--structured", "neurons",
                                      "--sparsity", "0.5", "--scope", "local", "--json"])
        assert r.exit_code == 0, r.output
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before
    import json

    rep = json.loads(r.output)
    t = rep["structured"]["totals"]
    assert t["units_before"] == 384 and t["units_after"] == 192 and t["params_after"] < t["params_before"]
    assert t["model_bytes_after"] < t["model_bytes_before"]
    assert rep["tensors"] == []


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "o.onnx"
    r = CliRunner().invoke(main, ["prune", str(MODELS / "digits_mlp.onnx"), "-o", str(out), "--structured",
                                  "neurons", "--sparsity", "0.5", "--pattern", "2:4"])
    assert r.exit_code == 2 and "pick one" in r.output and not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_external_data_is_rewritten_into_a_fresh_data_file(tmp_path):
    model = cnn()
    src = tmp_path / "in.onnx"
    onnx.save(cnn(), src, save_as_external_data=True, all_tensors_to_one_file=True, location="in.data",
              size_threshold=0)
    data_before = (tmp_path / "in.data").read_bytes()
    out = tmp_path / "out.onnx"
    from onnx_magprune.api import prune_file

    rep = prune_file(src, out, 0.5, "local", structured=S, min_numel=0)
    assert (tmp_path / "in.data").read_bytes() == data_before
    assert (tmp_path / "out.onnx.data").exists()
    pruned = onnx.load(out)
    assert tensor_by_name(pruned, "C2").shape == (4, 3, 3, 3)
    _check_equal(model, pruned, rep, {"x": _w((2, 2, 8, 8), 3)})


def _i64(values, name):
    return numpy_helper.from_array(np.asarray(values, np.int64), name)


def _stops(model):
    _, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    return rep.structured["groups"] == []


def test_reshapes_and_gates_that_would_move_the_units_stop_the_group():
    w = [_init(_w((8, 16), 1), "W1"), _init(_w((16, 4), 3), "W2")]
    head = [helper.make_node("MatMul", ["x", "W1"], ["h"])]
    tail = [helper.make_node("Reshape", ["h", "shp"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["s"], axis=1), helper.make_node("Reshape", ["s", "back"], ["y"])]
    io = ([vi("x", ["N", 8])], [vi("y", ["N", 4])])
    # a 0 in the target copies the input's unit axis into axis 1
    assert _stops(make_model(head + tail, *io, w + [_i64([-1, 0, 16], "shp"), _i64([-1, 4], "back")]))
    # the units' own size read at run time but placed before the last axis: [-1, C, C]
    own = [helper.make_node("Shape", ["h"], ["sh"]), helper.make_node("Gather", ["sh", "im1"], ["c"], axis=0),
           helper.make_node("Unsqueeze", ["c", "ax0"], ["uc"]),
           helper.make_node("Slice", ["sh", "sm1", "end", "ax0"], ["last"]),
           helper.make_node("Concat", ["m1", "uc", "last"], ["shp"], axis=0)]
    assert _stops(make_model(head + own + tail, *io, w + [_i64([-1], "m1"), _i64(-1, "im1"), _i64([0], "ax0"),
                                                        _i64([-1], "sm1"), _i64([2 ** 63 - 1], "end"),
                                                        _i64([-1, 4], "back")]))
    # a Conv's units (axis 1) gated by a MatMul's (last axis) of the same count
    conv = make_model([helper.make_node("Conv", ["x", "C1"], ["c"]), helper.make_node("MatMul", ["z", "Wu"], ["u"]),
                       helper.make_node("Mul", ["c", "u"], ["h"]), helper.make_node("Conv", ["h", "C2"], ["y"])],
                      [vi("x", ["N", 8, 16]), vi("z", ["N", 16, 8])], [vi("y", ["N", 4, 16])],
                      [_init(_w((16, 8, 1), 1), "C1"), _init(_w((8, 16), 2), "Wu"), _init(_w((4, 16, 1), 3), "C2")])
    assert _stops(conv)


def test_a_constant_read_on_both_branches_of_a_gate_is_cut_once():
    nodes = [helper.make_node("MatMul", ["x", "Wg"], ["g0"]), helper.make_node("Add", ["g0", "b"], ["g"]),
             helper.make_node("Sigmoid", ["g"], ["sg"]), helper.make_node("Mul", ["g", "sg"], ["silu"]),
             helper.make_node("MatMul", ["x", "Wu"], ["u0"]), helper.make_node("Add", ["u0", "b"], ["u"]),
             helper.make_node("Mul", ["silu", "u"], ["h"]), helper.make_node("MatMul", ["h", "Wd"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 8])],
                       [_init(_w((8, 16), 1), "Wg"), _init(_w((8, 16), 2), "Wu"), _init(_w((16,), 3), "b"),
                        _init(_w((16, 8), 4), "Wd")])
    pruned, rep = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    assert [g["co_producers"] for g in rep.structured["groups"]] == [["Wu"]]
    assert tensor_by_name(pruned, "b").shape == (8,)
    _check_equal(model, pruned, rep, {"x": _w((5, 8), 42)})


def test_a_bias_computed_from_a_shared_constant_says_so():
    nodes = [helper.make_node("MatMul", ["x", "W0"], ["m"]), helper.make_node("Identity", ["b_shared"], ["b0"]),
             helper.make_node("Add", ["m", "b0"], ["h"], name="bias_add"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 4])],
                       [_init(_w((8, 16), 1), "W0"), _init(_w((16,), 2), "b_shared"), _init(_w((16, 4), 3), "W1")])
    _, skipped = find_groups(model)
    assert skipped[0].reason == ("it reaches Add 'bias_add' whose other operand 'b0' is Identity of the constant "
                                 "'b_shared', not a constant of its own")


def test_quantized_layers_are_skipped_with_a_reason():
    q = numpy_helper.from_array(np.random.default_rng(11).integers(-100, 100, (16, 8)).astype(np.int8), "Q")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "Q", "xz"], ["yi"], name="mmi"),
             helper.make_node("Mul", ["xs", "qs"], ["s"]),
             helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["yf", "s"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 8])],
                       [q, numpy_helper.from_array(np.full(8, 0.01, np.float32), "qs")])
    _, skipped = find_groups(model)
    assert [(s.producer, s.producer_op, s.units, s.reason) for s in skipped] == [
        ("Q", "MatMulInteger", 8, "a quantized layer (MatMulInteger 'mmi'): structured removal cuts float weights "
                                  "only (prune the float model, then quantize it)")]


def test_layers_the_search_does_not_cut_are_listed_with_a_reason():
    lstm_w = _init(_w((1, 32, 4), 5), "LW")  # [directions, 4*hidden, input]
    lstm_r = _init(_w((1, 32, 8), 6), "LR")
    nodes = [helper.make_node("MatMul", ["Wl", "x"], ["a"], name="left"),
             helper.make_node("MatMul", ["x3", "W3"], ["b"], name="batched"),
             helper.make_node("Einsum", ["x", "We"], ["c"], equation="ij,jk->ik", name="ein"),
             helper.make_node("LSTM", ["seq", "LW", "LR"], ["ly"], hidden_size=8, name="lstm")]
    model = make_model(nodes, [vi("x", [4, 4]), vi("x3", [2, 3, 4]), vi("seq", [5, 1, 4])],
                       [vi("a", None), vi("b", None), vi("c", None), vi("ly", None)],
                       [_init(_w((6, 4), 1), "Wl"), _init(_w((2, 4, 5), 2), "W3"), _init(_w((4, 7), 3), "We"),
                        lstm_w, lstm_r])
    _, skipped = find_groups(model)
    assert [(s.producer, s.producer_op, s.units, s.reason) for s in skipped] == [
        ("Wl", "MatMul", 6, "its weight is the left operand of MatMul 'left' (W @ x): only x @ W layers are cut"),
        ("W3", "MatMul", 5, "a 3-D (batched) weight of MatMul 'batched': only 2-D weights are cut"),
        ("We", "Einsum", 0, "Einsum 'ein': only MatMul, Gemm and Conv layers are cut"),
        ("LW", "LSTM", 8, "the recurrent layer LSTM 'lstm': its hidden units feed back into it, so they are not cut")]
