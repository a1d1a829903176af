"""Drift metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from onnx_magprune.metrics import Accuracy, OutputDrift, pick_label_output, predictions


def test_float_metrics_by_hand():
    dense = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
    pruned = np.array([[3.0, 0.0], [1.0, 1.0]], np.float32)
    d = OutputDrift("y")
    d.update(dense[:1], pruned[:1])  # two batches: the result must not depend on batching
    d.update(dense[1:], pruned[1:])
    r = d.result()
    assert r["max_abs_error"] == 4.0
    assert r["mean_abs_error"] == pytest.approx(5 / 4)
    assert r["rel_l2"] == pytest.approx(math.sqrt(17) / math.sqrt(26))
    assert r["cosine"] == pytest.approx(10 / (math.sqrt(26) * math.sqrt(11)))
    # per sample: cos([3,4],[3,0]) = 9/15, cos([1,0],[1,1]) = 1/sqrt(2)
    assert r["cosine_per_sample_mean"] == pytest.approx((0.6 + 1 / math.sqrt(2)) / 2)
    assert r["cosine_per_sample_min"] == pytest.approx(0.6)
    assert r["top1_agreement"] == 0.5  # argmax [1, 0] vs [0, 1]
    assert r["nan_count"] == {"dense": 0, "pruned": 0}


def test_exact_match_nan_and_zero_outputs():
    d = OutputDrift("label")
    d.update(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    assert d.result()["exact_match"] == 0.75
    z = OutputDrift("z")
    z.update(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    r = z.result()
    assert r["rel_l2"] == 0.0 and r["cosine"] == 1.0 and r["cosine_per_sample_min"] == 1.0
    n = OutputDrift("n")
    n.update(np.ones((1, 2), np.float32), np.array([[np.nan, np.inf]], np.float32))
    r = n.result()
    assert r["nan_count"]["pruned"] == 1 and r["inf_count"]["pruned"] == 1
    one = OutputDrift("one")
    one.update(np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32))
    assert one.result()["cosine"] == 0.0 and one.result()["rel_l2"] == 1.0


def test_accuracy_and_label_output_choice():
    acc = Accuracy("scores")
    scores_dense = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    scores_pruned = np.array([[0.6, 0.4], [0.8, 0.2], [0.3, 0.7]])
    acc.update(scores_dense, scores_pruned, np.array([1, 0, 0]))
    r = acc.result()
    assert (r["dense"], r["pruned"]) == (pytest.approx(2 / 3), pytest.approx(1 / 3))
    assert r["drop"] == pytest.approx(1 / 3)
    assert predictions(np.array([2, 1])).tolist() == [2, 1]
    zipmap = [{0: 0.1, 1: 0.9}] * 5  # skl2onnx's ZipMap: a sequence of maps, never chosen
    outs = {"probabilities": zipmap, "scores": np.zeros((5, 10), np.float32), "label": np.zeros(5, np.int64)}
    assert pick_label_output(outs) == "label"
    assert pick_label_output({"p": zipmap, "logits": np.zeros((5, 10), np.float32)}) == "logits"
    assert pick_label_output({"p": zipmap, "emb": np.zeros((5, 3, 4), np.float32)}) is None


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="dense shape"):
        OutputDrift("y").update(np.zeros((2, 2)), np.zeros((2, 3)))


def test_hidden_states_are_not_class_scores():
    from onnx_magprune.metrics import looks_like_class_scores

    f32 = np.dtype(np.float32)
    assert looks_like_class_scores((8, 10), f32)
    assert not looks_like_class_scores((8, 64, 384), f32, "last_hidden_state")
    assert looks_like_class_scores((8, 64, 30522), f32, "logits")
    d = OutputDrift("last_hidden_state")
    d.update(np.ones((2, 3, 4), np.float32), np.ones((2, 3, 4), np.float32))
    assert d.result()["top1_agreement"] is None
