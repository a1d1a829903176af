"""The ``onnx-magprune`` command: a thin click layer over :mod:`onnx_magprune.api`.

Exit codes: 0 success, 1 a quality gate failed, 2 bad usage or bad input
(one line on stderr; ``--debug`` shows the traceback).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import click

from . import __version__
from .api import decode_file, encode_file, inspect_model, prune_file
from .encoding import Format, Objective
from .bench import BenchOptions, bench_models
from .calibration import SyntheticSpec, parse_shape
from .config import DEFAULT_MIN_NUMEL, NonFinite, PruneConfig, Scope, load_config
from .errors import ConfigError, GateFailed, MagpruneError, OutputError
from .methods import Method, MethodOptions, Schedule
from .structured_run import StructuredOptions
from .model_io import write_text_atomic
from .report import PruneReport
from .validate import RuntimeOptions, ValidationRequest, validate_models
from .validation_report import Gates


class _Group(click.Group):
    """Turns every error into a one-line message and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except GateFailed as e:
            click.echo(f"gate failed: {e}", err=True)
            ctx.exit(e.exit_code)
        except MagpruneError as e:
            if ctx.obj and ctx.obj.get("debug"):
                traceback.print_exc()
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except click.UsageError as e:  # bad options: one line too
            click.echo(f"error: {e.format_message()}", err=True)
            ctx.exit(2)
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
_markdown_option = click.option("--markdown", "markdown_path", type=click.Path(dir_okay=False),
                                help="Write a Markdown report (for a CI job summary).")


def _compose(*decorators):
    def apply(f):
        for d in reversed(decorators):
            f = d(f)
        return f
    return apply


_calibration_options = _compose(
    click.option("--calibration", type=click.Path(), default=None,
                 help="Calibration data: .npz, a directory of .npy, or ONNX test data. Default: synthetic inputs."),
    click.option("--labels", type=click.Path(dir_okay=False), default=None,
                 help="Labels (.npy, or .npz with a 'labels' array) for task accuracy."),
    click.option("--label-output", default=None, help="The output to score labels against."),
    click.option("--shape", "shapes", multiple=True, metavar="NAME=D0,D1,...",
                 help="Shape of a synthetic input with dynamic dimensions (repeatable)."),
    click.option("--samples", type=click.IntRange(min=1), default=None,
                 help="Synthetic samples (first axis) [default: 16; bench: the batch size]."),
    click.option("--int-range", default="0,100", show_default=True, metavar="LO,HI",
                 help="Half-open range of synthetic integer inputs."),
    click.option("--seed", type=int, default=0, show_default=True, help="Seed of synthetic inputs."),
    click.option("--max-samples", type=click.IntRange(min=1), default=None, help="Use at most N samples."),
)
_runtime_options = _compose(
    click.option("--providers", default="cpu", show_default=True,
                 help="Execution providers in priority order: cpu, cuda, tensorrt, ... (comma-separated)."),
    click.option("--allow-fallback", is_flag=True, help="Run without requested providers that are unavailable."),
    click.option("--trt-sparsity", is_flag=True, help="TensorRT: enable sparse (2:4) kernels."),
    click.option("--device-id", type=click.IntRange(min=0), default=0, show_default=True, help="GPU index."),
    click.option("--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (fixed)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=None,
                 help="Samples per run [default: validate 32, bench 1]."),
)
_method_options = _compose(
    click.option("--method", type=click.Choice([m.value for m in Method]), default=None,
                 help="Criterion: magnitude |w|; wanda |w|*||x|| and obs (SparseGPT-style reconstruction) read "
                      "layer statistics from --calibration [default: magnitude; obs with --structured and "
                      "--calibration]."),
    click.option("--pattern", default=None, metavar="N:M",
                 help="Keep N of every M consecutive weights along each layer's reduction axis (e.g. 2:4)."),
    click.option("--refit/--no-refit", default=None,
                 help="Re-fit the kept weights by OBS reconstruction on the calibration data [default: obs; with "
                      "--structured, wanda and obs]."),
    click.option("--sequential/--one-shot", default=True, show_default=True,
                 help="Collect each layer's statistics after the layers before it were pruned, or all at once."),
    click.option("--steps", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Reach the sparsity in T steps, re-collecting statistics and re-fitting in between."),
    click.option("--schedule", type=click.Choice([s.value for s in Schedule]), default="cubic", show_default=True,
                 help="Sparsity after each step: cubic (Zhu & Gupta), linear or constant."),
    click.option("--damp", type=click.FloatRange(min=0.0), default=0.1, show_default=True,
                 help="OBS dampening, relative to the mean diagonal of X^T X."),
    click.option("--match-dense/--match-own", default=None,
                 help="Sequential re-fits: fit each layer to the dense model's layer output (correcting the error "
                      "of earlier layers, and of the residual stream it adds into) or to its own output on the "
                      "pruned model's activations [default: dense; own with --structured]."),
    click.option("--residual/--no-residual", "match_residual", default=True, show_default=True,
                 help="With --match-dense: a layer that adds into a residual stream also cancels that stream's "
                      "error."),
    click.option("--block-size", type=click.IntRange(min=1), default=128, show_default=True,
                 help="OBS columns per lazy-update block."),
    click.option("--holdout", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.2, show_default=True,
                 help="Fraction of --calibration kept out of the statistics; validation runs on it."),
)
_structured_options = _compose(
    click.option("--structured", type=click.Choice(["neurons", "channels", "heads"]), default=None,
                 help="Remove whole units (MatMul/Gemm output neurons, Conv output channels, or the attention "
                      "heads of multi-head attention blocks) and shrink the graph; --sparsity is then the fraction "
                      "of units removed."),
    click.option("--norm", type=click.Choice(["l1", "l2"]), default="l2", show_default=True,
                 help="--structured with --method magnitude: rank units by this norm of their weights."),
    click.option("--min-units", type=click.IntRange(min=1), default=1, show_default=True,
                 help="--structured: units every layer keeps."),
    click.option("--norm-weighted/--unweighted", default=True, show_default=True,
                 help="--structured with calibration: weight each row of a layer whose output reaches a "
                      "LayerNorm/RMSNorm by 1/variance of the norm's input, so the re-fit minimises the error "
                      "after the norm."),
    click.option("--refine-epochs", type=click.IntRange(min=0), default=0, show_default=True,
                 help="--structured with calibration: after the re-fit, this many Adam epochs over the "
                      "calibration rows that also move the kept producer weights and biases of MatMul/Gemm -> "
                      "activation -> MatMul/Gemm blocks (the epoch with the least error on a held-out tenth of "
                      "the rows is kept)."),
    click.option("--refine-lr", type=click.FloatRange(min=0.0, max=1.0, min_open=True, max_open=True),
                 default=2.5e-3, show_default=True,
                 help="--refine-epochs: step size, relative to the RMS of each weight matrix."),
)
_drift_options = _compose(
    click.option("--metric", type=click.Choice(["rel_l2", "cosine", "top1", "accuracy"]), default="rel_l2",
                 show_default=True, help="Drift metric, larger is worse: rel_l2, 1-cosine, 1-top1 agreement, "
                                         "accuracy drop (labels)."),
    click.option("--levels", default="0.3,0.5,0.7,0.8,0.9,0.95", show_default=True, metavar="S1,S2,...",
                 help="Sparsity levels of the sensitivity sweep."),
    click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
                 help="Evaluate the sweep in N parallel processes (one ONNX Runtime session each)."),
    click.option("--group", "groups", multiple=True, metavar="GLOB",
                 help="Sweep (and allocate) the weights whose name matches GLOB as one unit (repeatable)."),
    click.option("--drift-mask", "drift_mask", default=None, metavar="INPUT",
                 help="Count only the positions this input marks non-zero (e.g. attention_mask: padding is "
                      "not data) in outputs whose leading axes have its shape."),
)
_allocation_options = _compose(
    click.option("--target-drift", type=float, default=None, metavar="X",
                 help="Choose per-weight sparsities: the highest overall sparsity whose measured drift on "
                      "--calibration stays within X (with --method obs/wanda: pruned by that criterion)."),
    click.option("--allocate", type=click.Choice(["none", "sensitivity"]), default="none", show_default=True,
                 help="With --sparsity S: share S between weights by sensitivity (least drift)."),
    click.option("--measure-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.3,
                 show_default=True, metavar="F",
                 help="With --method obs/wanda: the last F of the search samples measure drift; the rest feed "
                      "the criterion's statistics."),
    click.option("--drift-output", default=None, metavar="NAME",
                 help="The output whose drift counts [default: the worst output]."),
    _drift_options,
    click.option("--plots", "plot_dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                 help="Allocation: write sensitivity, per-weight and drift-vs-sparsity PNGs here (plot extra)."),
)
_gate_options = _compose(
    click.option("--max-rel-l2", type=float, default=None, help="Gate: relative L2 error of every output <= X."),
    click.option("--min-cosine", type=float, default=None, help="Gate: cosine similarity of every output >= X."),
    click.option("--min-top1", type=float, default=None, help="Gate: top-1 agreement of class outputs >= X."),
    click.option("--max-accuracy-drop", type=float, default=None, help="Gate: accuracy drop on labels <= X."),
)


def _gates(kw) -> Gates:
    return Gates(max_rel_l2=kw["max_rel_l2"], min_cosine=kw["min_cosine"], min_top1=kw["min_top1"],
                 max_accuracy_drop=kw["max_accuracy_drop"])


def _runtime(kw, default_batch: int = 32) -> RuntimeOptions:
    return RuntimeOptions(providers=kw["providers"], allow_fallback=kw["allow_fallback"],
                          trt_sparsity=kw["trt_sparsity"], device_id=kw["device_id"], threads=kw["threads"],
                          batch_size=kw["batch_size"] or default_batch)


def _synthetic(kw, default_samples: int = 16) -> SyntheticSpec:
    try:
        lo, hi = (int(x) for x in kw["int_range"].split(","))
    except ValueError:
        raise click.BadParameter("must look like LO,HI (integers)", param_hint="--int-range") from None
    if lo >= hi:
        raise click.BadParameter("LO must be below HI", param_hint="--int-range")
    shapes = dict(parse_shape(s) for s in kw["shapes"])
    return SyntheticSpec(samples=kw["samples"] or default_samples, int_range=(lo, hi), seed=kw["seed"],
                         shapes=shapes)


def _check_dirs(*paths: str | None) -> None:
    for p in paths:
        if p and not Path(p).resolve().parent.is_dir():
            raise OutputError(f"directory '{Path(p).parent}' does not exist")


def _write_markdown(path: str | None, report) -> None:
    if path and report is not None:
        write_text_atomic(path, report.to_markdown())


def _output(report, report_path: str | None, markdown_path: str | None, as_json: bool, quiet: bool) -> None:
    """Validation and bench reports: JSON and Markdown files, then JSON or a table on stdout."""
    if report_path:
        write_text_atomic(report_path, report.to_json())
    _write_markdown(markdown_path, report)
    if as_json:
        click.echo(report.to_json(), nl=False)
    elif not quiet:
        click.echo(report.format_table())


_optimize_option = click.option(
    "--optimize-for", "optimize_for", type=click.Choice([o.value for o in Objective]), default="balanced",
    show_default=True,
    help="compact: size (the smallest file), startup (the fewest decode steps at session start), balanced "
         "(the fastest-starting code within 1.095x of the information bound).")


_weight_options = _compose(_config_option, _exclude_option, _min_numel_option, _overridable_option, _report_option,
                           _json_option, _all_option)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_weight_options
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
              help="global: one threshold across all weights [default]; local: each tensor alone; "
                   "output: each output unit of each layer alone.")
@click.option("--nonfinite", type=click.Choice([n.value for n in NonFinite]), default=None,
              help="NaN/Inf weights: error [default], or keep them unpruned.")
@click.option("--overwrite", is_flag=True, help="Allow OUTPUT to be the input model itself.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in Format]), default="auto", show_default=True,
              help="How pruned weights are stored: dense (zeros in place), sparse (standard COO, INT64), "
                   "sparse-int32 (smaller, not checker-valid), compact (values + packed gap codes, decoded by "
                   "ONNX Runtime's constant folding at load), auto (the smallest of dense, sparse and compact "
                   "per tensor; never larger than dense).")
@_optimize_option
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@_weight_options
@_calibration_options
@_runtime_options
@_gate_options
@_markdown_option
@_method_options
@_structured_options
@_allocation_options
@click.option("--validate", "force_validate", is_flag=True,
              help="Validate against the input even without --calibration (synthetic inputs).")
def prune(model, output, sparsity, scope, nonfinite, overwrite, fmt, optimize_for, quiet, config_path, exclude, min_numel,
          include_overridable, report_path, as_json, all_skipped, markdown_path, force_validate, **kw):
    """Zero the smallest-magnitude weights of MODEL and write OUTPUT.

    With --calibration (or --validate) the pruned model is validated against
    MODEL before it is written; if a gate fails, nothing is written (exit 1)."""
    _check_dirs(report_path, markdown_path)  # before pruning: a report that cannot be written fails the run early
    gates = _gates(kw)
    validation = None
    if kw["calibration"] is not None or gates.any or force_validate:
        validation = ValidationRequest(calibration=kw["calibration"], labels=kw["labels"], gates=gates,
                                       runtime=_runtime(kw), synthetic=_synthetic(kw), max_samples=kw["max_samples"],
                                       label_output=kw["label_output"], quiet=quiet)
    if kw["refine_epochs"] and not kw["structured"]:
        raise ConfigError("--refine-epochs applies to --structured removal")
    structured = (StructuredOptions(unit=kw["structured"], norm=kw["norm"], min_units=kw["min_units"],
                                    norm_weighted=kw["norm_weighted"], refine_epochs=kw["refine_epochs"],
                                    refine_lr=kw["refine_lr"])
                  if kw["structured"] else None)
    criterion = kw["method"] or ("obs" if structured is not None and kw["calibration"] is not None else "magnitude")
    method = MethodOptions(method=criterion, calibration=kw["calibration"], holdout=kw["holdout"],
                           pattern=kw["pattern"], refit=kw["refit"], sequential=kw["sequential"], steps=kw["steps"],
                           schedule=kw["schedule"], damp=kw["damp"], block_size=kw["block_size"],
                           match_dense=kw["match_dense"], match_residual=kw["match_residual"],
                           threads=kw["threads"], max_samples=kw["max_samples"], quiet=quiet)
    try:
        report = prune_file(model, output, sparsity, scope, config=_base_config(config_path), exclude=exclude,
                            min_numel=min_numel, nonfinite=nonfinite, include_overridable=include_overridable,
                            overwrite=overwrite, validation=validation, format=fmt, optimize_for=optimize_for,
                            method=method,
                            structured=structured, allocation=_allocation(kw, quiet))
    except GateFailed as e:
        if e.report is not None:
            _emit(e.report, report_path, as_json, quiet, all_skipped)
            _write_markdown(markdown_path, e.report.validation)
        raise
    _emit(report, report_path, as_json, quiet, all_skipped)
    if report.allocation is None:
        _write_markdown(markdown_path, report.validation)
    else:
        _allocation_output(report, markdown_path, as_json, quiet, kw["plot_dir"])


def _allocation(kw, quiet: bool):
    """``--target-drift`` / ``--allocate sensitivity`` as AllocationOptions (None when neither is given)."""
    if kw["target_drift"] is None and kw["allocate"] == "none":
        return None
    from .allocation_search import AllocationOptions

    return AllocationOptions(calibration=kw["calibration"], target_drift=kw["target_drift"], allocate="sensitivity",
                             metric=kw["metric"], output=kw["drift_output"], label_output=kw["label_output"],
                             labels=kw["labels"], levels=kw["levels"], holdout=kw["holdout"],
                             max_samples=kw["max_samples"], runtime=_runtime(kw), jobs=kw["jobs"],
                             plots=kw["plot_dir"], groups=kw["groups"], measure_fraction=kw["measure_fraction"],
                             mask_input=kw["drift_mask"], quiet=quiet)


def _allocation_output(report, markdown_path, as_json: bool, quiet: bool, plot_dir) -> None:
    from .allocation_report import allocation_lines, allocation_markdown
    from .plots import PLOT_HINT

    if markdown_path:
        text = (report.validation.to_markdown() if report.validation is not None else "")
        write_text_atomic(markdown_path, text + allocation_markdown(report.allocation, markdown_path))
    if not as_json and not quiet:
        click.echo("\n".join(allocation_lines(report.allocation)))
    if plot_dir and report.allocation.get("plots") is None:
        click.echo(PLOT_HINT, err=True)


@main.command()
@click.argument("dense", type=click.Path(dir_okay=False))
@click.argument("pruned", type=click.Path(dir_okay=False))
@_calibration_options
@_runtime_options
@_gate_options
@_report_option
@_markdown_option
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
def validate(dense, pruned, report_path, markdown_path, as_json, quiet, **kw):
    """Compare PRUNED with DENSE on calibration data; exit 1 if a gate fails."""
    report = validate_models(dense, pruned, kw["calibration"], labels=kw["labels"], gates=_gates(kw),
                             runtime=_runtime(kw), synthetic=_synthetic(kw), max_samples=kw["max_samples"],
                             label_output=kw["label_output"], quiet=quiet)
    _output(report, report_path, markdown_path, as_json, quiet)
    if not report.passed:
        failed = [g for g in report.gates if not g.passed]
        raise GateFailed(f"{len(failed)} quality gate(s) failed ({', '.join(g.gate for g in failed)})")


@main.command()
@click.argument("models", nargs=-1, required=True, type=click.Path(dir_okay=False))
@_calibration_options
@_runtime_options
@click.option("--runs", type=click.IntRange(min=1), default=50, show_default=True, help="Timed runs per model.")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True, help="Untimed runs first.")
@click.option("--no-memory", is_flag=True, help="Skip the per-model peak-memory subprocess.")
@_report_option
@_markdown_option
@_json_option
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
def bench(models, runs, warmup, no_memory, report_path, markdown_path, as_json, quiet, **kw):
    """Latency, start-up, memory and size of MODEL, or of MODEL and MODEL2 compared A/B."""
    if len(models) > 2:
        raise click.UsageError("bench takes one or two models")
    runtime = _runtime(kw, default_batch=1)
    report = bench_models(list(models), kw["calibration"], runtime=runtime,
                          options=BenchOptions(runs=runs, warmup=warmup, measure_memory=not no_memory),
                          synthetic=_synthetic(kw, default_samples=runtime.batch_size), quiet=quiet)
    _output(report, report_path, markdown_path, as_json, quiet)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--format", "fmt", type=click.Choice([f.value for f in Format if f is not Format.DENSE]),
              default="auto", show_default=True, help="The storage format for the (already pruned) weights.")
@_optimize_option
@click.option("--overwrite", is_flag=True, help="Allow OUTPUT to be the input model itself.")
@click.option("-q", "--quiet", is_flag=True, help="Print nothing on success.")
@_report_option
@_json_option
def encode(model, output, fmt, optimize_for, overwrite, quiet, report_path, as_json):
    """Store the weights of an already-pruned MODEL sparsely in OUTPUT (nothing is pruned)."""
    _check_dirs(report_path)
    report = encode_file(model, output, fmt, overwrite=overwrite, optimize_for=optimize_for)
    _emit(report, report_path, as_json, quiet, False)


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Where to write the model.")
@click.option("--overwrite", is_flag=True, help="Allow OUTPUT to be the input model itself.")
def decode(model, output, overwrite):
    """Turn sparse and compact weights of MODEL back into plain dense initializers, bit-exact."""
    count = decode_file(model, output, overwrite=overwrite)
    click.echo(f"decoded {count} sparse or compact tensor(s) into {output}")


@main.command()
@click.argument("model", type=click.Path(dir_okay=False))
@_calibration_options
@_runtime_options
@_drift_options
@click.option("--output", "drift_output", default=None, metavar="NAME",
              help="The output whose drift counts [default: the worst output].")
@_config_option
@_exclude_option
@_min_numel_option
@_overridable_option
@_report_option
@_markdown_option
@_json_option
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write the per-weight sensitivity curves as a PNG (plot extra).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar, no table.")
def sensitivity(model, drift_output, config_path, exclude, min_numel, include_overridable, report_path,
                markdown_path, as_json, plot_path, quiet, **kw):
    """Drift when each prunable weight of MODEL alone is pruned to each level (one ONNX Runtime session)."""
    from .plots import PLOT_HINT, sensitivity_plot
    from .sensitivity import SweepOptions, sensitivity_sweep

    _check_dirs(report_path, markdown_path, plot_path)
    if kw["calibration"] is None:
        raise MagpruneError("sensitivity needs calibration data: pass --calibration")
    cfg = _base_config(config_path).with_overrides(exclude=exclude, min_numel=min_numel,
                                                   include_overridable=include_overridable)
    options = SweepOptions(levels=kw["levels"], metric=kw["metric"], output=drift_output,
                           label_output=kw["label_output"], runtime=_runtime(kw), jobs=kw["jobs"],
                           groups=kw["groups"], mask_input=kw["drift_mask"], quiet=quiet)
    report = sensitivity_sweep(model, kw["calibration"], config=cfg, options=options, labels=kw["labels"],
                               max_samples=kw["max_samples"])
    if plot_path:
        written = sensitivity_plot(report.curves, plot_path, report.metric)
        report.plots = {"sensitivity": written} if written else None
        if written is None:
            report.notes.append(PLOT_HINT)
    if report_path:
        write_text_atomic(report_path, report.to_json())
    if markdown_path:
        write_text_atomic(markdown_path, report.to_markdown(markdown_path))
    if as_json:
        click.echo(report.to_json(), nl=False)
    elif not quiet:
        click.echo(report.format_table())
    if plot_path and report.plots is None:
        click.echo(PLOT_HINT, err=True)


def run() -> None:  # console-script entry point
    main(prog_name="onnx-magprune")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run())
