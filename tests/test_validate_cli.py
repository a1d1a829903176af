"""validate, bench and prune --calibration: gates, exit codes, reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

import onnx_magprune as mp
from conftest import MODELS
from onnx_magprune.cli import main
from onnx_magprune.validate import RuntimeOptions, ValidationRequest, validate_models
from onnx_magprune.validation_report import Gates

CNN, CNN_DATA = MODELS / "digits_cnn.onnx", MODELS / "digits_cnn_calib.npz"


@pytest.fixture(scope="module")
def pruned_cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "cnn70.onnx"
    mp.prune_file(CNN, out, sparsity=0.7)
    return out


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_validate_end_to_end_with_labels(pruned_cnn):
    r = validate_models(CNN, pruned_cnn, CNN_DATA, gates=Gates(max_accuracy_drop=0.02, min_top1=0.95))
    assert r.calibration["samples"] == 450 and r.calibration["labels"] and not r.calibration["synthetic"]
    assert r.accuracy["output"] == "logits" and r.accuracy["dense"] == pytest.approx(0.98667, abs=1e-4)
    assert r.accuracy["drop"] < 0.02 and r.passed
    assert r.providers_used["pruned"] == ["CPUExecutionProvider"]
    out = r.outputs[0]
    assert out["name"] == "logits" and 0.95 < out["cosine"] < 1.0 and out["top1_agreement"] > 0.95


def test_identical_models_have_zero_drift():
    r = validate_models(CNN, CNN, CNN_DATA, runtime=RuntimeOptions(batch_size=100))
    o = r.outputs[0]
    assert o["max_abs_error"] == 0 and o["rel_l2"] == 0 and o["top1_agreement"] == 1.0
    assert r.accuracy["drop"] == 0 and r.batch_size == 100


def test_validate_gate_exit_codes_and_reports(pruned_cnn, tmp_path):
    rep, md = tmp_path / "v.json", tmp_path / "v.md"
    ok = invoke("validate", CNN, pruned_cnn, "--calibration", CNN_DATA, "--max-accuracy-drop", "0.05",
                "--report", rep, "--markdown", md)
    assert ok.exit_code == 0, ok.output
    data = json.loads(rep.read_text())
    assert data["schema_version"] == 1 and data["passed"] is True and data["gates"][0]["gate"] == "max_accuracy_drop"
    assert md.read_text().startswith("## onnx-magprune validation: PASSED")
    bad = invoke("validate", CNN, pruned_cnn, "--calibration", CNN_DATA, "--min-cosine", "0.9999")
    assert bad.exit_code == 1 and "gate failed: 1 quality gate(s) failed (min_cosine)" in bad.output
    wrong = invoke("validate", CNN, pruned_cnn, "--calibration", MODELS / "digits_mlp_calib.npz")
    assert wrong.exit_code == 2 and "the model expects input: float32 [batch, 1, 8, 8]" in wrong.output
    nolabels = invoke("validate", CNN, pruned_cnn, "--max-accuracy-drop", "0.1")
    assert nolabels.exit_code == 2 and "--max-accuracy-drop needs labels" in nolabels.output
    gpu = invoke("validate", CNN, pruned_cnn, "--providers", "cuda")
    if "CUDAExecutionProvider" not in __import__("onnxruntime").get_available_providers():
        assert gpu.exit_code == 2 and "not available" in gpu.output
        fb = invoke("validate", CNN, pruned_cnn, "--providers", "cuda,cpu", "--allow-fallback", "--json")
        assert fb.exit_code == 0 and json.loads(fb.output)["providers"]["used"]["pruned"] == ["CPUExecutionProvider"]


def test_synthetic_validation_says_so():
    r = invoke("validate", CNN, CNN, "--samples", "4", "--json")
    data = json.loads(r.output)
    assert data["calibration"]["synthetic"] and "SYNTHETIC" in data["calibration"]["notes"][0]
    assert data["calibration"]["samples"] == 4


def test_prune_with_failing_gate_writes_no_model_but_the_report(tmp_path):
    out, rep = tmp_path / "p.onnx", tmp_path / "r.json"
    r = invoke("prune", CNN, "-o", out, "--sparsity", "0.9", "--calibration", CNN_DATA,
               "--max-accuracy-drop", "0.01", "--report", rep, "-q")
    assert r.exit_code == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
    data = json.loads(rep.read_text())
    assert data["validation"]["passed"] is False and data["totals"]["zeros_after"] == 64411
    ok = invoke("prune", CNN, "-o", out, "--sparsity", "0.5", "--calibration", CNN_DATA,
                "--max-accuracy-drop", "0.01", "-q")
    assert ok.exit_code == 0 and out.exists()


def test_prune_file_api_raises_gate_failed(tmp_path):
    req = ValidationRequest(calibration=CNN_DATA, gates=Gates(min_cosine=0.999), quiet=True)
    with pytest.raises(mp.GateFailed) as info:
        mp.prune_file(CNN, tmp_path / "p.onnx", sparsity=0.9, validation=req)
    assert info.value.report.validation.passed is False
    assert not (tmp_path / "p.onnx").exists() and list(tmp_path.iterdir()) == []


def test_bench_compares_two_models(pruned_cnn, tmp_path):
    rep = tmp_path / "b.json"
    r = invoke("bench", CNN, pruned_cnn, "--runs", "5", "--warmup", "1", "--threads", "1", "--no-memory",
               "--report", rep)
    assert r.exit_code == 0, r.output
    data = json.loads(rep.read_text())
    assert data["threads"] == 1 and data["batch_size"] == 1 and len(data["models"]) == 2
    m0, m1 = data["models"]
    assert m0["params"]["float_nonzero"] == 71818 and m1["params"]["float_nonzero"] < 71818 * 0.35
    assert m0["latency_seconds"]["n"] == 5 and data["comparison"]["latency_ratio"]["n"] == 5
    assert m0["file_bytes"] == CNN.stat().st_size
    assert any("cannot change latency" in n for n in data["notes"])
    assert invoke("bench", CNN, CNN, CNN).exit_code == 2


def test_bench_memory_child_and_markdown(tmp_path):
    r = invoke("bench", CNN, "--runs", "3", "--markdown", tmp_path / "b.md", "--json")
    data = json.loads(r.output)
    rss = data["models"][0]["session_peak_rss"]
    assert rss is None or rss["peak"] >= rss["before"] > 0
    assert (tmp_path / "b.md").read_text().startswith("## onnx-magprune bench")


def test_iterable_feeds_from_python():
    data = np.load(CNN_DATA)
    feeds = [{"input": data["input"][i:i + 10], "labels": data["labels"][i:i + 10]} for i in range(0, 50, 10)]
    r = validate_models(CNN, CNN, feeds)
    assert r.calibration["samples"] == 50 and r.accuracy["samples"] == 50


def test_synthetic_integers_out_of_an_index_range_get_a_hint(tmp_path):
    from onnx import TensorProto, helper, numpy_helper

    from conftest import make_model, vi

    table = numpy_helper.from_array(np.ones((2, 4), np.float32), "types")  # two token types, as in BERT
    model = make_model([helper.make_node("Gather", ["types", "ids"], ["y"])],
                       [vi("ids", ["N", 3], TensorProto.INT64)], [vi("y", None)], [table])
    src = tmp_path / "m.onnx"
    src.write_bytes(model.SerializeToString())
    hint = ("(the inputs are synthetic, integers drawn from [0, 100): an index input such as token_type_ids may "
            "need a narrower --int-range, e.g. 0,2, or pass --calibration)")
    for args in (["validate", str(src), str(src), "-q"], ["bench", str(src), "-q"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 2 and hint in r.output and "unexpected" not in r.output, r.output
    for args in (["validate", str(src), str(src), "-q", "--int-range", "0,2"], ["bench", str(src), "-q", "--int-range", "0,2"]):
        assert CliRunner().invoke(main, args).exit_code == 0


def test_truncated_external_data_is_one_line_exit_2_for_validate_and_bench(tmp_path):
    import onnx
    from conftest import mlp

    onnx.save(mlp(), tmp_path / "dense.onnx")
    onnx.save(mlp(), tmp_path / "m.onnx", save_as_external_data=True, location="m.data", size_threshold=0)
    with open(tmp_path / "m.data", "r+b") as f:
        f.truncate(1000)
    for args in (["validate", str(tmp_path / "m.onnx"), str(tmp_path / "dense.onnx")],
                 ["bench", str(tmp_path / "m.onnx"), "--runs", "1", "--no-memory"]):
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, res.output
        lines = res.output.strip().splitlines()
        assert len(lines) == 1 and "lies beyond the end of 'm.data' (1000 bytes)" in lines[0], res.output


def _zipmap_classifier():
    """A scikit-learn-style classifier: a label output and a ZipMap (sequence of maps) of probabilities."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(12)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "W0"),
             numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b0"),
             numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "W1")]
    nodes = [helper.make_node("MatMul", ["X", "W0"], ["m0"]), helper.make_node("Add", ["m0", "b0"], ["a0"]),
             helper.make_node("Relu", ["a0"], ["r0"]), helper.make_node("MatMul", ["r0", "W1"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=1),
             helper.make_node("ArgMax", ["probs"], ["label"], axis=1, keepdims=0),
             helper.make_node("ZipMap", ["probs"], ["output_probability"], domain="ai.onnx.ml",
                              classlabels_int64s=[0, 1, 2, 3])]
    zipmap_type = onnx.TypeProto()
    zipmap_type.sequence_type.elem_type.map_type.key_type = TensorProto.INT64
    zipmap_type.sequence_type.elem_type.map_type.value_type.tensor_type.elem_type = TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
               helper.make_value_info("output_probability", zipmap_type)]
    g = helper.make_graph(nodes, "clf", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["N", 16])],
                          outputs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


def test_a_zipmap_output_is_passed_over_for_labels_and_drift(tmp_path):
    import onnx

    onnx.save(_zipmap_classifier(), tmp_path / "m.onnx")
    rng = np.random.default_rng(13)
    np.savez(tmp_path / "cal.npz", X=rng.standard_normal((64, 16)).astype(np.float32))
    np.save(tmp_path / "lab.npy", rng.integers(0, 4, 64).astype(np.int64))
    src, cal, lab = str(tmp_path / "m.onnx"), str(tmp_path / "cal.npz"), str(tmp_path / "lab.npy")
    assert CliRunner().invoke(main, ["prune", src, "-o", str(tmp_path / "p.onnx"), "--sparsity", "0.5",
                                     "-q"]).exit_code == 0
    res = CliRunner().invoke(main, ["validate", src, str(tmp_path / "p.onnx"), "--calibration", cal, "--labels", lab,
                                    "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["accuracy"]["output"] == "label"
    res = CliRunner().invoke(main, ["prune", src, "-o", str(tmp_path / "s.onnx"), "--sparsity", "0.25",
                                    "--structured", "neurons", "--calibration", cal, "-q"])
    assert res.exit_code == 0, res.output
