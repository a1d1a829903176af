"""The compact code: bit-exact round trips (numpy reference, numpy evaluation of the
ONNX decoder, ONNX Runtime), exact size estimates, the size near the information
bound, the folding check, and where compact cannot be used."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnx_magprune as mp
from conftest import MODELS
from onnx_magprune import compact_choice as choice
from onnx_magprune import compact_code as cc
from onnx_magprune.cli import main
from onnx_magprune.compact_graph import decoder, evaluate, weight_of
from onnx_magprune.encoding import _compact_blocker, decode_model
from onnx_magprune.folding import decoder_weights, unfolded_decoders

BF16 = np.dtype(helper.tensor_dtype_to_np_dtype(TensorProto.BFLOAT16))
ELEM = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
        np.dtype(np.float64): TensorProto.DOUBLE, BF16: TensorProto.BFLOAT16}


def bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).view(np.uint8).tobytes()


def special_arrays(dtype) -> dict[str, np.ndarray]:
    """Tensors at the edges of the code: every one must round-trip bit-exactly."""
    rng = np.random.default_rng(7)
    f32 = lambda a: a.astype(np.float32).astype(dtype)  # noqa: E731

    def pruned(shape, s):
        a = rng.standard_normal(shape)
        a[rng.random(shape) < s] = 0
        return f32(a)

    single = np.zeros((12, 40))
    single[7, 13] = 2.5
    long_runs = np.zeros((4, 3000))  # zero runs far longer than any advance: fillers / skips
    long_runs[0, 2999] = 1.0
    long_runs[2, 0] = -3.0
    long_runs[2, 1700] = 0.5
    signed = pruned((9, 16), 0.5)
    signed[0, 0] = -0.0  # a negative zero is a value: its bits are not all zero
    signed[3, 5] = -0.0
    return {
        "dense": pruned((6, 32), 0.0), "half": pruned((16, 24), 0.5), "s95": pruned((32, 64), 0.95),
        "all_zero": f32(np.zeros((8, 10))), "single": f32(single), "long_runs": f32(long_runs),
        "negative_zero": signed, "odd_size": pruned((7, 11, 3), 0.8), "vector": pruned((101,), 0.7),
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64, BF16], ids=str)
def test_every_code_round_trips_and_its_size_estimate_is_exact(dtype):
    for name, a in special_arrays(dtype).items():
        for alphabet in cc.alphabets():
            if not alphabet.fits(a.shape):
                continue
            code = cc.encode(a, alphabet)
            assert bits(code.decode()) == bits(a), (name, alphabet)
            fib = cc.nonzero_mask(cc.fiber_major(a, alphabet.layout))
            nbytes, k = cc.encoded_nbytes(cc._gaps(fib, alphabet.fibers(a.shape)), alphabet, a.itemsize)
            assert (nbytes, k) == (code.nbytes, code.entries), (name, alphabet)


def test_onnx_decoder_evaluated_with_numpy_matches_the_reference():
    for dtype in (np.float32, np.float16, BF16):
        for name, a in special_arrays(dtype).items():
            for alphabet in cc.alphabets():
                if not alphabet.fits(a.shape):
                    continue
                dec = decoder(cc.encode(a, alphabet), "W", ELEM[np.dtype(dtype)], set())
                consts = {t.name: _array(t) for t in dec.initializers}
                assert bits(evaluate(dec.nodes, consts, "W")) == bits(a), (dtype, name, alphabet)
                assert all(weight_of(n) == "W" for n in dec.nodes)


def _array(t: TensorProto) -> np.ndarray:
    if t.data_type == TensorProto.BFLOAT16:
        return np.frombuffer(t.raw_data, dtype=np.uint16).reshape(tuple(t.dims)).view(BF16)
    return numpy_helper.to_array(t)


def decoder_model(a: np.ndarray, alphabet: cc.Alphabet, opset: int = 17,
                  plan: cc.Blocking | None = None) -> onnx.ModelProto:
    """A model whose output is the decoded weight (as float32 for bfloat16, via an exact Cast);
    with ``plan``, coded in those blocks."""
    elem = ELEM[a.dtype]
    dec = decoder(cc.encode_blocked(a, alphabet, plan), "W", elem, set())
    nodes, out, out_type = list(dec.nodes), "W", elem
    if elem == TensorProto.BFLOAT16:
        nodes.append(helper.make_node("Cast", ["W"], ["W32"], to=TensorProto.FLOAT))
        out, out_type = "W32", TensorProto.FLOAT
    g = helper.make_graph(nodes, "g", [], [helper.make_tensor_value_info(out, out_type, list(a.shape))],
                          dec.initializers)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("dtype", [np.float32, np.float16, BF16], ids=str)
def test_onnx_runtime_folds_every_decoder_to_the_exact_tensor(dtype, tmp_path):
    arrays = special_arrays(dtype)
    for name in ("half", "s95", "all_zero", "long_runs", "negative_zero"):
        a = arrays[name]
        for alphabet in cc.alphabets():
            if not alphabet.fits(a.shape):
                continue
            model = decoder_model(a, alphabet)
            onnx.checker.check_model(model, full_check=True)
            so = ort.SessionOptions()
            so.optimized_model_filepath = str(tmp_path / "opt.onnx")
            out = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, {})
            expected = a.astype(np.float32) if a.dtype == BF16 else a
            assert bits(out[0]) == bits(expected), (name, alphabet)
            assert unfolded_decoders(str(tmp_path / "opt.onnx")) == [], (name, alphabet)


def test_a_decoder_that_is_not_folded_is_found(tmp_path):
    a = special_arrays(np.float32)["half"]
    model = decoder_model(a, cc.alphabets()[0])
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["ConstantFolding"])
    assert unfolded_decoders(str(tmp_path / "opt.onnx")) == ["W"]
    assert decoder_weights(model) == ["W"]


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_smallest_code_is_within_ten_percent_of_the_bound(dtype, sparsity):
    rng = np.random.default_rng(3)
    a = rng.standard_normal((512, 512)).astype(dtype)
    a[rng.random(a.shape) < sparsity] = 0
    nnz = int(cc.nonzero_mask(a).sum())
    bound = cc.bound_bytes(a.size, nnz, a.itemsize)
    smallest = choice.choose(a, cc.Objective.SIZE)
    assert smallest.nbytes <= 1.10 * bound
    balanced = choice.choose(a, cc.Objective.BALANCED)
    assert balanced.nbytes <= choice.BALANCED_CAP * bound or balanced == smallest
    startup = choice.choose(a, cc.Objective.STARTUP)
    assert startup.startup <= balanced.startup <= max(e.startup for e in choice.candidates(a))
    assert bits(cc.encode(a, balanced.alphabet).decode()) == bits(a)


def test_bound_is_values_plus_entropy_of_positions():
    assert cc.bound_bytes(1000, 500, 4) == pytest.approx(2000 + 1000 / 8)
    assert cc.bound_bytes(1000, 0, 4) == 0.0
    assert cc.bound_bytes(1000, 1000, 2) == 2000.0
    assert cc.bound_bytes(1000, 100, 4) == pytest.approx(400 + 1000 * cc.binary_entropy(0.9) / 8)


def mlp_model(opset: int = 17, dtype=np.float32, sparsity: float = 0.9, where: str = "initializer"):
    rng = np.random.default_rng(0)
    elem = ELEM[np.dtype(dtype)]
    w1 = rng.standard_normal((64, 96)).astype(dtype)
    w2 = rng.standard_normal((96, 32)).astype(dtype)
    for w in (w1, w2):
        w[rng.random(w.shape) < sparsity] = 0
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    inits = [numpy_helper.from_array(w1, "W1")]
    if where == "constant":
        nodes.insert(2, helper.make_node("Constant", [], ["W2"], value=numpy_helper.from_array(w2, "W2")))
    else:
        inits.append(numpy_helper.from_array(w2, "W2"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", elem, [2, 64])],
                          [helper.make_tensor_value_info("y", elem, [2, 32])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def test_prune_to_compact_matches_the_dense_pruned_model_bit_for_bit(tmp_path):
    for where in ("initializer", "constant"):
        model = mlp_model(where=where, sparsity=0.0)
        dense, _ = mp.prune_model(model, sparsity=0.9, min_numel=16)
        compact, report = mp.prune_model(model, sparsity=0.9, min_numel=16, format="compact")
        assert [t.format for t in report.tensors] == ["compact", "compact"]
        for t in report.tensors:
            assert t.bound_bytes is not None and t.stored_bytes <= 1.10 * t.bound_bytes
            assert t.overhead_bytes > 0 and t.code
        onnx.checker.check_model(compact, full_check=True)
        x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
        a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
                for m in (dense, compact))
        assert bits(a) == bits(b)
        back = onnx.ModelProto.FromString(compact.SerializeToString())
        assert decode_model(back) == 2
        want = {t.name: bits(numpy_helper.to_array(t)) for t in dense.graph.initializer}
        got = {t.name: bits(numpy_helper.to_array(t)) for t in back.graph.initializer}
        assert got == want if where == "initializer" else got["W1"] == want["W1"]
        assert decoder_weights(back) == []


def test_compact_is_refused_with_a_reason_where_it_cannot_work():
    model = mlp_model(opset=10)
    _, report = mp.prune_model(model, sparsity=0.9, min_numel=16, format="compact")
    assert [t.format for t in report.tensors] == ["dense", "dense"]
    assert report.tensors[0].format_note == "compact: the model's opset 10 is below 11 (CumSum, Range)"
    huge = helper.make_tensor_value_info("big", TensorProto.FLOAT, [1])  # only dims matter below
    big = TensorProto(name="big", data_type=TensorProto.FLOAT, dims=[1 << 15, 1 << 14])
    assert "1 GiB constant-folding limit" in _compact_blocker(mlp_model(), big, False)
    assert "local functions" in _compact_blocker(mlp_model(), big, True)
    bf = TensorProto(name="b", data_type=TensorProto.BFLOAT16, dims=[4, 4])
    assert _compact_blocker(mlp_model(opset=12), bf, False) == \
        "compact: bfloat16 needs opset 13 (Cast to and from bfloat16)"
    del huge


def test_auto_never_grows_a_tensor_and_prefers_compact_when_smaller():
    for sparsity in (0.0, 0.3, 0.6, 0.9, 0.99):
        _, report = mp.prune_model(mlp_model(sparsity=0.0), sparsity=sparsity, min_numel=16, format="auto")
        for t in report.tensors:
            dense_bytes = t.numel * 4
            assert t.stored_bytes + (t.overhead_bytes or 0) <= dense_bytes
            if sparsity in (0.6, 0.9):
                assert t.format == "compact"
            if sparsity == 0.0:
                assert t.format == "dense"
            if sparsity == 0.99:  # 61 values: COO beats the decoder's ~1.5 KB of nodes and constants
                assert t.format == "sparse"


def test_output_is_deterministic_and_validation_reports_folding(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(mlp_model(sparsity=0.0), src)
    outs = [tmp_path / f"o{i}.onnx" for i in range(2)]
    for out in outs:
        r = CliRunner().invoke(main, ["prune", str(src), "-o", str(out), "--sparsity", "0.9", "--min-numel", "16",
                                      "--format", "compact", "--optimize-for", "size", "--validate", "--json", "-q"])
        assert r.exit_code == 0, r.output
    assert outs[0].read_bytes() == outs[1].read_bytes()
    import json
    rep = json.loads(CliRunner().invoke(main, ["validate", str(src), str(outs[0]), "--json", "-q"]).output)
    assert rep["compact_decoders"] == {"compact_decoders": 2, "checked": True, "checked_on": "the validated session", "folded": True, "unfolded": []}
    assert [g["gate"] for g in rep["gates"]] == ["compact_decoders_folded"] and rep["passed"] is True


def test_cli_encode_and_decode_compact_round_trip_on_the_cnn(tmp_path):
    dense, compact, back, again = (tmp_path / f"{n}.onnx" for n in ("dense", "compact", "back", "again"))
    r = CliRunner().invoke(main, ["prune", str(MODELS / "digits_cnn.onnx"), "-o", str(dense), "--sparsity", "0.9",
                                  "--format", "dense", "-q"])
    assert r.exit_code == 0
    r = CliRunner().invoke(main, ["encode", str(dense), "-o", str(compact), "--format", "compact", "--json"])
    assert r.exit_code == 0, r.output
    assert compact.stat().st_size < 0.25 * dense.stat().st_size
    import json
    files = json.loads(r.output)["files"]
    assert files == {"input_bytes": dense.stat().st_size, "input_files": 1,
                     "output_bytes": compact.stat().st_size, "output_files": 1}
    onnx.checker.check_model(str(compact), full_check=True)
    r = CliRunner().invoke(main, ["decode", str(compact), "-o", str(back)])
    assert r.exit_code == 0 and "decoded 4 sparse or compact tensor(s)" in r.output
    x = np.load(MODELS / "digits_cnn_calib.npz")["input"]
    outs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
            for p in (dense, compact, back)]
    assert all(bits(o) == bits(outs[0]) for o in outs)
    want = {t.name: t.raw_data for t in onnx.load(str(dense)).graph.initializer}
    assert {t.name: t.raw_data for t in onnx.load(str(back)).graph.initializer} == want
    # a compact model can be pruned again: its weights are decoded first
    r = CliRunner().invoke(main, ["prune", str(compact), "-o", str(again), "--sparsity", "0.9", "--format", "dense",
                                  "-q"])
    assert r.exit_code == 0
    assert {t.name: t.raw_data for t in onnx.load(str(again)).graph.initializer} == want


def test_bad_optimize_for_is_a_usage_error(tmp_path):
    r = CliRunner().invoke(main, ["prune", str(MODELS / "digits_mlp.onnx"), "-o", str(tmp_path / "o.onnx"),
                                  "--sparsity", "0.5", "--optimize-for", "speed"])
    assert r.exit_code == 2 and "'speed' is not one of" in r.output
    assert not (tmp_path / "o.onnx").exists()
    with pytest.raises(mp.ConfigError, match="optimize-for must be one of size, startup, balanced"):
        mp.prune_model(MODELS / "digits_mlp.onnx", sparsity=0.5, format="compact", optimize_for="speed")


def test_a_weight_inside_a_subgraph_is_decoded_inside_it():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16, 16)).astype(np.float32)
    w[rng.random(w.shape) < 0.5] = 0
    then = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1, 16])],
                             [numpy_helper.from_array(w, "W")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [1, 16])])
    g = helper.make_graph([helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16]),
                           helper.make_tensor_value_info("c", TensorProto.BOOL, [])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    encoded, report = mp.prune_model(model, sparsity=0.0, min_numel=16, format="compact")
    assert [t.format for t in report.tensors] == ["compact"]
    then_of = lambda m: next(a.g for a in m.graph.node[0].attribute if a.name == "then_branch")  # noqa: E731
    branch = then_of(encoded)
    assert decoder_weights(encoded) == ["W"] and any(weight_of(n) == "W" for n in branch.node)
    onnx.checker.check_model(encoded, full_check=True)
    feeds = {"x": np.ones((1, 16), np.float32), "c": np.array(True)}
    a, b = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
            for m in (model, encoded))
    assert bits(a) == bits(b)
    assert decode_model(encoded) == 1
    assert bits(numpy_helper.to_array(then_of(encoded).initializer[0])) == bits(w)


def test_bench_reports_that_the_decoders_were_folded(tmp_path):
    from onnx_magprune.bench import BenchOptions, bench_models

    dense, _ = mp.prune_model(mlp_model(sparsity=0.0), sparsity=0.9, min_numel=16)
    compact, _ = mp.prune_model(mlp_model(sparsity=0.0), sparsity=0.9, min_numel=16, format="compact")
    report = bench_models([dense, compact], options=BenchOptions(runs=3, warmup=1, measure_memory=False), quiet=True)
    assert report.models[0]["compact_decoders"] is None
    assert report.models[1]["compact_decoders"] == {"compact_decoders": 2, "checked": True, "folded": True,
                                                    "checked_on": "the timed provider", "unfolded": []}


def test_largest_intermediate_counts_entries_and_the_decoded_tensor():
    from onnx_magprune.compact_graph import largest_intermediate

    a = special_arrays(np.float16)["half"]
    filler = next(x for x in cc.alphabets() if x.identity)
    code = cc.encode(a, filler)
    assert largest_intermediate(code) == max(a.size * 2, code.total_entries * 4)
    code = cc.encode(special_arrays(BF16)["half"], filler)  # bfloat16 decodes in float32
    assert largest_intermediate(code) == max(a.size * 4, code.total_entries * 4)


def test_total_params_count_the_weights_not_their_codes():
    _, dense = mp.prune_model(mlp_model(sparsity=0.0), sparsity=0.9, min_numel=16)
    _, compact = mp.prune_model(mlp_model(sparsity=0.0), sparsity=0.9, min_numel=16, format="compact")
    assert compact.totals.total_params == dense.totals.total_params == 64 * 96 + 96 * 32


def test_a_compact_model_with_external_data_keeps_it_external_when_pruned_again(tmp_path):
    onnx.save_model(mlp_model(sparsity=0.0), tmp_path / "in.onnx", save_as_external_data=True,
                    location="in.data", size_threshold=0)
    c1, c2, dn = tmp_path / "c1.onnx", tmp_path / "c2.onnx", tmp_path / "dn.onnx"
    mp.prune_file(tmp_path / "in.onnx", c1, sparsity=0.8, min_numel=16, format="compact")
    assert (tmp_path / "c1.onnx.data").exists()
    mp.prune_file(c1, c2, sparsity=0.9, min_numel=16, format="compact")
    assert (tmp_path / "c2.onnx.data").exists()
    report = mp.prune_file(c1, dn, sparsity=0.9, min_numel=16, format="dense")
    assert report.files["output_files"] == 2 and (tmp_path / "dn.onnx.data").exists()
    stored = {t.name: t.data_location for t in onnx.load(str(dn), load_external_data=False).graph.initializer}
    assert stored["W1"] == stored["W2"] == TensorProto.EXTERNAL
    ref, _ = mp.prune_model(tmp_path / "in.onnx", sparsity=0.9, min_numel=16)
    x = np.ones((2, 64), np.float32)
    a, b = (ort.InferenceSession(p if isinstance(p, str) else p.SerializeToString(),
                                 providers=["CPUExecutionProvider"]).run(None, {"x": x})[0] for p in (str(dn), ref))
    assert bits(a) == bits(b)


def test_bfloat16_with_nan_stays_out_of_compact_because_the_cast_back_drops_payloads():
    bits16 = np.zeros((8, 8), np.uint16)
    bits16[0, :3] = [0x7F81, 0x3F80, 0x4000]  # a NaN with a payload, 1.0, 2.0
    w = helper.make_tensor("W", TensorProto.BFLOAT16, [8, 8], bits16.tobytes(), raw=True)
    g = helper.make_graph([helper.make_node("Cast", ["W"], ["y"], to=TensorProto.FLOAT)], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 8])], [w])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    weight = TensorProto()
    weight.CopyFrom(w)
    from onnx_magprune.encoding import Format, encode_tensors
    from onnx_magprune.tensor_data import TensorStore

    out = encode_tensors(model, [model.graph.initializer[0]], Format.COMPACT, TensorStore(None))
    assert out[0].format == "dense" and "NaN payloads" in out[0].note
    bits16[0, 0] = 0x3F80  # without the NaN it is compact
    model.graph.initializer[0].raw_data = bits16.tobytes()
    assert encode_tensors(model, [model.graph.initializer[0]], Format.COMPACT, TensorStore(None))[0].format == \
        "compact"


def test_fold_check_runs_on_cpu_when_the_provider_compiles_nodes():
    from onnx_magprune.folding import can_check_in_session, check_on_cpu

    assert can_check_in_session(["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert not can_check_in_session(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    compact, _ = mp.prune_model(mlp_model(sparsity=0.0), sparsity=0.9, min_numel=16, format="compact")
    assert check_on_cpu(compact) == []


def test_decoder_names_avoid_value_info_and_the_label_names_the_layout():
    model = mlp_model(sparsity=0.0)
    model.graph.value_info.append(helper.make_tensor_value_info("W2/compact/values", TensorProto.FLOAT, [3]))
    onnx.checker.check_model(model, full_check=True)
    for objective in ("size", "startup"):
        encoded, report = mp.prune_model(model, sparsity=0.9, min_numel=16, format="compact",
                                         optimize_for=objective)
        onnx.checker.check_model(encoded, full_check=True)
        assert all(" layout, " in t.code and "fiber(s)" in t.code for t in report.tensors)
    assert any("rows layout" in t.code for t in report.tensors)  # startup: positions scattered into the shape


def test_an_output_with_compact_and_sparse_weights_is_decoded_whole_before_pruning_again(tmp_path):
    once, twice = tmp_path / "once.onnx", tmp_path / "twice.onnx"
    src = tmp_path / "m.onnx"
    onnx.save(mlp_model(sparsity=0.0), src)
    report = mp.prune_file(src, once, sparsity=0.98, min_numel=16, format="auto")
    assert [t.format for t in report.tensors] == ["compact", "sparse"]  # W2's 61 values are cheaper as COO
    again = mp.prune_file(once, twice, sparsity=0.98, min_numel=16, format="auto")
    assert [t.name for t in again.tensors] == ["W1", "W2"] and again.skipped == report.skipped
    assert once.read_bytes() == twice.read_bytes()


def _rows(word: int) -> cc.Alphabet:
    return next(a for a in cc.alphabets() if a.layout is cc.Layout.ROWS and a.word_bytes == word)


def test_rows_layout_stores_positions_and_decodes_without_cumsum_or_reshape():
    rng = np.random.default_rng(4)
    a = np.where(rng.random((64, 300)) < 0.1, rng.standard_normal((64, 300)), 0.0).astype(np.float32)
    a[5] = 0  # an empty row: one pad entry writing 0.0 at position 0
    assert not _rows(1).fits(a.shape) and _rows(2).fits(a.shape)  # 300 positions need two bytes
    code = cc.encode(a, _rows(2))
    assert code.codes.dtype == np.uint16 and code.codes.shape == (64, code.entries)
    assert code.entries == max(int(np.count_nonzero(a, axis=1).max()), 1)
    assert code.nbytes == 64 * code.entries * (2 + 4)
    assert bits(code.decode()) == bits(a)
    assert all(len(set(row)) == code.entries for row in code.codes.tolist())  # no index repeats in a row
    ops = [n.op_type for n in decoder(code, "W", TensorProto.FLOAT, set()).nodes]
    assert ops == ["Cast", "ConstantOfShape", "ScatterElements"]  # straight into the [rows, columns] shape
    three_d = a.reshape(8, 8, 300)
    ops = [n.op_type for n in decoder(cc.encode(three_d, _rows(2)), "W", TensorProto.FLOAT, set()).nodes]
    assert ops == ["Cast", "ConstantOfShape", "ScatterElements", "Reshape"]


def test_startup_objective_picks_rows_but_never_more_bytes_than_dense():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 512))
    s90 = np.where(np.abs(w) > np.quantile(np.abs(w), 0.9), w, 0.0).astype(np.float32)
    assert choice.choose(s90, cc.Objective.STARTUP).alphabet.layout is cc.Layout.ROWS
    # float16 at 50%: two-byte positions plus two-byte values are the dense size: not chosen
    s50 = np.where(np.abs(w) > np.quantile(np.abs(w), 0.5), w, 0.0).astype(np.float16)
    est = choice.choose(s50, cc.Objective.STARTUP)
    assert est.nbytes < s50.nbytes and est.alphabet.layout is not cc.Layout.ROWS
