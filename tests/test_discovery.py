"""Finding weights wherever exporters put them, and saying why anything is skipped."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import make_model, vi, weight
from onnx_magprune.discovery import find_weights
from onnx_magprune.graph_index import GraphIndex


def discover(model, min_numel=16):
    found = find_weights(GraphIndex(model), min_numel=min_numel)
    return {w.name: w for w in found.weights}, {s.name: s.reason for s in found.skipped}


def init(name, shape, seed=0, dtype=np.float32):
    return numpy_helper.from_array(weight(shape, seed, dtype), name)


def const_node(out, array, name=None):
    return helper.make_node("Constant", [], [out], name=name or f"const_{out}",
                            value=numpy_helper.from_array(array, out))


def test_initializer_and_constant_node_weights():
    nodes = [const_node("Wc", weight((8, 8), 1)),
             helper.make_node("MatMul", ["x", "Wi"], ["h"]),
             helper.make_node("MatMul", ["h", "Wc"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])], [init("Wi", (8, 8))])
    weights, skipped = discover(m)
    assert set(weights) == {"Wi", "Wc"} and not skipped
    assert weights["Wc"].value.where() == "Constant node 'const_Wc' in main"
    assert weights["Wi"].value.where() == "initializer in main"


def _if_model():
    then_g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W_outer"], ["t_out"])], "then", [], [vi("t_out", [1, 8])])
    else_g = helper.make_graph(
        [const_node("W_inner", weight((8, 8), 2)), helper.make_node("MatMul", ["x", "W_inner"], ["e_out"])],
        "else", [], [vi("e_out", [1, 8])])
    nodes = [helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    return make_model(nodes, [vi("x", [1, 8]), vi("cond", [], TensorProto.BOOL)], [vi("y", [1, 8])],
                      [init("W_outer", (8, 8))])


def test_subgraph_weights_and_outer_scope_captures():
    weights, skipped = discover(_if_model())
    assert set(weights) == {"W_outer", "W_inner"} and not skipped
    assert weights["W_outer"].uses[0].graph == "main/If 'branch'.then_branch"
    assert weights["W_inner"].value.graph == "main/If 'branch'.else_branch"


def test_loop_body_capture_and_subgraph_shadowing():
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W"], ["h_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body", [vi("i", [], TensorProto.INT64), vi("cond_in", [], TensorProto.BOOL), vi("h_in", [1, 8])],
        [vi("cond_out", [], TensorProto.BOOL), vi("h_out", [1, 8])],
        initializer=[init("S", (8, 8), 9)])  # a body initializer nobody uses
    nodes = [helper.make_node("Loop", ["n", "", "x"], ["y"], body=body, name="loop")]
    m = make_model(nodes, [vi("x", [1, 8]), vi("n", [], TensorProto.INT64)], [vi("y", [1, 8])], [init("W", (8, 8))])
    weights, skipped = discover(m)
    assert set(weights) == {"W"}
    assert skipped["S"] == "unused (reaches no weight input)"


def test_shared_weight_is_one_weight():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])], [init("W", (8, 8))])
    weights, _ = discover(m)
    assert list(weights) == ["W"] and len(weights["W"].uses) == 2 and weights["W"].consumers() == ["MatMul"]


def test_layout_chain_and_cast_pass_through():
    shape = numpy_helper.from_array(np.array([8, 8], np.int64), "shape")
    nodes = [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]),
             helper.make_node("Reshape", ["Wt", "shape"], ["Wr"]),
             helper.make_node("Identity", ["Wr"], ["Wi"]),
             helper.make_node("Unsqueeze", ["Wi", "ax"], ["Wu"]),
             helper.make_node("Squeeze", ["Wu", "ax"], ["Ws"]),
             helper.make_node("MatMul", ["x", "Ws"], ["h"]),
             helper.make_node("Cast", ["H16"], ["H32"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["h", "H32"], ["y"])]
    ax = numpy_helper.from_array(np.array([0], np.int64), "ax")
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])],
                   [init("W", (8, 8)), shape, ax, init("H16", (8, 8), 3, np.float16)])
    weights, skipped = discover(m)
    assert set(weights) == {"W", "H16"}
    assert skipped["shape"] == "int64 tensor, not floating point"


def test_packed_tensor_split_into_weight_slots_is_one_weight():
    nodes = [helper.make_node("Split", ["QKV"], ["q", "k", "v"], axis=1, num_outputs=3),
             helper.make_node("MatMul", ["x", "q"], ["a"]),
             helper.make_node("MatMul", ["x", "k"], ["b"]),
             helper.make_node("MatMul", ["x", "v"], ["c"]),
             helper.make_node("Sum", ["a", "b", "c"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])], [init("QKV", (8, 24))], opset=18)
    weights, _ = discover(m)
    assert list(weights) == ["QKV"] and len(weights["QKV"].uses) == 3


def test_packed_tensor_with_a_non_weight_slice_is_skipped():
    starts = numpy_helper.from_array(np.array([0], np.int64), "s0")
    ends = numpy_helper.from_array(np.array([8], np.int64), "e0")
    starts2 = numpy_helper.from_array(np.array([8], np.int64), "s1")
    ends2 = numpy_helper.from_array(np.array([16], np.int64), "e1")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [helper.make_node("Slice", ["P", "s0", "e0", "axes"], ["w"]),
             helper.make_node("Slice", ["P", "s1", "e1", "axes"], ["bias"]),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Add", ["h", "bias"], ["y"], name="add_bias")]
    m = make_model(nodes, [vi("x", [8, 8])], [vi("y", [8, 8])],
                   [init("P", (8, 16)), starts, ends, starts2, ends2, axes])
    weights, skipped = discover(m)
    assert "P" not in weights
    assert skipped["P"] == "also feeds a non-weight input: Add 'add_bias' input 1"


def test_gather_constant_indices_pass_dynamic_indices_are_embeddings():
    idx = numpy_helper.from_array(np.array(0, np.int64), "zero")
    nodes = [helper.make_node("Gather", ["Stack", "zero"], ["w"], axis=0),
             helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Gather", ["Emb", "ids"], ["e"], axis=0),
             helper.make_node("Add", ["h", "e"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8]), vi("ids", [1], TensorProto.INT64)], [vi("y", [1, 8])],
                   [init("Stack", (2, 8, 8)), idx, init("Emb", (50, 8))])
    weights, skipped = discover(m)
    assert set(weights) == {"Stack"}
    assert skipped["Emb"].startswith("embedding table (data of a Gather with run-time indices)")


def test_every_skip_reason():
    sparse = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(2, np.float32), "Sp"), numpy_helper.from_array(np.array([0, 5], np.int64),
                                                                                       "Sp_idx"), [8, 8])
    scale = numpy_helper.from_array(np.full((64, 1), 0.02, np.float32), "big_scale")
    qweight = numpy_helper.from_array(np.ones((64, 8), np.int8), "Wq")
    nodes = [
        helper.make_node("MatMul", ["x", "Over"], ["a"]),           # overridable initializer
        helper.make_node("Gemm", ["a", "Wg", "Cbias"], ["b"]),       # Gemm C is not a weight slot
        helper.make_node("MatMul", ["b", "Tiny"], ["c"]),           # too small
        helper.make_node("Add", ["c", "Bias"], ["d"]),              # 1-D
        helper.make_node("MatMul", ["d", "Sp"], ["e"]),             # sparse initializer
        helper.make_node("DequantizeLinear", ["Wq", "big_scale"], ["wdq"], axis=0),  # int weight + float scale
        helper.make_node("MatMul", ["e", "Out"], ["f"]),            # also a graph output
        helper.make_node("Identity", ["f"], ["y"]),
    ]
    inits = [init("Over", (8, 8)), init("Wg", (8, 8), 1), init("Cbias", (8, 8), 2), init("Tiny", (8, 1), 3),
             init("Bias", (8,), 4), scale, qweight, init("Out", (8, 8), 5)]
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 8]), vi("Over", [8, 8])],
                              [vi("y", [1, 8]), vi("wdq", [64, 8]), vi("Out", [8, 8])],
                              initializer=inits, sparse_initializer=[sparse])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    weights, skipped = discover(m)
    assert set(weights) == {"Wg"}
    assert skipped == {
        "Over": "initializer is also a graph input, so callers can override it at run time "
                "(--include-overridable prunes it)",
        "Cbias": "also feeds a non-weight input: Gemm input 2",
        "Tiny": "too small: 8 elements, below min_numel 16",
        "Bias": "1-D tensor (bias, scale or norm parameter)",
        "big_scale": "quantization scale or zero point: DequantizeLinear input 1",
        "Wq": "its dequantized value is a graph output: output 1 of graph main",
        "Out": "is a graph output: output 2 of graph main",
        "Sp": "stored as a sparse tensor (already encoded; decode it first)",
    }
    report = mp.inspect_model(m)
    sp = next(s for s in report.skipped if s.name == "Sp")
    assert (tuple(sp.shape), sp.dtype) == ((8, 8), "float")  # its dense shape, not its 2 stored values
    # every tensor at its dense size: four 8x8, Tiny 8x1, Bias 8, the 64x1 scale, the 64x8 int8, the 8x8 sparse one
    assert report.totals.total_params == 4 * 64 + 8 + 8 + 64 + 512 + 64


def test_fake_quant_pair_passes_and_duplicates_are_refused():
    sc = numpy_helper.from_array(np.array(0.05, np.float32), "sc")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [helper.make_node("QuantizeLinear", ["W", "sc", "zp"], ["wq"]),
             helper.make_node("DequantizeLinear", ["wq", "sc", "zp"], ["wd"]),
             helper.make_node("MatMul", ["x", "wd"], ["h"]),
             helper.make_node("MatMul", ["h", "D"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])],
                   [init("W", (8, 8)), sc, zp, init("D", (8, 8), 1), init("D", (8, 8), 2)])
    weights, skipped = discover(m)
    assert set(weights) == {"W"}
    assert skipped["D"] == "its name is bound more than once in its graph"
    assert skipped["sc"] == "scalar"


def test_einsum_conv_rnn_and_function_bodies():
    conv_w = init("CW", (4, 3, 3, 3))
    lstm_w, lstm_r = init("LW", (1, 16, 3)), init("LR", (1, 16, 4), 1)
    nodes = [helper.make_node("Einsum", ["x2", "E"], ["ein"], equation="ij,jk->ik"),
             helper.make_node("Conv", ["img", "CW"], ["conv"]),
             helper.make_node("LSTM", ["seq", "LW", "LR"], ["lstm_y"], hidden_size=4),
             helper.make_node("MyLinear", ["x2"], ["fy"], domain="local")]
    fn = helper.make_function(
        "local", "MyLinear", ["inp"], ["out"],
        [const_node("FW", weight((8, 8), 7), name="fn_const"), helper.make_node("MatMul", ["inp", "FW"], ["out"])],
        opset_imports=[helper.make_opsetid("", 17)])
    graph = helper.make_graph(nodes, "g", [vi("x2", [2, 8]), vi("img", [1, 3, 5, 5]), vi("seq", [2, 1, 3])],
                              [vi("ein", [2, 8]), vi("conv", None), vi("lstm_y", None), vi("fy", [2, 8])],
                              initializer=[init("E", (8, 8)), conv_w, lstm_w, lstm_r])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                          functions=[fn])
    weights, skipped = discover(m)
    assert set(weights) == {"E", "CW", "LW", "LR", "FW"}
    assert weights["FW"].value.graph == "function local:MyLinear"
    assert weights["CW"].consumers() == ["Conv"] and weights["LR"].consumers() == ["LSTM"]


def test_unsorted_nodes_are_indexed():
    nodes = [helper.make_node("MatMul", ["h", "W2"], ["y"]), helper.make_node("MatMul", ["x", "W1"], ["h"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8])], [init("W1", (8, 8)), init("W2", (8, 8), 1)])
    weights, _ = discover(m)
    assert set(weights) == {"W1", "W2"}


def test_overridable_initializers_can_be_included():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["y"])]
    graph = helper.make_graph(nodes, "g", [vi("x", [1, 8]), vi("W", [8, 8])], [vi("y", [1, 8])],
                              initializer=[init("W", (8, 8))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert discover(m)[0] == {}
    found = find_weights(GraphIndex(m), min_numel=16, include_overridable=True)
    assert [w.name for w in found.weights] == ["W"]


def test_shape_reads_do_not_block_a_weight():
    nodes = [helper.make_node("Shape", ["W"], ["s"]), helper.make_node("MatMul", ["x", "W"], ["y"])]
    m = make_model(nodes, [vi("x", [1, 8])], [vi("y", [1, 8]), vi("s", [2], TensorProto.INT64)], [init("W", (8, 8))])
    weights, skipped = discover(m)
    assert set(weights) == {"W"} and not skipped


def test_lstm_gate_reordering_with_slice_and_concat():
    # PyTorch's exporter without constant folding: W[128, 64] -> 4 Slices -> Concat -> Unsqueeze -> LSTM W
    consts, slices = [], []
    for i in range(4):
        consts += [numpy_helper.from_array(np.array([i * 8], np.int64), f"s{i}"),
                   numpy_helper.from_array(np.array([(i + 1) * 8], np.int64), f"e{i}")]
        slices.append(helper.make_node("Slice", ["W", f"s{i}", f"e{i}", "ax"], [f"g{i}"]))
    consts.append(numpy_helper.from_array(np.array([0], np.int64), "ax"))
    nodes = slices + [helper.make_node("Concat", ["g0", "g3", "g1", "g2"], ["Wc"], axis=0),
                      helper.make_node("Unsqueeze", ["Wc", "ax"], ["Wu"]),
                      helper.make_node("LSTM", ["x", "Wu", "R"], ["y"], hidden_size=8)]
    m = make_model(nodes, [vi("x", [2, 1, 3])], [vi("y", None)],
                   [init("W", (32, 3)), init("R", (1, 32, 8), 1)] + consts)
    weights, _ = discover(m)
    assert set(weights) == {"W", "R"}
    assert len(weights["W"].uses) == 1 and weights["W"].consumers() == ["LSTM"]


def test_deformconv_and_nhwcconv_weights_are_found():
    w1, w2 = weight((4, 3, 3, 3), 1), weight((4, 3, 3, 3), 2)
    nodes = [helper.make_node("DeformConv", ["x", "W1", "off"], ["y1"]),
             helper.make_node("NhwcConv", ["x", "W2"], ["y2"], domain="com.microsoft")]
    model = make_model(nodes, [vi("x", [1, 3, 8, 8]), vi("off", [1, 18, 6, 6])], [vi("y1", None), vi("y2", None)],
                       [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")], opset=19)
    found = find_weights(GraphIndex(model), min_numel=1)
    assert sorted(w.name for w in found.weights) == ["W1", "W2"]


def test_numbers_in_attributes_are_listed_with_why_they_stay():
    """scikit-learn's linear models keep their weights in ai.onnx.ml attributes; Constants may hold lists."""
    clf = helper.make_node("LinearClassifier", ["x"], ["label", "scores"], domain="ai.onnx.ml", name="lc",
                           coefficients=[0.5] * 12, intercepts=[0.1, 0.2, 0.3], classlabels_ints=[0, 1, 2])
    const = helper.make_node("Constant", [], ["c"], value_floats=[1.0, 2.0, 3.0])
    model = make_model([clf, const], [vi("x", ["N", 4])], [vi("label", None, TensorProto.INT64), vi("scores", None),
                                                          vi("c", None)])
    model.opset_import.append(helper.make_opsetid("ai.onnx.ml", 1))
    found = find_weights(GraphIndex(model), min_numel=128)
    assert found.weights == []
    assert [(s.name, s.shape, s.dtype, s.where) for s in found.skipped] == [
        ("lc.coefficients", (12,), "float32", "attribute of ai.onnx.ml.LinearClassifier 'lc' in main"),
        ("lc.intercepts", (3,), "float32", "attribute of ai.onnx.ml.LinearClassifier 'lc' in main"),
        ("c", (3,), "float32", "Constant node in main")]
    assert found.skipped[2].reason == "a Constant's value_floats attribute (a number list, not a tensor): left as it is"
    assert found.skipped[0].reason == ("parameters held in an operator attribute, not a tensor: only tensors "
                                       "are pruned")


def test_a_flat_weight_reshaped_into_a_weight_slot_is_a_weight_a_1d_vector_read_directly_is_not():
    w = weight((8 * 4 * 3 * 3,), 3)  # stored flat, reshaped to the Conv's [O, I, kH, kW]
    v = weight((200,), 4)  # a 1-D operand a MatMul reads as it is: a vector, not a layer's weight
    nodes = [helper.make_node("Reshape", ["Wflat", "shp"], ["W"]), helper.make_node("Conv", ["x", "W"], ["y"]),
             helper.make_node("MatMul", ["q", "vec"], ["d"]),
             helper.make_node("Reshape", ["gamma", "shp2"], ["g"]), helper.make_node("Mul", ["y", "g"], ["z"])]
    model = make_model(nodes, [vi("x", [1, 4, 6, 6]), vi("q", [3, 200])], [vi("z", None), vi("d", None)],
                       [numpy_helper.from_array(w, "Wflat"), numpy_helper.from_array(np.array([8, 4, 3, 3]), "shp"),
                        numpy_helper.from_array(v, "vec"), numpy_helper.from_array(weight((128,), 5), "gamma"),
                        numpy_helper.from_array(np.array([8, 4, 4]), "shp2")])
    found = find_weights(GraphIndex(model), min_numel=128)
    assert [w.name for w in found.weights] == ["Wflat"]
    reasons = {s.name: s.reason for s in found.skipped}
    assert reasons["vec"] == reasons["gamma"] == "1-D tensor (bias, scale or norm parameter)"
