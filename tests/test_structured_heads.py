"""Attention-head removal (--structured heads): blocks found, skips with reasons, removed == masked."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from conftest import make_model, run_ort, tensor_by_name, vi
from onnx_magprune.api import prune_model
from onnx_magprune.calibration import open_calibration
from onnx_magprune.cli import main
from onnx_magprune.config import PruneConfig
from onnx_magprune.methods import MethodOptions
from onnx_magprune.structured_heads import find_head_groups
from onnx_magprune.structured_rewrite import rewrite
from onnx_magprune.structured_run import StructuredOptions, StructuredRun

TOL = dict(rtol=1e-5, atol=1e-5)  # removed vs masked: the same sums without the zero terms (float32 rounding)
HEADS = StructuredOptions(unit="heads")
E, H, D, S = 12, 4, 3, 5  # width, heads, head size, sequence length


def _init(a, name, dtype=np.float32):
    return numpy_helper.from_array(np.asarray(a, dtype), name)


def _w(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _i64(values, name):
    return _init(values, name, np.int64)


def attention(style="hf", mask="input", fused=False, shared_shape_outside=False):
    """One PyTorch-style multi-head self-attention block with a residual Add.

    ``style``: "hf" (targets Concat(B, S, -1, d) from Shape reads, Kᵀ by one Transpose [0,2,3,1],
    scale by Div after QK) or "const" (targets one constant [0, 0, H, d] shared by Q/K/V, merge
    [0, 0, H*d], Kᵀ by two Transposes, Q scaled by Mul before QK).  ``mask``: "input" (a graph
    input [B, 1, 1, S]), "per_head_const" ([1, H, S, S] constant), "per_head_input" ([B, H, S, S]),
    "computed" (from a [B, S] input, unsqueezed to [B, 1, 1, S]), "computed_per_head" (then expanded
    to [B, H, S, S])."""
    nodes, inits = [], []
    for i, role in enumerate("qkvo"):
        inits += [_init(_w((E, E), 10 + i), f"W{role}"), _init(_w((E,), 20 + i), f"b{role}")]
    if fused:
        inits = [t for t in inits if t.name not in ("Wq", "Wk", "Wv", "bq", "bk", "bv")]
        inits += [_init(_w((E, 3 * E), 30), "Wqkv"), _init(_w((3 * E,), 31), "bqkv"), _i64([E, E, E], "split")]
        nodes += [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv_m"], name="qkv"),
                  helper.make_node("Add", ["qkv_m", "bqkv"], ["qkv_a"], name="qkv_bias"),
                  helper.make_node("Split", ["qkv_a", "split"], ["q_a", "k_a", "v_a"], axis=-1, name="split")]
    else:
        for role in "qkv":
            nodes += [helper.make_node("MatMul", ["x", f"W{role}"], [f"{role}_m"], name=f"{role}_proj"),
                      helper.make_node("Add", [f"b{role}", f"{role}_m"], [f"{role}_a"], name=f"{role}_bias")]
    if style == "classic":  # older HF: x.size()[:-1] + (H, d) of the projection itself, merge [:-2] + (H*d,)
        inits += [_i64([0], "st0"), _i64([-1], "en1"), _i64([H, D], "hd")]
        for role in "qkv":
            nodes += [helper.make_node("Shape", [f"{role}_a"], [f"{role}_shp"]),
                      helper.make_node("Slice", [f"{role}_shp", "st0", "en1"], [f"{role}_lead"]),
                      helper.make_node("Concat", [f"{role}_lead", "hd"], [f"{role}_shape"], axis=0)]
        split_shape = {r: f"{r}_shape" for r in "qkv"}
    elif style in ("hf", "sdpa"):
        nodes += [helper.make_node("Shape", ["x"], ["xs"]),
                  helper.make_node("Gather", ["xs", "i0"], ["b0"], axis=0),
                  helper.make_node("Gather", ["xs", "i1"], ["s0"], axis=0),
                  helper.make_node("Unsqueeze", ["b0", "ax0"], ["bu"]),
                  helper.make_node("Unsqueeze", ["s0", "ax0"], ["su"])]
        inits += [_i64(0, "i0"), _i64(1, "i1"), _i64([0], "ax0")]
        for role in "qkv":
            inits += [_i64([-1], f"{role}_m1"), _i64([D], f"{role}_d")]
            nodes.append(helper.make_node("Concat", ["bu", "su", f"{role}_m1", f"{role}_d"], [f"{role}_shape"], axis=0))
        split_shape = {r: f"{r}_shape" for r in "qkv"}
        if style == "sdpa":  # Whisper scales Q between its bias and the split
            inits.append(_init(0.5, "q_scale"))
            nodes.append(helper.make_node("Mul", ["q_a0", "q_scale"], ["q_a"]))
            for n in nodes:
                if n.name == "q_bias":
                    n.output[0] = "q_a0"
    else:
        inits.append(_i64([0, 0, H, D], "split_shape"))
        split_shape = {r: "split_shape" for r in "qkv"}
    for role in "qkv":
        nodes.append(helper.make_node("Reshape", [f"{role}_a", split_shape[role]], [f"{role}_r"], name=f"{role}_split"))
    nodes += [helper.make_node("Transpose", ["q_r"], ["q_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Transpose", ["v_r"], ["v_t"], perm=[0, 2, 1, 3])]
    inits.append(_init(1.0 / np.sqrt(D), "scale"))
    if style == "sdpa":  # PyTorch's sdpa export: sqrt(scale) on Q and Kᵀ, Shape reads of S and d, a NaN guard
        inits += [_init(1.0 / np.sqrt(np.sqrt(D)), "sq"), _i64(2, "i2"), _i64(3, "i3"), _init(0.0, "zero")]
        nodes += [helper.make_node("Transpose", ["k_r"], ["k_t0"], perm=[0, 2, 3, 1]),
                  helper.make_node("Shape", ["q_t"], ["qs"]), helper.make_node("Gather", ["qs", "i2"], ["q_len"], axis=0),
                  helper.make_node("Mul", ["q_t", "sq"], ["q_s"]), helper.make_node("Mul", ["k_t0", "sq"], ["k_t"]),
                  helper.make_node("MatMul", ["q_s", "k_t"], ["scores0"], name="qk")]
    elif style == "hf":
        nodes += [helper.make_node("Transpose", ["k_r"], ["k_t"], perm=[0, 2, 3, 1]),
                  helper.make_node("MatMul", ["q_t", "k_t"], ["qk"], name="qk"),
                  helper.make_node("Mul", ["qk", "scale"], ["scores0"])]
    else:
        nodes += [helper.make_node("Transpose", ["k_r"], ["k_h"], perm=[0, 2, 1, 3]),
                  helper.make_node("Transpose", ["k_h"], ["k_t"], perm=[0, 1, 3, 2]),
                  helper.make_node("Mul", ["q_t", "scale"], ["q_s"]),
                  helper.make_node("MatMul", ["q_s", "k_t"], ["scores0"], name="qk")]
    inputs = [vi("x", ["B", S, E])]
    if mask == "per_head_const":
        inits.append(_init(_w((1, H, S, S), 40), "mask"))
    elif mask.startswith("computed"):  # (1 - m) * -1e4 from a [B, S] 0/1 input, unsqueezed or expanded per head
        inputs.append(vi("m", ["B", S]))
        inits += [_init(1.0, "one_f"), _init(-1e4, "big"), _i64([1, 2], "ax12"), _i64([1, H, S, 1], "per_head")]
        nodes += [helper.make_node("Sub", ["one_f", "m"], ["inv"]), helper.make_node("Mul", ["inv", "big"], ["add2"]),
                  helper.make_node("Unsqueeze", ["add2", "ax12"], ["mask1" if mask.endswith("per_head") else "mask"])]
        if mask.endswith("per_head"):
            nodes.append(helper.make_node("Expand", ["mask1", "per_head"], ["mask"]))
    elif mask == "per_head_input":
        inputs.append(vi("mask", ["B", H, S, S]))
    elif mask == "symbolic_heads":
        inputs.append(vi("mask", ["B", "heads", S, S]))
    else:
        inputs.append(vi("mask", ["B", 1, 1, S]))
    nodes += [helper.make_node("Add", ["scores0", "mask"], ["scores"], name="mask_add"),
              helper.make_node("Softmax", ["scores"], ["probs0" if style == "sdpa" else "probs"], axis=-1,
                               name="softmax")]
    if style == "sdpa":
        nodes += [helper.make_node("IsNaN", ["probs0"], ["nan"]),
                  helper.make_node("Where", ["nan", "zero", "probs0"], ["probs"]),
                  helper.make_node("MatMul", ["probs", "v_t"], ["ctx0"], name="pv"),
                  helper.make_node("Shape", ["v_t"], ["vs"]), helper.make_node("Gather", ["vs", "i3"], ["v_dim"], axis=0),
                  helper.make_node("Unsqueeze", ["q_len", "ax0"], ["q_len1"]),
                  helper.make_node("Unsqueeze", ["v_dim", "ax0"], ["v_d1"]),
                  helper.make_node("Concat", ["bu", "m1", "q_len1", "v_d1"], ["keep_shape"], axis=0),
                  helper.make_node("Reshape", ["ctx0", "keep_shape"], ["ctx"], name="keep")]
        inits.append(_i64([-1], "m1"))
    else:
        nodes.append(helper.make_node("MatMul", ["probs", "v_t"], ["ctx"], name="pv"))
    nodes.append(helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]))
    if style in ("hf", "sdpa", "classic"):
        nodes += [helper.make_node("Shape", ["ctx_t"], ["cs"]),
                  helper.make_node("Slice", ["cs", "st0", "en2"], ["lead"])]
        inits += [_i64([-2], "en2"), _i64([H * D], "merged")] + ([] if style == "classic" else [_i64([0], "st0")])
        nodes.append(helper.make_node("Concat", ["lead", "merged"], ["merge_shape"], axis=0))
    else:
        inits.append(_i64([0, 0, H * D], "merge_shape"))
    nodes += [helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["ctx_m"], name="merge",
                               **({"allowzero": 1} if style == "sdpa" else {})),  # dynamo writes allowzero=1
              helper.make_node("MatMul", ["ctx_m", "Wo"], ["o_m"], name="o_proj"),
              helper.make_node("Add", ["o_m", "bo"], ["o"], name="o_bias"),
              helper.make_node("Add", ["o", "x"], ["y"], name="residual")]
    outputs = [vi("y", ["B", S, E])]
    if shared_shape_outside:  # the split target also shapes a graph output
        nodes.append(helper.make_node("Reshape", ["x", "split_shape"], ["x4"]))
        outputs.append(vi("x4", ["B", S, H, D]))
    return make_model(nodes, inputs, outputs, inits)


def _feeds(seed=0, batch=2):
    rng = np.random.default_rng(seed)
    mask = np.where(rng.random((batch, 1, 1, S)) < 0.2, -1e4, 0.0)
    return {"x": rng.standard_normal((batch, S, E)).astype(np.float32), "mask": mask.astype(np.float32)}


def _masked(model, rep):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    groups, _ = find_head_groups(m)
    by_producer = {g.producer: g for g in groups}
    plans = [(by_producer[g["producer"]], np.array(g["removed_units"], dtype=np.int64))
             for g in rep.structured["groups"]]
    return rewrite(m, plans, mode="mask")


@pytest.mark.parametrize("style", ["hf", "const"])
def test_block_is_found_with_every_cut(style):
    groups, skipped = find_head_groups(attention(style))
    assert skipped == []
    (g,) = groups
    assert (g.producer, g.units, g.kind, g.co_producers) == ("Wq", H, "heads", ["Wk", "Wv"])
    assert [(c.weight, c.block, c.bias) for c in g.consumers] == [("Wo", D, "bo")]
    cuts = sorted((s.tensor, s.axis, s.role, s.block) for s in g.shrinks)
    expected = [("Wk", 1, "producer", D), ("Wo", 0, "consumer", D), ("Wq", 1, "producer", D), ("Wv", 1, "producer", D),
                ("bk", 0, "producer bias", D), ("bq", 0, "producer bias", D), ("bv", 0, "producer bias", D)]
    if style == "const":  # the head count (entry 2, once per removed head) and the width (entry 2, D per head)
        expected += [("merge_shape", 2, "shape", D), ("split_shape", 2, "shape", 1), ("split_shape", 2, "shape", 1),
                     ("split_shape", 2, "shape", 1)]
    else:  # targets end in -1: only the merged width is a constant
        expected += [("merged", 0, "shape", D)]
    assert cuts == sorted(expected)
    # the mask input is declared [B, 1, 1, S]: the same for every head, nothing to check; a split whose head
    # entry is -1 is checked on a run (the other entries must leave the heads on that axis)
    splits = [("q_r", -2, H, "split"), ("k_r", -2, H, "split"), ("v_r", -2, H, "split")]
    assert g.head_axis_checks == (splits if style == "hf" else [])


@pytest.mark.parametrize("style", ["hf", "const", "sdpa", "classic"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_removed_heads_match_the_masked_model(style, scope):
    model = attention(style)
    pruned, rep = prune_model(model, 0.5, scope, structured=HEADS, min_numel=0)
    (g,) = rep.structured["groups"]
    assert g["units_before"] == H and g["units_after"] == H // 2 and len(g["removed_units"]) == H // 2
    kept = (H // 2) * D
    for name, shape in (("Wq", (E, kept)), ("Wk", (E, kept)), ("Wv", (E, kept)), ("bq", (kept,)), ("Wo", (kept, E))):
        assert tensor_by_name(pruned, name).shape == shape
    if style == "const":
        assert tensor_by_name(pruned, "split_shape").tolist() == [0, 0, H // 2, D]
        assert tensor_by_name(pruned, "merge_shape").tolist() == [0, 0, kept]
    elif style == "classic":
        assert tensor_by_name(pruned, "hd").tolist() == [H // 2, D]
        assert tensor_by_name(pruned, "merged").tolist() == [kept]
    else:
        assert tensor_by_name(pruned, "merged").tolist() == [kept]
    onnx.checker.check_model(pruned, full_check=True)
    if style == "sdpa":  # the Shape reads, scales, NaN guard and layout Reshape were passed
        assert rep.structured["skipped"] == []
    masked = _masked(model, rep)
    # and a reference built without the finder: the removed heads' rows of Wo zeroed by hand
    by_hand = onnx.ModelProto()
    by_hand.CopyFrom(model)
    for t in by_hand.graph.initializer:
        if t.name == "Wo":
            wo = numpy_helper.to_array(t).copy()
            for h in g["removed_units"]:
                wo[h * D:(h + 1) * D] = 0
            t.CopyFrom(numpy_helper.from_array(wo, "Wo"))
    for seed in range(3):
        feeds = _feeds(seed)
        np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(masked, feeds)[0], **TOL)
        np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(by_hand, feeds)[0], **TOL)


def test_weight_norm_ranks_heads_by_their_q_k_v_columns():
    model = attention("hf")
    weak = 2
    for t in model.graph.initializer:
        if t.name in ("Wq", "Wk", "Wv"):
            a = numpy_helper.to_array(t).copy()
            a[:, weak * D:(weak + 1) * D] *= 0.01
            t.CopyFrom(numpy_helper.from_array(a, t.name))
    _pruned, rep = prune_model(model, 0.25, "local", structured=HEADS, min_numel=0)
    assert rep.structured["groups"][0]["removed_units"] == [weak]


def test_calibrated_head_removal_refits_the_output_projection():
    model = attention("hf")
    calib = [_feeds(seed) for seed in range(8)]
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    run = StructuredRun(proto, PruneConfig(sparsity=0.5, scope="local", min_numel=0), HEADS,
                        MethodOptions(method="obs", calibration=calib, holdout=0.0), open_calibration(calib, model))
    (g,) = run.structured_dict()["groups"]
    assert g["criterion"] == "obs" and g["bias_refit"] is True and g["error_after"] < g["error_masked"]
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    rewrite(masked, [(run.groups[0].group, run.groups[0].removed)], run.values, mode="mask")
    for seed in (100, 101):
        feeds = _feeds(seed)
        np.testing.assert_allclose(run_ort(proto, feeds)[0], run_ort(masked, feeds)[0], **TOL)


def _skips(model):
    _groups, skipped = find_head_groups(model)
    if not skipped:
        _pruned, rep = prune_model(model, 0.5, "local", structured=HEADS, min_numel=0)
        return [(s["producer"], s["reason"]) for s in rep.structured["skipped"]]
    return [(s.producer, s.reason) for s in skipped]


def test_blocks_that_cannot_be_cut_say_why():
    assert _skips(attention(fused=True)) == [
        ("Softmax 'softmax'", "attention heads: Q comes from Split 'split' (a fused QKV layer is not cut)")]
    assert _skips(attention(mask="per_head_const")) == [
        ("Softmax 'softmax'", "attention heads: the constant 'mask' of Add 'mask_add' has 4 entries on the head "
                              "axis (e.g. a per-head position bias)")]
    assert _skips(attention("const", shared_shape_outside=True)) == [
        ("Softmax 'softmax'", "attention heads: 'split_shape' is also read by Reshape input 1")]
    assert _skips(attention(mask="per_head_input")) == [
        ("Softmax 'softmax'", "attention heads: the input 'mask' of Add 'mask_add' has 4 entries on the head axis")]
    assert _skips(attention(mask="symbolic_heads")) == [
        ("Softmax 'softmax'", "attention heads: the input 'mask' of Add 'mask_add' has no declared size on the head "
                              "axis")]


def test_a_split_whose_minus_one_is_not_the_head_count_is_skipped():
    """[0, 0, 2, -1, d]: the -1 is half the heads (the other half sits on the axis before it).
    Statically the block looks like 4 heads of 3; the run shows 2 on the head axis."""
    inits = [_init(_w((E, E), 10 + i), f"W{r}") for i, r in enumerate("qkvo")]
    inits += [_i64([0, 0, 2, -1, D], "split5"), _i64([0, 0, -1], "merge3"), _init(0.5, "scale")]
    nodes = []
    for r in "qkv":
        nodes += [helper.make_node("MatMul", ["x", f"W{r}"], [f"{r}_m"], name=f"{r}_proj"),
                  helper.make_node("Reshape", [f"{r}_m", "split5"], [f"{r}_r"], name=f"{r}_split")]
    nodes += [helper.make_node("Transpose", ["q_r"], ["q_t"], perm=[0, 2, 3, 1, 4]),
              helper.make_node("Transpose", ["k_r"], ["k_t"], perm=[0, 2, 3, 4, 1]),
              helper.make_node("Transpose", ["v_r"], ["v_t"], perm=[0, 2, 3, 1, 4]),
              helper.make_node("MatMul", ["q_t", "k_t"], ["qk"], name="qk"),
              helper.make_node("Mul", ["qk", "scale"], ["sc"]),
              helper.make_node("Softmax", ["sc"], ["p"], axis=-1, name="softmax"),
              helper.make_node("MatMul", ["p", "v_t"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 3, 1, 2, 4]),
              helper.make_node("Reshape", ["ctx_t", "merge3"], ["ctx_m"], name="merge"),
              helper.make_node("MatMul", ["ctx_m", "Wo"], ["y"], name="o_proj")]
    model = make_model(nodes, [vi("x", ["B", S, E])], [vi("y", ["B", S, E])], inits)
    (g,), _ = find_head_groups(model)
    assert g.units == H and ("q_r", -2, H, "split") in g.head_axis_checks
    assert _skips(model) == [("Softmax 'softmax'", "attention heads: 'q_r' has shape [1, 5, 2, 2, 3]: 2 on the head "
                                                   "axis, not the 4 heads the target's -1 stands for")]


def test_a_bias_shared_through_identity_says_so():
    model = attention("hf")
    model.graph.node.insert(0, helper.make_node("Identity", ["bq_shared"], ["bq_id"], name="share"))
    model.graph.initializer.append(_init(np.zeros(E), "bq_shared"))
    for n in model.graph.node:
        if n.name == "q_bias":
            n.input[0] = "bq_id"
    assert _skips(model) == [("Softmax 'softmax'", "attention heads: Q's bias Add 'q_bias' reads Identity of the "
                                                   "constant 'bq_shared' (exporters share equal biases this way), not "
                                                   "a bias of its own")]


def test_computed_masks_are_checked_on_a_run_of_the_model():
    model = attention(mask="computed")
    (g,), _ = find_head_groups(model)
    assert g.head_axis_checks[0] == ("mask", -3, 1, "mask")
    _pruned, rep = prune_model(model, 0.5, "local", structured=HEADS, min_numel=0)
    assert rep.structured["skipped"] == [] and rep.structured["groups"][0]["units_after"] == H // 2
    # the same graph with a mask computed per head ([B, H, S, S]): seen on the run, the block is skipped
    assert _skips(attention(mask="computed_per_head")) == [
        ("Softmax 'softmax'", "attention heads: the mask 'mask' added to its scores has shape [1, 4, 5, 5]: 4 "
                              "entries on the head axis, so it differs per head")]


def test_neuron_groups_do_not_take_the_attention_layers():
    from onnx_magprune.structured import find_groups

    groups, skipped = find_groups(attention("hf"))
    assert groups == []
    reasons = {s.producer: s.reason for s in skipped}
    assert reasons["Wq"].startswith("it reaches Reshape 'q_split'")


def test_cli_heads_end_to_end(tmp_path):
    src = tmp_path / "attn.onnx"
    onnx.save(attention("const"), src)
    before = src.read_bytes()
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--structured", "heads", "--sparsity", "0.25",
                                    "--min-numel", "0", "--json"])
    assert res.exit_code == 0, res.output
    assert src.read_bytes() == before
    pruned = onnx.load(out)
    assert tensor_by_name(pruned, "split_shape").tolist() == [0, 0, H - 1, D]
    out2 = tmp_path / "out2.onnx"
    res = CliRunner().invoke(main, ["prune", str(src), "-o", str(out2), "--structured", "heads", "--sparsity", "0.25",
                                    "--min-numel", "0", "--json"])
    assert res.exit_code == 0 and out2.read_bytes() == out.read_bytes()


def _read_q_projection_shape(model, index, output):
    """Shape(q_a) -> Gather(index): a read of the Q projection's own shape, into ``output``."""
    model.graph.initializer.append(_i64(index, f"gi{index}"))
    return [helper.make_node("Shape", ["q_a"], [f"qas{index}"]),
            helper.make_node("Gather", [f"qas{index}", f"gi{index}"], [output], axis=0)]


def test_a_shape_read_of_a_projection_takes_its_axis_from_the_inferred_rank():
    # Gather(Shape(q_a), 0) is the batch of the rank-3 [B, S, E] projection (the rank from shape inference)
    model = attention("hf")
    idx = next(i for i, n in enumerate(model.graph.node) if n.output[0] == "q_shape")
    for n in reversed(_read_q_projection_shape(model, 0, "qb") + [helper.make_node("Unsqueeze", ["qb", "ax0"], ["qbu"])]):
        model.graph.node.insert(idx, n)
    next(n for n in model.graph.node if n.output[0] == "q_shape").input[0] = "qbu"
    (g,), skipped = find_head_groups(model)
    assert skipped == [] and g.units == H
    pruned, rep = prune_model(model, 0.5, "local", structured=HEADS, min_numel=0)
    masked = _masked(model, rep)
    feeds = _feeds(3)
    np.testing.assert_allclose(run_ort(pruned, feeds)[0], run_ort(masked, feeds)[0], **TOL)


def test_a_shape_read_of_the_width_of_a_2d_gemm_projection_stops_the_block():
    # Gemm on [B*S, E]: Gather(Shape(q_a), 1) reads E, which the cut changes (a rank guessed from the
    # split target [2, S, -1, d] would have taken it for S)
    model = attention("hf")
    g = model.graph
    g.initializer.extend([_i64([-1, E], "flat2"), _i64([2, S, -1, D], "split4")])
    nodes = [helper.make_node("Reshape", ["x", "flat2"], ["x2"], name="flat")]
    for n in g.node:
        if n.name in ("q_proj", "k_proj", "v_proj"):
            r = n.name[0]
            nodes.append(helper.make_node("Gemm", ["x2", f"W{r}", f"b{r}"], [f"{r}_a"], name=n.name))
        elif n.name in ("q_split", "k_split", "v_split"):
            n.input[1] = "split4"
            nodes.append(n)
        elif n.name == "residual":
            n.output[0] = "y0"
            nodes += [n] + _read_q_projection_shape(model, 1, "qw") + [
                helper.make_node("Cast", ["qw"], ["qwf"], to=TensorProto.FLOAT),
                helper.make_node("Add", ["y0", "qwf"], ["y"])]
        elif n.name not in ("q_bias", "k_bias", "v_bias"):
            nodes.append(n)
    del g.node[:]
    g.node.extend(nodes)
    g.input[0].CopyFrom(vi("x", [2, S, E]))
    assert [s.reason for s in find_head_groups(model)[1]] == [
        "attention heads: 'q_a' is read by 2 ops (Reshape 'q_split' input 0, Shape input 0)"]
