"""prune_model / prune_file / inspect_model end to end on tiny models."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import make_model, mlp, run_ort, tensor_by_name, vi, weight
from onnx_magprune.selection import target_count


def zeros(a):
    return int(np.count_nonzero(a == 0))


def test_global_prune_is_exact_and_runs(mlp_model):
    model, report = mp.prune_model(mlp_model, sparsity=0.8)
    n = 32 * 64 + 64 * 16
    assert report.totals.prunable_params == n
    assert report.totals.zeros_after == target_count(0.8, n) == report.totals.target_zeros
    assert zeros(tensor_by_name(model, "W0")) + zeros(tensor_by_name(model, "W1")) == target_count(0.8, n)
    # one threshold: every kept weight is at least as large as every pruned one
    kept = np.concatenate([np.abs(tensor_by_name(model, w)).ravel() for w in ("W0", "W1")])
    orig = np.concatenate([np.abs(tensor_by_name(mlp_model, w)).ravel() for w in ("W0", "W1")])
    assert kept[kept > 0].min() >= orig[kept == 0].max()
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
    assert run_ort(model, {"x": x})[0].shape == (3, 16)


def test_local_scope_prunes_each_tensor_exactly(mlp_model):
    model, report = mp.prune_model(mlp_model, sparsity=0.35, scope="local")
    for name, n in (("W0", 32 * 64), ("W1", 64 * 16)):
        assert zeros(tensor_by_name(model, name)) == target_count(0.35, n)
    assert {t.selection for t in report.tensors} == {"local"}


def test_everything_but_pruned_weights_is_byte_identical(mlp_model):
    mlp_model.doc_string = "keep me"
    mlp_model.metadata_props.add(key="k", value="v")
    mlp_model.graph.value_info.append(vi("m0", ["N", 64]))
    model, _ = mp.prune_model(mlp_model, sparsity=0.5)
    for field in ("doc_string", "metadata_props", "opset_import", "ir_version", "producer_name"):
        assert getattr(model, field) == getattr(mlp_model, field)
    assert list(model.graph.node) == list(mlp_model.graph.node)
    assert list(model.graph.value_info) == list(mlp_model.graph.value_info)
    for a, b in zip(model.graph.initializer, mlp_model.graph.initializer):
        if a.name.startswith("b"):
            assert a.SerializeToString() == b.SerializeToString()
        else:
            assert (a.name, a.dims, a.data_type) == (b.name, b.dims, b.data_type)


def test_input_model_object_and_file_are_not_modified(mlp_model, tmp_path):
    before = mlp_model.SerializeToString()
    mp.prune_model(mlp_model, sparsity=0.9)
    assert mlp_model.SerializeToString() == before
    src = tmp_path / "in.onnx"
    src.write_bytes(before)
    mp.prune_file(src, tmp_path / "out.onnx", sparsity=0.9)
    assert src.read_bytes() == before


def test_output_is_deterministic(mlp_model, tmp_path):
    src = tmp_path / "in.onnx"
    src.write_bytes(mlp_model.SerializeToString())
    digests = set()
    for i in range(3):
        out = tmp_path / f"out{i}.onnx"
        mp.prune_file(src, out, sparsity=0.7)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


def test_constant_and_subgraph_weights_are_pruned_in_place():
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [], [vi("t", [1, 16])])
    const = helper.make_node("Constant", [], ["C"], name="c", value=numpy_helper.from_array(weight((16, 16), 1), "C"))
    else_g = helper.make_graph([const, helper.make_node("MatMul", ["x", "C"], ["e"])], "else", [], [vi("e", [1, 16])])
    model = make_model([helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)],
                       [vi("x", [1, 16]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 16])],
                       [numpy_helper.from_array(weight((16, 16)), "W")])
    pruned, report = mp.prune_model(model, sparsity=0.5)
    assert report.totals.zeros_after == 256
    else_branch = next(a.g for a in pruned.graph.node[0].attribute if a.name == "else_branch")
    c = numpy_helper.to_array(else_branch.node[0].attribute[0].t)
    w = tensor_by_name(pruned, "W")
    assert zeros(c) + zeros(w) == 256
    onnx.checker.check_model(pruned, full_check=True)
    x = np.ones((1, 16), np.float32)
    for cond in (True, False):
        run_ort(pruned, {"x": x, "cond": np.array(cond)})


@pytest.mark.parametrize("dtype,elem", [(np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)])
def test_half_and_double_weights(dtype, elem):
    w = weight((32, 32), 2, dtype)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [vi("x", [1, 32], elem)],
                       [vi("y", [1, 32], elem)], [numpy_helper.from_array(w, "W")])
    pruned, report = mp.prune_model(model, sparsity=0.6)
    assert zeros(tensor_by_name(pruned, "W")) == target_count(0.6, 1024)
    assert report.tensors[0].dtype == ("float16" if dtype == np.float16 else "double")
    run_ort(pruned, {"x": np.ones((1, 32), dtype)})


def test_bfloat16_and_typed_field_storage_round_trip():
    bf16 = helper.make_tensor("B", TensorProto.BFLOAT16, [16, 16], weight((16, 16), 3).ravel().tolist())
    f32 = helper.make_tensor("F", TensorProto.FLOAT, [16, 16], weight((16, 16), 4).ravel().tolist())  # float_data
    nodes = [helper.make_node("Cast", ["B"], ["B32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["x", "B32"], ["h"]), helper.make_node("MatMul", ["h", "F"], ["y"])]
    model = make_model(nodes, [vi("x", [1, 16])], [vi("y", [1, 16])], [bf16, f32])
    pruned, _ = mp.prune_model(model, sparsity=0.5, scope="local")
    b, f = pruned.graph.initializer
    assert len(b.int32_data) == 256 and not b.raw_data  # storage kind kept
    assert len(f.float_data) == 256 and not f.raw_data
    assert zeros(numpy_helper.to_array(b).astype(np.float32)) == 128
    assert zeros(numpy_helper.to_array(f)) == 128


def test_rules_fix_exclude_and_bound_tensors(mlp_model):
    cfg = mp.PruneConfig(rules=(mp.Rule(name="W1", sparsity=0.25),))
    pruned, report = mp.prune_model(mlp_model, sparsity=0.9, config=cfg)
    assert zeros(tensor_by_name(pruned, "W1")) == target_count(0.25, 1024)
    assert zeros(tensor_by_name(pruned, "W0")) == target_count(0.9, 2048)  # alone in the global pool
    pruned, report = mp.prune_model(mlp_model, sparsity=0.9, exclude=["W0"])
    assert zeros(tensor_by_name(pruned, "W0")) == 0
    assert any(s.name == "W0" and s.reason == "excluded by --exclude (name='W0')" for s in report.skipped)
    cfg = mp.PruneConfig(rules=(mp.Rule(name="W1", max_sparsity=0.5),))
    pruned, report = mp.prune_model(mlp_model, sparsity=0.6, config=cfg)
    assert zeros(tensor_by_name(pruned, "W1")) == 512
    assert report.totals.zeros_after == target_count(0.6, 3072)


def test_op_glob_rules(mlp_model):
    cfg = mp.PruneConfig(rules=(mp.Rule(op="Mat*", exclude=True),))
    _, report = mp.prune_model(mlp_model, sparsity=0.5, config=cfg)
    assert report.tensors == [] and report.totals.zeros_after == 0


def test_nonfinite_weights_error_or_keep(mlp_model):
    w = numpy_helper.to_array(mlp_model.graph.initializer[2]).copy()
    w[0, 0] = np.nan
    mlp_model.graph.initializer[2].CopyFrom(numpy_helper.from_array(w, "W1"))
    with pytest.raises(mp.NonFiniteWeightError, match="weight 'W1' holds 1 NaN/Inf"):
        mp.prune_model(mlp_model, sparsity=0.5)
    pruned, report = mp.prune_model(mlp_model, sparsity=0.5, nonfinite="keep")
    assert np.isnan(tensor_by_name(pruned, "W1")[0, 0])
    assert report.totals.zeros_after == target_count(0.5, 3071)


def test_missing_sparsity_and_bad_options_are_config_errors(mlp_model):
    with pytest.raises(mp.ConfigError, match="no sparsity given"):
        mp.prune_model(mlp_model)
    with pytest.raises(mp.ConfigError, match=r"sparsity must be in \[0, 1\]"):
        mp.prune_model(mlp_model, sparsity=1.5)
    with pytest.raises(mp.ConfigError, match="scope must be one of"):
        mp.prune_model(mlp_model, sparsity=0.5, scope="sideways")
    with pytest.raises(mp.ConfigError, match="unexpected keyword argument 'sparsty'"):
        mp.prune_model(mlp_model, sparsty=0.5)


def test_inspect_reports_without_changing(mlp_model):
    report = mp.inspect_model(mlp_model)
    assert [t.name for t in report.tensors] == ["W0", "W1"]
    assert report.totals.zeros_after == report.totals.zeros_before == 0
    assert {s.name for s in report.skipped} == {"b0", "b1"}
    d = report.to_dict()
    assert d["schema_version"] == mp.SCHEMA_VERSION and d["command"] == "inspect"


def test_report_schema_keys(mlp_model):
    _, report = mp.prune_model(mlp_model, sparsity=0.5)
    d = json.loads(report.to_json())
    assert {"schema_version", "tensors", "skipped", "totals"} <= set(d)
    assert {"name", "numel", "zeros_before", "zeros_after", "sparsity", "threshold", "shape", "dtype",
            "consumers", "where"} <= set(d["tensors"][0])
    assert {"name", "reason"} <= set(d["skipped"][0])
    assert {"prunable_params", "zeros_after", "sparsity", "total_params"} <= set(d["totals"])


# ---------------------------------------------------------------------------
# external data


def _external_model(tmp_path, location="weights.bin"):
    model = mlp((64, 128, 32))
    path = tmp_path / "ext.onnx"
    onnx.save_model(onnx.ModelProto.FromString(model.SerializeToString()), path, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=0)
    return model, path


def _locations(model):
    out = {}
    for t in model.graph.initializer:
        info = {e.key: e.value for e in t.external_data}
        out[t.name] = (info.get("location"), info.get("offset"), info.get("length"))
    return out


def test_external_data_stays_external_with_same_layout(tmp_path):
    dense, src = _external_model(tmp_path)
    data_before = (tmp_path / "weights.bin").read_bytes()
    outdir = tmp_path / "out"
    outdir.mkdir()
    report = mp.prune_file(src, outdir / "pruned.onnx", sparsity=0.75)
    assert (tmp_path / "weights.bin").read_bytes() == data_before  # input untouched
    out_model = onnx.load(outdir / "pruned.onnx", load_external_data=False)
    renamed = {k: ("pruned.onnx.weights.bin", o, n) for k, (_loc, o, n) in
               _locations(onnx.load(src, load_external_data=False)).items()}
    assert _locations(out_model) == renamed  # same offsets and lengths, in a file named after the output
    assert os.path.getsize(outdir / "pruned.onnx.weights.bin") == len(data_before)
    loaded = onnx.load(outdir / "pruned.onnx")
    n = 64 * 128 + 128 * 32
    assert zeros(tensor_by_name(loaded, "W0")) + zeros(tensor_by_name(loaded, "W1")) == target_count(0.75, n)
    assert report.totals.zeros_after == target_count(0.75, n)
    np.testing.assert_array_equal(tensor_by_name(loaded, "b0"), tensor_by_name(dense, "b0"))
    onnx.checker.check_model(str(outdir / "pruned.onnx"), full_check=True)


def test_external_data_in_same_directory_is_renamed_not_overwritten(tmp_path):
    _, src = _external_model(tmp_path)
    data_before = (tmp_path / "weights.bin").read_bytes()
    mp.prune_file(src, tmp_path / "pruned.onnx", sparsity=0.5)
    assert (tmp_path / "weights.bin").read_bytes() == data_before
    out_model = onnx.load(tmp_path / "pruned.onnx", load_external_data=False)
    assert {loc for loc, _o, _l in _locations(out_model).values()} == {"pruned.onnx.weights.bin"}
    onnx.load(tmp_path / "pruned.onnx")  # data resolves


def test_outputs_sharing_a_directory_keep_their_own_data_files(tmp_path):
    _, src = _external_model(tmp_path)
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "weights.bin").write_bytes(b"someone else's file")
    mp.prune_file(src, outdir / "a.onnx", sparsity=0.5)
    mp.prune_file(src, outdir / "b.onnx", sparsity=0.9)
    assert (outdir / "weights.bin").read_bytes() == b"someone else's file"
    n = 64 * 128 + 128 * 32
    for name, s in (("a.onnx", 0.5), ("b.onnx", 0.9)):
        loaded = onnx.load(outdir / name)
        assert zeros(tensor_by_name(loaded, "W0")) + zeros(tensor_by_name(loaded, "W1")) == target_count(s, n)


def test_prune_model_reads_external_data_into_the_result(tmp_path):
    _, src = _external_model(tmp_path)
    model, report = mp.prune_model(src, sparsity=0.5)
    assert all(t.data_location == TensorProto.DEFAULT for t in model.graph.initializer)
    assert report.totals.zeros_after == target_count(0.5, 64 * 128 + 128 * 32)


def test_in_place_needs_overwrite(tmp_path, mlp_model):
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp_model.SerializeToString())
    with pytest.raises(mp.OutputError, match="refusing to overwrite the input model"):
        mp.prune_file(src, src, sparsity=0.5)
    mp.prune_file(src, src, sparsity=0.5, overwrite=True)
    assert zeros(tensor_by_name(onnx.load(src), "W0")) > 0


def test_in_place_repack_notes_the_data_file_it_no_longer_uses(tmp_path):
    model, src = _external_model(tmp_path)
    x = {"x": np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)}
    rep = mp.prune_file(src, src, sparsity=0.5, overwrite=True)  # dense: weights.bin rewritten where it was
    assert not [n for n in rep.notes if "no longer used" in n]
    expected = run_ort(onnx.load(src), x)[0]
    rep = mp.encode_file(src, src, "compact", overwrite=True)  # re-encoded into a fresh ext.onnx.data
    assert [n for n in rep.notes if "no longer used" in n] == [
        "the input's external data file 'weights.bin' is no longer used by the overwritten model; it was left "
        "in place"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "weights.bin"]
    np.testing.assert_array_equal(run_ort(onnx.load(src), x)[0], expected)


def test_failed_run_leaves_no_output(tmp_path, mlp_model):
    w = numpy_helper.to_array(mlp_model.graph.initializer[0]).copy()
    w[1, 1] = np.inf
    mlp_model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W0"))
    src = tmp_path / "m.onnx"
    src.write_bytes(mlp_model.SerializeToString())
    with pytest.raises(mp.NonFiniteWeightError):
        mp.prune_file(src, tmp_path / "out.onnx", sparsity=0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_unsafe_external_locations_are_refused(tmp_path):
    _, src = _external_model(tmp_path)
    for bad, msg in (("../x.bin", "contains '..'"), ("/etc/passwd", "absolute path")):
        m = onnx.load(src, load_external_data=False)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = bad
        evil = tmp_path / "evil.onnx"
        evil.write_bytes(m.SerializeToString())
        with pytest.raises(mp.ExternalDataError, match=msg):
            mp.prune_file(evil, tmp_path / "o.onnx", sparsity=0.5)
    (tmp_path / "sub").mkdir()
    os.symlink("/etc", tmp_path / "sub" / "link")
    m = onnx.load(src, load_external_data=False)
    t = m.graph.initializer[0]
    for e in t.external_data:
        if e.key == "location":
            e.value = "sub/link/passwd"
    evil.write_bytes(m.SerializeToString())
    with pytest.raises(mp.ExternalDataError, match="resolves outside the model directory"):
        mp.prune_file(evil, tmp_path / "o.onnx", sparsity=0.5)
    m = onnx.load(src, load_external_data=False)
    for e in m.graph.initializer[0].external_data:
        if e.key == "offset":
            e.value = str(10**9)
    evil.write_bytes(m.SerializeToString())
    with pytest.raises(mp.ExternalDataError, match="lies beyond the end"):
        mp.prune_file(evil, tmp_path / "o.onnx", sparsity=0.5)
    assert not (tmp_path / "o.onnx").exists()
