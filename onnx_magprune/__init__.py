"""onnx_magprune: exact magnitude pruning for exported ONNX models."""

__version__ = "0.1.0"

from .api import PruneResult, decode_file, encode_file, inspect_model, prune_file, prune_model  # noqa: E402
from .encoding import Format  # noqa: E402
from .bench import BenchOptions, bench_models  # noqa: E402
from .calibration import CalibrationError, SyntheticSpec  # noqa: E402
from .config import NonFinite, PruneConfig, Rule, Scope, load_config  # noqa: E402
from .errors import (  # noqa: E402
    ConfigError,
    ExternalDataError,
    GateFailed,
    MagpruneError,
    ModelLoadError,
    NonFiniteWeightError,
    OutputError,
)
from .report import SCHEMA_VERSION, PruneReport  # noqa: E402
from .runtime import RuntimeFailure  # noqa: E402
from .selection import SelectionParams  # noqa: E402
from .structured_run import StructuredOptions  # noqa: E402
from .validate import RuntimeOptions, ValidationRequest, validate_models  # noqa: E402
from .sensitivity import SensitivityReport, SweepOptions, sensitivity_sweep  # noqa: E402
from .allocation_search import AllocationOptions  # noqa: E402
from .validation_report import Gates, ValidationReport  # noqa: E402

__all__ = [
    "__version__",
    "PruneResult",
    "inspect_model",
    "prune_file",
    "prune_model",
    "encode_file",
    "decode_file",
    "Format",
    "NonFinite",
    "PruneConfig",
    "Rule",
    "Scope",
    "load_config",
    "ConfigError",
    "ExternalDataError",
    "GateFailed",
    "MagpruneError",
    "ModelLoadError",
    "NonFiniteWeightError",
    "OutputError",
    "SCHEMA_VERSION",
    "PruneReport",
    "SelectionParams",
    "StructuredOptions",
    "BenchOptions",
    "bench_models",
    "CalibrationError",
    "SyntheticSpec",
    "RuntimeFailure",
    "RuntimeOptions",
    "ValidationRequest",
    "validate_models",
    "SweepOptions",
    "SensitivityReport",
    "sensitivity_sweep",
    "AllocationOptions",
    "Gates",
    "ValidationReport",
]
