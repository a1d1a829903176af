"""--refine-epochs: the chain's derivatives, the Adam refinement, which groups it applies to, end to end."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import make_model, run_ort, vi
from test_structured import _init, _w, cnn, ffn
from test_structured_refit import _err, _ffn_data
from onnx_magprune.api import prune_model
from onnx_magprune.cli import main
from onnx_magprune.methods import MethodOptions
from onnx_magprune.structured import find_groups
from onnx_magprune.structured_refine import Block, Chain, ChainNode, forward, refine
from onnx_magprune.structured_refine_plan import RefinePlan, refine_plan
from onnx_magprune.structured_run import StructuredOptions
from onnx import helper

C = {"half": np.float64(0.5), "one": np.float64(1.0), "sqrt2": np.float64(np.sqrt(2.0)), "three": np.float64(3.0),
     "per_unit": np.linspace(0.5, 1.5, 6)}
CHAINS = {
    "erf_gelu": [("Div", ("z", "sqrt2"), "d"), ("Erf", ("d",), "e"), ("Add", ("e", "one"), "e1"),
                 ("Mul", ("z", "e1"), "g0"), ("Mul", ("g0", "half"), "out")],
    "gelu_op": [("Gelu", ("z",), "out")],
    "gelu_tanh_op": [("Gelu", ("z",), "out", {"approximate": "tanh"})],
    "silu": [("Sigmoid", ("z",), "s"), ("Mul", ("z", "s"), "out")],
    "tanh_sub_div": [("Tanh", ("z",), "t"), ("Sub", ("one", "t"), "u"), ("Div", ("u", "per_unit"), "out")],
    "pow_sqrt_exp": [("Pow", ("z", "three"), "p"), ("Exp", ("z",), "e"), ("Add", ("p", "e"), "a"),
                     ("Add", ("a", "three"), "b"), ("Sqrt", ("b",), "out")],
    "leaky_softplus_neg": [("LeakyRelu", ("z",), "l", {"alpha": 0.2}), ("Softplus", ("l",), "s"),
                           ("Neg", ("s",), "out")],
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_chain_derivatives_match_central_differences(name):
    nodes = [ChainNode(op, ins, out, dict(rest[0]) if rest else {}) for op, ins, out, *rest in CHAINS[name]]
    chain = Chain("z", "out", nodes, C)
    z = np.linspace(-1.3, 1.1, 6 * 7).reshape(7, 6)
    v, d = chain(z)
    eps = 1e-6
    numeric = (chain(z + eps)[0] - chain(z - eps)[0]) / (2 * eps)
    np.testing.assert_allclose(d, numeric, rtol=1e-6, atol=1e-7)
    assert v.shape == d.shape == z.shape


def test_relu_derivative_is_the_step():
    v, d = Chain("z", "r", [ChainNode("Relu", ("z",), "r")], {})(np.array([[-2.0, 0.0, 3.0]]))
    assert v.tolist() == [[0.0, 0.0, 3.0]] and d.tolist() == [[0.0, 0.0, 1.0]]


def _teacher_student(seed=0, n=3000, width=8, hidden=24, keep=12):
    rng = np.random.default_rng(seed)
    gelu = Chain("z", "out", [ChainNode("Gelu", ("z",), "out")], {})
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    teacher = Block(f32(width, hidden), f32(hidden), f32(hidden, width), f32(width))
    x = rng.standard_normal((n, width)).astype(np.float32)
    y = forward(teacher, gelu, x)[0]
    student = Block(teacher.wp[:, :keep].copy(), teacher.bp[:keep].copy(), teacher.wc[:keep].copy(), teacher.bc.copy())
    return gelu, teacher, student, x, y


def test_refine_lowers_the_held_out_error_and_is_deterministic():
    gelu, _t, student, x, y = _teacher_student()
    a = refine(student, gelu, x, y, None, epochs=5, lr=1e-2)
    b = refine(student, gelu, x, y, None, epochs=5, lr=1e-2)
    assert a.rows == 3000 and a.held_out_rows == 300
    assert 1 <= a.best_epoch <= 5 and a.error_after < 0.9 * a.error_before
    for k in ("wp", "bp", "wc", "bc"):
        assert np.array_equal(getattr(a.block, k), getattr(b.block, k))
        assert getattr(a.block, k).dtype == np.float32
    assert np.array_equal(student.wp, _teacher_student()[2].wp)  # the start block is not changed in place


def test_refine_keeps_the_start_when_no_epoch_beats_it():
    gelu, teacher, _s, x, y = _teacher_student()
    res = refine(teacher, gelu, x, y, None, epochs=2, lr=1e-2)  # already exact: nothing to gain
    assert res.best_epoch == 0 and res.error_after == res.error_before
    assert all(np.array_equal(getattr(res.block, k), getattr(teacher, k)) for k in ("wp", "bp", "wc", "bc"))
    zero = refine(_teacher_student()[2], gelu, x, y, None, epochs=0, lr=1e-2)
    assert zero.best_epoch == 0 and zero.error_after == zero.error_before


def test_row_weights_change_what_is_fitted():
    gelu, _t, student, x, y = _teacher_student()
    w = np.where(np.arange(len(x)) % 2 == 0, 100.0, 1.0)
    a = refine(student, gelu, x, y, None, epochs=2, lr=1e-2)
    b = refine(student, gelu, x, y, w, epochs=2, lr=1e-2)
    assert not np.array_equal(a.block.wp, b.block.wp)


# --- which groups: the plan -----------------------------------------------------------------------


@pytest.mark.parametrize("form, ops", [("erf", ["Div", "Erf", "Add", "Mul", "Mul"]),
                                       ("tanh", ["Pow", "Mul", "Add", "Mul", "Tanh", "Add", "Mul", "Mul"])])
def test_plan_of_a_pytorch_feed_forward_block(form, ops):
    model = ffn(form)
    (g,), _ = find_groups(model)
    plan = refine_plan(model, g)
    assert isinstance(plan, RefinePlan)
    assert (plan.x, plan.producer, plan.unit_axis, plan.producer_bias, plan.start, plan.end) == \
        ("x", "W1", 1, "b1", "h", "g")
    assert [n.op for n in plan.chain] == ops
    assert set(plan.constants) == ({"sqrt2", "one", "half"} if form == "erf" else {"three", "c3", "k", "one", "half"})


def test_plan_reasons_for_groups_it_cannot_refine():
    groups, _ = find_groups(cnn())
    plans = {g.producer: refine_plan(cnn(), g) for g in groups}
    assert plans["C1"] == "its consumer is a Conv (conv); only MatMul/Gemm consumers are refined"
    assert plans["C2"] == "its consumer reads each unit as a block of 16 inputs (after Flatten)"
    fc1 = plans["F1"]
    assert isinstance(fc1, RefinePlan) and fc1.unit_axis == 0 and fc1.producer_bias == "f1b" and fc1.start == "h"
    # an op without a derivative here (HardSwish) in the chain
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("HardSwish", ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "W2"], ["y"])]
    m = make_model(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 4])],
                   [_init(_w((4, 8), 1), "W1"), _init(_w((8, 4), 2), "W2")])
    (g,), _ = find_groups(m)
    assert refine_plan(m, g) == "its chain holds a HardSwish, which refinement cannot differentiate"


# --- end to end -------------------------------------------------------------------------------------


def _refined(model, epochs, calib):
    return prune_model(model, 0.5, "local", structured=StructuredOptions(refine_epochs=epochs, refine_lr=1e-2),
                       method=MethodOptions(method="obs", calibration=calib, holdout=0.0), min_numel=0)


def test_refinement_end_to_end_lowers_drift_on_fresh_data_and_is_deterministic():
    model = ffn("erf", hidden=32, width=8)
    calib = _ffn_data(n=160)
    held = [{"x": _w((4, 6, 8), 500 + i)} for i in range(8)]
    plain, rep0 = _refined(model, 0, calib)
    refined, rep = _refined(model, 6, calib)
    again, _ = _refined(model, 6, calib)
    (g,) = rep.structured["groups"]
    r = g["refine"]
    assert r["rows"] == 160 * 6 and r["held_out_rows"] == 96 and r["epochs"] == 6
    assert r["best_epoch"] >= 1 and r["error_after"] < r["error_before"]
    assert rep0.structured["groups"][0].get("refine") is None
    assert rep.structured["groups"][0]["removed_units"] == rep0.structured["groups"][0]["removed_units"]
    assert _err(model, refined, held) < _err(model, plain, held)
    assert refined.SerializeToString() == again.SerializeToString()
    onnx.checker.check_model(refined, full_check=True)
    assert run_ort(refined, held[0])[0].shape == (4, 6, 8)


def test_refine_epochs_messages(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(ffn("erf"), model)
    runner = CliRunner()
    r = runner.invoke(main, ["prune", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                             "--refine-epochs", "2"])
    assert r.exit_code == 2 and r.output.strip().endswith("--refine-epochs applies to --structured removal")
    r = runner.invoke(main, ["prune", str(model), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                             "--structured", "neurons", "--refine-epochs", "2"])
    assert r.exit_code == 2 and "--refine-epochs refines the re-fitted layers" in r.output
    assert not (tmp_path / "o.onnx").exists()


# --- cases a review found ---------------------------------------------------------------------------


def _three_layers():
    """x -> W1 -> Tanh -> W2 -> Tanh -> W3: W2 consumes the first group and produces the second."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["a"]), helper.make_node("Tanh", ["a"], ["ta"]),
             helper.make_node("MatMul", ["ta", "W2"], ["b"]), helper.make_node("Tanh", ["b"], ["tb"]),
             helper.make_node("MatMul", ["tb", "W3"], ["y"])]
    inits = [_init(_w((8, 16), 1) * 0.5, "W1"), _init(_w((16, 16), 2) * 0.3, "W2"), _init(_w((16, 6), 3), "W3")]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 6])], inits)


def test_inputs_removed_upstream_are_not_refined_into_the_producer():
    model = _three_layers()
    calib = [{"x": _w((50, 8), 20 + i)} for i in range(4)]
    held = [{"x": _w((50, 8), 90 + i)} for i in range(4)]
    plain, _ = _refined(model, 0, calib)
    refined, rep = _refined(model, 10, calib)
    r = {g["producer"]: g["refine"] for g in rep.structured["groups"]}
    assert r["W2"]["best_epoch"] >= 1 and r["W2"]["error_after"] < r["W2"]["error_before"]
    assert _err(model, refined, held) < _err(model, plain, held)
    # W2's rows for the units W1's group removes stay 0 until the cut (Adam used to move them: trained, then cut)
    from onnx_magprune.calibration import open_calibration
    from onnx_magprune.config import PruneConfig
    from onnx_magprune.structured_run import StructuredRun

    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    run = StructuredRun(proto, PruneConfig(sparsity=0.5, scope="local", min_numel=0),
                        StructuredOptions(refine_epochs=10, refine_lr=1e-2),
                        MethodOptions(method="obs", calibration=calib, holdout=0.0), open_calibration(calib, model))
    first = next(gr for gr in run.groups if gr.group.producer == "W1")
    assert len(first.removed) == 8 and not run.values["W2"][first.removed].any()


def _block(between, consts=(), producer="MatMul", consumer_attrs=None, c=None):
    """x[N, 8] -> producer(W1) -> between -> MatMul/Gemm(W2) -> y; ``between`` nodes read 'h', write 'a'."""
    p_inputs = ["x", "W1"] + ([c] if c else [])
    nodes = [helper.make_node(producer, p_inputs, ["h"])] + between
    if consumer_attrs is not None:
        nodes.append(helper.make_node("Gemm", ["a", "W2", "c2"], ["y"], **consumer_attrs))
    else:
        nodes.append(helper.make_node("MatMul", ["a", "W2"], ["y"]))
    inits = [_init(_w((8, 16), 1) * 0.3, "W1"), _init(_w((16, 6), 3), "W2"), _init(_w((6,), 4), "c2"), *consts]
    return make_model(nodes, [vi("x", ["N", 8])], [vi("y", ["N", 6])], inits)


@pytest.mark.parametrize("case, reason", [
    ("scalar_c", "its producer Gemm adds a C that is not one value per unit"),
    ("pow_exponent", "its chain raises a constant to the power of the units (Pow with a varying exponent)"),
])
def test_plan_refuses_what_it_would_get_wrong(case, reason):
    if case == "scalar_c":
        m = _block([helper.make_node("Tanh", ["h"], ["a"])], [_init(np.array(2.0), "two")], producer="Gemm", c="two")
    else:
        m = _block([helper.make_node("Pow", ["two", "h"], ["a"])], [_init(np.array(2.0), "two")])
    (g,), _ = find_groups(m)
    assert refine_plan(m, g) == reason


def test_a_rank3_per_unit_constant_and_too_few_rows():
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Mul", ["h", "s"], ["hs"]),
             helper.make_node("Tanh", ["hs"], ["a"]), helper.make_node("MatMul", ["a", "W2"], ["y"])]
    inits = [_init(_w((8, 16), 1) * 0.3, "W1"), _init(np.linspace(0.5, 1.5, 16).reshape(1, 1, 16), "s"),
             _init(_w((16, 8), 3), "W2")]
    m = make_model(nodes, [vi("x", ["B", "T", 8])], [vi("y", ["B", "T", 8])], inits)
    _, rep = _refined(m, 3, [{"x": _w((4, 10, 8), 30 + i)} for i in range(5)])
    (g,) = rep.structured["groups"]
    assert g["refine"]["rows"] == 200 and g["refine"]["held_out_rows"] == 20
    _, rep = _refined(m, 3, [{"x": _w((1, 10, 8), 30 + i)} for i in range(4)])
    (g,) = rep.structured["groups"]
    assert g["refine"] == {"skipped": "40 calibration rows, fewer than 50: too few to hold a tenth out and still fit"}


def test_a_consumer_gemm_with_beta_keeps_its_c():
    m = _block([helper.make_node("Tanh", ["h"], ["a"])], consumer_attrs={"beta": 0.5})
    pruned, rep = _refined(m, 0, [{"x": _w((50, 8), 40 + i)} for i in range(2)])
    (g,) = rep.structured["groups"]
    assert g["bias_refit"] is False
    c2 = next(t for t in pruned.graph.initializer if t.name == "c2")
    assert np.array_equal(onnx.numpy_helper.to_array(c2), _w((6,), 4))
