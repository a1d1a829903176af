"""Regression tests for problems a code review found."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import mlp, vi
from onnx_magprune.cli import main
from onnx_magprune.selection import SelectionParams, select_smallest


def test_weights_passed_into_local_functions_are_found_and_pruned():
    w = np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32)
    fn = helper.make_function("loc", "Lin", ["a", "w"], ["o"], [helper.make_node("MatMul", ["a", "w"], ["o"])],
                              opset_imports=[helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("Lin", ["x", "Wf"], ["y"], domain="loc")], "g", [vi("x", [1, 16])],
                          [vi("y", [1, 16])], [numpy_helper.from_array(w, "Wf")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("loc", 1)],
                          functions=[fn])
    pruned, report = mp.prune_model(m, sparsity=0.5, min_numel=16)
    assert [(t.name, t.consumers) for t in report.tensors] == [("Wf", ["MatMul"])]
    assert report.totals.zeros_after == 128
    import onnxruntime as ort

    ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])


def test_unwritable_report_fails_before_writing_the_model(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp().SerializeToString())
    r = CliRunner().invoke(main, ["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5",
                                  "--report", str(tmp_path / "nodir" / "r.json")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_weight_sharing_external_bytes_with_a_skipped_tensor_is_not_pruned(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    (tmp_path / "c.bin").write_bytes(w.tobytes())
    tensors = []
    for name in ("w3", "emb"):
        t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=[16, 16], data_location=TensorProto.EXTERNAL)
        for key, value in (("location", "c.bin"), ("offset", "0"), ("length", str(w.nbytes))):
            t.external_data.add(key=key, value=value)
        tensors.append(t)
    nodes = [helper.make_node("MatMul", ["x", "w3"], ["h"]), helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("Add", ["h", "e"], ["y"])]
    g = helper.make_graph(nodes, "g", [vi("x", [16, 16]), vi("ids", [16], TensorProto.INT64)], [vi("y", [16, 16])],
                          tensors)
    (tmp_path / "m.onnx").write_bytes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
                                      .SerializeToString())
    (tmp_path / "out").mkdir()
    report = mp.prune_file(tmp_path / "m.onnx", tmp_path / "out" / "p.onnx", sparsity=0.7, min_numel=16)
    assert report.tensors == []
    assert {s.name: s.reason for s in report.skipped}["w3"] == \
        "shares its external data bytes with 'emb', which is not pruned"
    assert (tmp_path / "out" / "p.onnx.c.bin").read_bytes() == w.tobytes()


def test_output_named_like_the_inputs_data_file_gets_its_own_data_file(tmp_path):
    onnx.save_model(mlp((64, 128, 32)), tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    (tmp_path / "out").mkdir()
    r = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "out" / "w.bin"),
                                  "--sparsity", "0.5", "--format", "dense"])  # data files are named after the output
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["w.bin", "w.bin.w.bin"]
    onnx.checker.check_model(str(tmp_path / "out" / "w.bin"), full_check=True)


def test_overwrite_in_place_keeps_permissions(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp().SerializeToString())
    os.chmod(src, 0o640)
    assert CliRunner().invoke(main, ["prune", str(src), "-o", str(src), "--sparsity", "0.5", "--overwrite",
                                     "-q"]).exit_code == 0
    assert src.stat().st_mode & 0o777 == 0o640


def test_selection_params_and_k_are_checked():
    with pytest.raises(ValueError, match="split_ways must be an integer >= 2"):
        SelectionParams(split_ways=1)
    with pytest.raises(ValueError, match="chunk must be an integer >= 1"):
        SelectionParams(chunk=0)
    a = np.arange(100, dtype=np.float32)
    with pytest.raises(ValueError, match=r"k=150 is outside \[0, 100\]"):
        select_smallest([a], 150, params=SelectionParams(direct_max=4))


def test_usage_errors_are_one_line(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp().SerializeToString())
    for args in (["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--sparsity", "inf"],
                 ["prune", str(tmp_path), "-o", str(tmp_path / "o.onnx"), "--sparsity", "0.5"],
                 ["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--scope", "sideways"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2
        lines = [ln for ln in r.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), r.output
