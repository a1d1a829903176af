"""Allocation: Lagrange bisection over curves, budget search, config bounds, CLI."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from onnx_magprune.allocation import allocate, make_curve, max_zeros, min_zeros, zeros_for_cost
from onnx_magprune.allocation_search import AllocationOptions, escape_glob
from onnx_magprune.api import prune_file
from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig, Rule
from onnx_magprune.errors import ConfigError
from onnx_magprune.validate import validate_models
from conftest import MODELS
from sensitivity_models import weights_of, write

LEVELS = (0.3, 0.5, 0.7, 0.9)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def files(tmp_path):
    return write(tmp_path)


def sparsity(a: np.ndarray) -> float:
    return float(np.count_nonzero(a == 0)) / a.size


# ---------------------------------------------------------------- pure allocation


def test_allocate_spends_on_the_cheap_curve():
    cheap = make_curve(1000, LEVELS, [0.01, 0.02, 0.03, 0.05])
    dear = make_curve(1000, LEVELS, [0.3, 0.5, 0.7, 0.9])
    a = allocate([cheap, dear], 1000)
    assert a.counts == [900, 100]  # cheap to its highest swept level, the rest along dear's first segment
    assert sum(a.counts) == 1000
    assert a.cost == pytest.approx(0.05 + 0.1)


def test_allocate_respects_bounds_and_exact_totals():
    curves = [make_curve(500, LEVELS, [0.01, 0.02, 0.03, 0.04], (0.0, 0.4)),
              make_curve(300, LEVELS, [0.5, 0.6, 0.7, 0.8], (0.2, 1.0)),
              make_curve(200, LEVELS, [0.1, 0.2, 0.3, 0.4])]
    assert min_zeros(curves) == 60 and max_zeros(curves) == 200 + 270 + 180
    for zeros in (0, 60, 123, 400, 650, 700):
        a = allocate(curves, zeros)
        assert sum(a.counts) == min(max(zeros, 60), 650)
        assert a.counts[0] <= 200 and a.counts[1] >= 60
        assert all(0 <= k <= c.numel for k, c in zip(a.counts, curves))


def test_zeros_for_cost_is_the_largest_within_budget():
    curves = [make_curve(100, LEVELS, [0.1, 0.2, 0.4, 0.8]), make_curve(100, LEVELS, [0.05, 0.1, 0.2, 0.6])]
    z = zeros_for_cost(curves, 0.3)
    assert allocate(curves, z).cost <= 0.3 < allocate(curves, z + 1).cost


def test_escape_glob():
    assert escape_glob("a*b?[c]") == "a[*]b[?][[]c]"


# ---------------------------------------------------------------- on a model


def test_fragile_layer_gets_less_sparsity(files, tmp_path):
    model, calib = files
    out = tmp_path / "p.onnx"
    report = prune_file(model, out, 0.5, allocation=AllocationOptions(calibration=calib, levels=LEVELS, holdout=0.0))
    w = weights_of(out)
    s = {k: sparsity(v) for k, v in w.items()}
    assert s["F"] < s["A"] and s["F"] < s["B"]
    assert sum(np.count_nonzero(v == 0) for v in w.values()) == round(0.5 * 1792)  # exactly round(S x N)
    chosen = {x["name"]: x["sparsity"] for x in report.allocation["weights"]}
    assert chosen == pytest.approx(s)
    assert report.allocation["chosen_by"] in ("allocation", "global magnitude")


@pytest.mark.parametrize("budget", [0.01, 0.05, 0.2, 0.5])
def test_target_drift_never_exceeds_budget(files, tmp_path, budget):
    model, calib = files
    out = tmp_path / "p.onnx"
    report = prune_file(model, out, allocation=AllocationOptions(calibration=calib, target_drift=budget,
                                                                 levels=LEVELS, holdout=0.0))
    a = report.allocation
    assert a["measured_drift"] <= budget and a["verified_drift"] <= budget
    measured = validate_models(model, out, calib).outputs[0]["rel_l2"]  # what the user would check
    assert measured <= budget
    assert measured == pytest.approx(a["verified_drift"], rel=1e-6)
    assert a["evaluations"]["total"] == a["evaluations"]["sweep"] + a["evaluations"]["search"] + \
        a["evaluations"]["tradeoff"]
    assert a["evaluations"]["sweep"] == 3 * len(LEVELS)


def test_more_budget_more_sparsity(files, tmp_path):
    model, calib = files
    got = []
    for budget in (0.02, 0.3):
        r = prune_file(model, tmp_path / f"p{budget}.onnx",
                       allocation=AllocationOptions(calibration=calib, target_drift=budget, levels=LEVELS, holdout=0))
        got.append(r.allocation["pool_sparsity"])
    assert got[0] < got[1]


def test_exclusions_bounds_and_fixed_rules_hold(files, tmp_path):
    model, calib = files
    cfg = PruneConfig(rules=(Rule(name="B", exclude=True), Rule(name="A", max_sparsity=0.25),
                             Rule(name="F", min_sparsity=0.1)))
    out = tmp_path / "p.onnx"
    r = prune_file(model, out, config=cfg,
                   allocation=AllocationOptions(calibration=calib, target_drift=0.3, levels=LEVELS, holdout=0))
    w, dense = weights_of(out), weights_of(model)
    assert np.array_equal(w["B"], dense["B"])  # excluded: untouched
    assert sparsity(w["A"]) <= 0.25
    assert sparsity(w["F"]) >= 0.1
    assert "B" not in {x["name"] for x in r.allocation["weights"]}
    fixed = PruneConfig(rules=(Rule(name="B", sparsity=0.5),))
    r = prune_file(model, tmp_path / "q.onnx", config=fixed,
                   allocation=AllocationOptions(calibration=calib, target_drift=0.3, levels=LEVELS, holdout=0))
    assert sparsity(weights_of(tmp_path / "q.onnx")["B"]) == 0.5
    assert {x["name"]: x["selection"] for x in r.allocation["weights"]}["B"] == "fixed"


def test_deterministic_output(files, tmp_path):
    model, calib = files
    opts = AllocationOptions(calibration=calib, target_drift=0.1, levels=LEVELS)
    prune_file(model, tmp_path / "a.onnx", allocation=opts)
    prune_file(model, tmp_path / "b.onnx", allocation=opts)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_input_not_modified_and_holdout_validated(files, tmp_path):
    model, calib = files
    before = model.read_bytes()
    args = ["prune", model, "-o", tmp_path / "p.onnx", "--target-drift", "0.1", "--calibration", calib,
            "--levels", "0.5,0.9", "--report", tmp_path / "r.json", "-q"]
    assert invoke(*args).exit_code == 0
    assert model.read_bytes() == before
    d = json.loads((tmp_path / "r.json").read_text())
    a = d["allocation"]
    assert {"mode", "metric", "target_drift", "pool_sparsity", "predicted_drift", "measured_drift", "verified_drift",
            "weights", "sensitivity", "search", "evaluations", "sessions", "seconds", "plots", "notes",
            "search_data", "held_out"} <= set(a)
    assert a["mode"] == "target-drift" and a["held_out"] and "holdout" in d["validation"]["calibration"]["description"]
    assert "statistics" in a["search_data"]["description"]


@pytest.mark.parametrize("extra, message", [
    (("--target-drift", "0.1"), "needs calibration data"),
    (("--target-drift", "0.1", "--sparsity", "0.5", "--calibration", "CALIB"), "drop --sparsity"),
    (("--allocate", "sensitivity", "--calibration", "CALIB"), "needs --sparsity"),
    (("--target-drift", "-1", "--calibration", "CALIB"), "target drift"),
    (("--target-drift", "0.1", "--calibration", "CALIB", "--method", "wanda", "--pattern", "2:4"), "drop --pattern"),
    (("--target-drift", "0.1", "--calibration", "CALIB", "--metric", "accuracy"), "needs labels"),
    (("--target-drift", "0.1", "--calibration", "CALIB", "--drift-output", "nope"), "no output named"),
    (("--target-drift", "0.1", "--calibration", "CALIB", "--drift-mask", "nope"), "no input named 'nope'"),
    (("--sparsity", "0.5", "--allocate", "sensitivity", "--calibration", "CALIB", "--structured", "neurons"),
     "drop --structured"),
])
def test_cli_bad_input_exit_2(files, tmp_path, extra, message):
    model, calib = files
    out = tmp_path / "p.onnx"
    r = invoke("prune", model, "-o", out, *[calib if x == "CALIB" else x for x in extra])
    assert r.exit_code == 2, r.output
    assert message in r.output and len(r.output.strip().splitlines()) == 1
    assert not out.exists()


def test_impossible_budget_exits_1_and_writes_nothing(files, tmp_path):
    model, calib = files
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rules": [{"name": "F", "sparsity": 0.9}]}))
    out = tmp_path / "p.onnx"
    r = invoke("prune", model, "-o", out, "--config", cfg, "--target-drift", "0.001", "--calibration", calib,
               "--levels", "0.5")
    assert r.exit_code == 1 and not out.exists()


def test_plots_and_markdown(files, tmp_path):
    pytest.importorskip("matplotlib")
    model, calib = files
    md = tmp_path / "r.md"
    r = invoke("prune", model, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--allocate", "sensitivity",
               "--calibration", calib, "--levels", "0.5,0.9", "--plots", tmp_path, "--markdown", md,
               "--report", tmp_path / "r.json", "-q")
    assert r.exit_code == 0, r.output
    plots = json.loads((tmp_path / "r.json").read_text())["allocation"]["plots"]
    assert set(plots) == {"sensitivity", "allocation", "tradeoff"}
    for path in plots.values():
        assert open(path, "rb").read(4) == b"\x89PNG"
    text = md.read_text()
    assert "![tradeoff](p.tradeoff.png)" in text and "## Allocation" in text


def test_no_matplotlib_message(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    model, calib = files
    r = CliRunner().invoke(main, ["prune", str(model), "-o", str(tmp_path / "p.onnx"), "--target-drift", "0.1",
                                  "--calibration", str(calib), "--levels", "0.5,0.9", "--plots", str(tmp_path),
                                  "--report", str(tmp_path / "r.json"), "-q"])
    assert r.exit_code == 0
    assert "pip install 'onnx-magprune[plot]'" in r.output
    a = json.loads((tmp_path / "r.json").read_text())["allocation"]
    assert a["plots"] is None and set(a["tradeoff"]) == {"local", "global", "allocated"}
    assert not list(tmp_path.glob("*.png"))


def test_digits_mlp_end_to_end(tmp_path):
    out = tmp_path / "p.onnx"
    r = invoke("prune", MODELS / "digits_mlp.onnx", "-o", out, "--target-drift", "0.02", "--metric", "accuracy",
               "--calibration", MODELS / "digits_mlp_calib.npz", "--levels", "0.5,0.7,0.9", "--json")
    assert r.exit_code == 0, r.output
    a = json.loads(r.output)["allocation"]
    assert a["measured_drift"] <= 0.02 and a["verified_drift"] <= 0.02
    assert a["pool_sparsity"] > 0.5
    assert a["sessions"] == 3  # the sweep/search session, and the plain dense + pruned check


def test_options_validation():
    with pytest.raises(ConfigError):
        AllocationOptions(calibration=None, target_drift=0.1)
    with pytest.raises(ConfigError):
        AllocationOptions(calibration="x.npz", jobs=0)


def test_group_members_share_one_level(files, tmp_path):
    model, calib = files
    out = tmp_path / "p.onnx"
    r = prune_file(model, out, 0.5, allocation=AllocationOptions(calibration=calib, levels=LEVELS, holdout=0,
                                                                 groups=("[AB]",)))
    w = weights_of(out)
    assert r.allocation["chosen_by"] == "allocation"  # no global-magnitude fallback with groups
    assert abs(sparsity(w["A"]) - sparsity(w["B"])) < 2 / 256
    assert sum(np.count_nonzero(v == 0) for v in w.values()) == round(0.5 * 1792)
    assert {x["name"]: x["group"] for x in r.allocation["weights"]} == {"A": "[AB]", "F": None, "B": "[AB]"}
    assert r.allocation["evaluations"]["sweep"] == 2 * len(LEVELS)
