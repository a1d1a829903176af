"""Drift of pruned variants of one model with ONE ONNX Runtime session.

The session runs a copy of the model whose prunable weights are overridable
initializers (graph inputs with the dense values as defaults, see
:func:`~onnx_magprune.stats_graph.overridable_proto`): a variant is evaluated
by feeding only the weights it changes.  The calibration batches and the
dense model's outputs on them are computed once and reused by every
evaluation.  ``jobs > 1`` evaluates in worker processes, each with its own
session built from the same bytes.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx

from .calibration import Batch, CalibrationError, CalibrationSet, effective_batch, model_inputs, samples_in
from .drift import Metric, drift_value
from .stats_graph import overridable_proto
from .metrics import Accuracy, OutputDrift, pick_label_output
from .progress import Progress
from .runtime import available_providers, create_session, output_names, resolve_providers, run
from .validate import RuntimeOptions


@dataclass(frozen=True)
class DriftSpec:
    """Which number an evaluation yields: ``metric`` on ``output`` (None: the worst output)."""

    metric: Metric = Metric.REL_L2
    output: str | None = None
    label_output: str | None = None
    # an input whose non-zero entries mark the positions that count (e.g. a transformer's attention_mask):
    # outputs with more axes than it whose leading axes have its shape ([batch, tokens, features]) are
    # compared on those positions only (padding is not data); other outputs count whole
    mask_input: str | None = None


def masked(feeds: Mapping[str, np.ndarray], spec: DriftSpec, dense: np.ndarray, pruned: np.ndarray):
    """(dense, pruned) restricted to the positions ``spec.mask_input`` marks, when the output has them."""
    if spec.mask_input is None:
        return dense, pruned
    mask = np.asarray(feeds[spec.mask_input]) != 0
    if dense.ndim <= mask.ndim or dense.shape[:mask.ndim] != mask.shape:  # per-position vectors only
        return dense, pruned
    return dense[mask], pruned[mask]


@dataclass
class Measured:
    drift: float
    outputs: list[dict[str, Any]]
    accuracy: dict[str, Any] | None


@dataclass
class _State:
    """Everything a worker process needs (picklable)."""

    proto_bytes: bytes
    providers: list[str]
    provider_options: list[dict]
    threads: int | None
    batches: list[tuple[dict[str, np.ndarray], np.ndarray | None]]
    dense: list[list[np.ndarray]]
    names: list[str]
    spec: DriftSpec
    label_output: str | None


class _Session:
    def __init__(self, state: _State):
        from .runtime import ProviderChoice

        self.state = state
        self.session, _ = create_session(state.proto_bytes, ProviderChoice(state.providers, state.provider_options),
                                         threads=state.threads)

    def measure(self, overrides: Mapping[str, np.ndarray]) -> Measured:
        st = self.state
        drifts = {n: OutputDrift(n) for n in st.names}
        acc = Accuracy(st.label_output) if st.label_output is not None else None
        for (feeds, labels), dense in zip(st.batches, st.dense):
            outs = run(self.session, {**feeds, **overrides}, "the pruned model")
            for n, d, p in zip(st.names, dense, outs):
                drifts[n].update(*masked(feeds, st.spec, d, p))
            if acc is not None and labels is not None:
                i = st.names.index(acc.output)
                acc.update(dense[i], outs[i], labels)
        outputs = [drifts[n].result() for n in st.names]
        accuracy = acc.result() if acc is not None else None
        return Measured(drift_value(st.spec.metric, outputs, accuracy, st.spec.output), outputs, accuracy)


_WORKER: _Session | None = None


def _init_worker(state: _State) -> None:
    global _WORKER
    _WORKER = _Session(state)


def _work(overrides: Mapping[str, np.ndarray]) -> float:
    assert _WORKER is not None
    return _WORKER.measure(overrides).drift


@dataclass
class DriftEvaluator:
    """``measure(overrides)`` -> drift of the model with those weights replaced, on fixed batches."""

    model: onnx.ModelProto
    fed: Sequence[str]
    calibration: CalibrationSet
    spec: DriftSpec = DriftSpec()
    runtime: RuntimeOptions = RuntimeOptions()
    jobs: int = 1
    sessions_created: int = 0
    evaluations: int = 0
    seconds: float = 0.0
    _session: _Session | None = field(default=None, repr=False)

    def __post_init__(self):
        start = time.perf_counter()
        choice = resolve_providers(self.runtime.providers,
                                   self.runtime.available if self.runtime.available is not None
                                   else available_providers(),
                                   allow_fallback=self.runtime.allow_fallback, trt_sparsity=self.runtime.trt_sparsity,
                                   device_id=self.runtime.device_id)
        proto = overridable_proto(self.model, self.fed)
        batch = effective_batch(self.runtime.batch_size, model_inputs(self.model))
        batches = [(dict(b.feeds), b.labels) for b in self.calibration.batches(batch)]
        if not batches:
            raise CalibrationError(f"{self.calibration.description}: no samples")
        if self.spec.mask_input is not None and self.spec.mask_input not in batches[0][0]:
            raise CalibrationError(f"no input named '{self.spec.mask_input}' to mask the drift with "
                                   f"(inputs: {', '.join(sorted(batches[0][0]))})")
        state = _State(proto.SerializeToString(), list(choice.providers), list(choice.options), self.runtime.threads,
                       batches, [], [], self.spec, None)
        self._session = _Session(state)
        self.sessions_created += 1
        state.names = output_names(self._session.session)
        state.dense = [run(self._session.session, feeds, "the dense model") for feeds, _ in batches]
        if self.spec.mask_input is not None:
            marked = [sum(masked(f, self.spec, d, d)[0].size for (f, _), d in zip(batches, dense)) for dense in
                      zip(*state.dense)]
            sized = [sum(d.size for d in dense) for dense in zip(*state.dense)]
            if any(m == 0 < n for m, n in zip(marked, sized)):
                raise CalibrationError(f"--drift-mask '{self.spec.mask_input}' marks no position of the "
                                       "calibration data: every masked output would compare nothing")
        has_labels = all(labels is not None for _, labels in batches)
        if has_labels:
            chosen = self.spec.label_output or pick_label_output(dict(zip(state.names, state.dense[0])))
            if chosen is not None and chosen not in state.names:
                raise CalibrationError(f"no output named '{chosen}' to score labels against "
                                       f"(outputs: {', '.join(state.names)})")
            state.label_output = chosen
        self.providers_used = list(self._session.session.get_providers())
        self.samples = sum(samples_in(Batch(f)) for f, _ in batches)  # 0-d arrays (scalar inputs) hold no samples
        self.batch_size = batch
        try:
            self._session.measure({})  # the metric applies to these outputs (labels present, ...)
        except ValueError as e:
            raise CalibrationError(str(e)) from e
        self.setup_seconds = time.perf_counter() - start

    @property
    def names(self) -> list[str]:
        return self._session.state.names

    def measure(self, overrides: Mapping[str, np.ndarray]) -> Measured:
        start = time.perf_counter()
        result = self._session.measure(overrides)
        self.evaluations += 1
        self.seconds += time.perf_counter() - start
        return result

    def drift(self, overrides: Mapping[str, np.ndarray]) -> float:
        return self.measure(overrides).drift

    def drifts(self, tasks: Sequence[Callable[[], Mapping[str, np.ndarray]]], *, label: str = "evaluating",
               quiet: bool = True) -> list[float]:
        """The drift of each task's overrides, in order; ``jobs > 1`` runs them in worker processes."""
        start = time.perf_counter()
        out: list[float] = []
        with Progress(label, len(tasks), enabled=False if quiet else None) as bar:
            if self.jobs <= 1 or len(tasks) < 2:
                for make in tasks:
                    out.append(self._session.measure(make()).drift)
                    bar.update()
            else:
                workers = min(self.jobs, len(tasks))
                state = self._session.state
                threads = state.threads or max(1, (os.cpu_count() or 1) // workers)
                wstate = _State(state.proto_bytes, state.providers, state.provider_options, threads, state.batches,
                                state.dense, state.names, state.spec, state.label_output)
                with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                         initializer=_init_worker, initargs=(wstate,)) as pool:
                    self.sessions_created += workers
                    chunk = 2 * workers  # bounded memory: a few pruned variants in flight per worker
                    for lo in range(0, len(tasks), chunk):
                        for value in pool.map(_work, [make() for make in tasks[lo:lo + chunk]]):
                            out.append(value)
                            bar.update()
        self.evaluations += len(tasks)
        self.seconds += time.perf_counter() - start
        return out
