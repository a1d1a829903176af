"""Budget-driven allocation with a calibrated criterion (--method obs|wanda with --target-drift /
--allocate sensitivity): one-shot variants, the method's pipeline, and the written weights."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnx_magprune import allocation_search
from onnx_magprune.allocation_search import AllocationOptions
from onnx_magprune.allocation_variants import CriterionSpace
from onnx_magprune.api import prune_file
from onnx_magprune.calibration import open_calibration, split_holdout
from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig
from onnx_magprune.methods import MethodOptions
from onnx_magprune.validate import validate_models
from conftest import MODELS, make_model, vi
from sensitivity_models import calibration, fragile_model, weights_of, write

LEVELS = (0.3, 0.5, 0.7, 0.9)


@pytest.fixture
def files(tmp_path):
    return write(tmp_path)


def zeros(a: np.ndarray) -> int:
    return int(np.count_nonzero(a == 0))


def obs(calib, **kw) -> MethodOptions:
    return MethodOptions(method=kw.pop("method", "obs"), calibration=calib, **kw)


def measured_part(tmp_path, calib) -> str:
    """The samples the search measures drift on: the last 30% (rounded half up) of the 64, 45..63;
    the criterion's statistics come from 0..44."""
    x = np.load(calib)["x"]
    path = tmp_path / "measured.npz"
    np.savez(path, x=x[45:])
    return str(path)


@pytest.mark.parametrize("budget", [0.02, 0.1, 0.3])
def test_obs_target_drift_never_exceeds_budget(files, tmp_path, budget):
    model, calib = files
    out = tmp_path / "p.onnx"
    r = prune_file(model, out, method=obs(calib, holdout=0.0),
                   allocation=AllocationOptions(calibration=calib, target_drift=budget, levels=LEVELS, holdout=0.0))
    a = r.allocation
    assert a["measured_drift"] <= budget and a["verified_drift"] <= budget
    measured = validate_models(model, out, measured_part(tmp_path, calib)).outputs[0]["rel_l2"]
    assert measured == pytest.approx(a["verified_drift"], rel=1e-6)  # what the user would check
    c = a["criterion"]
    assert "samples 0..44 of 64" in c["statistics"] and "samples 45..63 of 64" in c["drift_measured_on"]
    assert c["method"] == "obs" and c["statistics_passes"] == 1 and c["fallback"] == {}
    assert 1 <= len(c["pipeline_runs"]) <= AllocationOptions(calibration=calib).pipeline_runs
    # the written weights have exactly the zeros the chosen levels say
    w = weights_of(out)
    for x in a["weights"]:
        assert zeros(w[x["name"]]) == round(x["sparsity"] * x["numel"])
    assert {t["name"]: t["method"]["criterion"] for t in json.loads(r.to_json())["tensors"]} == \
        {"A": "obs", "F": "obs", "B": "obs"}


def test_obs_allocation_prunes_more_than_magnitude_at_the_same_budget(files, tmp_path):
    model, calib = files
    got = {}
    for name, method in (("magnitude", None), ("obs", obs(calib, holdout=0.0))):
        r = prune_file(model, tmp_path / f"{name}.onnx", method=method,
                       allocation=AllocationOptions(calibration=calib, target_drift=0.05, levels=LEVELS, holdout=0))
        got[name] = r.allocation["pool_sparsity"]
    assert got["obs"] > got["magnitude"] + 0.05


def test_one_shot_variant_is_exact_and_beats_masking(files):
    model, calib = files
    proto = onnx.load(str(model))
    fit = open_calibration(str(calib), proto)
    space = CriterionSpace.build_for(proto, PruneConfig(), obs(str(calib)), fit)
    i = space.names.index("F")
    dense = space.dense(i).astype(np.float64)
    a = numpy_helper.to_array([t for t in proto.graph.initializer if t.name == "A"][0]).astype(np.float64)
    x = np.maximum(calibration()["x"].astype(np.float64) @ a, 0)  # F's input: relu(x A)
    for level in (0.3, 0.6):
        v = space.stored(i, level)
        assert v.dtype == np.float32 and v.shape == dense.shape
        assert zeros(v) == round(level * dense.size)
        assert space.stored(i, level) is v  # the search asks again: the same variant
        mag = space.values[i].raw.copy()
        mag[np.abs(mag) <= np.sort(np.abs(mag), axis=None)[round(level * mag.size) - 1]] = 0
        err = np.linalg.norm(x @ v - x @ dense)
        assert err < 0.7 * np.linalg.norm(x @ mag - x @ dense)  # OBS re-fits the kept weights
        assert space.outcome(i, level)["criterion"] == "obs" and space.outcome(i, level)["refit"]
    assert space.stats_sessions == 1


def test_pipeline_worse_than_variants_writes_the_variants(files, tmp_path, monkeypatch):
    model, calib = files
    real = allocation_search._pipeline

    def worse(*args, **kw):
        arrays, outcomes, info = real(*args, **kw)
        return {k: v * np.float32(1.5) for k, v in arrays.items()}, outcomes, info

    monkeypatch.setattr(allocation_search, "_pipeline", worse)
    out = tmp_path / "p.onnx"
    r = prune_file(model, out, method=obs(calib, holdout=0.0),
                   allocation=AllocationOptions(calibration=calib, target_drift=0.1, levels=LEVELS, holdout=0.0))
    c = r.allocation["criterion"]
    assert c["final"].startswith("one-shot") and [x["kept"] for x in c["pipeline_runs"]] == [False]
    measured = validate_models(model, out, measured_part(tmp_path, calib)).outputs[0]["rel_l2"]
    assert measured == pytest.approx(c["one_shot_drift"], rel=1e-6) and measured <= 0.1
    proto = onnx.load(str(model))
    stats, _measure = split_holdout(open_calibration(str(calib), proto), 0.3)  # as the search splits it
    space = CriterionSpace.build_for(proto, PruneConfig(), obs(str(calib)), stats)
    w = weights_of(out)
    levels = {x["name"]: x["sparsity"] for x in r.allocation["weights"]}
    for i, name in enumerate(space.names):
        assert np.array_equal(w[name], space.stored(i, levels[name]))  # exactly the measured variant


def test_sparsity_mode_with_wanda(files, tmp_path):
    model, calib = files
    out = tmp_path / "p.onnx"
    r = prune_file(model, out, 0.5, method=obs(calib, method="wanda", holdout=0.0),
                   allocation=AllocationOptions(calibration=calib, levels=LEVELS, holdout=0.0))
    w = weights_of(out)
    assert sum(zeros(v) for v in w.values()) == round(0.5 * 1792)
    assert r.allocation["criterion"]["method"] == "wanda"
    assert len(r.allocation["criterion"]["pipeline_runs"]) == 1  # the level is given: one run, no search


def if_model(tmp_path, sub_w: np.ndarray, branch_input: str, main_nodes=(), main_inits=()):
    """The fragile model, then ``main_nodes``, then If(c) whose then-branch multiplies
    ``branch_input`` by its own initializer ``S`` (= ``sub_w``); writes it and its calibration."""
    base = fragile_model()
    branch = helper.make_graph([helper.make_node("MatMul", [branch_input, "S"], ["z_then"])], "then", [],
                               [helper.make_tensor_value_info("z_then", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(sub_w, "S")])
    other = helper.make_graph([helper.make_node("Identity", [branch_input], ["z_else"])], "else", [],
                              [helper.make_tensor_value_info("z_else", TensorProto.FLOAT, None)])
    nodes = list(base.graph.node) + list(main_nodes) + [
        helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=other)]
    inits = list(base.graph.initializer) + list(main_inits) + [numpy_helper.from_array(np.array(True), "c")]
    model = tmp_path / "if.onnx"
    model.write_bytes(make_model(nodes, [vi("x", ["N", 16])], [vi("z", ["N", 8])], inits).SerializeToString())
    calib = tmp_path / "c.npz"
    np.savez(calib, **calibration())
    return model, calib


def then_initializer(path) -> np.ndarray:
    got = onnx.load(str(path))
    return numpy_helper.to_array([t for n in got.graph.node if n.op_type == "If" for a in n.attribute
                                  if a.name == "then_branch" for t in a.g.initializer][0])


def test_weights_a_session_cannot_feed_stay_unpruned(tmp_path):
    """A weight inside an If branch is left alone (it used to get no level at all under --target-drift)."""
    sub_w = np.random.default_rng(3).standard_normal((8, 8)).astype(np.float32)
    model, calib = if_model(tmp_path, sub_w, "y")
    out = tmp_path / "p.onnx"
    for method in (None, obs(calib, holdout=0.0)):
        r = prune_file(model, out, method=method, overwrite=True, min_numel=16,
                       allocation=AllocationOptions(calibration=calib, target_drift=0.1, levels=LEVELS, holdout=0))
        assert np.array_equal(then_initializer(out), sub_w)
        assert {x["name"]: x["sparsity"] for x in r.allocation["weights"]}.get("S") is None
        row = [t for t in r.tensors if t.name == "S"][0]
        assert row.target_sparsity == 0.0 and row.zeros_after == 0
        assert sum(t.zeros_after for t in r.tensors) > 0  # the others were pruned


def test_cli_obs_target_drift_on_digits(tmp_path):
    out = tmp_path / "p.onnx"
    r = CliRunner().invoke(main, [str(a) for a in (
        "prune", MODELS / "digits_mlp.onnx", "-o", out, "--target-drift", "0.05", "--calibration",
        MODELS / "digits_mlp_calib.npz", "--method", "obs", "--levels", "0.5,0.7,0.9", "--json")],
        catch_exceptions=False)
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)["allocation"]
    assert a["verified_drift"] <= 0.05 and a["pool_sparsity"] > 0.7
    assert a["criterion"]["final"].startswith("pipeline")


def test_name_shared_with_a_subgraph_weight_leaves_both_unpruned(tmp_path):
    """Rules and reports go by name: a main-graph weight named like one inside a subgraph cannot be
    given its own level, so neither is pruned (the main one used to get the other's level, unmeasured)."""
    rng = np.random.default_rng(5)
    s_main, s_sub = (rng.standard_normal((8, 8)).astype(np.float32) for _ in range(2))
    model, calib = if_model(tmp_path, s_sub, "y2", [helper.make_node("MatMul", ["y", "S"], ["y2"])],
                            [numpy_helper.from_array(s_main, "S")])
    out = tmp_path / "p.onnx"
    for method in (None, obs(calib, holdout=0.0)):
        r = prune_file(model, out, method=method, overwrite=True, min_numel=16,
                       allocation=AllocationOptions(calibration=calib, target_drift=0.2, levels=LEVELS, holdout=0))
        assert np.array_equal(then_initializer(out), s_sub)
        assert np.array_equal(weights_of(out)["S"], s_main)
        part = calib if method is None else measured_part(tmp_path, calib)  # magnitude measures on all of them
        assert validate_models(model, out, part).outputs[0]["rel_l2"] == pytest.approx(
            r.allocation["verified_drift"], rel=1e-6)
        assert "S" not in {x["name"] for x in r.allocation["weights"]}


def test_counts_stay_exact_with_uneven_existing_zeros(tmp_path):
    """OBS shares a count between column blocks; existing zeros crowded in one block used to push
    the total over the level."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((256, 32)).astype(np.float32)
    a[:128][rng.random((128, 32)) < 0.6] = 0  # zeros in the first 128 inputs of the [out, in] view only
    b = rng.standard_normal((32, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["y"])]
    model = tmp_path / "m.onnx"
    model.write_bytes(make_model(nodes, [vi("x", ["N", 256])], [vi("y", ["N", 8])],
                                 [numpy_helper.from_array(a, "A"), numpy_helper.from_array(b, "B")]).SerializeToString())
    calib = tmp_path / "c.npz"
    np.savez(calib, x=rng.standard_normal((300, 256)).astype(np.float32))
    out = tmp_path / "p.onnx"
    prune_file(model, out, 0.5, "local", method=obs(calib, holdout=0.0))  # the method's own run
    assert {k: zeros(v) for k, v in weights_of(out).items()} == {"A": round(0.5 * a.size), "B": round(0.5 * b.size)}
    r = prune_file(model, out, 0.5, overwrite=True, method=obs(calib, holdout=0.0),
                   allocation=AllocationOptions(calibration=calib, levels=LEVELS, holdout=0.0))
    w = weights_of(out)
    for x in r.allocation["weights"]:
        assert zeros(w[x["name"]]) == round(x["sparsity"] * x["numel"])
    assert sum(zeros(v) for v in w.values()) == round(0.5 * (a.size + b.size))
    assert zeros(w["A"]) >= zeros(a)  # and the existing zeros stayed


def test_quantized_weight_with_a_calibrated_criterion(tmp_path):
    """A DequantizeLinear(int8) -> MatMul weight: its layer's statistics are collected without
    feeding it (this crashed), and it is pruned to its zero point."""
    base = fragile_model()
    a = numpy_helper.to_array(base.graph.initializer[0])
    scale, zp = np.float32(np.abs(a).max() / 100), np.int8(3)
    aq = np.clip(np.round(a / scale) + zp, -128, 127).astype(np.int8)
    inits = [numpy_helper.from_array(aq, "Aq"), numpy_helper.from_array(np.array(scale, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, np.int8), "zp")] + list(base.graph.initializer[1:])
    nodes = [helper.make_node("DequantizeLinear", ["Aq", "s", "zp"], ["A"])] + list(base.graph.node)
    model = tmp_path / "q.onnx"
    model.write_bytes(make_model(nodes, [vi("x", ["N", 16])], [vi("y", ["N", 8])], inits).SerializeToString())
    calib = tmp_path / "c.npz"
    np.savez(calib, **calibration())
    out = tmp_path / "p.onnx"
    prune_file(model, out, 0.9, "local", method=obs(calib, holdout=0.0))
    assert int(np.count_nonzero(weights_of(out)["Aq"] == zp)) == round(0.9 * aq.size)
    r = prune_file(model, out, overwrite=True, method=obs(calib, holdout=0.0),
                   allocation=AllocationOptions(calibration=calib, target_drift=0.1, levels=LEVELS, holdout=0.0))
    assert validate_models(model, out, measured_part(tmp_path, calib)).outputs[0]["rel_l2"] <= 0.1
    assert weights_of(out)["Aq"].dtype == np.int8
    assert {t.name: t.method["criterion"] for t in r.tensors}["Aq"] == "obs"


def test_measuring_on_the_fitted_samples_is_optimistic(files, tmp_path):
    """measure_fraction 0: statistics and drift on the same samples (re-fits look better there than
    on samples they did not see); the default measures on samples the criterion did not fit."""
    model, calib = files
    got = {}
    for frac in (0.0, 0.3):
        r = prune_file(model, tmp_path / f"p{frac}.onnx", method=obs(calib, holdout=0.0),
                       allocation=AllocationOptions(calibration=calib, target_drift=0.1, levels=LEVELS, holdout=0.0,
                                                    measure_fraction=frac))
        got[frac] = r.allocation
    assert got[0.0]["criterion"]["statistics"] == got[0.0]["criterion"]["drift_measured_on"]
    assert got[0.3]["criterion"]["statistics"] != got[0.3]["criterion"]["drift_measured_on"]
    with pytest.raises(Exception, match="measure_fraction"):
        AllocationOptions(calibration=calib, measure_fraction=1.0)


def test_drift_mask_counts_only_the_marked_positions(tmp_path):
    """--drift-mask: outputs whose leading axes have the mask's shape are compared on its non-zero
    positions only (a transformer's padding is not data); other outputs as a whole."""
    from onnx_magprune.evaluator import DriftEvaluator, DriftSpec

    rng = np.random.default_rng(11)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("ReduceSum", ["y"], ["t"], keepdims=0)]
    model = make_model(nodes, [vi("x", ["N", "T", 4]), vi("m", ["N", "T"], TensorProto.INT64)],
                       [vi("y", ["N", "T", 6]), vi("t", [])], [numpy_helper.from_array(w, "W")])
    x = rng.standard_normal((3, 5, 4)).astype(np.float32)
    m = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=np.int64)
    x[m == 0] *= 50  # padding rows are large: they would dominate the whole-output error
    feeds = [{"x": x, "m": m}]
    pruned = w.copy()
    pruned[np.abs(w) < np.quantile(np.abs(w), 0.5)] = 0
    y, yp = x @ w, x @ pruned
    keep = m != 0
    want = np.linalg.norm(yp[keep] - y[keep]) / np.linalg.norm(y[keep])
    ev = DriftEvaluator(model, ["W"], open_calibration(feeds, model), DriftSpec(output="y", mask_input="m"))
    assert ev.drift({"W": pruned}) == pytest.approx(want, rel=1e-5)
    plain = DriftEvaluator(model, ["W"], open_calibration(feeds, model), DriftSpec(output="y"))
    assert plain.drift({"W": pruned}) == pytest.approx(np.linalg.norm(yp - y) / np.linalg.norm(y), rel=1e-5)
    scalar = DriftEvaluator(model, ["W"], open_calibration(feeds, model), DriftSpec(output="t", mask_input="m"))
    t, tp = y.sum(), yp.sum()
    assert scalar.drift({"W": pruned}) == pytest.approx(abs(tp - t) / abs(t), rel=1e-4)  # not masked: no T axis
    with pytest.raises(Exception, match="no input named 'mask'"):
        DriftEvaluator(model, ["W"], open_calibration(feeds, model), DriftSpec(output="y", mask_input="mask"))
    nothing = [{"x": x, "m": np.zeros_like(m)}]  # e.g. token_type_ids passed by mistake
    with pytest.raises(Exception, match="marks no position"):
        DriftEvaluator(model, ["W"], open_calibration(nothing, model), DriftSpec(output="y", mask_input="m"))


def test_single_search_batch_measures_in_sample_with_a_note(tmp_path):
    model = fragile_model()
    feeds = [calibration(16)]  # one whole batch: nothing to split
    from onnx_magprune.api import prune_model

    _, r = prune_model(model, method=obs(feeds, holdout=0.0),
                       allocation=AllocationOptions(calibration=feeds, target_drift=0.1, levels=LEVELS, holdout=0.0))
    assert any("too little to split" in n for n in r.allocation["notes"])
    assert r.allocation["verified_drift"] <= 0.1
