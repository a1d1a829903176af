"""Calibration readers, synthetic inputs, and the messages for data that does not fit."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, vi
from onnx_magprune.calibration import (
    CalibrationError,
    SyntheticSpec,
    model_inputs,
    open_calibration,
    parse_shape,
    split_holdout,
    synthetic,
)


def two_input_model():
    nodes = [helper.make_node("Cast", ["ids"], ["idsf"], to=TensorProto.FLOAT),
             helper.make_node("Add", ["x", "idsf"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 4]), vi("ids", ["N", 4], TensorProto.INT64)], [vi("y", ["N", 4])])


def feeds(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 4)).astype(np.float32), "ids": rng.integers(0, 5, (n, 4))}


def collect(calib, bs):
    batches = list(calib.batches(bs))
    return batches, sum(b.feeds["x"].shape[0] for b in batches)


def test_npz_with_labels_in_batches(tmp_path):
    f = feeds()
    np.savez(tmp_path / "c.npz", **f, labels=np.arange(10))
    calib = open_calibration(tmp_path / "c.npz", two_input_model())
    assert calib.has_labels and calib.samples == 10 and not calib.synthetic
    batches, n = collect(calib, 4)
    assert [b.feeds["x"].shape[0] for b in batches] == [4, 4, 2] and n == 10
    assert batches[2].labels.tolist() == [8, 9]
    np.testing.assert_array_equal(np.concatenate([b.feeds["ids"] for b in batches]), f["ids"])
    assert calib.count_batches(4) == 3


def test_npy_directory_and_separate_labels(tmp_path):
    for k, v in feeds().items():
        np.save(tmp_path / f"{k}.npy", v)
    np.save(tmp_path.parent / "lab.npy", np.arange(10))
    calib = open_calibration(tmp_path, two_input_model(), labels=tmp_path.parent / "lab.npy", max_samples=7)
    batches, n = collect(calib, 5)
    assert n == 7 and calib.has_labels and batches[-1].labels.tolist() == [5, 6]


def test_onnx_test_data_directories(tmp_path):
    model = two_input_model()
    for i in range(3):
        d = tmp_path / f"test_data_set_{i}"
        d.mkdir()
        for j, (k, v) in enumerate(feeds(2, seed=i).items()):
            (d / f"input_{j}.pb").write_bytes(numpy_helper.from_array(v, k).SerializeToString())
    calib = open_calibration(tmp_path, model)
    batches = list(calib.batches(100))
    assert len(batches) == 3 and calib.fixed_batches and calib.count_batches(100) == 3
    np.testing.assert_array_equal(batches[1].feeds["x"], feeds(2, seed=1)["x"])
    flat = tmp_path / "test_data_set_0"
    assert len(list(open_calibration(flat, model).batches(1))) == 1


def test_python_iterables_and_calibration_data_reader():
    model = two_input_model()
    items = [feeds(3, s) for s in range(4)]
    calib = open_calibration(items, model)
    assert len(list(calib.batches(99))) == 4

    class Reader:  # onnxruntime.quantization.CalibrationDataReader protocol
        def __init__(self):
            self.it = iter(items)

        def get_next(self):
            return next(self.it, None)

    calib = open_calibration(Reader(), model)
    assert calib.description == "CalibrationDataReader (4 feeds)"
    assert len(list(calib.batches(1))) == 4 and len(list(calib.batches(1))) == 4  # re-iterable


def test_synthetic_is_seeded_and_loud():
    model = two_input_model()
    spec = SyntheticSpec(samples=6, int_range=(3, 5), seed=1, shapes={"ids": (6, 4)})
    a = list(open_calibration(None, model, synthetic_spec=spec).batches(100))[0].feeds
    b = list(open_calibration(None, model, synthetic_spec=spec).batches(100))[0].feeds
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["x"].shape == (6, 4) and a["ids"].dtype == np.int64
    assert a["ids"].min() >= 3 and a["ids"].max() < 5
    calib = open_calibration(None, model)
    assert calib.synthetic and "SYNTHETIC" in calib.notes[0]


def test_static_batch_dimension_is_respected():
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [1, 4])], [vi("y", [1, 4])])
    from onnx_magprune.calibration import effective_batch

    assert effective_batch(32, model_inputs(model)) == 1


@pytest.mark.parametrize("mutate,message", [
    (lambda f: f.pop("ids"), "missing ids (the model expects x: float32 [N, 4], ids: int64 [N, 4])"),
    (lambda f: f.update(extra=np.zeros((10, 1))), "unknown extra"),
    (lambda f: f.update(x=f["x"].astype(np.float64)), "input 'x' is float64, the model expects float32"),
    (lambda f: f.update(x=f["x"].reshape(10, 2, 2)), "input 'x' has shape [10, 2, 2], the model expects rank 2"),
    (lambda f: f.update(x=np.zeros((10, 5), np.float32)), "(axis 1 must be 4)"),
    (lambda f: f.update(x=f["x"][:9]), "inputs disagree on the number of samples (x: 9, ids: 10)"),
    (lambda f: f.update(labels=np.arange(3)), "3 labels for 10 samples"),
])
def test_mismatches_name_what_the_model_expects(tmp_path, mutate, message):
    f = feeds()
    mutate(f)
    np.savez(tmp_path / "c.npz", **f)
    with pytest.raises(CalibrationError) as info:
        open_calibration(tmp_path / "c.npz", two_input_model())
    assert message in str(info.value)


def test_other_bad_sources(tmp_path):
    model = two_input_model()
    with pytest.raises(CalibrationError, match="does not exist"):
        open_calibration(tmp_path / "nope.npz", model)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="cannot read calibration file"):
        open_calibration(tmp_path / "bad.npz", model)
    (tmp_path / "d").mkdir()
    with pytest.raises(CalibrationError, match="holds no .npy files and no ONNX test data"):
        open_calibration(tmp_path / "d", model)
    with pytest.raises(CalibrationError, match="--shape names unknown input"):
        open_calibration(None, model, synthetic_spec=SyntheticSpec(shapes={"z": (1,)}))
    with pytest.raises(CalibrationError, match="item 0 is int"):
        open_calibration([1, 2], model)
    with pytest.raises(CalibrationError, match="must look like NAME=1,128"):
        parse_shape("x=1,a")
    assert parse_shape("input_ids=1,128") == ("input_ids", (1, 128))


def _scalar_input_model():
    """y = (x @ W) * s with s a rank-0 input (like a loop count or a temperature)."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Mul", ["h", "s"], ["y"])]
    return make_model(nodes, [vi("x", ["N", 8]), vi("s", [])], [vi("y", ["N", 8])], [w])


def test_a_scalar_input_is_fed_whole_with_every_batch(tmp_path):
    from click.testing import CliRunner

    from onnx_magprune.cli import main

    model = _scalar_input_model()
    x = np.random.default_rng(1).standard_normal((10, 8)).astype(np.float32)
    src, out, data = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "c.npz"
    np.savez(data, x=x, s=np.array(2.0, np.float32))
    calib = open_calibration(data, model)
    batches = list(calib.batches(4))
    assert [b.feeds["x"].shape for b in batches] == [(4, 8), (4, 8), (2, 8)]
    assert all(b.feeds["s"].shape == () and b.feeds["s"] == 2.0 for b in batches)
    fit, held = split_holdout(calib, 0.3)
    assert sum(b.feeds["x"].shape[0] for b in held.batches(8)) == 3
    assert all(b.feeds["s"].shape == () for b in list(fit.batches(4)) + list(held.batches(8)))
    assert all(b.feeds["s"].shape == () for b in synthetic(model_inputs(model)).batches(4))
    src.write_bytes(model.SerializeToString())
    for args in (["prune", str(src), "-o", str(out), "--sparsity", "0.5", "--min-numel", "8", "-q",
                  "--method", "obs", "--calibration", str(data)],
                 ["validate", str(src), str(out), "--calibration", str(data), "-q"],
                 ["validate", str(src), str(out), "-q"],  # synthetic inputs
                 ["sensitivity", str(src), "--calibration", str(data), "--min-numel", "8", "-q"],
                 ["prune", str(src), "-o", str(tmp_path / "a.onnx"), "--target-drift", "0.5", "--min-numel", "8",
                  "--calibration", str(data), "-q"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output


def test_synthetic_inputs_keep_fixed_shapes_without_a_common_sample_axis_and_fixed_zero_dims():
    # a Scan-like signature: a state [1, 8] and a sequence [5, 1, 8]; no axis counts samples
    model = make_model([helper.make_node("Identity", ["s"], ["y"]), helper.make_node("Identity", ["x"], ["z"])],
                       [vi("s", [1, 8]), vi("x", [5, 1, 8])], [vi("y", [1, 8]), vi("z", [5, 1, 8])])
    calib = open_calibration(None, model)
    batches = list(calib.batches(32))
    assert len(batches) == 1 and calib.samples == 1
    assert batches[0].feeds["s"].shape == (1, 8) and batches[0].feeds["x"].shape == (5, 1, 8)
    zero = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", ["N", 0])], [vi("y", ["N", 0])])
    assert list(open_calibration(None, zero).batches(4))[0].feeds["x"].shape == (4, 0)


def test_a_fixed_batch_asks_for_a_multiple_of_it(tmp_path):
    model = make_model([helper.make_node("Identity", ["x"], ["y"])], [vi("x", [2, 4])], [vi("y", [2, 4])])
    np.savez(tmp_path / "c.npz", x=np.zeros((7, 4), np.float32))
    with pytest.raises(CalibrationError, match=r"axis 0 must be a multiple of 2: the model fixes its batch"):
        open_calibration(str(tmp_path / "c.npz"), model)
    np.savez(tmp_path / "d.npz", x=np.zeros((8, 4), np.float32))
    assert open_calibration(str(tmp_path / "d.npz"), model).samples == 8
