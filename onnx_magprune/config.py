"""Pruning options and the per-layer config file (TOML or JSON).

A config file sets the same options as the command line plus ordered rules::

    sparsity = 0.8            # fraction of weights to zero, in [0, 1]
    scope = "global"          # "global": one threshold for all; "local": each tensor alone;
                              # "output": each output unit of each layer alone
    min_numel = 128           # tensors with fewer elements are skipped
    nonfinite = "error"       # "error" or "keep" (NaN/Inf are never pruned, not counted)
    include_overridable = false  # also prune initializers listed as graph inputs
    exclude = ["lm_head*"]    # shorthand: rules that exclude these name globs

    [[rules]]                 # the first rule that matches a tensor applies
    name = "*attn*"           # glob on the tensor name (default "*")
    op = "MatMul"             # glob on an op type the tensor feeds (optional)
    sparsity = 0.5            # fix this tensor's sparsity (it leaves the global pool)
    # or: min_sparsity / max_sparsity = bounds in global scope (clamps in local scope)
    # or: exclude = true

Command-line options override the file's values; ``--exclude`` rules come
before the file's rules.
"""

from __future__ import annotations

import enum
import fnmatch
import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from .errors import ConfigError


class Scope(str, enum.Enum):
    GLOBAL = "global"
    LOCAL = "local"
    OUTPUT = "output"  # each output unit (row of the layer's matrix) alone; needs layer structure


class NonFinite(str, enum.Enum):
    ERROR = "error"
    KEEP = "keep"


DEFAULT_MIN_NUMEL = 128


def _enum(cls, value, where: str):
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in cls)
        raise ConfigError(f"{where} must be one of {choices}, got {value!r}") from None


def check_fraction(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if math.isnan(value) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where} must be in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Rule:
    """Per-tensor control.  ``origin`` says where the rule came from, for reports."""

    name: str = "*"
    op: str | None = None
    exclude: bool = False
    sparsity: float | None = None
    min_sparsity: float | None = None
    max_sparsity: float | None = None
    origin: str = "rule"

    def __post_init__(self):
        where = self.origin
        for key in ("sparsity", "min_sparsity", "max_sparsity"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, check_fraction(getattr(self, key), f"{where}: {key}"))
        has_bounds = self.min_sparsity is not None or self.max_sparsity is not None
        if self.exclude and (self.sparsity is not None or has_bounds):
            raise ConfigError(f"{where}: an excluding rule cannot also set a sparsity")
        if self.sparsity is not None and has_bounds:
            raise ConfigError(f"{where}: set either sparsity or min/max bounds, not both")
        if (self.min_sparsity or 0.0) > (1.0 if self.max_sparsity is None else self.max_sparsity):
            raise ConfigError(f"{where}: min_sparsity is above max_sparsity")

    @property
    def bounds(self) -> tuple[float, float]:
        lo = 0.0 if self.min_sparsity is None else self.min_sparsity
        hi = 1.0 if self.max_sparsity is None else self.max_sparsity
        return lo, hi

    def matches(self, tensor_name: str, ops: Sequence[str]) -> bool:
        if not fnmatch.fnmatchcase(tensor_name, self.name):
            return False
        return self.op is None or any(fnmatch.fnmatchcase(op, self.op) for op in ops)

    def describe(self) -> str:
        parts = [f"name={self.name!r}"] + ([f"op={self.op!r}"] if self.op else [])
        return f"{self.origin} ({', '.join(parts)})"


@dataclass(frozen=True)
class PruneConfig:
    sparsity: float | None = None
    scope: Scope = Scope.GLOBAL
    min_numel: int = DEFAULT_MIN_NUMEL
    nonfinite: NonFinite = NonFinite.ERROR
    include_overridable: bool = False
    rules: tuple[Rule, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.sparsity is not None:
            object.__setattr__(self, "sparsity", check_fraction(self.sparsity, "sparsity"))
        object.__setattr__(self, "scope", _enum(Scope, self.scope, "scope"))
        object.__setattr__(self, "nonfinite", _enum(NonFinite, self.nonfinite, "nonfinite"))
        if isinstance(self.min_numel, bool) or not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ConfigError(f"min_numel must be a non-negative integer, got {self.min_numel!r}")
        if not isinstance(self.include_overridable, bool):
            raise ConfigError(f"include_overridable must be true or false, got {self.include_overridable!r}")
        object.__setattr__(self, "rules", tuple(self.rules))

    def rule_for(self, tensor_name: str, ops: Sequence[str]) -> Rule | None:
        return next((r for r in self.rules if r.matches(tensor_name, ops)), None)

    def with_overrides(
        self,
        *,
        sparsity: float | None = None,
        scope: Scope | str | None = None,
        min_numel: int | None = None,
        nonfinite: NonFinite | str | None = None,
        include_overridable: bool | None = None,
        exclude: Sequence[str] = (),
    ) -> "PruneConfig":
        changes: dict[str, Any] = {}
        if include_overridable is not None:
            changes["include_overridable"] = include_overridable
        if sparsity is not None:
            changes["sparsity"] = sparsity
        if scope is not None:
            changes["scope"] = scope
        if min_numel is not None:
            changes["min_numel"] = min_numel
        if nonfinite is not None:
            changes["nonfinite"] = nonfinite
        if exclude:
            extra = tuple(Rule(name=g, exclude=True, origin="--exclude") for g in exclude)
            changes["rules"] = extra + self.rules
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sparsity": self.sparsity,
            "scope": self.scope.value,
            "min_numel": self.min_numel,
            "nonfinite": self.nonfinite.value,
            "include_overridable": self.include_overridable,
            "rules": [
                {k: v for k, v in {
                    "name": r.name, "op": r.op, "exclude": r.exclude or None, "sparsity": r.sparsity,
                    "min_sparsity": r.min_sparsity, "max_sparsity": r.max_sparsity, "origin": r.origin,
                }.items() if v is not None}
                for r in self.rules
            ],
        }


_SCALAR_KEYS = ("sparsity", "scope", "min_numel", "nonfinite", "include_overridable")
_TOP_KEYS = {*_SCALAR_KEYS, "exclude", "rules"}
_RULE_KEYS = {"name", "op", "exclude", "sparsity", "min_sparsity", "max_sparsity"}


def _rule_from(raw: Any, where: str) -> Rule:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table/object")
    unknown = sorted(set(raw) - _RULE_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_RULE_KEYS))})")
    for key in ("name", "op"):
        if key in raw and not isinstance(raw[key], str):
            raise ConfigError(f"{where}: {key} must be a string")
    if "exclude" in raw and not isinstance(raw["exclude"], bool):
        raise ConfigError(f"{where}: exclude must be true or false")
    return Rule(**raw, origin=where)


def config_from_dict(raw: Any, source: str = "config") -> PruneConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a table/object")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(_TOP_KEYS))})")
    rules: list[Rule] = []
    exclude = raw.get("exclude", [])
    if not isinstance(exclude, list) or not all(isinstance(g, str) for g in exclude):
        raise ConfigError(f"{source}: exclude must be a list of name globs")
    rules += [Rule(name=g, exclude=True, origin=f"{source}: exclude[{i}]") for i, g in enumerate(exclude)]
    raw_rules = raw.get("rules", [])
    if not isinstance(raw_rules, list):
        raise ConfigError(f"{source}: rules must be a list of tables")
    rules += [_rule_from(r, f"{source}: rules[{i}]") for i, r in enumerate(raw_rules)]
    kwargs = {k: raw[k] for k in _SCALAR_KEYS if k in raw}
    try:
        return PruneConfig(rules=tuple(rules), **kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from e


def load_config(path: str | Path) -> PruneConfig:
    """Read a ``.toml`` (Python >= 3.11) or ``.json`` config file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read config '{path}': {e.strerror or e}") from e
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ConfigError(f"config '{path}' is not valid JSON: {e}") from e
    elif path.suffix.lower() == ".toml":
        if sys.version_info < (3, 11):
            raise ConfigError("TOML configs need Python 3.11 or newer (tomllib); use a .json config")
        import tomllib

        try:
            raw = tomllib.loads(text.decode("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"config '{path}' is not valid TOML: {e}") from e
    else:
        raise ConfigError(f"config '{path}' must end in .toml or .json")
    return config_from_dict(raw, source=path.name)
