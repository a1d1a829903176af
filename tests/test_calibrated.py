"""Calibration-aware pruning end to end: wanda, obs, refit, schedules, scopes, holdout, one session."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import MODELS, make_model, mlp, run_ort, tensor_by_name, vi
from onnx_magprune.api import prune_file, prune_model
from onnx_magprune.calibration import open_calibration, split_holdout
from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig, Rule
from onnx_magprune.errors import ConfigError
from onnx_magprune.stats_graph import topological_stages
from onnx_magprune.layer_view import linear_view
from onnx_magprune.discovery import find_weights
from onnx_magprune.graph_index import GraphIndex
from onnx_magprune.methods import MethodOptions, Schedule


def _feeds(n=120, width=32, seed=0, batch=20):
    rng = np.random.default_rng(seed)
    # correlated inputs with one loud feature, as real activations are
    base = rng.standard_normal((n, width)).astype(np.float32)
    mix = rng.standard_normal((width, width)).astype(np.float32) * 0.3 + np.eye(width, dtype=np.float32)
    x = base @ mix
    x[:, 0] *= 20
    return x, [{"x": x[i:i + batch]} for i in range(0, n, batch)]


def _err(model, pruned, x):
    a, b = run_ort(model, {"x": x})[0], run_ort(pruned, {"x": x})[0]
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_wanda_keeps_small_weights_on_loud_inputs():
    # y = x @ W with W [2, 4]: feature 0 is loud (x100) with small weights, feature 1 quiet with larger ones
    W = np.array([[0.1, 0.2, -0.1, 0.3], [1.0, -2.0, 1.5, -1.2]], np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", ["N", 2])], [vi("y", ["N", 4])],
                       [numpy_helper.from_array(W, "W")])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 2)).astype(np.float32) * np.array([100.0, 1.0], np.float32)
    feeds = [{"x": x}]
    mag, _ = prune_model(model, 0.5, "local", min_numel=1)
    wanda, rep = prune_model(model, 0.5, "local", min_numel=1,
                             method=MethodOptions(method="wanda", calibration=feeds, holdout=0.0))
    assert np.array_equal(tensor_by_name(mag, "W")[0] == 0, [True] * 4)  # magnitude drops the loud feature
    assert np.array_equal(tensor_by_name(wanda, "W")[1] == 0, [True] * 4)  # wanda drops the quiet one
    assert rep.tensors[0].method["criterion"] == "wanda"
    assert _err(model, wanda, x) < _err(model, mag, x)


def test_wanda_output_scope_prunes_each_output_unit_alike():
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    pruned, rep = prune_model(model, 0.25, "output", method=MethodOptions(method="wanda", calibration=feeds))
    W0 = tensor_by_name(pruned, "W0")  # [32, 64]: output units are columns, 8 of 32 inputs zeroed in each
    assert ((W0 == 0).sum(axis=0) == 8).all()
    assert rep.totals.zeros_after == 64 * 8 + 16 * 16


@pytest.mark.parametrize("scope", ["local", "global"])
def test_obs_is_exact_and_beats_plain_masking(scope):
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    mag, _ = prune_model(model, 0.6, scope)
    obs, rep = prune_model(model, 0.6, scope, method=MethodOptions(method="obs", calibration=feeds, holdout=0.0))
    n = 32 * 64 + 64 * 16
    assert rep.totals.zeros_after == rep.totals.target_zeros == round(0.6 * n)
    for t in rep.tensors:
        assert t.method["refit"] is True and t.method["error_after"] < t.method["error_masked"]
    assert _err(model, obs, x) < 0.8 * _err(model, mag, x)


def test_refit_flag_reconstructs_a_magnitude_mask():
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    mag, _ = prune_model(model, 0.5, "local")
    refit, rep = prune_model(model, 0.5, "local",
                             method=MethodOptions(method="magnitude", refit=True, calibration=feeds, holdout=0.0))
    for name in ("W0", "W1"):  # the same weights are zeroed, the kept ones moved
        assert np.array_equal(tensor_by_name(mag, name) == 0, tensor_by_name(refit, name) == 0)
    assert not np.array_equal(tensor_by_name(mag, "W1"), tensor_by_name(refit, "W1"))
    assert _err(model, refit, x) < _err(model, mag, x)


def test_exclusions_and_bounds_hold_for_calibrated_methods():
    x, feeds = _feeds()
    model = mlp((32, 64, 16, 8))
    cfg = PruneConfig(rules=(Rule(name="W1", min_sparsity=0.7),))
    pruned, rep = prune_model(model, 0.5, "global", config=cfg, exclude=["W2"],
                              method=MethodOptions(method="wanda", calibration=feeds))
    assert np.array_equal(tensor_by_name(pruned, "W2"), tensor_by_name(model, "W2"))
    assert [t.name for t in rep.tensors] == ["W0", "W1"]
    assert rep.tensors[1].zeros_after == round(0.7 * 64 * 16)  # held at its min bound
    assert rep.totals.zeros_after == rep.totals.target_zeros == round(0.5 * (32 * 64 + 64 * 16))


def test_cubic_schedule_steps_and_one_session():
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    opts = MethodOptions(method="obs", calibration=feeds, steps=3, schedule="cubic", holdout=0.0)
    assert opts.fractions() == pytest.approx([1 - (2 / 3) ** 3, 1 - (1 / 3) ** 3, 1.0])
    assert MethodOptions(steps=4, schedule=Schedule.LINEAR).fractions() == [0.25, 0.5, 0.75, 1.0]
    pruned, rep = prune_model(model, 0.8, "local", method=opts)
    n1, n2 = 32 * 64, 64 * 16
    want = [(round(f * 0.8 * n1) + round(f * 0.8 * n2)) / (n1 + n2) for f in opts.fractions()]
    assert rep.method["step_sparsity"] == pytest.approx(want, abs=1e-12)
    assert rep.totals.zeros_after == round(0.8 * n1) + round(0.8 * n2)
    # 3 steps x 2 sequential stages, all served by one ONNX Runtime session
    assert rep.method["passes"] == 6 and rep.method["stages"] == 2 and rep.method["sessions"] == 1


def test_sequential_stages_follow_the_dataflow():
    model = mlp((32, 64, 16, 8))
    index = GraphIndex(model)
    views = {w.name: linear_view(w, index)[0] for w in find_weights(index, min_numel=1).weights}
    assert topological_stages(model, views) == [["W0"], ["W1"], ["W2"]]


def test_holdout_is_kept_out_of_statistics_and_used_for_validation(tmp_path):
    x, _ = _feeds(n=100)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    src = tmp_path / "m.onnx"
    onnx.save(mlp((32, 64, 16)), src)
    runner = CliRunner()
    res = runner.invoke(main, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                               "--method", "obs", "--calibration", str(calib), "--holdout", "0.25",
                               "--report", str(tmp_path / "r.json"), "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"]["statistics_samples"] == 75 and rep["method"]["holdout_samples"] == 25
    assert "holdout: samples 75..99 of 100" in rep["method"]["validated_on"]
    assert rep["validation"]["calibration"]["samples"] == 25
    assert rep["tensors"][0]["method"]["stats_rows"] == 75


def test_split_holdout_splits_exactly():
    x, _ = _feeds(n=10)
    cal = open_calibration([{"x": x}], mlp((32, 64, 16)))
    fit, held = split_holdout(open_calibration(str(_npz(x)), mlp((32, 64, 16))), 0.3)
    assert fit.samples == 7 and held.samples == 3
    assert np.array_equal(np.concatenate([b.feeds["x"] for b in held.batches(2)]), x[7:])
    assert split_holdout(cal, 0.0)[1] is None


def test_split_holdout_keeps_whole_batches_of_a_fixed_batch_model(tmp_path):
    """A model exported with batch 2: both parts hold whole batches, so every batch runs (16 samples
    at 0.2 would hold out 3 and leave a batch of 1)."""
    x, _ = _feeds(n=16)
    fit, held = split_holdout(open_calibration(str(_npz(x)), mlp((32, 64, 16))), 0.2, batch=2)
    assert (fit.samples, held.samples) == (12, 4)
    assert [b.feeds["x"].shape[0] for b in fit.batches(2)] == [2] * 6
    assert split_holdout(open_calibration(str(_npz(x)), mlp((32, 64, 16))), 0.2)[1].samples == 3
    fixed = mlp((32, 64, 16))
    fixed.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    src, calib = tmp_path / "fixed.onnx", tmp_path / "c.npz"
    onnx.save(fixed, src)
    np.savez(calib, x=x)
    res = CliRunner().invoke(main, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                                    "--method", "obs", "--calibration", str(calib), "--holdout", "0.2",
                                    "--report", str(tmp_path / "r.json"), "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["method"]["statistics_samples"] == 12 and rep["method"]["holdout_samples"] == 4


def _npz(x):
    import tempfile
    path = tempfile.mkdtemp() + "/c.npz"
    np.savez(path, x=x)
    return path


def test_calibrated_methods_need_calibration_data(tmp_path):
    with pytest.raises(ConfigError, match="--method obs needs calibration data"):
        MethodOptions(method="obs")
    src = tmp_path / "m.onnx"
    onnx.save(mlp(), src)
    res = CliRunner().invoke(main, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                                    "--method", "wanda"])
    assert res.exit_code == 2 and res.output.strip().splitlines()[-1] == \
        "error: --method wanda needs calibration data: pass --calibration"
    assert not (tmp_path / "p.onnx").exists()


def test_calibrated_pruning_is_deterministic(tmp_path):
    x, _ = _feeds()
    calib = tmp_path / "c.npz"
    np.savez(calib, x=x)
    src = tmp_path / "m.onnx"
    onnx.save(mlp((32, 64, 16)), src)
    opts = MethodOptions(method="obs", calibration=str(calib))
    prune_file(src, tmp_path / "a.onnx", 0.5, method=opts)
    prune_file(src, tmp_path / "b.onnx", 0.5, method=opts)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_float16_weights_keep_exact_counts_after_reconstruction():
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    cast = helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16)
    model.graph.node.insert(0, cast)
    model.graph.node[1].input[0] = "xh"
    model.graph.node[-1].op_type = "Cast"
    model.graph.node[-1].attribute.append(helper.make_attribute("to", TensorProto.FLOAT))
    pruned, rep = prune_model(model, 0.7, "global", method=MethodOptions(method="obs", calibration=feeds))
    assert rep.totals.zeros_after == rep.totals.target_zeros == round(0.7 * (32 * 64 + 64 * 16))
    assert tensor_by_name(pruned, "W0").dtype == np.float16


def test_obs_on_the_cnn_and_two_four_pattern():
    model = onnx.load(MODELS / "digits_cnn.onnx")
    calib = str(MODELS / "digits_cnn_calib.npz")
    pruned, rep = prune_model(model, 0.5, "local", method=MethodOptions(method="obs", calibration=calib,
                                                                     max_samples=200))
    assert rep.totals.zeros_after == rep.totals.target_zeros
    assert {t.method["criterion"] for t in rep.tensors} == {"obs"}
    pruned, rep = prune_model(model, method=MethodOptions(method="obs", calibration=calib, pattern="2:4",
                                                          max_samples=200))
    for t in rep.tensors:
        assert t.zeros_after == t.numel // 2


def test_too_few_calibration_rows_warn_and_raise_the_dampening():
    x, _ = _feeds(n=10)
    model = mlp((32, 64, 16))
    _, rep = prune_model(model, 0.5, "local", method=MethodOptions(method="obs", calibration=[{"x": x}],
                                                                   holdout=0.0))
    assert any("rank-deficient" in n for n in rep.notes)
    w0 = rep.tensors[0].method
    assert w0["stats_rows"] == 10 and w0["damp"] == pytest.approx(0.1 * 32 / 10)


def test_cli_two_four_pattern_report(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp((32, 64, 16)), src)
    res = CliRunner().invoke(main, ["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--pattern", "2:4",
                                    "--json", "-q"])
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["method"]["pattern"] == "2:4" and rep["totals"]["zeros_after"] == (32 * 64 + 64 * 16) // 2
    bad = CliRunner().invoke(main, ["prune", str(src), "-o", str(tmp_path / "q.onnx"), "--pattern", "2-4"])
    assert bad.exit_code == 2 and "pattern must look like N:M" in bad.output
    assert not (tmp_path / "q.onnx").exists()


def test_kept_zeros_stay_zero_when_fewer_are_asked_for():
    x, feeds = _feeds()
    model = mlp((32, 64, 16))
    W0 = tensor_by_name(model, "W0").copy()
    W0[24:, :] = 0  # 25% already zero: the inputs of OBS's last block, which earlier blocks' updates reach
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(W0, "W0"))
    pruned, rep = prune_model(model, 0.1, "local", method=MethodOptions(method="obs", calibration=feeds,
                                                                        block_size=8))
    P0 = tensor_by_name(pruned, "W0")
    assert (P0 == 0).sum() == 32 * 16  # the existing zeros count toward the 10%; none became tiny non-zeros
    assert rep.tensors[0].zeros_before == rep.tensors[0].zeros_after == 32 * 16


def test_a_weight_behind_a_cast_is_scored_and_refitted_one_behind_a_transpose_falls_back():
    rng = np.random.default_rng(3)
    w = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float16), "W")  # float16 storage
    t = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "T")
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "Wf"], ["y0"]),
             helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Tt"], ["y1"])]
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y0", ["N", 16]), vi("y1", ["N", 16])], [w, t])
    _, feeds = _feeds()
    pruned, rep = prune_model(model, 0.5, "local", method=MethodOptions(method="obs", calibration=feeds, holdout=0.0))
    by = {r.name: r for r in rep.tensors}
    assert by["W"].method["criterion"] == "obs" and by["W"].method["refit"] is True
    assert "fallback" not in by["W"].method and by["W"].zeros_after == 256
    assert tensor_by_name(pruned, "W").dtype == np.float16
    assert by["T"].method["criterion"] == "magnitude"
    assert by["T"].method["fallback"] == ("it reaches MatMul through Transpose (the layer's input rows are known "
                                          "only for a weight the op reads directly)")


def test_global_pool_ranks_weights_the_criterion_cannot_score_among_themselves():
    """A weight OBS cannot see (behind a Transpose) is scored by |w|, the others by OBS saliency: one
    cut across both scales would empty one of them.  Each kind is cut to the same fraction instead."""
    rng = np.random.default_rng(4)
    a = numpy_helper.from_array((rng.standard_normal((32, 32)) * 100).astype(np.float32), "A")  # huge |w|
    t = numpy_helper.from_array((rng.standard_normal((16, 32)) * 1e-3).astype(np.float32), "T")  # tiny |w|
    b = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]),
             helper.make_node("MatMul", ["h", "B"], ["y0"]),
             helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "Tt"], ["y1"])]
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y0", ["N", 16]), vi("y1", ["N", 16])], [a, b, t])
    _, feeds = _feeds()
    pruned, rep = prune_model(model, 0.5, "global", method=MethodOptions(method="obs", calibration=feeds, holdout=0.0))
    by = {r.name: r for r in rep.tensors}
    assert by["T"].method["criterion"] == "magnitude" and by["T"].zeros_after == 256  # 50% of its 512
    assert by["A"].zeros_after + by["B"].zeros_after == 768  # 50% of the 1536 OBS scores
    assert sum(r.zeros_after for r in rep.tensors) == 1024  # round(0.5 * 2048): the total stays exact
    assert any("ranked by magnitude among themselves" in n for n in rep.notes)


def test_output_scope_uses_the_layout_of_cast_and_quantized_op_weights():
    rng = np.random.default_rng(5)
    w = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float16), "W")  # [K, N] behind a Cast
    q = numpy_helper.from_array(rng.integers(-100, 100, (16, 8)).astype(np.int8), "Q")  # MatMulInteger B [K, N]
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "Wf"], ["h"]),
             helper.make_node("DynamicQuantizeLinear", ["h"], ["hq", "hs", "hz"]),
             helper.make_node("MatMulInteger", ["hq", "Q", "hz"], ["yi"]),
             helper.make_node("Mul", ["hs", "qs"], ["s"]),  # as ONNX Runtime's dynamic quantization writes it
             helper.make_node("Cast", ["yi"], ["yf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["yf", "s"], ["y"])]
    qs = numpy_helper.from_array(np.full(8, 0.01, np.float32), "qs")
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y", ["N", 8])], [w, q, qs])
    pruned, rep = prune_model(model, 0.25, "output", min_numel=1)
    by = {r.name: r for r in rep.tensors}
    assert by["W"].selection == "output" and by["Q"].selection == "output"
    assert np.array_equal((tensor_by_name(pruned, "W") == 0).sum(axis=0), [8] * 16)  # round(0.25*32) per column
    assert np.array_equal((tensor_by_name(pruned, "Q") == 0).sum(axis=0), [4] * 8)  # round(0.25*16) per column
    _, feeds = _feeds()
    _, rep = prune_model(model, 0.25, "output", min_numel=1,
                         method=MethodOptions(method="wanda", calibration=feeds, holdout=0.0))
    by = {r.name: r for r in rep.tensors}
    assert by["W"].method["criterion"] == "wanda"
    assert by["Q"].method["fallback"].startswith("its op MatMulInteger multiplies quantized activations")


def test_output_scope_without_a_layer_view_reports_local_selection():
    rng = np.random.default_rng(6)
    t = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "T")
    nodes = [helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Tt"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y", ["N", 16])], [t])
    _, rep = prune_model(model, 0.25, "output")
    assert rep.tensors[0].selection == "local" and rep.tensors[0].zeros_after == 128
    assert "through Transpose" in rep.tensors[0].method["fallback"]


def test_global_pool_of_mixed_kinds_takes_existing_zeros_first_and_stays_exact():
    rng = np.random.default_rng(14)
    a = numpy_helper.from_array(rng.standard_normal((32, 32)).astype(np.float32), "A")
    t_val = rng.standard_normal((16, 32)).astype(np.float32)
    t_val[rng.random(t_val.shape) < 0.8] = 0  # an already pruned weight the criterion cannot score: 80% zero
    t = numpy_helper.from_array(t_val, "T")
    b = numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "B")
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("MatMul", ["h", "B"], ["y0"]),
             helper.make_node("Transpose", ["T"], ["Tt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Tt"], ["y1"])]
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y0", ["N", 16]), vi("y1", ["N", 16])], [a, b, t])
    _, feeds = _feeds()
    for method in ("obs", "wanda"):
        _, rep = prune_model(model, 0.5, "global", method=MethodOptions(method=method, calibration=feeds, holdout=0.0))
        by = {r.name: r for r in rep.tensors}
        zeros_t = int((t_val == 0).sum())
        assert by["T"].zeros_before == zeros_t and by["T"].zeros_after >= zeros_t
        assert sum(r.zeros_after for r in rep.tensors) == 1024, method  # round(0.5 * 2048), the zeros counted
        # the 1024 - zeros_t left are shared so each kind loses the same fraction of its non-zero weights
        rest = 1024 - zeros_t
        share_t = (by["T"].zeros_after - zeros_t) / (512 - zeros_t)
        share_ab = (by["A"].zeros_after + by["B"].zeros_after) / 1536
        assert abs(share_t - share_ab) < 0.01 and rest > 0


def _bf16_tensor(values: np.ndarray, name: str):
    """A bfloat16 initializer holding ``values`` rounded toward zero (the upper half of each float32)."""
    bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return helper.make_tensor(name, TensorProto.BFLOAT16, list(values.shape), bits.tobytes(), raw=True)


def test_a_bfloat16_weight_behind_a_cast_is_scored_by_the_criterion_and_sensitivity_says_why_it_skips_it(tmp_path):
    """ONNX Runtime's Python API takes no bfloat16 arrays: the statistics model keeps such a weight as a
    constant (its later layers see its dense values) and sensitivity leaves it out with the reason."""
    from onnx_magprune.sensitivity import SweepOptions, sensitivity_sweep

    rng = np.random.default_rng(16)
    w = _bf16_tensor(rng.standard_normal((32, 16)), "W")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 16)).astype(np.float32), "W2")
    nodes = [helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "Wf"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])]
    model = make_model(nodes, [vi("x", ["N", 32])], [vi("y", ["N", 16])], [w, w2])
    _, feeds = _feeds()
    pruned, rep = prune_model(model, 0.5, "local", method=MethodOptions(method="obs", calibration=feeds, holdout=0.0))
    by = {r.name: r for r in rep.tensors}
    assert by["W"].method["criterion"] == "obs" and by["W"].zeros_after == 256 and by["W2"].zeros_after == 128
    assert next(t for t in pruned.graph.initializer if t.name == "W").data_type == TensorProto.BFLOAT16
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", x=np.concatenate([f["x"] for f in feeds]))
    rep = sensitivity_sweep(str(tmp_path / "m.onnx"), str(tmp_path / "c.npz"), options=SweepOptions(levels=(0.5,),
                                                                                                    quiet=True))
    assert [c.name for c in rep.curves] == ["W2"]
    assert any(s["name"] == "W" and s["reason"].startswith("a bfloat16 weight: onnxruntime's Python API cannot "
                                                           "feed it") for s in rep.skipped)
