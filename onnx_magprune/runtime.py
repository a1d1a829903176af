"""ONNX Runtime: choosing execution providers, creating sessions, running feeds.

Provider choice is a pure function of what was asked and what the installed
onnxruntime offers (:func:`resolve_providers`), so it is unit-tested with
injected provider lists on machines without a GPU.  The report always records
the providers a session actually uses (``session.get_providers()``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import onnx

from .errors import MagpruneError

ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}
CPU = "CPUExecutionProvider"
DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda",
                    "ROCMExecutionProvider": "cuda"}


class RuntimeFailure(MagpruneError):
    """ONNX Runtime cannot load or run a model, or a provider is unavailable."""


@dataclass(frozen=True)
class ProviderChoice:
    providers: list[str]
    options: list[dict[str, Any]]
    dropped: list[str] = field(default_factory=list)  # asked for, unavailable, dropped by --allow-fallback

    @property
    def device(self) -> str:
        """Where I/O binding keeps tensors: 'cuda' when the first provider is a GPU one, else 'cpu'."""
        return DEVICE_PROVIDERS.get(self.providers[0], "cpu")


def parse_providers(text: str | Sequence[str]) -> list[str]:
    """``"cuda,cpu"`` or ``["cuda", "CPUExecutionProvider"]`` -> full provider names."""
    items = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not items:
        raise RuntimeFailure("no execution provider given")
    names = []
    for item in items:
        name = ALIASES.get(item.lower(), item if item.endswith("ExecutionProvider") else None)
        if name is None:
            raise RuntimeFailure(f"unknown execution provider '{item}' (known: {', '.join(sorted(ALIASES))}, "
                                 "or a full onnxruntime provider name)")
        if name not in names:
            names.append(name)
    return names


def resolve_providers(
    requested: str | Sequence[str],
    available: Sequence[str],
    *,
    allow_fallback: bool = False,
    trt_sparsity: bool = False,
    device_id: int = 0,
) -> ProviderChoice:
    """Providers to create sessions with, in priority order, with their options.

    A requested provider the installed onnxruntime lacks is an error unless
    ``allow_fallback``, which drops it (and says so).  CPU is always last, as
    the fallback for nodes other providers do not support.
    """
    names = parse_providers(requested)
    missing = [n for n in names if n not in available]
    if missing and not allow_fallback:
        hint = " (pip install 'onnx-magprune[gpu]' for CUDA/TensorRT)" if any(
            n in DEVICE_PROVIDERS for n in missing) else ""
        raise RuntimeFailure(
            f"execution provider {', '.join(missing)} is not available in this onnxruntime "
            f"(available: {', '.join(available)}){hint}; pass --allow-fallback to run without it")
    kept = [n for n in names if n in available]
    if CPU not in kept:
        kept.append(CPU)
    if trt_sparsity and "TensorrtExecutionProvider" not in kept:
        raise RuntimeFailure("--trt-sparsity needs the TensorRT execution provider (--providers tensorrt,cuda,cpu)")
    options = [provider_options(n, trt_sparsity=trt_sparsity, device_id=device_id) for n in kept]
    return ProviderChoice(kept, options, missing)


def provider_options(name: str, *, trt_sparsity: bool = False, device_id: int = 0) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        opts: dict[str, Any] = {"device_id": device_id}
        if trt_sparsity:
            opts["trt_sparsity_enable"] = True  # lets TensorRT use 2:4 sparse tensor cores
        return opts
    if name in ("CUDAExecutionProvider", "ROCMExecutionProvider"):
        return {"device_id": device_id}
    return {}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def session_options(threads: int | None = None, optimized_model_path: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 4  # errors come back as exceptions, which we report in one line
    if optimized_model_path:
        so.optimized_model_filepath = optimized_model_path
        # weights go to a side file, so the optimized model is never a >2 GiB protobuf
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                    Path(optimized_model_path).name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    return so


ModelRef = str | os.PathLike | onnx.ModelProto | bytes


def model_bytes_or_path(model: ModelRef) -> str | bytes:
    if isinstance(model, onnx.ModelProto):
        try:
            return model.SerializeToString()
        except ValueError as e:  # over 2 GiB
            raise RuntimeFailure("the model is over 2 GiB in memory; save it with external data first") from e
    if isinstance(model, bytes):
        return model
    return str(Path(model))


def create_session(model: ModelRef, choice: ProviderChoice, *, threads: int | None = None,
                   optimized_model_path: str | None = None):
    """``(session, seconds)``; a model ONNX Runtime cannot load is a :class:`RuntimeFailure`."""
    import onnxruntime as ort

    source = model_bytes_or_path(model)
    so = session_options(threads, optimized_model_path)
    start = time.perf_counter()
    try:
        session = ort.InferenceSession(source, sess_options=so, providers=choice.providers,
                                       provider_options=choice.options)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own pybind exception types
        raise RuntimeFailure(f"onnxruntime cannot load {_label(model)}: {_first_line(e)}") from e
    return session, time.perf_counter() - start


def run(session, feeds: Mapping[str, np.ndarray], label: str = "the model") -> list[np.ndarray]:
    try:
        return session.run(None, dict(feeds))
    except Exception as e:  # noqa: BLE001
        raise RuntimeFailure(f"onnxruntime failed to run {label}: {_first_line(e)}") from e


class BoundRunner:
    """Runs one session on fixed inputs.  On a GPU provider inputs and outputs
    stay on the device (I/O binding), so timing measures the model, not copies."""

    def __init__(self, session, feeds: Mapping[str, np.ndarray], device: str, device_id: int = 0):
        self.session = session
        self.feeds = dict(feeds)
        self.binding = None
        if device != "cpu":
            import onnxruntime as ort

            binding = session.io_binding()
            for name, value in self.feeds.items():
                binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, device, device_id))
            for out in session.get_outputs():
                binding.bind_output(out.name, device, device_id)
            self.binding = binding

    def __call__(self) -> None:
        try:
            if self.binding is not None:
                self.session.run_with_iobinding(self.binding)
                self.binding.synchronize_outputs()
            else:
                self.session.run(None, self.feeds)
        except Exception as e:  # noqa: BLE001 - onnxruntime's own exception types
            raise RuntimeFailure(f"onnxruntime failed to run the model: {_first_line(e)}") from e


def _label(model: ModelRef) -> str:
    return "the in-memory model" if isinstance(model, (onnx.ModelProto, bytes)) else f"'{model}'"


def _first_line(e: Exception) -> str:
    """The message on one line: its first line, and for onnxruntime's shape errors ("... for the
    following indices") the lines that say which index got what."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    first = lines[0]
    if first.endswith("following indices"):
        first = "; ".join([first] + [ln for ln in lines[1:] if ln.startswith("index:")])
    return first[:500]


def output_names(session) -> list[str]:
    return [o.name for o in session.get_outputs()]
