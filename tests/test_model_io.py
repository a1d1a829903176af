"""Loading, tensor storage and atomic saving."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import mlp, tensor_by_name
from onnx_magprune.model_io import load_model, save_model
from onnx_magprune.tensor_data import TensorStore


def test_load_errors_are_precise(tmp_path):
    good = mlp().SerializeToString()
    cases = {
        "truncated.onnx": (good[: len(good) // 2], "is not an ONNX model (protobuf parse failed"),
        "text.onnx": (b"hello, I am not a model", "is not an ONNX model"),
        "empty.onnx": (b"", "it has no graph"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(mp.ModelLoadError, match=message.replace("(", r"\(")):
            load_model(tmp_path / name)
    no_opset = mlp()
    del no_opset.opset_import[:]
    with pytest.raises(mp.ModelLoadError, match="declares no opset"):
        load_model(no_opset)


def test_typed_and_raw_storage_round_trip_bit_exact():
    store = TensorStore(None)
    rng = np.random.default_rng(0)
    for data_type in (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE):
        values = rng.standard_normal(12).astype(np.float32)
        typed = helper.make_tensor("t", data_type, [3, 4], values.tolist())
        raw = helper.make_tensor("r", data_type, [3, 4], values.tolist())
        raw_arr = store.read(typed)
        raw.ClearField("float_data"), raw.ClearField("int32_data"), raw.ClearField("double_data")
        raw.raw_data = raw_arr.tobytes()
        for t in (typed, raw):
            before = t.SerializeToString()
            arr = store.read(t)
            assert arr.shape == (3, 4)
            store.write(t, arr)
            assert t.SerializeToString() == before  # same field, same bytes


def test_size_mismatch_is_a_load_error():
    t = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    t.raw_data = t.raw_data[:-4]
    with pytest.raises(mp.ModelLoadError, match="holds 60 bytes but its shape \\[4, 4\\] needs 64"):
        TensorStore(None).read(t)


def test_external_data_in_a_subdirectory_is_written_flat_under_the_outputs_name(tmp_path):
    src_dir, out_dir = tmp_path / "src", tmp_path / "out"
    src_dir.mkdir(), out_dir.mkdir(), (src_dir / "weights").mkdir()
    model = mlp((64, 128, 32))
    onnx.save_model(model, src_dir / "m.onnx", save_as_external_data=True, location="weights/w.bin",
                    size_threshold=0)
    mp.prune_file(src_dir / "m.onnx", out_dir / "p.onnx", sparsity=0.5)
    pruned = onnx.load(out_dir / "p.onnx")
    assert np.count_nonzero(tensor_by_name(pruned, "W0") == 0) > 0
    assert sorted(p.name for p in out_dir.rglob("*")) == ["p.onnx", "p.onnx.weights_w.bin"]


def test_half_precision_constant_with_external_data(tmp_path):
    w = np.random.default_rng(1).standard_normal((32, 32)).astype(np.float16)
    const = helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W"))
    graph = helper.make_graph([const, helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 32])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 32])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    t = model.graph.node[0].attribute[0].t  # onnx.save_model leaves attribute tensors inline: move it by hand
    (tmp_path / "h.bin").write_bytes(b"\0" * 8 + t.raw_data)
    onnx.external_data_helper.set_external_data(t, "h.bin", offset=8, length=len(t.raw_data))
    t.ClearField("raw_data")
    t.data_location = TensorProto.EXTERNAL
    (tmp_path / "h.onnx").write_bytes(model.SerializeToString())
    report = mp.prune_file(tmp_path / "h.onnx", tmp_path / "hp.onnx", sparsity=0.75)
    assert report.totals.zeros_after == 768
    out = onnx.load(tmp_path / "hp.onnx")
    assert np.count_nonzero(numpy_helper.to_array(out.graph.node[0].attribute[0].t) == 0) == 768


def test_save_refuses_a_directory_and_cleans_up(tmp_path):
    loaded = load_model(mlp())
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(mp.OutputError, match="is a directory"):
        save_model(loaded, tmp_path / "d.onnx")
    save_model(loaded, tmp_path / "ok.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.onnx", "ok.onnx"]
    assert (tmp_path / "ok.onnx").stat().st_mode & 0o777 != 0o600  # ordinary permissions, not mkstemp's
