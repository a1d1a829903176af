#!/usr/bin/env python
"""Build the example ONNX models and calibration data shipped in ``models/``.

Produces, next to this script:

* ``digits_mlp.onnx``        scikit-learn MLPClassifier (64 -> 256 -> 128 -> 10), via skl2onnx
* ``digits_mlp_calib.npz``   held-out calibration data for the MLP (input-name key + ``labels``)
* ``digits_cnn.onnx``        small PyTorch CNN (Conv-BN-ReLU-Conv-ReLU-MaxPool-FC-ReLU-FC)
* ``digits_cnn_calib.npz``   held-out calibration data for the CNN (``input`` + ``labels``)

Data: ``sklearn.datasets.load_digits()`` (bundled with scikit-learn, no
download). Pixel values (0..16) are divided by 16.0 for both models. A fixed
stratified 75/25 train / held-out split (random_state=0) is used; the
calibration files contain the held-out 25%.

Everything is seeded and single-threaded so that re-running the script
produces byte-identical ``.onnx`` and ``.npz`` files (with the same library
versions on the same platform).

Usage (from anywhere)::

    python models/build_models.py

Requires: numpy, onnx, onnxruntime, scikit-learn, skl2onnx, torch==2.13.0.
"""

from __future__ import annotations

import os

# Pin BLAS / OpenMP thread counts *before* numpy / torch are imported so that
# floating-point reductions happen in a fixed order (bitwise reproducibility).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"
# Needed by torch.use_deterministic_algorithms for some CUDA ops; harmless on CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import hashlib  # noqa: E402
import io  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

SEED = 0
OPSET = 17
HERE = Path(__file__).resolve().parent

MLP_PATH = HERE / "digits_mlp.onnx"
MLP_CALIB_PATH = HERE / "digits_mlp_calib.npz"
CNN_PATH = HERE / "digits_cnn.onnx"
CNN_CALIB_PATH = HERE / "digits_cnn_calib.npz"


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #
def seed_everything(seed: int = SEED) -> None:
    random.seed(seed)
    np.random.seed(seed)


def load_data():
    digits = load_digits()
    X = (digits.data / 16.0).astype(np.float32)  # [1797, 64], values in [0, 1]
    y = digits.target.astype(np.int64)            # [1797]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.25, stratify=y, random_state=SEED
    )
    return X_train, X_test, y_train, y_test


def normalize_model(model: onnx.ModelProto) -> onnx.ModelProto:
    """Strip anything that could vary between runs / machines.

    Doc strings (which some exporters fill with stack traces or file paths) are
    cleared on the model, graph and every node (including subgraphs). Producer
    name/version are kept: they are fixed by the pinned library versions.
    """
    model.doc_string = ""

    def _clean_graph(g: onnx.GraphProto) -> None:
        g.doc_string = ""
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            vi.doc_string = ""
        for init in g.initializer:
            init.doc_string = ""
        for node in g.node:
            node.doc_string = ""
            for attr in node.attribute:
                attr.doc_string = ""
                if attr.type == onnx.AttributeProto.GRAPH:
                    _clean_graph(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        _clean_graph(sub)

    _clean_graph(model.graph)
    for func in model.functions:
        func.doc_string = ""
        for node in func.node:
            node.doc_string = ""
    return model


def set_default_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """Raise the ai.onnx opset import to ``opset`` without touching the graph.

    Only allowed when every ai.onnx op in the graph has the same schema version
    at the current and the target opset (i.e. its semantics did not change).
    The onnx version converter is deliberately not used: it re-runs shape
    inference and renames symbolic dims (``unk__0``) for no benefit.
    """
    entry = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    current = entry.version
    if current == opset:
        return model
    if current > opset:
        raise ValueError(f"model already uses opset {current} > {opset}")
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        old = onnx.defs.get_schema(node.op_type, current).since_version
        new = onnx.defs.get_schema(node.op_type, opset).since_version
        if old != new:
            raise ValueError(f"{node.op_type} changed between opset {current} and {opset}")
    entry.version = opset
    return model


def save_model(model: onnx.ModelProto, path: Path) -> None:
    model = normalize_model(model)
    onnx.checker.check_model(model, full_check=True)
    data = model.SerializeToString(deterministic=True)
    path.write_bytes(data)
    # Re-check from disk (also validates the bytes we actually ship).
    onnx.checker.check_model(str(path), full_check=True)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    # np.savez writes zip entries with a fixed (1980-01-01) timestamp, so the
    # output is deterministic; write via a buffer to control the exact bytes.
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    path.write_bytes(buf.getvalue())


def ort_session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def describe_graph(path: Path) -> str:
    m = onnx.load(str(path))
    lines = []
    opsets = ", ".join(f"{o.domain or 'ai.onnx'}={o.version}" for o in m.opset_import)
    lines.append(f"  opsets: {opsets}")
    for vi in m.graph.input:
        lines.append(f"  input  {vi.name}: {_vi_str(vi)}")
    for vi in m.graph.output:
        lines.append(f"  output {vi.name}: {_vi_str(vi)}")
    lines.append("  nodes: " + " -> ".join(n.op_type for n in m.graph.node))
    for init in m.graph.initializer:
        lines.append(
            f"  init   {init.name}: {list(init.dims)} "
            f"{onnx.TensorProto.DataType.Name(init.data_type)}"
        )
    return "\n".join(lines)


def _vi_str(vi: onnx.ValueInfoProto) -> str:
    t = vi.type.tensor_type
    dims = [d.dim_param if d.dim_param else (d.dim_value if d.HasField("dim_value") else "?")
            for d in t.shape.dim]
    return f"{onnx.TensorProto.DataType.Name(t.elem_type)} {dims}"


# --------------------------------------------------------------------------- #
# scikit-learn MLP
# --------------------------------------------------------------------------- #
def build_mlp(X_train, X_test, y_train, y_test) -> dict:
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    seed_everything()
    clf = MLPClassifier(
        hidden_layer_sizes=(256, 128),
        activation="relu",
        solver="adam",
        alpha=1e-4,
        batch_size=64,
        learning_rate_init=1e-3,
        max_iter=1000,  # converges (tol=1e-4, n_iter_no_change=10) well before this
        random_state=SEED,
    )
    clf.fit(X_train, y_train)
    sk_acc = float((clf.predict(X_test) == y_test).mean())
    n_params = int(sum(w.size for w in clf.coefs_) + sum(b.size for b in clf.intercepts_))

    onx = convert_sklearn(
        clf,
        name="digits_mlp",
        initial_types=[("X", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset={"": OPSET, "ai.onnx.ml": 3},
    )
    # skl2onnx stamps the *lowest* opset its ops need (16 here); upgrade the
    # default domain to exactly OPSET (checked: no op used here changed in 17).
    onx = set_default_opset(onx, OPSET)
    save_model(onx, MLP_PATH)

    sess = ort_session(MLP_PATH)
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    label, proba = sess.run(["label", "probabilities"], {in_name: X_test})
    onnx_acc = float((label == y_test).mean())
    agree = float((label == clf.predict(X_test)).mean())
    max_prob_diff = float(np.abs(proba - clf.predict_proba(X_test)).max())

    save_npz(MLP_CALIB_PATH, **{in_name: X_test.astype(np.float32),
                                "labels": y_test.astype(np.int64)})
    return dict(name="digits_mlp", path=MLP_PATH, calib=MLP_CALIB_PATH,
                framework_acc=sk_acc, onnx_acc=onnx_acc, agree=agree,
                max_diff=max_prob_diff, diff_what="probabilities",
                params=n_params, input=in_name, outputs=out_names,
                n_iter=clf.n_iter_)


# --------------------------------------------------------------------------- #
# PyTorch CNN
# --------------------------------------------------------------------------- #
def build_cnn(X_train, X_test, y_train, y_test) -> dict:
    import torch
    from torch import nn

    seed_everything()
    torch.manual_seed(SEED)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    class DigitsCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
            self.bn1 = nn.BatchNorm2d(16)
            self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
            self.pool = nn.MaxPool2d(2)
            self.fc1 = nn.Linear(32 * 4 * 4, 128)
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = torch.relu(self.bn1(self.conv1(x)))
            x = torch.relu(self.conv2(x))
            x = self.pool(x)
            x = torch.flatten(x, 1)
            x = torch.relu(self.fc1(x))
            return self.fc2(x)

    model = DigitsCNN()
    n_params = int(sum(p.numel() for p in model.parameters()))

    xtr = torch.from_numpy(X_train.reshape(-1, 1, 8, 8).copy())
    ytr = torch.from_numpy(y_train.copy())
    xte_np = np.ascontiguousarray(X_test.reshape(-1, 1, 8, 8), dtype=np.float32)
    xte = torch.from_numpy(xte_np.copy())

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(SEED)
    epochs, bs = 30, 64
    for _epoch in range(epochs):
        model.train()
        perm = torch.randperm(xtr.shape[0], generator=gen)
        for i in range(0, xtr.shape[0], bs):
            idx = perm[i:i + bs]
            opt.zero_grad()
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            loss.backward()
            opt.step()

    model.eval()
    with torch.no_grad():
        torch_logits = model(xte).numpy()
    torch_pred = torch_logits.argmax(1)
    torch_acc = float((torch_pred == y_test).mean())

    # Legacy TorchScript-based exporter (no onnxscript needed). TrainingMode.PRESERVE
    # with the model in eval() mode exports inference-mode BatchNormalization but
    # skips the eval peephole pass that would fuse BN into the preceding Conv.
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation warning
        torch.onnx.export(
            model,
            (xte[:1],),
            buf,
            dynamo=False,
            export_params=True,
            opset_version=OPSET,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.PRESERVE,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
        )
    onx = onnx.load_from_string(buf.getvalue())
    onx.graph.name = "digits_cnn"
    save_model(onx, CNN_PATH)

    sess = ort_session(CNN_PATH)
    in_name = sess.get_inputs()[0].name
    out_names = [o.name for o in sess.get_outputs()]
    (onnx_logits,) = sess.run(["logits"], {in_name: xte_np})
    onnx_pred = onnx_logits.argmax(1)
    onnx_acc = float((onnx_pred == y_test).mean())
    agree = float((onnx_pred == torch_pred).mean())
    max_diff = float(np.abs(onnx_logits - torch_logits).max())

    save_npz(CNN_CALIB_PATH, input=xte_np, labels=y_test.astype(np.int64))
    return dict(name="digits_cnn", path=CNN_PATH, calib=CNN_CALIB_PATH,
                framework_acc=torch_acc, onnx_acc=onnx_acc, agree=agree,
                max_diff=max_diff, diff_what="logits",
                params=n_params, input=in_name, outputs=out_names,
                n_iter=epochs)


# --------------------------------------------------------------------------- #
def main() -> None:
    X_train, X_test, y_train, y_test = load_data()
    print(f"digits: train={len(y_train)} held-out={len(y_test)} (stratified, random_state={SEED})")

    results = [build_mlp(X_train, X_test, y_train, y_test),
               build_cnn(X_train, X_test, y_train, y_test)]

    print()
    print("=" * 72)
    print("Summary")
    print("=" * 72)
    total = 0
    for r in results:
        size = r["path"].stat().st_size
        csize = r["calib"].stat().st_size
        total += size + csize
        fw = "sklearn" if r["name"] == "digits_mlp" else "torch"
        print(f"{r['name']}: params={r['params']:,}  iters/epochs={r['n_iter']}")
        print(f"  held-out acc: {fw}={r['framework_acc']:.4f}  onnxruntime={r['onnx_acc']:.4f}  "
              f"(prediction agreement {r['agree']:.4f}, max |diff| {r['diff_what']}={r['max_diff']:.2e})")
        print(f"  {r['path'].name}: {size:,} bytes  sha256={sha256(r['path'])}")
        print(f"  {r['calib'].name}: {csize:,} bytes  sha256={sha256(r['calib'])}")
        print(f"  inputs={[r['input']]} outputs={r['outputs']}")
        print(describe_graph(r["path"]))
        if r["agree"] < 1.0 or abs(r["framework_acc"] - r["onnx_acc"]) > 1e-9:
            raise SystemExit(f"{r['name']}: ONNX and framework predictions disagree")
    print(f"total size of generated files: {total:,} bytes")


if __name__ == "__main__":
    main()
