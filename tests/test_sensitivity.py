"""Sensitivity sweep: one session, curves, drift conventions, CLI, plots."""

from __future__ import annotations

import json
import sys

import onnxruntime
import pytest
from click.testing import CliRunner

from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig, Rule
from onnx_magprune.drift import Metric, drift_value
from onnx_magprune.errors import ConfigError
from onnx_magprune.sensitivity import SweepOptions, parse_levels, sensitivity_sweep
from sensitivity_models import write

LEVELS = (0.3, 0.6, 0.9)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def files(tmp_path):
    return write(tmp_path)


@pytest.fixture
def count_sessions(monkeypatch):
    made = []
    real = onnxruntime.InferenceSession

    class Counting(real):
        def __init__(self, *a, **k):
            made.append(1)
            super().__init__(*a, **k)

    monkeypatch.setattr(onnxruntime, "InferenceSession", Counting)
    return made


def test_sweep_builds_one_session(files, count_sessions):
    model, calib = files
    r = sensitivity_sweep(model, calib, options=SweepOptions(levels=LEVELS))
    assert len(count_sessions) == 1
    assert r.sessions == 1
    assert r.evaluations == 3 * len(LEVELS)
    assert [c.name for c in r.curves] == ["A", "F", "B"]
    assert all(c.levels == list(LEVELS) for c in r.curves)


def test_fragile_layer_has_the_largest_drift(files):
    model, calib = files
    r = sensitivity_sweep(model, calib, options=SweepOptions(levels=LEVELS))
    by = {c.name: c.drift for c in r.curves}
    for j in range(len(LEVELS)):
        assert by["F"][j] > by["A"][j] and by["F"][j] > by["B"][j]
    assert by["F"] == sorted(by["F"])  # more pruning, more drift
    shares = {c.name: c.share for c in r.curves}
    assert shares == {"A": 512 / 1792, "F": 1024 / 1792, "B": 256 / 1792}


def test_exclusions_are_not_swept(files):
    model, calib = files
    cfg = PruneConfig(rules=(Rule(name="F", exclude=True),))
    r = sensitivity_sweep(model, calib, config=cfg, options=SweepOptions(levels=(0.5,)))
    assert [c.name for c in r.curves] == ["A", "B"]
    assert any(s["name"] == "F" and "excluded" in s["reason"] for s in r.skipped)


def test_deterministic_json(files):
    model, calib = files
    a = sensitivity_sweep(model, calib, options=SweepOptions(levels=LEVELS)).to_json(timings=False)
    b = sensitivity_sweep(model, calib, options=SweepOptions(levels=LEVELS)).to_json(timings=False)
    assert a == b


def test_parallel_jobs_match(files):
    model, calib = files
    one = sensitivity_sweep(model, calib, options=SweepOptions(levels=(0.5,), jobs=1))
    two = sensitivity_sweep(model, calib, options=SweepOptions(levels=(0.5,), jobs=2))
    assert [c.drift[0] for c in one.curves] == pytest.approx([c.drift[0] for c in two.curves], rel=1e-5)
    assert two.sessions == 3  # the parent's (dense reference) and one per worker


def test_drift_conventions():
    outs = [{"name": "a", "kind": "float", "rel_l2": 0.2, "cosine": 0.9, "top1_agreement": 0.75},
            {"name": "b", "kind": "float", "rel_l2": 0.5, "cosine": 0.99, "top1_agreement": None},
            {"name": "c", "kind": "exact", "exact_match": 0.9}]
    acc = {"drop": 0.25}
    assert drift_value(Metric.REL_L2, outs, acc) == 0.5
    assert drift_value(Metric.REL_L2, outs, acc, "a") == 0.2
    assert drift_value(Metric.COSINE, outs, acc, "a") == pytest.approx(0.1)
    assert drift_value(Metric.TOP1, outs, acc) == 0.25
    assert drift_value(Metric.ACCURACY, outs, acc) == 0.25
    assert drift_value(Metric.COSINE, outs, acc) == pytest.approx(0.1)  # worst: c's 1 - exact match is 0.1 too
    with pytest.raises(ConfigError):
        drift_value(Metric.ACCURACY, outs, None)
    with pytest.raises(ConfigError):
        drift_value(Metric.TOP1, outs, acc, "b")
    with pytest.raises(ConfigError):
        drift_value(Metric.REL_L2, outs, acc, "nope")
    assert drift_value(Metric.REL_L2, [{"name": "a", "kind": "float", "rel_l2": float("nan")}], None) == float("inf")


def test_levels_parsing():
    assert parse_levels("0.9,0.3, 0.5") == (0.3, 0.5, 0.9)
    for bad in ("0,0.5", "1.5", "x", ""):
        with pytest.raises(ConfigError):
            parse_levels(bad)


def test_cli_report_keys(files, tmp_path):
    model, calib = files
    out = tmp_path / "s.json"
    r = invoke("sensitivity", model, "--calibration", calib, "--levels", "0.5,0.9", "--report", out, "-q")
    assert r.exit_code == 0, r.output
    d = json.loads(out.read_text())
    assert {"schema_version", "command", "metric", "metric_meaning", "output", "levels", "calibration", "weights",
            "skipped", "evaluations", "sessions", "jobs", "seconds", "evaluations_per_second", "plots",
            "notes"} <= set(d)
    assert d["sessions"] == 1 and d["evaluations"] == 6 and d["levels"] == [0.5, 0.9]
    assert set(d["weights"][0]) == {"name", "numel", "share", "zeros_before", "selection", "bounds", "levels",
                                    "drift", "members"}


@pytest.mark.parametrize("args, message", [
    ((), "needs calibration data"),
    (("--levels", "0.5,2"), "levels"),
    (("--output", "nope"), "no output named 'nope'"),
    (("--metric", "accuracy"), "needs labels"),
])
def test_cli_bad_input_exit_2(files, args, message):
    model, calib = files
    calib_args = () if not args else ("--calibration", calib)
    r = invoke("sensitivity", model, *calib_args, *args, "-q")
    assert r.exit_code == 2
    assert message in r.output and len(r.output.strip().splitlines()) == 1


def test_cli_plot_written(files, tmp_path):
    pytest.importorskip("matplotlib")
    model, calib = files
    png, md = tmp_path / "s.png", tmp_path / "s.md"
    r = invoke("sensitivity", model, "--calibration", calib, "--levels", "0.5", "--plot", png, "--markdown", md,
               "--report", tmp_path / "s.json", "-q")
    assert r.exit_code == 0, r.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![sensitivity](s.png)" in md.read_text()
    assert json.loads((tmp_path / "s.json").read_text())["plots"] == {"sensitivity": str(png)}


def test_cli_without_matplotlib_says_how(files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    model, calib = files
    png, report = tmp_path / "s.png", tmp_path / "s.json"
    r = CliRunner().invoke(main, ["sensitivity", str(model), "--calibration", str(calib), "--levels", "0.5",
                                  "--plot", str(png), "--report", str(report), "-q"])
    assert r.exit_code == 0
    assert "pip install 'onnx-magprune[plot]'" in r.output
    assert not png.exists()
    d = json.loads(report.read_text())
    assert d["plots"] is None and d["weights"][0]["drift"]  # the data is in the JSON


def test_groups_are_swept_together(files):
    model, calib = files
    r = sensitivity_sweep(model, calib, options=SweepOptions(levels=(0.5,), groups=("[AB]",)))
    assert [(c.name, c.members, c.numel) for c in r.curves] == [("[AB]", ["A", "B"], 768), ("F", None, 1024)]
    assert r.evaluations == 2
