"""The command line: exit codes, one-line errors, reports."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from conftest import MODELS, mlp
from onnx_magprune import __version__
from onnx_magprune.cli import main
from onnx_magprune.selection import target_count


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    path.write_bytes(mlp().SerializeToString())
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version():
    r = invoke("--version")
    assert r.exit_code == 0 and __version__ in r.output


def test_prune_writes_model_and_report(model_file, tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = invoke("prune", model_file, "-o", out, "--sparsity", "0.8", "--report", rep)
    assert r.exit_code == 0, r.output
    assert "W0" in r.output and "zeros: 0 -> 2,458 (sparsity 80.01%; asked for 2,458)" in r.output
    data = json.loads(rep.read_text())
    assert data["schema_version"] == 1
    assert data["totals"]["zeros_after"] == target_count(0.8, 32 * 64 + 64 * 16)
    assert [t["name"] for t in data["tensors"]] == ["W0", "W1"]
    onnx.checker.check_model(str(out), full_check=True)


def test_json_output_and_quiet(model_file, tmp_path):
    r = invoke("prune", model_file, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "--json")
    assert json.loads(r.output)["command"] == "prune"
    r = invoke("prune", model_file, "-o", tmp_path / "p.onnx", "--sparsity", "0.5", "-q")
    assert r.exit_code == 0 and r.output == ""


def test_inspect(model_file):
    r = invoke("inspect", model_file)
    assert r.exit_code == 0
    assert "b0" in r.output and "1-D tensor" in r.output and "prunable params: 3,072" in r.output


def test_scope_exclude_and_config(model_file, tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"rules": [{"name": "W1", "sparsity": 0.5}]}))
    out = tmp_path / "p.onnx"
    r = invoke("prune", model_file, "-o", out, "--sparsity", "0.9", "--scope", "local", "--config", cfg,
               "--exclude", "W0")
    assert r.exit_code == 0, r.output
    m = onnx.load(out)
    w0, w1 = (numpy_helper.to_array(t) for t in m.graph.initializer if t.name in ("W0", "W1"))
    assert np.count_nonzero(w0 == 0) == 0 and np.count_nonzero(w1 == 0) == 512


@pytest.mark.parametrize("args,message", [
    (["prune", "{model}", "-o", "{out}", "--sparsity", "1.5"], "1.5 is not in the range"),
    (["prune", "{model}", "-o", "{out}"], "error: no sparsity given"),
    (["prune", "{tmp}/nope.onnx", "-o", "{out}", "--sparsity", "0.5"], "error: cannot read model"),
    (["prune", "{garbage}", "-o", "{out}", "--sparsity", "0.5"], "is not an ONNX model"),
    (["prune", "{model}", "-o", "{tmp}/no/such/dir/o.onnx", "--sparsity", "0.5"], "output directory"),
    (["prune", "{model}", "-o", "{model}", "--sparsity", "0.5"], "refusing to overwrite the input model"),
    (["prune", "{model}", "-o", "{out}", "--sparsity", "0.5", "--config", "{tmp}/c.yaml"], "cannot read config"),
    (["inspect", "{tmp}"], "is a directory"),
])
def test_bad_input_exits_2_with_one_line(model_file, tmp_path, args, message):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07\x12\x03abc\xff\xff\xff")
    args = [a.format(model=model_file, out=tmp_path / "o.onnx", tmp=tmp_path, garbage=garbage) for a in args]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o.onnx").exists()
    if message.startswith("error:") or "Error:" not in r.output:
        assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1


def test_debug_shows_the_traceback(tmp_path):
    r = CliRunner().invoke(main, ["--debug", "inspect", str(tmp_path / "nope.onnx")])
    assert r.exit_code == 2 and "Traceback" in r.output


def test_console_script_and_module_entry_points(model_file, tmp_path):
    r = subprocess.run([sys.executable, "-m", "onnx_magprune", "prune", str(model_file), "-o",
                        str(tmp_path / "p.onnx"), "--sparsity", "0.3", "-q"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, "-m", "onnx_magprune", "prune", str(model_file), "-o",
                        str(tmp_path / "p.onnx"), "--sparsity", "2"], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_real_model_from_models_dir(tmp_path):
    out = tmp_path / "cnn.onnx"
    r = invoke("prune", MODELS / "digits_cnn.onnx", "-o", out, "--sparsity", "0.8")
    assert r.exit_code == 0
    assert "zeros: 0 -> 57,254 (sparsity 80.00%; asked for 57,254)" in r.output
