"""The deploytool command line: parse, call the library, render; maps errors to exit codes. The
options are declared in cli_options.py, the rules that tie them together in options.py."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__, options
from . import cli_options as opt
from .atomic import interrupts_raise, write_text
from .errors import DeployError
from .export import DEFAULT_OPSET
from .inputs import images_or_default
from .registry import is_int8
from .results import exit_code
from .spec_toml import load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export PyTorch models to TorchScript, ONNX and ncnn, and prove parity on every backend.",
)
# Parity tables need ~110 columns; logs and pipes would otherwise get rich's 80.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

INTERNAL_ERROR = 5


def _error(text: str) -> None:
    err_console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)


@contextmanager
def _errors():
    """Every failure becomes one line and its exit code: DeployErrors by their class, anything else
    (a bug) exit 5 with the traceback saved to a file; interrupts and typer's own exits pass."""
    try:
        yield
    except DeployError as exc:
        _error(str(exc))
        raise typer.Exit(exc.exit_code) from None
    except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - the boundary: nothing may escape as a traceback
        path = _save_traceback(exc)
        where = f"; traceback saved to {path}" if path else ""
        bug = f"internal error ({type(exc).__name__}: {str(exc)[:200]})"
        _error(f"{bug}: this is a bug in deploytool, please report it{where}")
        raise typer.Exit(INTERNAL_ERROR) from None


def _save_traceback(exc: BaseException) -> Path | None:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    name = f"deploytool-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    try:
        return write_text(Path(tempfile.gettempdir()) / name, f"argv: {sys.argv}\n{text}")
    except OSError:
        return None


def command(fn):
    """app.command() with every failure mapped to its exit code (see _errors)."""

    @functools.wraps(fn)
    def guarded(*args, **kwargs):
        with _errors():
            return fn(*args, **kwargs)

    return app.command()(guarded)


@command
def run(
    model: opt.ModelArg,
    out: opt.OutOpt = None,
    backends: opt.BackendsOpt = None,
    images: opt.ImagesOpt = None,
    converter: opt.RunConverterOpt = None,
    onnx2ncnn: opt.Onnx2ncnnOpt = None,
    opset: opt.OpsetOpt = DEFAULT_OPSET,
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
    ncnn_precision: opt.PrecisionOpt = "fp32",
    fp16: opt.Fp16Opt = False,
    precision: opt.AutoOpt = None,
    budget: opt.BudgetOpt = None,
    threads: opt.ThreadsOpt = 2,
    save_vis: opt.VisOpt = None,
    report: opt.ReportOpt = None,
    junit: opt.JunitOpt = None,
    markdown: opt.MarkdownOpt = None,
    calib: opt.CalibOpt = None,
    method: opt.MethodOpt = options.DEFAULT_METHOD,
    table: opt.TableOpt = None,
    keep_fp32: opt.KeepFp32Opt = None,
) -> None:
    """Export, convert and run MODEL on every backend; exit 1 if any parity check fails. MODEL may be an
    ONNX file (FILE.onnx, or a spec with [onnx]): then ONNX Runtime is the reference."""
    from .foreign import is_onnx_file, onnx_converter, run_onnx, spec_for_file
    from .pipeline import run as run_pipeline
    from .report import check_output_files

    check_output_files(report=report, junit=junit, markdown=markdown)
    auto = options.auto_budget(precision, budget, ncnn_precision, fp16)
    spec = spec_for_file(Path(model), input_shape) if is_onnx_file(model) else load_spec(model, input_shape)
    if spec.onnx is not None:
        converter, run_pipeline = onnx_converter(converter, onnx2ncnn), run_onnx
    elif auto is not None:
        from .bench.auto import run_auto as run_pipeline
    recipe = options.Recipe.from_flags(
        converter or "pnnx", fp16, onnx2ncnn, is_int8(ncnn_precision), calib, method, table, keep_fp32
    )
    opts = options.RunOptions(
        out=Path(out or Path("out") / spec.name), backends=backends, recipe=recipe, opset=opset,
        images=images_or_default(images, spec.task), weights=weights, ncnn_precision=ncnn_precision,
        threads=threads, save_vis=save_vis, budget=auto,
    )  # fmt: skip
    _render(run_pipeline(spec, opts), opts.out, report, junit, markdown)


@command
def quantize(
    model: opt.ModelArg,
    out: opt.OutOpt = None,
    calib: opt.CalibOpt = None,
    method: opt.MethodOpt = options.DEFAULT_METHOD,
    table: opt.TableOpt = None,
    keep_fp32: opt.KeepFp32Opt = None,
    backends: opt.QuantizeBackendsOpt = None,
    images: opt.ImagesOpt = None,
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
    threads: opt.ThreadsOpt = 2,
    report: opt.ReportOpt = None,
    junit: opt.JunitOpt = None,
    markdown: opt.MarkdownOpt = None,
    explain: opt.ExplainOpt = False,
    auto_mixed: opt.AutoMixedOpt = None,
) -> None:
    """Calibrate and write MODEL's int8 ncnn model (model.int8.param/.bin, model.table in ncnn2table's
    format), then check it against torch; exit 1 if a parity check fails. Same as
    `run --ncnn-precision int8` with the int8 backends only."""
    from .pipeline import run as run_pipeline
    from .report import check_output_files
    from .sensitivity import ExplainOptions

    check_output_files(report=report, junit=junit, markdown=markdown)
    explained = ExplainOptions(auto_mixed) if explain or auto_mixed is not None else None
    spec = load_spec(model, input_shape)
    recipe = options.Recipe.from_flags(
        int8=True, calib=calib, method=method, table=table, keep_fp32=keep_fp32
    )
    opts = options.RunOptions(
        out=Path(out or Path("out") / spec.name), backends=backends or options.quantize_backends(),
        images=images_or_default(images, spec.task), recipe=recipe, weights=weights, ncnn_precision="int8",
        threads=threads,
    )  # fmt: skip
    section = None
    if explained is None:
        result = run_pipeline(spec, opts)
    else:
        from .sensitivity import explain_quantize
        from .sensitivity_report import markdown_section, render_sensitivity

        result, sens = explain_quantize(spec, opts, explained)
        render_sensitivity(sens, console)
        section = functools.partial(markdown_section, sens)
    layers = result.artifacts.get("int8_layers") or []
    console.print(f"quantized {len(layers)} layers; table {result.artifacts.get('int8_table')}")
    _render(result, opts.out, report, junit, markdown, section=section)


@command
def parity(
    target: opt.ParityTargetArg,
    model: opt.ParityModelOpt = None,
    backends: opt.BackendsOpt = None,
    images: opt.ImagesOpt = None,
    inputs: opt.InputsOpt = None,
    golden: opt.GoldenOpt = None,
    save_golden: opt.SaveGoldenOpt = None,
    reference: opt.ReferenceOpt = None,
    layerwise: opt.LayerwiseOpt = False,
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
    ncnn_precision: opt.ParityPrecisionOpt = None,
    threads: opt.ThreadsOpt = 2,
    save_vis: opt.VisOpt = None,
    report: opt.ReportOpt = None,
    junit: opt.JunitOpt = None,
    markdown: opt.MarkdownOpt = None,
) -> None:
    """Compare backends on artifacts that already exist (nothing is exported or converted)."""
    from .parity import ParityOptions, run_parity
    from .report import check_output_files

    check_output_files(report=report, junit=junit, markdown=markdown, save_golden=save_golden)
    opts = ParityOptions(
        backends=backends, images=tuple(images or ()), weights=weights, ncnn_precision=ncnn_precision,
        threads=threads, model=model, input_shape=input_shape, inputs_npz=inputs, golden=golden,
        save_golden=save_golden, reference=reference, layerwise=layerwise, save_vis=save_vis,
    )  # fmt: skip
    result = run_parity(target, opts)
    _render(result, target if target.is_dir() else None, report, junit, markdown, stem="parity")


def _render(result, folder: Path | None, report: Path | None, junit: Path | None, markdown: Path | None,
            stem: str = "report", section=None):  # fmt: skip
    """Print the summary and write the report files (`section`: see report.write_outputs); exit 0
    (passed), 1 (a parity check failed) or 3 (a backend failed: the others' results are in the report
    all the same)."""
    from .report import console_summary, write_outputs

    console_summary(result, console)
    written = write_outputs(result, folder, report, junit, markdown, stem, section)
    if written:
        console.print("  wrote " + ", ".join(map(str, written)))
    failed = result.failed_backends
    if failed:
        more = f" (and {len(failed) - 1} more backend(s), see the report)" if len(failed) > 1 else ""
        _error(f"{failed[0].error}{more}; the other backends' results are in the report")
    raise typer.Exit(exit_code(result.passed, failed=bool(failed)))


@command
def bench(
    model: opt.ModelArg,
    out: opt.BenchOutOpt = None,
    runs: opt.RunsOpt = 20,
    warmup: opt.WarmupOpt = 3,
    threads: opt.ThreadCountsOpt = "2",
    backends: opt.BenchBackendsOpt = None,
    images: opt.ImagesOpt = None,
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
    budget: opt.BudgetOpt = None,
    retries: opt.RetriesOpt = 0,
    tune: opt.TuneOpt = False,
    keep_fp32: opt.BenchKeepFp32Opt = None,
) -> None:
    """Latency (median, p90, min) per backend and per ncnn precision variant, with parity for each, and
    the fastest variant within the accuracy budget."""
    from .bench import BenchOptions, bench_model, render_bench

    spec = load_spec(model, input_shape)
    opts = BenchOptions(
        out=Path(out or Path("out") / spec.name / "bench"), runs=runs, warmup=warmup, backends=backends,
        threads=options.thread_counts(threads), images=images_or_default(images, spec.task), weights=weights,
        budget=budget, retries=retries, tune=tune, keep_fp32=options.names(keep_fp32),
    )  # fmt: skip
    result = bench_model(spec, opts)
    render_bench(result, console)
    console.print(f"  wrote {opts.out / 'bench.json'}")
    raise typer.Exit(exit_code(budget is None or result.budget_fits is not False))


@command
def bundle(
    model: opt.ModelArg,
    out: opt.BundleOutOpt,
    work: opt.WorkOpt = None,
    images: opt.ImagesOpt = None,
    converter: opt.ConverterOpt = "pnnx",
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
    threads: opt.ThreadsOpt = 2,
    ncnn_precision: opt.BundlePrecisionOpt = "fp32",
    calib: opt.CalibOpt = None,
    method: opt.MethodOpt = options.DEFAULT_METHOD,
    table: opt.TableOpt = None,
    keep_fp32: opt.KeepFp32Opt = None,
    force: opt.ForceOpt = False,
    target: opt.TargetOpt = "x86_64",
) -> None:
    """Convert MODEL, check parity (torch, ncnn-cpu, the C++ runner when libncnn is built, and with
    --target aarch64 the cross-built runner under qemu), and write the folder that goes onto the board;
    nothing is written if parity fails. --out must be a new or empty folder or an earlier bundle
    (replaced; files you added to it are kept); the folder is checked before any work."""
    from .bundle import make_bundle
    from .report import console_summary

    options.check_bundle_precision(ncnn_precision)
    spec = load_spec(model, input_shape)
    recipe = options.Recipe.from_flags(
        converter, int8=is_int8(ncnn_precision), calib=calib, method=method, table=table, keep_fp32=keep_fp32
    )
    opts = options.RunOptions(
        out=Path(work or Path("out") / spec.name), images=images_or_default(images, spec.task), recipe=recipe,
        weights=weights, threads=threads, ncnn_precision=ncnn_precision,
    )  # fmt: skip
    result, path = make_bundle(spec, opts, out, force=force, target=target)
    console_summary(result, console)
    if path is None:
        _error(f"parity failed; no bundle written (details: {opts.out / 'report.json'})")
    else:
        console.print(f"wrote bundle {path}: see {path / 'README.md'} to build and run it on the board")
    raise typer.Exit(exit_code(path is not None))


@command
def deploy(
    bundle_dir: opt.BundleArg, to: opt.ToOpt, build: opt.BuildOpt = "auto", ncnn_dir: opt.NcnnDirOpt = None
) -> None:
    """Copy a bundle to a board over SSH (your ssh client, keys and config; host keys checked), put the
    runner there (the bundle's cross-built binary, or built on the board), check that it runs, and
    only then switch the board's folder to it. A failure leaves the board's folder as it was."""
    from .deploy import deploy as deploy_bundle

    result = deploy_bundle(bundle_dir, to, build=build, ncnn_dir=ncnn_dir)
    for line in result.lines():
        console.print(line, highlight=False, markup=False)


@command
def matrix(
    models: opt.ModelsArg = None,
    backends: opt.BackendsOpt = None,
    precisions: opt.PrecisionsOpt = "fp32",
    jobs: opt.JobsOpt = None,
    shard: opt.ShardOpt = None,
    out: opt.MatrixOutOpt = Path("out/matrix"),
    no_cache: opt.NoCacheOpt = False,
    cache: opt.CacheOpt = None,
) -> None:
    """Run model × backend × precision and write one table (matrix.md), matrix.json and junit.xml; exit 1
    when a cell fails, 3 when a job could not run. Export, conversion and outputs are cached (keyed by
    what decides them) under the deploytool cache, so an unchanged rerun only re-judges.
    `deploytool matrix merge A/matrix.json B/matrix.json --out DIR` joins shards into one report."""
    from .matrix import MatrixOptions, markdown, merge, parse_shard, run_matrix
    from .targets.build import cache_root

    given = list(models or [])
    if given[:1] == ["merge"]:  # `matrix merge REPORT…`: a word, not a model
        result = merge([Path(n) for n in given[1:]], out)
    else:
        opts = MatrixOptions(
            models=tuple(given), backends=backends, precisions=options.names(precisions),
            jobs=jobs if jobs is not None else (os.cpu_count() or 1), shard=parse_shard(shard), out=out,
            cache=None if no_cache else (cache or cache_root() / "stages"),
        )  # fmt: skip
        result = run_matrix(opts)
    console.print(markdown(result), highlight=False, markup=False)
    console.print(f"wrote {out / 'matrix.md'}, {out / 'matrix.json'}, {out / 'junit.xml'}")
    raise typer.Exit(result.exit_code)


@command
def export(
    model: opt.ModelArg,
    out: opt.OutOpt = None,
    formats: opt.FormatsOpt = "torchscript,onnx",
    opset: opt.OpsetOpt = DEFAULT_OPSET,
    input_shape: opt.ShapeOpt = None,
    weights: opt.WeightsOpt = None,
) -> None:
    """Export MODEL to TorchScript and/or ONNX."""
    from .pipeline import export

    spec = load_spec(model, input_shape)
    paths = export(spec, Path(out or Path("out") / spec.name), formats, opset, weights)
    for path in paths:
        console.print(f"wrote {path}")


@command
def convert(
    file: opt.FileArg,
    converter: opt.FileConverterOpt = None,
    input_shape: opt.ShapeOpt = None,
    out: opt.ConvertOutOpt = None,
    onnx2ncnn: opt.Onnx2ncnnOpt = None,
    fp16: opt.Fp16Opt = False,
) -> None:
    """Convert a TorchScript or ONNX file to ncnn .param/.bin."""
    from .convert import convert_file

    result = convert_file(file, converter, input_shape, out, fp16_weights=fp16, onnx2ncnn=onnx2ncnn)
    console.print(
        f"wrote {result.param} and {result.bin} (inputs {result.input_names}, "
        f"outputs {result.output_names}); log: {result.log}"
    )


@command
def doctor() -> None:
    """Versions of every tool, Vulkan devices, converters, and which backends can run here."""
    from .doctor import facts

    for fact in facts():  # values hold brackets ([fp32/fp16]): printed as text, not markup
        console.print(f"{fact.name:25} {fact.value}", highlight=False, markup=False,
                      style=None if fact.ok else "yellow")  # fmt: skip


@command
def models() -> None:
    """List the model specs in models/."""
    from .spec import available_models

    for name in available_models():
        spec = load_spec(name)
        source = spec.factory or spec.onnx  # a PyTorch factory, or the ONNX file a spec options.names
        console.print(f"{name:12} {spec.task:9} {','.join(map(str, spec.input_shape)):14} {source}")


@app.callback(invoke_without_command=True)
def _main(version: opt.VersionOpt = False, quiet: opt.QuietOpt = False) -> None:
    from . import progress

    progress.configure(quiet=quiet)
    if version:
        console.print(f"deploytool {__version__}")
        raise typer.Exit(0)


def main() -> None:
    """The console script. SIGINT, SIGTERM and SIGHUP raise an Interrupted (a KeyboardInterrupt) in the
    main thread, so every `finally` removes its temporary files; then one line `interrupted (SIGTERM)`
    and exit 128 + the signal's number (130 SIGINT, 143 SIGTERM, 129 SIGHUP)."""
    import signal

    code = 0
    with interrupts_raise() as received:
        try:
            app()
        except SystemExit as exc:  # typer exits with 130 for any KeyboardInterrupt: `received` says which
            code = exc.code
        except KeyboardInterrupt:
            received[:] = received or [signal.SIGINT]
    if received:
        sys.stderr.write(f"interrupted ({signal.Signals(received[0]).name})\n")
        sys.exit(128 + received[0])
    sys.exit(code)


if __name__ == "__main__":
    main()
