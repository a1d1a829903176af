"""Typed errors. Every error a user can cause is a :class:`MagpruneError`.

The CLI turns a ``MagpruneError`` into a one-line message and exit code 2
(:class:`GateFailed` into exit code 1); anything else is a bug and is shown
with its traceback only under ``--debug``.
"""

from __future__ import annotations


class MagpruneError(Exception):
    """Bad usage or bad input: the CLI prints the message and exits 2."""

    exit_code = 2


class ModelLoadError(MagpruneError):
    """The model file cannot be read, parsed, or its external data resolved."""


class ExternalDataError(ModelLoadError):
    """An external-data reference is unsafe, malformed or out of bounds."""


class ConfigError(MagpruneError):
    """The pruning options or the config file are invalid."""


class NonFiniteWeightError(MagpruneError):
    """A prunable weight holds NaN or Inf and the user did not ask to keep them."""


class OutputError(MagpruneError):
    """The output cannot be written where the user asked."""


class GateFailed(MagpruneError):
    """A quality gate failed: the CLI exits 1.  ``report`` holds the full report."""

    exit_code = 1

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report
