"""Did ONNX Runtime fold the compact decoders?  A decoder it does not fold
(an intermediate over its constant-folding size limit, a missing kernel, a
provider that does not fold) silently runs on every inference, so validation
and bench look at the optimized graph the session actually built."""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from .compact_graph import weight_of
from .model_io import iter_graphs


def decoder_weights(model: onnx.ModelProto) -> list[str]:
    """The weights a compact decoder rebuilds, anywhere in ``model`` (sorted)."""
    return sorted({w for g in iter_graphs(model) for node in g.node if (w := weight_of(node)) is not None})


@dataclass
class FoldCheck:
    """Compact decoders in a model and the ones its session did not fold."""

    decoders: list[str]
    unfolded: list[str] = field(default_factory=list)
    checked: bool = True
    checked_on: str = "the validated session"

    @property
    def folded(self) -> bool:
        return not self.unfolded

    def to_dict(self) -> dict:
        return {"compact_decoders": len(self.decoders), "checked": self.checked, "checked_on": self.checked_on,
                "folded": self.folded, "unfolded": list(self.unfolded)}


@contextmanager
def optimized_model_path(enabled: bool):
    """A temporary path for ONNX Runtime's optimized model (None when not ``enabled``)."""
    if not enabled:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="magprune-opt-") as tmp:
        yield str(Path(tmp) / "optimized.onnx")


def unfolded_decoders(optimized_path: str) -> list[str]:
    """Weights whose decoder nodes survive in the optimized model ONNX Runtime wrote."""
    model = onnx.load(optimized_path, load_external_data=False)
    return decoder_weights(model)


#: providers whose sessions can write their optimized model (others compile nodes, which ONNX Runtime
#: refuses to serialize): with any other provider the fold check runs in a CPU session of its own
SERIALIZABLE = ("CPUExecutionProvider", "CUDAExecutionProvider", "ROCMExecutionProvider")


def can_check_in_session(providers) -> bool:
    return all(p in SERIALIZABLE for p in providers)


def check_on_cpu(model, threads: int | None = None) -> list[str]:
    """Create a CPU session only to see which compact decoders ONNX Runtime leaves unfolded."""
    from .runtime import ProviderChoice, create_session

    with optimized_model_path(True) as path:
        create_session(model, ProviderChoice(["CPUExecutionProvider"], [{}]), threads=threads,
                       optimized_model_path=path)
        return unfolded_decoders(path)
