"""Compact codes in blocks: the block plan, bit-exact round trips of every alphabet block by block
(numpy reference, numpy evaluation of the ONNX decoder, ONNX Runtime), the shared constants, and
the whole pipeline (prune -> compact -> ONNX Runtime -> decode) with blocked weights in
initializers, Constants and subgraphs, float32 / float16 / bfloat16."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from onnx_magprune import compact_choice as choice
from onnx_magprune import compact_code as cc
from onnx_magprune.compact_graph import decoder, evaluate, largest_intermediate, weight_of
from onnx_magprune.encoding import decode_model
from onnx_magprune.folding import decoder_weights, unfolded_decoders
from test_compact import BF16, ELEM, _array, bits, decoder_model, special_arrays


@pytest.mark.parametrize("shape, itemsize, block_bytes, want", [
    ((4096, 4096), 4, 1 << 20, (0, (64,) * 64)),
    ((4096, 4096), 2, 1 << 20, (0, (128,) * 32)),
    ((4097, 256), 4, 1 << 20, (0, (820, 820, 819, 819, 819))),
    ((1, 1000, 1000), 4, 1 << 20, (1, (250,) * 4)),
    ((3, 1_000_000), 4, 1 << 20, (1, (83334,) * 4 + (83333,) * 8)),  # axis 0's slices are 4 MB: cut axis 1
    ((2, 2, 3_000_000), 4, 1 << 20, (2, (65218,) * 18 + (65217,) * 28)),  # 48 MB in 46 blocks
    ((2, 1 << 20), 4, 1 << 20, (1, (131_072,) * 8)),
    ((5, 2), 4, 4, (0, (1,) * 5)),                        # no axis has slices of 4 bytes: the longest
    ((256, 1024), 4, 1 << 20, None),                      # exactly one block: decoded whole
    ((1, 1, 1), 4, 1, None),                              # no axis to cut
    ((10,), 4, 8, (0, (2,) * 5)),
])
def test_block_plan(shape, itemsize, block_bytes, want):
    plan = cc.blocking(shape, itemsize, block_bytes)
    assert (plan.axis, plan.sizes) == want if want else plan is None
    if plan:
        assert sum(plan.sizes) == shape[plan.axis]


def test_block_plan_uses_the_module_default_at_call_time(monkeypatch):
    assert cc.blocking((64, 64), 4) is None
    monkeypatch.setattr(cc, "BLOCK_BYTES", 4096)
    assert cc.blocking((64, 64), 4).sizes == (16,) * 4
    assert cc.decoded_itemsize(BF16) == 4 and cc.decoded_itemsize(np.float16) == 2


def _blocked_cases(dtype):
    """(name, array, plan): the special arrays cut into about 6 blocks (at least 96 decoded bytes)."""
    arrays = special_arrays(dtype)
    arrays["leading_one"] = arrays["half"].reshape(1, 16, 24)  # cut along axis 1
    for name, a in arrays.items():
        size = cc.decoded_itemsize(a.dtype)
        plan = cc.blocking(a.shape, size, max(96, a.size * size // 6))
        if plan is not None:
            yield name, a, plan


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_every_alphabet_round_trips_block_by_block_in_numpy_and_in_the_onnx_decoder(dtype):
    seen = 0
    for name, a, plan in _blocked_cases(dtype):
        shapes = plan.block_shapes(a.shape)
        for alphabet in cc.alphabets():
            if not all(alphabet.fits(s) for s in [a.shape] + shapes):
                continue
            code = cc.encode_blocked(a, alphabet, plan)
            assert isinstance(code, cc.BlockedTensor) and len(code.blocks) == len(plan.sizes)
            assert code.nbytes == sum(b.nbytes for b in code.blocks)
            assert bits(code.decode()) == bits(a), (name, alphabet)
            dec = decoder(code, "W", ELEM[np.dtype(dtype)], set())
            consts = {t.name: _array(t) for t in dec.initializers}
            got = evaluate(dec.nodes, consts, "W")
            assert got.shape == a.shape and bits(got) == bits(a), (name, alphabet)
            assert all(weight_of(n) == "W" for n in dec.nodes)
            assert [n.op_type for n in dec.nodes].count("Concat") == 1 and dec.nodes[-1].op_type == "Concat"
            assert len(dec.nodes[-1].input) == len(plan.sizes)
            names = [t.name for t in dec.initializers]
            assert len(names) == len(set(names))
            seen += 1
    assert seen > 100


def test_blocks_share_their_small_constants_and_lookup_table():
    rng = np.random.default_rng(11)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    a[rng.random(a.shape) < 0.8] = 0
    plan = cc.blocking(a.shape, 4, 48 * 4 * 8)  # 8 blocks of 8 rows
    assert plan.sizes == (8,) * 8
    rows = next(x for x in cc.alphabets() if x.mode is cc.Mode.POSITION and x.word_bytes == 1)
    ops = [n.op_type for n in decoder(cc.encode_blocked(a, rows, plan), "W", TensorProto.FLOAT, set()).nodes]
    # one zeros for all (equal) blocks; per block a Cast and a scatter; one Concat
    assert ops.count("ConstantOfShape") == 1 and ops.count("Cast") == 8 and ops.count("ScatterElements") == 8
    assert ops.count("Concat") == 1 and len(ops) == 18
    skip = next(x for x in cc.alphabets() if x.mode is cc.Mode.SKIP and x.planes == 2)
    dec = decoder(cc.encode_blocked(a, skip, plan), "W", TensorProto.FLOAT, set())
    ops = [n.op_type for n in dec.nodes]
    assert ops.count("Range") == 1 and ops.count("Div") == 1 and ops.count("Mod") == 1  # one lookup table
    assert ops.count("ScatterElements") == 8
    small = [t for t in dec.initializers if numpy_helper.to_array(t).nbytes <= 64]
    assert len({numpy_helper.to_array(t).tobytes() + t.name.rsplit("/", 1)[-1].encode() for t in small}) == len(small)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_onnx_runtime_folds_blocked_decoders_to_the_exact_tensor(dtype, tmp_path):
    cases = {name: (a, plan) for name, a, plan in _blocked_cases(dtype)}
    assert cases["leading_one"][1].axis == 1
    for name in ("half", "s95", "all_zero", "long_runs", "negative_zero", "odd_size", "leading_one"):
        a, plan = cases[name]
        shapes = plan.block_shapes(a.shape)
        for alphabet in cc.alphabets():
            if not all(alphabet.fits(s) for s in [a.shape] + shapes):
                continue
            model = decoder_model(a, alphabet, plan=plan)
            onnx.checker.check_model(model, full_check=True)
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
            got = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {})
            assert bits(got[0]) == bits(a.astype(np.float32) if a.dtype == BF16 else a), (name, alphabet)
            assert unfolded_decoders(str(tmp_path / "opt.onnx")) == [], (name, alphabet)


def test_blocked_candidates_fit_every_block_and_their_sizes_are_exact():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 10)).astype(np.float32)  # 60 elements: 3-, 4-, 5- and 6-plane codes fit whole
    a[rng.random(a.shape) < 0.5] = 0
    whole = {e.alphabet.planes for e in choice.candidates(a) if e.alphabet.layout is cc.Layout.PLANES}
    assert {3, 4, 5, 6} <= whole
    plan = cc.blocking(a.shape, 4, 80)  # 3 blocks of [2, 10]: 20 elements each
    assert plan.sizes == (2, 2, 2)
    found = choice.candidates(a, plan)
    assert {e.alphabet.planes for e in found if e.alphabet.layout is cc.Layout.PLANES} == \
        {p for p in whole if 20 % p == 0}
    for e in found:
        code = cc.encode_blocked(a, e.alphabet, plan)
        assert e.plan == plan and (e.nbytes, e.entries) == (code.nbytes, code.total_entries), e.alphabet


def test_choose_codes_whole_for_size_and_in_blocks_otherwise_unless_balanced_misses_its_cap():
    rng = np.random.default_rng(9)
    a = rng.standard_normal((64, 256)).astype(np.float16)
    a[rng.random(a.shape) < 0.5] = 0
    plan = cc.blocking(a.shape, 2, 4096)  # 8 blocks of 8 rows
    assert choice.choose(a, cc.Objective.SIZE, plan).plan is None
    assert choice.choose(a, cc.Objective.STARTUP, plan).plan == plan
    assert choice.choose(a, cc.Objective.BALANCED, plan).plan == plan
    sparse = np.zeros((64, 256), np.float16)
    sparse[rng.random(sparse.shape) < 0.01] = 1.0  # 99% zeros: each tiny block pays its own code starts
    tiny = cc.blocking(sparse.shape, 2, 256)  # 128 blocks of half a row
    cap = choice._cap(sparse)
    blocked = choice._pick(sparse, choice.candidates(sparse, tiny), cc.Objective.BALANCED, cap)
    assert blocked.nbytes > cap  # no blocked code is near the bound ...
    chosen = choice.choose(sparse, cc.Objective.BALANCED, tiny)
    assert chosen.plan is None and chosen.nbytes <= cap  # ... so balanced codes it whole


def test_largest_intermediate_of_a_blocked_code_is_the_joined_tensor():
    a = np.zeros((64, 32), np.float32)
    a[::3, ::5] = 1.0
    rows = next(x for x in cc.alphabets() if x.mode is cc.Mode.POSITION and x.word_bytes == 1)
    code = cc.encode_blocked(a, rows, cc.blocking(a.shape, 4, 1024))
    assert largest_intermediate(code) == 64 * 32 * 4


def _mlp(dtype, where: str) -> onnx.ModelProto:
    """x[2, 64] @ W1[64, 96] -> Relu -> @ W2[96, 32]; W2 an initializer, a Constant, or inside an If."""
    rng = np.random.default_rng(0)
    elem = ELEM[np.dtype(dtype)]
    cast = (lambda w: w.astype(np.float32).astype(dtype))  # noqa: E731
    w1, w2 = cast(rng.standard_normal((64, 96))), cast(rng.standard_normal((96, 32)))
    vi = lambda n, s: helper.make_tensor_value_info(n, elem, s)  # noqa: E731
    w2_init = helper.make_tensor("W2", elem, [96, 32], w2.view(np.uint16).tobytes(), raw=True) \
        if dtype == BF16 else numpy_helper.from_array(w2, "W2")
    w1_init = helper.make_tensor("W1", elem, [64, 96], w1.view(np.uint16).tobytes(), raw=True) \
        if dtype == BF16 else numpy_helper.from_array(w1, "W1")
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"])]
    inits, inputs = [w1_init], [vi("x", [2, 64])]
    if where == "subgraph":
        then = helper.make_graph([helper.make_node("MatMul", ["r", "W2"], ["t"])], "then", [], [vi("t", [2, 32])],
                                 [w2_init])
        other = helper.make_graph([helper.make_node("Slice", ["r", "s0", "s1", "s2"], ["e"])], "else", [],
                                  [vi("e", [2, 32])])
        inits += [numpy_helper.from_array(np.array([0], np.int64), n) for n in ("s0",)]
        inits += [numpy_helper.from_array(np.array([32], np.int64), "s1"),
                  numpy_helper.from_array(np.array([1], np.int64), "s2")]
        nodes.append(helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other))
        inputs.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    elif where == "constant":
        nodes += [helper.make_node("Constant", [], ["W2"], value=w2_init),
                  helper.make_node("MatMul", ["r", "W2"], ["y"])]
    else:
        inits.append(w2_init)
        nodes.append(helper.make_node("MatMul", ["r", "W2"], ["y"]))
    g = helper.make_graph(nodes, "g", inputs, [vi("y", [2, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("where", ["initializer", "constant", "subgraph"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_blocked_weights_through_the_whole_pipeline_are_bit_exact(dtype, where, monkeypatch, tmp_path):
    monkeypatch.setattr(cc, "BLOCK_BYTES", 4096)  # W1 (64x96) and W2 (96x32) both in blocks
    model = _mlp(dtype, where)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 64)).astype(
        np.float32 if dtype == BF16 else dtype)}
    if where == "subgraph":
        feeds["c"] = np.array(True)
    if dtype == BF16:  # ONNX Runtime's CPU MatMul has no bfloat16 kernel: compare the weights only
        feeds = None
    dense, _ = mp.prune_model(model, sparsity=0.6, min_numel=16)
    for objective in ("balanced", "startup"):
        compact, report = mp.prune_model(model, sparsity=0.6, min_numel=16, format="compact",
                                         optimize_for=objective)
        assert [t.format for t in report.tensors] == ["compact", "compact"], objective
        blocked = [" blocks of " in t.code for t in report.tensors]
        # startup blocks both; balanced codes a tensor whole when no blocked code is within its cap
        assert all(blocked) if objective == "startup" else any(blocked), [t.code for t in report.tensors]
        onnx.checker.check_model(compact, full_check=True)
        if feeds is not None:
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
            a = ort.InferenceSession(dense.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
            b = ort.InferenceSession(compact.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
                None, feeds)
            assert bits(a[0]) == bits(b[0]), objective
            assert unfolded_decoders(str(tmp_path / "opt.onnx")) == []
        assert sorted(decoder_weights(compact)) == ["W1", "W2"]
        back = onnx.ModelProto.FromString(compact.SerializeToString())
        assert decode_model(back) == 2 and decoder_weights(back) == []
        assert _weights(back) == _weights(dense), objective


def _weights(model: onnx.ModelProto) -> dict[str, bytes]:
    """Every weight's bytes by name: initializers and Constants, in every graph."""
    out = {}
    for g in [model.graph] + [a.g for n in model.graph.node for a in n.attribute if a.type == a.GRAPH]:
        for t in g.initializer:
            if t.name in ("W1", "W2"):
                out[t.name] = t.raw_data or numpy_helper.to_array(t).tobytes()
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] in ("W1", "W2"):
                t = n.attribute[0].t
                out[n.output[0]] = t.raw_data or numpy_helper.to_array(t).tobytes()
    return out


def test_size_objective_codes_weights_whole(monkeypatch):
    monkeypatch.setattr(cc, "BLOCK_BYTES", 2048)
    _, report = mp.prune_model(_mlp(np.float32, "initializer"), sparsity=0.6, min_numel=16, format="compact",
                               optimize_for="size")
    assert [t.format for t in report.tensors] == ["compact", "compact"]
    assert not any("blocks" in t.code for t in report.tensors)


def test_blocked_output_is_deterministic(monkeypatch):
    monkeypatch.setattr(cc, "BLOCK_BYTES", 2048)
    model = _mlp(np.float16, "initializer")
    one, two = (mp.prune_model(model, sparsity=0.6, min_numel=16, format="compact", optimize_for="startup")[0]
                .SerializeToString() for _ in range(2))
    assert one == two


def test_equal_blocks_keep_their_own_codes_and_values_so_the_report_counts_real_bytes(monkeypatch):
    rng = np.random.default_rng(4)
    a = rng.standard_normal((64, 48)).astype(np.float32)
    a[rng.random(a.shape) < 0.7] = 0
    a[:32] = 0  # four equal (all-zero) blocks of 8 rows
    plan = cc.blocking(a.shape, 4, 48 * 4 * 8)
    rows = next(x for x in cc.alphabets() if x.mode is cc.Mode.POSITION and x.word_bytes == 1)
    code = cc.encode_blocked(a, rows, plan)
    dec = decoder(code, "W", TensorProto.FLOAT, set())
    own = [t for t in dec.initializers if t.name.rsplit("/", 1)[-1] in ("codes", "values")]
    assert len(own) == 16
    assert sum(numpy_helper.to_array(t).nbytes for t in own) == code.nbytes
    monkeypatch.setattr(cc, "BLOCK_BYTES", 48 * 4 * 8)
    model = helper.make_model(helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 48])], [numpy_helper.from_array(a, "W")]),
        opset_imports=[helper.make_opsetid("", 17)])
    _, report = mp.prune_model(model, sparsity=0.0, min_numel=16, format="compact", optimize_for="startup")
    (t,) = report.tensors
    assert " 8 blocks of 8-8 " in t.code and t.overhead_bytes > 0
