"""Validate a pruned model against the dense one with ONNX Runtime.

Both models run on the same calibration batches in the same process; drift
metrics are accumulated batch by batch (:mod:`onnx_magprune.metrics`), so
memory is bounded by one batch, and the gates decide pass or fail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import onnx

from . import __version__
from .calibration import CalibrationError, CalibrationSet, SyntheticSpec, effective_batch, model_inputs, \
    open_calibration, samples_in, synthetic_hint
from .metrics import Accuracy, OutputDrift, pick_label_output
from .model_io import check_external_data, load_model
from .progress import Progress
from .runtime import ModelRef, RuntimeFailure, available_providers, create_session, output_names, \
    resolve_providers, run
from .folding import FoldCheck, can_check_in_session, check_on_cpu, decoder_weights, optimized_model_path, \
    unfolded_decoders
from .validation_report import GateResult, Gates, ValidationReport


@dataclass(frozen=True)
class RuntimeOptions:
    """How models are run: providers, threads, batching."""

    providers: str | Sequence[str] = "cpu"
    allow_fallback: bool = False
    trt_sparsity: bool = False
    device_id: int = 0
    threads: int | None = None
    batch_size: int = 32
    available: Sequence[str] | None = None  # injected in tests; default: what onnxruntime offers


@dataclass(frozen=True)
class ValidationRequest:
    """Everything :func:`validate_models` needs besides the two models (used by ``prune``)."""

    calibration: Any = None
    labels: str | Path | None = None
    gates: Gates = Gates()
    runtime: RuntimeOptions = RuntimeOptions()
    synthetic: SyntheticSpec = SyntheticSpec()
    max_samples: int | None = None
    label_output: str | None = None
    quiet: bool = False

    def run(self, dense: ModelRef, pruned: ModelRef) -> ValidationReport:
        return validate_models(dense, pruned, self.calibration, labels=self.labels, gates=self.gates,
                               runtime=self.runtime, synthetic=self.synthetic, max_samples=self.max_samples,
                               label_output=self.label_output, quiet=self.quiet)


def _graph_of(model: ModelRef) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, bytes):
        return onnx.ModelProto.FromString(model)
    loaded = load_model(model)  # structure only: external data is checked, not read
    check_external_data(loaded)
    return loaded.proto


def _label(model: ModelRef) -> str:
    return "<in memory>" if isinstance(model, (onnx.ModelProto, bytes)) else str(model)


def _check_same_interface(dense: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    a, b = model_inputs(dense), model_inputs(pruned)
    if [(s.name, s.dtype) for s in a] != [(s.name, s.dtype) for s in b]:
        raise CalibrationError("the dense and pruned models have different inputs: "
                               f"{', '.join(s.describe() for s in a)} vs {', '.join(s.describe() for s in b)}")
    outs_a = [o.name for o in dense.graph.output]
    outs_b = [o.name for o in pruned.graph.output]
    if outs_a != outs_b:
        raise CalibrationError(f"the dense and pruned models have different outputs: {outs_a} vs {outs_b}")


def validate_models(
    dense: ModelRef,
    pruned: ModelRef,
    calibration: Any = None,
    *,
    labels: str | Path | None = None,
    gates: Gates = Gates(),
    runtime: RuntimeOptions = RuntimeOptions(),
    synthetic: SyntheticSpec = SyntheticSpec(),
    max_samples: int | None = None,
    label_output: str | None = None,
    quiet: bool = False,
) -> ValidationReport:
    """Run both models on the calibration data and compare their outputs.

    ``calibration`` is a path (.npz, a directory of .npy, ONNX test data), an
    iterable of feeds, a ``CalibrationDataReader``, a :class:`CalibrationSet`
    or None (seeded synthetic inputs, reported as such)."""
    start = time.perf_counter()
    dense_graph, pruned_graph = _graph_of(dense), _graph_of(pruned)
    _check_same_interface(dense_graph, pruned_graph)
    calib = open_calibration(calibration, dense_graph, labels=labels, synthetic_spec=synthetic,
                             max_samples=max_samples)
    if gates.max_accuracy_drop is not None and not calib.has_labels:
        raise CalibrationError("--max-accuracy-drop needs labels: a 'labels' array in the calibration data "
                               "or --labels FILE")
    choice = resolve_providers(runtime.providers,
                               runtime.available if runtime.available is not None else available_providers(),
                               allow_fallback=runtime.allow_fallback, trt_sparsity=runtime.trt_sparsity,
                               device_id=runtime.device_id)
    dense_sess, _ = create_session(dense, choice, threads=runtime.threads)
    decoders = decoder_weights(pruned_graph)
    in_session = bool(decoders) and can_check_in_session(choice.providers)
    with optimized_model_path(in_session) as opt_path:
        pruned_sess, _ = create_session(pruned, choice, threads=runtime.threads, optimized_model_path=opt_path)
        fold = FoldCheck(decoders, unfolded_decoders(opt_path)) if in_session else None
    if decoders and not in_session:  # compiling providers cannot write their optimized model
        fold = FoldCheck(decoders, check_on_cpu(pruned, runtime.threads), checked_on="a separate CPU session")
    names = output_names(dense_sess)
    drifts = {n: OutputDrift(n) for n in names}
    accuracy: Accuracy | None = None
    batch_size = effective_batch(runtime.batch_size, model_inputs(dense_graph))
    samples = 0
    with Progress("validating", calib.count_batches(batch_size), enabled=None if not quiet else False) as bar:
        for batch in calib.batches(batch_size):
            with synthetic_hint(calib, model_inputs(dense_graph), synthetic):
                d_out = run(dense_sess, batch.feeds, "the dense model")
                p_out = run(pruned_sess, batch.feeds, "the pruned model")
            for n, d, p in zip(names, d_out, p_out):
                drifts[n].update(d, p)
            if batch.labels is not None:
                if accuracy is None:
                    chosen = label_output or pick_label_output(dict(zip(names, d_out)))
                    if chosen is None or chosen not in names:
                        raise CalibrationError(
                            f"cannot tell which output to score labels against (outputs: {', '.join(names)}); "
                            "pass --label-output NAME")
                    accuracy = Accuracy(chosen)
                i = names.index(accuracy.output)
                try:
                    accuracy.update(d_out[i], p_out[i], batch.labels)
                except ValueError as e:
                    raise CalibrationError(str(e)) from e
            samples += samples_in(batch) if batch.feeds else 0
            bar.update()
    outputs = [drifts[n].result() for n in names]
    acc = accuracy.result() if accuracy is not None else None
    notes = []
    gate_results = gates.evaluate(outputs, acc)
    if fold is not None:
        gate_results.append(GateResult("compact_decoders_folded", 0, float(len(fold.unfolded)), fold.folded, None))
        if not fold.folded:
            notes.append(f"ONNX Runtime did not constant-fold the compact decoder(s) of {', '.join(fold.unfolded)}: "
                         "they would run on every inference; store those weights dense or sparse")
    if choice.dropped:
        notes.append(f"requested provider(s) {', '.join(choice.dropped)} unavailable: ran without them "
                     "(--allow-fallback)")
    return ValidationReport(
        tool_version=__version__,
        dense=_label(dense),
        pruned=_label(pruned),
        providers_requested=list(choice.providers) + list(choice.dropped),
        providers_used={"dense": list(dense_sess.get_providers()), "pruned": list(pruned_sess.get_providers())},
        calibration=_describe(calib, samples),
        batch_size=batch_size,
        outputs=outputs,
        accuracy=acc,
        gates=gate_results,
        seconds=time.perf_counter() - start,
        notes=notes,
        decoders=fold.to_dict() if fold is not None else None,
    )


def _describe(calib: CalibrationSet, samples: int) -> dict[str, Any]:
    return {"description": calib.description, "synthetic": calib.synthetic, "samples": samples,
            "labels": calib.has_labels, "notes": list(calib.notes)}


__all__ = ["RuntimeOptions", "ValidationRequest", "validate_models", "Gates", "RuntimeFailure"]
