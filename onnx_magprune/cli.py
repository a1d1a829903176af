"""The ``onnx-magprune`` command: a thin click layer over :mod:`onnx_magprune.api`.

Exit codes: 0 success, 1 a quality gate failed, 2 bad usage or bad input
(one line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys
import traceback

import click

from . import __version__
from .api import inspect_model, prune_file
from .config import DEFAULT_MIN_NUMEL, NonFinite, PruneConfig, Scope, load_config
from .errors import MagpruneError
from .model_io import write_text_atomic
from .report import PruneReport


class _Group(click.Group):
    """Turns every error into a one-line message and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MagpruneError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            ctx.exit(130)
        except Exception as e:  # a bug, or input we failed to classify: still no traceback by default
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: unexpected {type(e).__name__}: {first} (rerun with --debug for details)", err=True)
            ctx.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="onnx-magprune")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Exact magnitude pruning for ONNX models."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def _base_config(path: str | None) -> PruneConfig:
    return load_config(path) if path else PruneConfig()


def _emit(report: PruneReport, report_path: str | None, as_json: bool, quiet: bool, all_skipped: bool) -> None:
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if as_json:
        click.echo(report.to_json(), nl=False)
    elif not quiet:
        click.echo(report.format_table(all_skipped=all_skipped))


_config_option = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                              help="Per-layer config file (.toml or .json).")
_exclude_option = click.option("--exclude", multiple=True, metavar="GLOB",
                               help="Never prune tensors whose name matches GLOB (repeatable).")
_min_numel_option = click.option("--min-numel", type=click.IntRange(min=0), default=None,
                                 help=f"Skip tensors with fewer elements [default: {DEFAULT_MIN_NUMEL}].")
_overridable_option = click.option("--include-overridable", is_flag=True, default=None,
                                   help="Also prune initializers listed as graph inputs (older exporters list all).")
_report_option = click.option("--report", "report_path", type=click.Path(dir_okay=False),
                              help="Write the JSON report here.")
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the JSON report instead of the table.")
_all_option = click.option("--all", "all_skipped", is_flag=True, help="List every skipped constant in the table.")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_config_option
@_exclude_option
@_min_numel_option
@_overridable_option
@_report_option
@_json_option
@_all_option
def inspect(model, config_path, exclude, min_numel, include_overridable, report_path, as_json, all_skipped):
    """List the prunable weights of MODEL, and every skipped tensor with its reason."""
    report = inspect_model(model, config=_base_config(config_path), exclude=exclude, min_numel=min_numel,
                           include_overridable=include_overridable)
    _emit(report, report_path, as_json, False, all_skipped)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the pruned model.")
@click.option("--sparsity", type=click.FloatRange(0.0, 1.0), default=None,
              help="Fraction of the prunable weights to zero (exactly round(S x N)).")
@click.option("--scope", type=click.Choice([s.value for s in Scope]), default=None,
              help="global: one threshold across all weights [default]; local: each tensor alone.")
@click.option("--nonfinite", type=click.Choice([n.value for n in NonFinite]), default=None,
              help="NaN/Inf weights: error [default], or keep them unpruned.")
@click.option("--overwrite", is_flag=True, help="Allow OUTPUT to be the input model itself.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@_config_option
@_exclude_option
@_min_numel_option
@_overridable_option
@_report_option
@_json_option
@_all_option
def prune(model, output, sparsity, scope, nonfinite, overwrite, quiet, config_path, exclude, min_numel,
          include_overridable, report_path, as_json, all_skipped):
    """Zero the smallest-magnitude weights of MODEL and write OUTPUT."""
    report = prune_file(model, output, sparsity, scope, config=_base_config(config_path), exclude=exclude,
                        min_numel=min_numel, nonfinite=nonfinite, include_overridable=include_overridable,
                        overwrite=overwrite)
    _emit(report, report_path, as_json, quiet, all_skipped)


def run() -> None:  # console-script entry point
    main(prog_name="onnx-magprune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
