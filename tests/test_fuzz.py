"""Fuzzing: random small graphs and byte-level corruptions of valid models.

Invariant: every run either succeeds with a model that passes the checker
whenever the input did and loads in ONNX Runtime whenever the input did, or
exits 2 with a one-line message; never a traceback or an "unexpected" error,
and never a partial output file.  Crashers found are kept in
``test_fuzz_corpus`` below as regression tests.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from conftest import mlp
from onnx_magprune.cli import main

FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16, TensorProto.DOUBLE: np.float64}


def loads_in_ort(data: bytes) -> bool:
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return True
    except Exception:  # noqa: BLE001 - any refusal
        return False


def passes_checker(model: onnx.ModelProto) -> bool:
    try:
        onnx.checker.check_model(model, full_check=True)
        return True
    except Exception:  # noqa: BLE001
        return False


def check_run(data: bytes, *extra: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        src.write_bytes(data)
        r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "-q", *extra])
        assert r.exit_code in (0, 2), r.output
        assert "Traceback" not in r.output and "unexpected" not in r.output, r.output
        assert src.read_bytes() == data  # input untouched
        names = sorted(p.name for p in Path(tmp).iterdir())
        if r.exit_code == 2:
            assert names == ["in.onnx"], names  # no partial output
            assert len([ln for ln in r.output.splitlines() if ln.startswith("error:")]) == 1
            return
        assert names == ["in.onnx", "out.onnx"]
        try:
            model_in = onnx.ModelProto.FromString(data)
        except Exception:  # noqa: BLE001
            return
        model_out = onnx.load(str(out))
        if passes_checker(model_in):
            assert passes_checker(model_out)
        if loads_in_ort(data):
            assert loads_in_ort(out.read_bytes())


@st.composite
def graphs(draw):
    """Chains of MatMul/Gemm/Add/Relu/Transpose with weights as initializers or Constant nodes,
    of random float types, optionally inside an If branch."""
    elem = draw(st.sampled_from(sorted(FLOATS)))
    np_t = FLOATS[elem]
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    width = draw(st.integers(1, 12))
    nodes, inits = [], []
    prev = "x"
    for i in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["matmul", "gemm", "add", "relu", "transpose_w", "shared"]))
        out = f"h{i}"
        w = rng.standard_normal((width, width)).astype(np_t)
        if draw(st.booleans()):
            w[rng.random(w.shape) < 0.3] = 0
        as_constant = draw(st.booleans())
        wname = f"W{i}"
        if kind in ("matmul", "gemm", "transpose_w", "shared", "add"):
            if as_constant:
                nodes.append(helper.make_node("Constant", [], [wname], value=numpy_helper.from_array(w, wname)))
            else:
                inits.append(numpy_helper.from_array(w, wname))
        if kind == "matmul":
            nodes.append(helper.make_node("MatMul", [prev, wname], [out]))
        elif kind == "gemm":
            nodes.append(helper.make_node("Gemm", [prev, wname], [out], transB=draw(st.integers(0, 1))))
        elif kind == "add":
            nodes.append(helper.make_node("Add", [prev, wname], [out]))
        elif kind == "relu":
            nodes.append(helper.make_node("Relu", [prev], [out]))
        elif kind == "transpose_w":
            nodes += [helper.make_node("Transpose", [wname], [wname + "t"], perm=[1, 0]),
                      helper.make_node("MatMul", [prev, wname + "t"], [out])]
        else:  # one weight used twice
            nodes += [helper.make_node("MatMul", [prev, wname], [out + "a"]),
                      helper.make_node("MatMul", [out + "a", wname], [out])]
        prev = out
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    x = helper.make_tensor_value_info("x", elem, [width, width])
    y = helper.make_tensor_value_info("y", elem, [width, width])
    if draw(st.booleans()):  # wrap the chain in an If branch capturing outer initializers
        branch = helper.make_graph(nodes, "then", [], [y])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["y2"])], "else", [],
                                  [helper.make_tensor_value_info("y2", elem, [width, width])])
        nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=other)]
        inputs = [x, helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    else:
        inputs = [x]
    graph = helper.make_graph(nodes, "g", inputs, [y], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=graphs(), sparsity=st.sampled_from(["0", "0.3", "0.5", "0.9", "1"]),
       scope=st.sampled_from(["global", "local"]), min_numel=st.sampled_from(["0", "4", "128"]))
def test_random_graphs(model, sparsity, scope, min_numel):
    check_run(model.SerializeToString(), "--sparsity", sparsity, "--scope", scope, "--min-numel", min_numel)


VALID = mlp((8, 16, 4)).SerializeToString()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_byte_corruptions(data):
    raw = bytearray(VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        op = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete", "set"]))
        pos = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if op == "flip" and raw:
            raw[pos] ^= 1 << data.draw(st.integers(0, 7))
        elif op == "truncate":
            del raw[pos:]
        elif op == "insert":
            raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del raw[pos:pos + data.draw(st.integers(1, 8))]
        elif op == "set" and raw:
            raw[pos] = data.draw(st.integers(0, 255))
    check_run(bytes(raw), "--sparsity", "0.5", "--min-numel", "4")


def _corpus():
    """Inputs that once crashed (kept as regression tests)."""
    base = mlp((8, 16, 4))
    cases = {}
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.initializer[0].dims[0] = 1_000_000_000  # shape far larger than the data
    cases["huge_dims"] = m.SerializeToString()
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.initializer[0].data_type = 999  # unknown element type
    cases["unknown_dtype"] = m.SerializeToString()
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.initializer[0].dims[0] = -3  # negative dimension
    cases["negative_dim"] = m.SerializeToString()
    m = onnx.ModelProto.FromString(base.SerializeToString())
    del m.graph.node[:]
    cases["empty_graph"] = m.SerializeToString()
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.node[0].domain = "my.custom"
    m.graph.node[0].op_type = "CustomMatMul"
    m.opset_import.add(domain="my.custom", version=1)
    cases["custom_op"] = m.SerializeToString()
    m = onnx.ModelProto.FromString(base.SerializeToString())
    m.graph.initializer[0].raw_data = m.graph.initializer[0].raw_data[:-2]  # truncated tensor bytes
    cases["short_raw_data"] = m.SerializeToString()
    return cases


@pytest.mark.parametrize("name", sorted(_corpus()))
def test_fuzz_corpus(name):
    check_run(_corpus()[name], "--sparsity", "0.5", "--min-numel", "4")


def test_output_over_the_inputs_external_data_is_refused(tmp_path):
    model = mlp((64, 128, 32))
    onnx.save_model(model, tmp_path / "m.onnx", save_as_external_data=True, location="w.bin", size_threshold=0)
    before = (tmp_path / "w.bin").read_bytes()
    r = CliRunner().invoke(main, ["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "w.bin"),
                                  "--sparsity", "0.5"])
    assert r.exit_code == 2 and "over the input's external data file" in r.output
    assert (tmp_path / "w.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "w.bin"]


def test_pruning_a_pruned_model_again_changes_nothing(tmp_path):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp((32, 64, 16)).SerializeToString())
    for scope in ("global", "local"):
        once, twice = tmp_path / f"once-{scope}.onnx", tmp_path / f"twice-{scope}.onnx"
        for a, b in ((src, once), (once, twice)):
            assert CliRunner().invoke(main, ["prune", str(a), "-o", str(b), "--sparsity", "0.7", "--scope", scope,
                                             "-q"]).exit_code == 0
        assert once.read_bytes() == twice.read_bytes()


def test_custom_ops_prune_but_validation_says_onnxruntime_cannot_run(tmp_path):
    m = mlp((8, 16, 4))
    m.graph.node[2].domain, m.graph.node[2].op_type = "my.custom", "FancyRelu"
    m.opset_import.add(domain="my.custom", version=1)
    src, out = tmp_path / "c.onnx", tmp_path / "p.onnx"
    src.write_bytes(m.SerializeToString())
    r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--min-numel", "4", "-q"])
    assert r.exit_code == 0 and out.exists()
    r = CliRunner().invoke(main, ["validate", str(src), str(out), "-q"])
    assert r.exit_code == 2 and "onnxruntime cannot load" in r.output and "Traceback" not in r.output


def test_zero_sized_and_half_precision_models(tmp_path):
    from onnx_magprune.validate import validate_models

    w = np.random.default_rng(0).standard_normal((32, 32)).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Concat", ["h", "E"], ["y"], axis=1)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [2, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2, 32])],
                          [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.zeros((2, 0), np.float16), "E")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    src, out = tmp_path / "h.onnx", tmp_path / "p.onnx"
    src.write_bytes(m.SerializeToString())
    r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--json"])
    assert r.exit_code == 0, r.output
    import json

    report = json.loads(r.output)
    assert [t["name"] for t in report["tensors"]] == ["W"] and report["totals"]["zeros_after"] == 512
    assert {s["name"]: s["reason"] for s in report["skipped"]}["E"] == "empty tensor"
    v = validate_models(src, out, gates=__import__("onnx_magprune").Gates(min_cosine=0.5))
    assert v.outputs[0]["kind"] == "float" and 0.5 < v.outputs[0]["cosine"] < 1.0 and v.passed


@pytest.mark.parametrize("fmt", ["auto", "sparse", "compact"])
def test_pruning_an_encoded_model_again_writes_the_same_bytes(tmp_path, fmt):
    """Weights in initializers and in Constants (one with an unnamed tensor, as exporters write them),
    at magnitudes that give each a different sparsity under one global threshold, so auto mixes formats."""
    rng = np.random.default_rng(4)
    w = [rng.standard_normal((48, 48)).astype(np.float32) * s for s in (4.0, 1.0, 0.05, 1.5)]
    nodes = [helper.make_node("Constant", [], ["W1"], value=numpy_helper.from_array(w[1], "")),
             helper.make_node("Constant", [], ["W3"], value=numpy_helper.from_array(w[3], "W3")),
             helper.make_node("MatMul", ["x", "W0"], ["h0"]), helper.make_node("MatMul", ["h0", "W1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "W2"], ["h2"]), helper.make_node("MatMul", ["h2", "W3"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 48])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])],
                              [numpy_helper.from_array(w[0], "W0"), numpy_helper.from_array(w[2], "W2")])
    src = tmp_path / "m.onnx"
    src.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    reports = []
    for a, b in ((src, once), (once, twice)):
        r = CliRunner().invoke(main, ["prune", str(a), "-o", str(b), "--sparsity", "0.8", "--format", fmt,
                                      "--min-numel", "16", "-q", "--report", str(tmp_path / "r.json")])
        assert r.exit_code == 0, r.output
        reports.append(json.loads((tmp_path / "r.json").read_text()))
    formats = sorted(t["format"] for t in reports[0]["tensors"])
    if fmt == "auto":
        assert len(set(formats)) >= 2, formats  # a mix, or the test would not test placement
    assert {t["name"]: t["format"] for t in reports[1]["tensors"]} == {t["name"]: t["format"]
                                                                      for t in reports[0]["tensors"]}
    assert once.read_bytes() == twice.read_bytes()
