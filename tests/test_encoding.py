"""Sparse formats: bit-exact round trips, ONNX Runtime loads them, the checker passes, auto never grows."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import MODELS
from onnx_magprune.cli import main
from onnx_magprune.encoding import decode_model

DTYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


def model_with_weights(dtype, where: str, sparsity: float):
    """x @ W with W (16x16) as an initializer, a Constant node (its tensor named W, unnamed as most exporters
    leave it, or named otherwise), an initializer captured by an If branch, or a Constant inside that branch."""
    elem = DTYPES[dtype]
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 16)).astype(dtype)
    w[rng.random(w.shape) < sparsity] = 0
    if sparsity >= 1.0:
        w[:] = 0
    w.reshape(-1)[3] = -0.0 if sparsity >= 1.0 else w.reshape(-1)[3]  # a negative zero must round-trip
    x, y = helper.make_tensor_value_info("x", elem, [1, 16]), helper.make_tensor_value_info("y", elem, [1, 16])
    inits, nodes, inputs = [], [], [x]
    tensor_name = {"constant_unnamed": "", "constant_renamed": "W_value"}.get(where, "W")
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, tensor_name))
    if where.startswith("constant"):
        nodes.append(const)
    elif where in ("initializer", "subgraph"):
        inits.append(numpy_helper.from_array(w, "W"))
    if where.startswith("subgraph"):
        inner = [const] if where == "subgraph_constant" else []
        then = helper.make_graph(inner + [helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                                 [helper.make_tensor_value_info("t", elem, [1, 16])])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                                  [helper.make_tensor_value_info("e", elem, [1, 16])])
        nodes.append(helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other))
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    else:
        nodes.append(helper.make_node("MatMul", ["x", "W"], ["y"]))
    g = helper.make_graph(nodes, "g", inputs, [y], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), w


def run(model, dtype):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": np.random.default_rng(1).standard_normal((1, 16)).astype(dtype)}
    if any(i.name == "c" for i in sess.get_inputs()):
        feeds["c"] = np.array(True)
    return sess.run(None, feeds)[0]


def weight_bits(model):
    """The bytes of W after ``decode``: an initializer W, or the tensor of the Constant writing W."""
    decoded = onnx.ModelProto.FromString(model.SerializeToString())
    decode_model(decoded)
    graphs = [decoded.graph] + [a.g for n in decoded.graph.node for a in n.attribute if a.HasField("g")]
    for g in graphs:
        for t in g.initializer:
            if t.name == "W":
                return numpy_helper.to_array(t).tobytes()
        for n in g.node:
            if n.op_type == "Constant" and list(n.output) == ["W"]:
                return numpy_helper.to_array(n.attribute[0].t).tobytes()
    raise AssertionError("W not found after decode")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
@pytest.mark.parametrize("where", ["initializer", "constant", "constant_unnamed", "constant_renamed", "subgraph",
                                   "subgraph_constant"])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.95, 1.0])
def test_round_trips(dtype, where, sparsity):
    model, w = model_with_weights(dtype, where, sparsity)
    dense_out = run(model, dtype)
    for fmt in ("sparse", "sparse-int32", "compact", "auto"):
        encoded, report = mp.prune_model(model, sparsity=0.0, format=fmt, min_numel=16)
        t = report.tensors[0]
        assert t.name == "W"
        assert t.stored_bytes <= w.nbytes if fmt == "auto" else True
        assert np.array_equal(run(encoded, dtype).view(np.uint8), dense_out.view(np.uint8))  # bit-exact
        assert weight_bits(encoded) == w.tobytes()  # decode is bit-exact, -0.0 included
        if fmt != "sparse-int32":
            onnx.checker.check_model(encoded, full_check=True)
        nnz = int(np.count_nonzero(w.view(np.dtype(f"u{w.itemsize}"))))
        expected = {"sparse": nnz * (w.itemsize + 8), "sparse-int32": nnz * (w.itemsize + 4)}
        assert t.format == "compact" if fmt == "compact" else True
        if t.format in expected:
            assert t.stored_bytes == expected[t.format]


@pytest.mark.parametrize("fmt", ["sparse", "auto"])
def test_sparse_needs_opset_11(fmt):
    model, w = model_with_weights(np.float32, "initializer", 0.95)
    model.opset_import[0].version = 9
    encoded, report = mp.prune_model(model, sparsity=0.0, format=fmt, min_numel=16)
    onnx.checker.check_model(encoded, full_check=True)  # sparse_value would be an unknown attribute at opset 9
    assert report.tensors[0].format == "dense"
    assert not any(n.op_type == "Constant" for n in encoded.graph.node)
    if fmt == "sparse":
        assert report.tensors[0].format_note == "sparse: a Constant's sparse_value needs opset 11, the model has opset 9"


@pytest.mark.parametrize("fmt", ["sparse", "auto", "compact"])
def test_a_constant_weight_in_a_local_function(fmt):
    w = np.random.default_rng(5).standard_normal((16, 16)).astype(np.float32)
    w[np.abs(w) < 1.6] = 0  # ~89% zeros: auto picks sparse
    body = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w, "")),
            helper.make_node("MatMul", ["a", "w"], ["b"])]
    func = helper.make_function("local", "F", ["a"], ["b"], body, [helper.make_opsetid("", 17)])
    g = helper.make_graph([helper.make_node("F", ["x"], ["y"], domain="local")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func])
    encoded, report = mp.prune_model(model, sparsity=0.0, format=fmt, min_numel=16)
    expected = "dense" if fmt == "compact" else "sparse"  # compact: functions have no initializers
    assert report.tensors[0].format == expected
    onnx.checker.check_model(encoded, full_check=True)
    assert np.array_equal(run(encoded, np.float32), run(model, np.float32))


def test_sparse_int32_stays_dense_in_subgraphs():
    model, w = model_with_weights(np.float32, "subgraph_constant", 0.95)
    encoded, report = mp.prune_model(model, sparsity=0.0, format="sparse-int32", min_numel=16)
    assert report.tensors[0].format == "dense" and "INT32 indices" in report.tensors[0].format_note
    assert np.array_equal(run(encoded, np.float32), run(model, np.float32))


def test_auto_picks_the_smaller_per_tensor():
    model, _ = model_with_weights(np.float32, "initializer", 0.5)
    _, report = mp.prune_model(model, sparsity=0.5, format="auto", min_numel=16)
    assert report.tensors[0].format == "dense"  # 50% float32: COO INT64 would be larger
    _, report = mp.prune_model(model, sparsity=0.9, format="auto", min_numel=16)
    assert report.tensors[0].format == "sparse" and report.tensors[0].stored_bytes < 16 * 16 * 4
    assert any("densifies sparse initializers" in n for n in report.notes)


def test_cli_prune_encode_decode_files(tmp_path):
    dense, sparse, again, back = (tmp_path / f"{n}.onnx" for n in ("dense", "sparse", "again", "back"))
    r = CliRunner().invoke(main, ["prune", str(MODELS / "digits_cnn.onnx"), "-o", str(dense), "--sparsity", "0.9",
                                  "--format", "dense", "-q"])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["encode", str(dense), "-o", str(sparse), "--format", "sparse", "--json"])
    assert r.exit_code == 0, r.output
    assert sparse.stat().st_size < dense.stat().st_size * 0.45
    onnx.checker.check_model(str(sparse), full_check=True)
    r = CliRunner().invoke(main, ["prune", str(MODELS / "digits_cnn.onnx"), "-o", str(again), "--sparsity", "0.9",
                                  "--format", "sparse", "-q"])
    assert r.exit_code == 0 and again.read_bytes() == sparse.read_bytes()
    r = CliRunner().invoke(main, ["decode", str(sparse), "-o", str(back)])
    assert r.exit_code == 0 and "decoded 4 sparse or compact tensor(s)" in r.output
    x = np.load(MODELS / "digits_cnn_calib.npz")["input"]
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (dense, sparse, back)]
    assert all(np.array_equal(o.view(np.uint32), outs[0].view(np.uint32)) for o in outs)
    weights = {t.name: t.raw_data for t in onnx.load(str(dense)).graph.initializer}
    assert {t.name: t.raw_data for t in onnx.load(str(back)).graph.initializer} == weights


def test_sparse_formats_with_external_data_write_a_fresh_data_file(tmp_path):
    from conftest import mlp

    onnx.save_model(mlp((64, 128, 32)), tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    before = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "out").mkdir()
    dense_out, sparse_out = tmp_path / "out" / "d.onnx", tmp_path / "out" / "s.onnx"
    mp.prune_file(tmp_path / "m.onnx", dense_out, sparsity=0.9)
    report = mp.prune_file(tmp_path / "m.onnx", sparse_out, sparsity=0.9, format="sparse")
    assert (tmp_path / "w.bin").read_bytes() == before
    assert {t.format for t in report.tensors} == {"sparse"}
    # the sparse weights are inline now, and what is left (biases) is under the 1 KiB external threshold
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["d.onnx", "d.onnx.w.bin", "s.onnx"]
    size = lambda *ps: sum(p.stat().st_size for p in ps)  # noqa: E731
    assert size(sparse_out) < 0.4 * size(dense_out, tmp_path / "out" / "d.onnx.w.bin")
    onnx.checker.check_model(str(sparse_out), full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    a, b = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
            for p in (dense_out, sparse_out))
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))
    back = tmp_path / "out" / "b.onnx"
    assert CliRunner().invoke(main, ["decode", str(sparse_out), "-o", str(back)]).exit_code == 0
    dense_w = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path / "out")).tobytes()
               for t in onnx.load(str(dense_out)).graph.initializer}
    back_w = {t.name: numpy_helper.to_array(t).tobytes() for t in onnx.load(str(back)).graph.initializer}
    assert back_w == dense_w


def test_auto_with_external_data_writes_a_fresh_data_file(tmp_path):
    from conftest import mlp

    onnx.save_model(mlp((64, 128, 32)), tmp_path / "m.onnx", save_as_external_data=True, location="w.bin",
                    size_threshold=0)
    out = tmp_path / "a.onnx"
    report = mp.prune_file(tmp_path / "m.onnx", out, sparsity=0.5, format="auto")
    # at 50% the compact code (values + ~2.3 bits per element) beats dense and INT64 COO
    assert {t.format for t in report.tensors} == {"compact"}
    data = tmp_path / "a.onnx.data"
    dense_bytes = (64 * 128 + 128 * 32) * 4
    assert data.exists() and 0.5 * dense_bytes < data.stat().st_size < 0.6 * dense_bytes
    onnx.checker.check_model(str(out), full_check=True)
    x = np.ones((1, 64), np.float32)
    ref = mp.prune_model(tmp_path / "m.onnx", sparsity=0.5)[0]
    a = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    b = ort.InferenceSession(ref.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_a_subgraph_initializer_shadowing_an_outer_name_stays_dense_with_a_note():
    """An If branch may hold its own initializer 'W' beside the outer 'W'; a Constant or decoder
    output named 'W' in the branch would break single assignment, so that weight stays dense."""
    rng = np.random.default_rng(9)
    w_out, w_in = (rng.standard_normal((16, 16)).astype(np.float32) for _ in range(2))
    def branch(name, inits):
        return helper.make_graph([helper.make_node("MatMul", ["x", "W"], [name])], name, [],
                                 [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, 16])], inits)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("If", ["c"], ["y"], then_branch=branch("t", [numpy_helper.from_array(w_in, "W")]),
                              else_branch=branch("e", []))]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                                       helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16]),
                           helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 16])],
                          [numpy_helper.from_array(w_out, "W")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    for fmt in ("sparse", "compact", "auto"):
        pruned, report = mp.prune_model(model, sparsity=0.9, scope="local", format=fmt)
        onnx.checker.check_model(pruned, full_check=True)
        ort.InferenceSession(pruned.SerializeToString(), providers=["CPUExecutionProvider"])
        notes = [t.format_note for t in report.tensors if t.format == "dense"]
        assert any(n and "defines the name 'W' too" in n for n in notes), fmt


def test_encode_keeps_nonfinite_values_and_overridable_initializers_say_why_they_stay_dense(tmp_path):
    w = np.random.default_rng(10).standard_normal((32, 32)).astype(np.float32)
    w[np.abs(w) < 1.0] = 0
    w[0, 0], w[1, 1] = np.nan, np.inf
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
                          [numpy_helper.from_array(w, "W")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), tmp_path / "m.onnx")
    res = CliRunner().invoke(main, ["encode", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "e.onnx"),
                                    "--format", "compact", "-q"])
    assert res.exit_code == 0, res.output  # nothing is pruned: NaN/Inf are stored as they are
    dec = tmp_path / "d.onnx"
    assert CliRunner().invoke(main, ["decode", str(tmp_path / "e.onnx"), "-o", str(dec)]).exit_code == 0
    back = numpy_helper.to_array(onnx.load(dec).graph.initializer[0])
    assert back.tobytes() == w.tobytes()
    g.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, [32, 32]))  # IR 3 style
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    _, report = mp.prune_model(model, sparsity=0.9, format="compact", include_overridable=True, nonfinite="keep")
    t = report.tensors[0]
    assert t.format == "dense" and t.format_note.startswith("compact: an initializer that is also a graph input")
