"""Calibration-aware structured removal: the numpy maths, and end to end on tiny models and digits."""

import numpy as np
import onnx
import pytest

from conftest import MODELS, mlp, run_ort
from test_structured import _w, ffn
from onnx_magprune.api import prune_file, prune_model
from onnx_magprune.config import PruneConfig
from onnx_magprune.errors import ConfigError
from onnx_magprune.methods import MethodOptions
from onnx_magprune.structured_refit import (activation_scores, lsq_refit, obs_remove, output_error,
                                            removal_costs)
from onnx_magprune.structured_rewrite import rewrite
from onnx_magprune.structured_run import StructuredOptions, StructuredRun
from onnx_magprune.structured_select import global_counts, local_counts, norm_scores

S = StructuredOptions()


def _gram(n=400, width=12, seed=0, bias=True):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, width)) @ (np.eye(width) + 0.3 * rng.standard_normal((width, width)))
    x[:, 0] *= 5
    if bias:
        x = np.hstack([x, np.ones((n, 1))])
    return x, x.T @ x


# --- numpy --------------------------------------------------------------------------------------------


def test_obs_remove_equals_least_squares_on_its_selection():
    x, h = _gram()
    w = np.random.default_rng(1).standard_normal((13, 5))
    cols = np.arange(12)[:, None]
    removed, new = obs_remove(h, w, cols, 5, damp=1e-10)
    assert removed.tolist() == sorted(removed.tolist()) and len(removed) == 5
    np.testing.assert_allclose(new, lsq_refit(h, w, cols, removed, 1e-10), atol=1e-6)
    # with real dampening both pull the kept rows toward their old values alike
    removed_d, new_d = obs_remove(h, w, cols, 5, damp=0.1)
    np.testing.assert_allclose(new_d, lsq_refit(h, w, cols, removed_d, 0.1), atol=1e-8)
    assert (new[removed] == 0).all() and (new[-1] != w[-1]).any()  # the bias row moved
    # the re-fit beats zeroing, and the greedy selection beats typical (random) selections re-fitted alike
    zeroed = w.copy()
    zeroed[removed] = 0
    assert output_error(w, new, h) < output_error(w, zeroed, h)
    rng = np.random.default_rng(2)
    others = [output_error(w, lsq_refit(h, w, cols, np.sort(rng.choice(12, 5, replace=False)), 1e-10), h)
              for _ in range(20)]
    assert output_error(w, new, h) < np.median(others)


def test_block_units_match_least_squares_and_single_removal_costs():
    x, h = _gram(width=12)
    w = np.random.default_rng(3).standard_normal((13, 4))
    cols = np.arange(12).reshape(6, 2)  # each unit owns two features (a Conv kernel or a Flatten block)
    removed, new = obs_remove(h, w, cols, 3, damp=1e-10)
    np.testing.assert_allclose(new, lsq_refit(h, w, cols, removed, 1e-10), atol=1e-6)
    costs = removal_costs(h, w, cols, 1e-10)
    for u in range(6):
        alone = lsq_refit(h, w, cols, np.array([u]), 1e-10)
        assert costs[u] == pytest.approx(output_error(w, alone, h), rel=1e-5)


def test_activation_scores_are_activation_norm_times_outgoing_norm():
    col_sq = np.array([4.0, 1.0, 9.0])
    w = np.array([[1.0, 0.0], [3.0, 4.0], [0.0, 1.0]])
    np.testing.assert_allclose(activation_scores(col_sq, w, np.arange(3)[:, None]), [2.0, 5.0, 3.0])


def test_counts_are_exact_and_deterministic():
    assert local_counts([10, 7, 3], [0.5, 0.5, 0.9], min_units=1) == [5, 4, 2]  # 3.5 rounds up; 2.7 -> 3, capped
    scores = [np.array([0.1, 0.5, 0.2, 0.9]), np.array([0.3, 0.05, 0.3])]
    assert global_counts(scores, 3 / 7, [(0.0, 1.0)] * 2, 1) == [2, 1]
    assert global_counts(scores, 6 / 7, [(0.0, 1.0)] * 2, 1) == [3, 2]  # min_units caps both
    assert global_counts(scores, 3 / 7, [(0.0, 0.25), (0.0, 1.0)], 1) == [1, 2]  # bounds hold
    np.testing.assert_allclose(norm_scores(np.array([[3.0, -4.0], [1.0, 1.0]]), "l1"), [3.5, 1.0])
    np.testing.assert_allclose(norm_scores(np.array([[3.0, -4.0]]), "l2"), [np.sqrt(12.5)])


# --- end to end -----------------------------------------------------------------------------------


def _ffn_data(seed=0, n=24):
    return [{"x": _w((4, 6, 8), seed + i)} for i in range(n // 4)]


def _err(a, b, feeds):
    ya = np.concatenate([run_ort(a, f)[0] for f in feeds])
    yb = np.concatenate([run_ort(b, f)[0] for f in feeds])
    return float(np.linalg.norm(ya - yb) / np.linalg.norm(ya))


@pytest.mark.parametrize("method", ["wanda", "obs"])
def test_calibrated_removal_beats_weight_norm_and_matches_its_masked_model(method):
    model = ffn("erf", hidden=32, width=8)
    calib = _ffn_data()
    held = [{"x": _w((4, 6, 8), 100 + i)} for i in range(4)]
    norm, _ = prune_model(model, 0.5, "local", structured=S, min_numel=0)
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    opts = MethodOptions(method=method, calibration=calib, holdout=0.0)
    from onnx_magprune.calibration import open_calibration

    run = StructuredRun(proto, PruneConfig(sparsity=0.5, scope="local", min_numel=0), S, opts,
                        open_calibration(calib, model))
    (g,) = run.structured_dict()["groups"]
    assert g["refit"] is True and g["bias_refit"] is True and g["error_after"] < g["error_masked"]
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    rewrite(masked, [(run.groups[0].group, run.groups[0].removed)], run.values, mode="mask")
    for f in held:
        np.testing.assert_allclose(run_ort(proto, f)[0], run_ort(masked, f)[0], rtol=1e-5, atol=1e-5)
    assert _err(model, proto, held) < 0.7 * _err(model, norm, held)


def test_obs_without_refit_keeps_its_selection_and_leaves_the_kept_rows_alone():
    """``--method obs --no-refit``: the units OBS selects are removed, every kept weight is the original."""
    from onnx_magprune.calibration import open_calibration

    model = ffn("erf", hidden=32, width=8)
    runs = {}
    for refit in (True, False):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        opts = MethodOptions(method="obs", refit=refit, calibration=_ffn_data(), holdout=0.0)
        run = StructuredRun(proto, PruneConfig(sparsity=0.5, scope="local", min_numel=0), S, opts,
                            open_calibration(_ffn_data(), model))
        runs[refit] = (run, proto)
    (g,) = runs[False][0].structured_dict()["groups"]
    assert g["criterion"] == "obs" and g["refit"] is False and g["bias_refit"] is False
    assert g["error_after"] == g["error_masked"]
    removed = runs[False][0].groups[0].removed
    np.testing.assert_array_equal(removed, runs[True][0].groups[0].removed)  # same selection either way
    kept = np.setdiff1d(np.arange(32), removed)
    init = {t.name: onnx.numpy_helper.to_array(t) for t in runs[False][1].graph.initializer}
    orig = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(init["W2"], orig["W2"][kept])  # consumer rows: not re-fitted
    np.testing.assert_array_equal(init["b2"], orig["b2"])  # consumer bias: not re-fitted
    np.testing.assert_array_equal(init["W1"], orig["W1"][:, kept])
    refitted = {t.name: onnx.numpy_helper.to_array(t) for t in runs[True][1].graph.initializer}
    assert not np.array_equal(refitted["W2"], orig["W2"][kept])  # the default re-fits them


def test_sequential_cnn_uses_one_session_and_reports_statistics(tmp_path):
    data = dict(np.load(MODELS / "digits_cnn_calib.npz"))
    data.pop("labels")
    calib = tmp_path / "c.npz"
    np.savez(calib, **{k: v[:200] for k, v in data.items()})
    out = tmp_path / "o.onnx"
    rep = prune_file(MODELS / "digits_cnn.onnx", out, 0.5, "local", structured=S,
                     method=MethodOptions(method="obs", calibration=str(calib), holdout=0.25))
    s = rep.structured
    assert s["criterion"] == "obs" and s["statistics_run"]["sessions"] == 1
    assert s["statistics_run"]["stages"] == 3 and s["statistics_run"]["holdout_samples"] == 50
    assert [g["units_after"] for g in s["groups"]] == [8, 16, 64]
    assert any("rank-deficient" in w for w in s["warnings"])  # fc1 reads 512 (+1) features from 150 images
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_cnn_channel_removal_with_refit_keeps_accuracy():
    data = dict(np.load(MODELS / "digits_cnn_calib.npz"))
    labels = data.pop("labels")
    calib = [{k: v[i:i + 50] for k, v in data.items()} for i in range(0, 300, 50)]
    held = {k: v[300:] for k, v in data.items()}
    dense = onnx.load(MODELS / "digits_cnn.onnx")
    acc = lambda m: float((run_ort(m, held)[0].argmax(1) == labels[300:]).mean())  # noqa: E731
    obs, _ = prune_model(dense, 0.5, "local", structured=S, method=MethodOptions(method="obs", calibration=calib,
                                                                                   holdout=0.0))
    norm, _ = prune_model(dense, 0.5, "local", structured=S)
    assert acc(obs) >= acc(dense) - 0.03 and acc(obs) > acc(norm)


def test_calibrated_criteria_need_calibration():
    with pytest.raises(ConfigError):
        prune_model(mlp(), 0.5, structured=S, method=MethodOptions(method="obs"))
    with pytest.raises(ConfigError, match="needs calibration"):
        StructuredRun(mlp(), PruneConfig(sparsity=0.5), S, MethodOptions(method="magnitude", refit=True,
                                                                          calibration=[{}]), None)



def test_allocation_fills_the_cheapest_hull_segments_exactly():
    from onnx_magprune.structured_allocate import allocate, lower_hull

    assert lower_hull([2, 4, 6], [1.0, 1.5, 4.0]) == [(0, 0.0), (4, 1.5), (6, 4.0)]  # (2, 1) is above the chord
    flat = ([2, 4], [0.1, 0.2])  # cheap: 0.05 per unit
    steep = ([2, 4], [1.0, 2.0])  # 0.5 per unit
    assert allocate([flat, steep], 5, [0, 0], [4, 4]) == [4, 1]
    assert allocate([flat, steep], 5, [0, 3], [4, 4]) == [2, 3]  # floors first
    assert allocate([flat, steep], 20, [0, 0], [4, 3]) == [4, 3]  # caps hold
    assert allocate([steep, steep], 3, [0, 0], [4, 4]) == [3, 0]  # ties: the earlier group first
    # past the last measured point only when the measured segments run out: flat is measured to 4 units
    # only, so its straight extension (0.05 per unit) comes after steep's measured 0.5 per unit ...
    assert allocate([flat, steep], 7, [0, 0], [8, 4]) == [4, 3]
    # ... and is used, cheapest first, once nothing measured is left
    assert allocate([flat, steep], 10, [0, 0], [8, 4]) == [6, 4]


def test_global_scope_with_calibration_allocates_by_measured_drift():
    model = mlp((8, 24, 16, 4))
    calib = [{"x": _w((16, 8), i)} for i in range(6)]
    _, rep = prune_model(model, 0.5, "global", structured=S, min_numel=0,
                         method=MethodOptions(method="obs", calibration=calib, holdout=0.0))
    groups = rep.structured["groups"]
    assert sum(g["units_before"] - g["units_after"] for g in groups) == 20  # round(0.5 * 40), exactly
    for g in groups:
        # measured at 0.25x, 0.5x, ... 2x the target fraction, up to the cap (min_units 1 kept)
        units = g["units_before"]
        want = sorted({min(units - 1, round(m * 0.5 * units + 1e-9)) for m in (0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75, 2)})
        assert g["drift_curve"]["removed"] == want and want[-1] == units - 1 and len(want) == 8
        assert all(d >= 0 for d in g["drift_curve"]["drift"])
