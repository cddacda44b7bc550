"""The deploytool command line: parse, call the library, render; maps errors to exit codes."""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .errors import BackendError, DeployError, SpecError
from .inputs import images_or_default
from .spec import load_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Export PyTorch models to TorchScript, ONNX and ncnn, and prove parity on every backend.",
)
# Parity tables need ~110 columns; logs and pipes would otherwise get rich's 80.
console = Console(width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)

ModelArg = Annotated[
    str, typer.Argument(help="name in models/ (resnet18), a .toml spec, or pkg.module:factory")
]
OutOpt = Annotated[Path | None, typer.Option("--out", help="artifact folder (default: out/MODEL)")]
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="e.g. 1,3,224,224 (required for pkg:factory)")
]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="state_dict checkpoint (loaded weights_only)")
]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset")]
ConverterOpt = Annotated[str, typer.Option("--converter", help="pnnx | pnnx-onnx | onnx2ncnn")]
Onnx2ncnnOpt = Annotated[str | None, typer.Option("--onnx2ncnn", help="path to an onnx2ncnn binary")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="let pnnx write fp16 weights (default fp32)")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads for every backend")]


INTERNAL_ERROR = 5


def _fail(exc: DeployError) -> None:
    err_console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
    raise typer.Exit(exc.exit_code)


@contextmanager
def _errors():
    """Every failure becomes one line and its exit code: DeployErrors by their class, anything else
    (a bug) exit 5 with the traceback saved to a file; interrupts and typer's own exits pass."""
    try:
        yield
    except DeployError as exc:
        _fail(exc)
    except (typer.Exit, typer.Abort, typer.TyperException, KeyboardInterrupt):
        raise
    except BaseException as exc:  # noqa: BLE001 - the boundary: nothing may escape as a traceback
        path = _save_traceback(exc)
        where = f"; traceback saved to {path}" if path else ""
        err_console.print(
            f"[red]error:[/] internal error ({type(exc).__name__}: {escape(str(exc)[:200])}): "
            f"this is a bug in deploytool, please report it{where}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(INTERNAL_ERROR) from None


def _save_traceback(exc: BaseException) -> Path | None:
    import tempfile
    import time
    import traceback

    from .atomic import write_text

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


BackendsOpt = Annotated[
    str | None,
    typer.Option("--backends", help="comma-separated; default torch,onnxruntime,ncnn-cpu,ncnn-vulkan"),
]
ImagesOpt = Annotated[list[Path] | None, typer.Option("--images", help="image file or folder (repeatable)")]
PrecisionOpt = Annotated[
    str, typer.Option("--ncnn-precision", help="fp32 (parity), fp16 (ncnn's fast defaults) or bf16")
]
VisOpt = Annotated[
    Path | None, typer.Option("--save-vis", help="detectors: draw each backend's boxes on the photos in DIR")
]
BudgetOpt = Annotated[
    str | None,
    typer.Option("--budget", help='accuracy budget, e.g. "top1=1.0,rel=1e-2" (det=1.0 for detectors)'),
]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="also write report.json here")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="write JUnit XML here")]
MarkdownOpt = Annotated[
    Path | None, typer.Option("--markdown", help="also write the Markdown summary (and its PNGs) here")
]
CalibOpt = Annotated[
    list[Path] | None,
    typer.Option("--calib", help="int8: calibration photos, file or folder (default images/calib)"),
]
MethodOpt = Annotated[str, typer.Option("--method", help="int8 calibration: kl | aciq | minmax")]
TableOpt = Annotated[
    Path | None, typer.Option("--table", help="int8: use this ncnn2table-format table instead of calibrating")
]
KeepFp32Opt = Annotated[
    str | None, typer.Option("--keep-fp32", help="int8: layers (comma-separated) left in fp32")
]


def _recipe(converter, fp16, onnx2ncnn, int8: bool, calib, method, table, keep_fp32):
    """The recipe of the ncnn files; the int8 options only mean something with int8 (else refused)."""
    from .pipeline import Recipe

    given = [f for f, v in (("--calib", calib), ("--table", table), ("--keep-fp32", keep_fp32)) if v]
    if not int8 and (given or method != "kl"):
        raise SpecError(f"{(given or ['--method'])[0]} is for int8 models; add --ncnn-precision int8")
    if table is not None and calib:
        raise SpecError("--table replaces calibration; drop --calib or drop --table")
    keep = tuple(n.strip() for n in (keep_fp32 or "").split(",") if n.strip())
    return Recipe(
        converter=converter, fp16_weights=fp16, onnx2ncnn=onnx2ncnn,
        quantize=method if int8 and table is None else None, calib=tuple(calib or ()), table=table,
        keep_fp32=keep,
    )  # fmt: skip


@command
def run(
    model: ModelArg,
    out: OutOpt = None,
    backends: BackendsOpt = None,
    images: ImagesOpt = None,
    converter: Annotated[
        str | None,
        typer.Option(
            "--converter", help="pnnx | pnnx-onnx | onnx2ncnn (default pnnx; pnnx-onnx for ONNX files)"
        ),
    ] = None,
    onnx2ncnn: Onnx2ncnnOpt = None,
    opset: OpsetOpt = 17,
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
    ncnn_precision: PrecisionOpt = "fp32",
    fp16: Fp16Opt = False,
    precision: Annotated[
        str | None,
        typer.Option(
            "--precision", help="auto: bench every ncnn variant and convert/run the fastest within --budget"
        ),
    ] = None,
    budget: BudgetOpt = None,
    threads: ThreadsOpt = 2,
    save_vis: VisOpt = None,
    report: ReportOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    calib: CalibOpt = None,
    method: MethodOpt = "kl",
    table: TableOpt = None,
    keep_fp32: KeepFp32Opt = None,
) -> None:
    """Export, convert and run MODEL on every backend; exit 1 if any parity check fails. MODEL may be an
    ONNX file (FILE.onnx, or a spec with [onnx]): then ONNX Runtime is the reference."""
    from .foreign import is_onnx_file, onnx_converter, run_onnx, spec_for_file
    from .pipeline import RunOptions
    from .pipeline import run as run_pipeline
    from .report import check_output_files

    check_output_files(report=report, junit=junit, markdown=markdown)
    auto = _auto_budget(precision, budget, ncnn_precision, fp16)
    spec = spec_for_file(Path(model), input_shape) if is_onnx_file(model) else load_spec(model, input_shape)
    if spec.onnx is not None:
        converter, run_pipeline = onnx_converter(converter, onnx2ncnn), run_onnx
    opts = RunOptions(
        out=Path(out or Path("out") / spec.name),
        backends=backends,
        images=images_or_default(images, spec.task),
        recipe=_recipe(
            converter or "pnnx", fp16, onnx2ncnn, ncnn_precision == "int8", calib, method, table, keep_fp32
        ),
        opset=opset,
        weights=weights,
        ncnn_precision=ncnn_precision,
        threads=threads,
        save_vis=save_vis,
        budget=auto,
    )
    _render(run_pipeline(spec, opts), opts.out, report, junit, markdown)


def _auto_budget(precision: str | None, budget: str | None, ncnn_precision: str, fp16: bool) -> str | None:
    """--precision auto --budget B -> B (the run benches and picks a variant); anything else: None.
    The variant it picks sets the ncnn precision and the weights, so naming those too is a conflict."""
    if precision is None:
        if budget is not None:
            raise SpecError("--budget is used by --precision auto; add --precision auto or drop --budget")
        return None
    if precision != "auto":
        raise SpecError(
            f"--precision takes only 'auto' (got {precision!r}); use --ncnn-precision for a fixed mode"
        )
    if budget is None:
        raise SpecError('--precision auto needs --budget, e.g. --budget "top1=1.0,rel=1e-2"')
    if ncnn_precision != "fp32" or fp16:
        given = "--fp16" if fp16 else f"--ncnn-precision {ncnn_precision}"
        raise SpecError(
            f"--precision auto chooses the precision itself; drop {given} or drop --precision auto"
        )
    return budget


@command
def quantize(
    model: ModelArg,
    out: OutOpt = None,
    calib: CalibOpt = None,
    method: MethodOpt = "kl",
    table: TableOpt = None,
    keep_fp32: KeepFp32Opt = None,
    backends: Annotated[
        str | None,
        typer.Option("--backends", help="backends that check the int8 model (default torch,ncnn-cpu)"),
    ] = None,
    images: ImagesOpt = None,
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    report: ReportOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
    explain: Annotated[
        bool,
        typer.Option(
            "--explain",
            help="rank the int8 layers by how much each alone degrades the output, and show the error "
            "growth blob by blob (sensitivity.json, ## int8 sensitivity in the Markdown, sensitivity.png)",
        ),
    ] = False,
    auto_mixed: Annotated[
        str | None,
        typer.Option(
            "--auto-mixed",
            help="keep the most sensitive layers fp32 until the int8 model meets this budget against torch, "
            'e.g. "top1=1.0,cosine=0.999" (implies --explain)',
        ),
    ] = None,
) -> None:
    """Calibrate and write MODEL's int8 ncnn model (model.int8.param/.bin, model.table in ncnn2table's
    format), then check it against torch; exit 1 if a parity check fails. Same as
    `run --ncnn-precision int8` with the int8 backends only."""
    from .pipeline import RunOptions
    from .pipeline import run as run_pipeline
    from .report import check_output_files
    from .sensitivity import ExplainOptions

    check_output_files(report=report, junit=junit, markdown=markdown)
    explained = ExplainOptions(auto_mixed) if explain or auto_mixed is not None else None
    spec = load_spec(model, input_shape)
    opts = RunOptions(
        out=Path(out or Path("out") / spec.name),
        backends=backends or "torch,ncnn-cpu",
        images=images_or_default(images, spec.task),
        recipe=_recipe("pnnx", False, None, True, calib, method, table, keep_fp32),
        weights=weights,
        ncnn_precision="int8",
        threads=threads,
    )
    section = None
    if explained is None:
        result = run_pipeline(spec, opts)
    else:
        from .sensitivity import explain_quantize, markdown_section, render_sensitivity

        result, sens = explain_quantize(spec, opts, explained)
        render_sensitivity(sens, console)
        section = functools.partial(markdown_section, sens)
    layers = result.artifacts.get("int8_layers") or []
    console.print(f"quantized {len(layers)} layers; table {result.artifacts.get('int8_table')}")
    _render(result, opts.out, report, junit, markdown, section=section)


@command
def parity(
    target: Annotated[
        Path, typer.Argument(help="a `run` --out folder, a .param (with its .bin), or an .onnx")
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", help="spec the artifacts came from (default: the folder's report.json)"),
    ] = None,
    backends: BackendsOpt = None,
    images: ImagesOpt = None,
    inputs: Annotated[Path | None, typer.Option("--inputs", help="FILE.npz with the input tensor")] = None,
    golden: Annotated[
        Path | None, typer.Option("--golden", help="compare against this golden FILE.npz")
    ] = None,
    save_golden: Annotated[
        Path | None, typer.Option("--save-golden", help="store inputs and reference outputs in FILE.npz")
    ] = None,
    reference: Annotated[str | None, typer.Option("--reference", help="backend to compare against")] = None,
    layerwise: Annotated[
        bool, typer.Option("--layerwise", help="compare every blob and name the first layer that diverges")
    ] = False,
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
    ncnn_precision: Annotated[
        str | None,
        typer.Option("--ncnn-precision", help="fp32, fp16 or bf16; an int8 model runs as int8 (default)"),
    ] = None,
    threads: ThreadsOpt = 2,
    save_vis: VisOpt = None,
    report: ReportOpt = None,
    junit: JunitOpt = None,
    markdown: MarkdownOpt = None,
) -> None:
    """Compare backends on artifacts that already exist (nothing is exported or converted)."""
    from .parity import ParityOptions, run_parity
    from .report import check_output_files

    check_output_files(report=report, junit=junit, markdown=markdown, save_golden=save_golden)
    opts = ParityOptions(
        backends=backends,
        images=tuple(images or ()),
        weights=weights,
        ncnn_precision=ncnn_precision,
        threads=threads,
        model=model,
        input_shape=input_shape,
        inputs_npz=inputs,
        golden=golden,
        save_golden=save_golden,
        reference=reference,
        layerwise=layerwise,
        save_vis=save_vis,
    )
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
        first = failed[0]
        more = f" (and {len(failed) - 1} more backend(s), see the report)" if len(failed) > 1 else ""
        _fail(BackendError(f"{first.error}{more}; the other backends' results are in the report"))
    raise typer.Exit(0 if result.passed else 1)


@command
def bench(
    model: ModelArg,
    out: Annotated[Path | None, typer.Option("--out", help="folder (default: out/MODEL/bench)")] = None,
    runs: Annotated[int, typer.Option("--runs", help="timed runs per backend")] = 20,
    warmup: Annotated[int, typer.Option("--warmup", help="untimed runs first")] = 3,
    threads: Annotated[str, typer.Option("--threads", help="thread counts, e.g. 1,2")] = "2",
    backends: Annotated[
        str | None,
        typer.Option("--backends", help="default: every backend that bench times (see doctor)"),
    ] = None,
    images: ImagesOpt = None,
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
    budget: BudgetOpt = None,
    retries: Annotated[int, typer.Option("--retries", help="re-measure noisy rows up to N times")] = 0,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help="also search ncnn's runtime options (Winograd, sgemm, packing, ...) of the fp32 and int8 "
            "variants; the fastest set within --budget goes into meta.json as ncnn_options",
        ),
    ] = False,
    keep_fp32: Annotated[
        str | None,
        typer.Option(
            "--keep-fp32",
            help="also time int8 with these layers kept fp32 (row ncnn-cpu/int8-mixed), e.g. the list "
            "`quantize --auto-mixed` prints",
        ),
    ] = None,
) -> None:
    """Latency (median, p90, min) per backend and per ncnn precision variant, with parity for each, and
    the fastest variant within the accuracy budget."""
    from .bench import BenchOptions, bench_model, render_bench

    spec = load_spec(model, input_shape)
    opts = BenchOptions(
        out=Path(out or Path("out") / spec.name / "bench"),
        runs=runs,
        warmup=warmup,
        threads=_thread_counts(threads),
        backends=backends,
        images=images_or_default(images, spec.task),
        weights=weights,
        budget=budget,
        retries=retries,
        tune=tune,
        keep_fp32=tuple(n.strip() for n in (keep_fp32 or "").split(",") if n.strip()),
    )
    result = bench_model(spec, opts)
    render_bench(result, console)
    console.print(f"  wrote {opts.out / 'bench.json'}")
    if budget is not None and result.budget_fits is False:
        raise typer.Exit(1)


def _thread_counts(text: str) -> tuple[int, ...]:
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        counts = ()
    if not counts or any(c < 1 for c in counts):
        raise SpecError(f"malformed --threads {text!r}: expected positive integers like 1,2")
    return counts


@command
def bundle(
    model: ModelArg,
    out: Annotated[
        Path, typer.Option("--out", help="the bundle folder: a new or empty one, or an earlier bundle")
    ],
    work: Annotated[Path | None, typer.Option("--work", help="run folder (default: out/MODEL)")] = None,
    images: ImagesOpt = None,
    converter: ConverterOpt = "pnnx",
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    ncnn_precision: Annotated[
        str,
        typer.Option("--ncnn-precision", help="fp32 (default) or int8: the model the board gets"),
    ] = "fp32",
    calib: CalibOpt = None,
    method: MethodOpt = "kl",
    table: TableOpt = None,
    keep_fp32: KeepFp32Opt = None,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="also write into a non-empty folder that is not a deploytool bundle: the bundle's files "
            "are added to it, files of the same name replaced, nothing else in it deleted",
        ),
    ] = False,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            help="x86_64 (default: sources, built on the board) or aarch64 (also the cross-built runner, "
            "checked under qemu-aarch64)",
        ),
    ] = "x86_64",
) -> None:
    """Convert MODEL, check parity (torch, ncnn-cpu, the C++ runner when libncnn is built, and with
    --target aarch64 the cross-built runner under qemu), and write the folder that goes onto the board;
    nothing is written if parity fails. --out must be a new or empty folder or an earlier bundle
    (replaced; files you added to it are kept); the folder is checked before any work."""
    from .bundle import make_bundle
    from .pipeline import RunOptions
    from .report import console_summary

    if ncnn_precision not in ("fp32", "int8"):
        raise SpecError(
            f"bundle --ncnn-precision takes fp32 or int8 (got {ncnn_precision!r}): fp16/bf16 are runtime "
            "settings of the board's ncnn, not files"
        )
    spec = load_spec(model, input_shape)
    opts = RunOptions(
        out=Path(work or Path("out") / spec.name),
        images=images_or_default(images, spec.task),
        recipe=_recipe(converter, False, None, ncnn_precision == "int8", calib, method, table, keep_fp32),
        weights=weights,
        threads=threads,
        ncnn_precision=ncnn_precision,
    )
    result, path = make_bundle(spec, opts, out, force=force, target=target)
    console_summary(result, console)
    if path is None:
        err_console.print(
            f"[red]error:[/] parity failed; no bundle written (details: {opts.out / 'report.json'})"
        )
        raise typer.Exit(1)
    console.print(f"wrote bundle {path}: see {path / 'README.md'} to build and run it on the board")


@command
def deploy(
    bundle_dir: Annotated[Path, typer.Argument(metavar="BUNDLE", help="a folder `deploytool bundle` wrote")],
    to: Annotated[
        str,
        typer.Option(
            "--to",
            metavar="[USER@]HOST[:PORT]:DIR",
            help="the board and the folder there (relative: to the home folder); HOST may be an alias "
            "from your ssh config",
        ),
    ],
    build: Annotated[
        str,
        typer.Option(
            "--build",
            help="auto (the bundle's cross-built runner when it has one for the board's CPU, else native), "
            "cross, or native (cmake on the board against --ncnn-dir)",
        ),
    ] = "auto",
    ncnn_dir: Annotated[
        str | None,
        typer.Option("--ncnn-dir", help="native builds: ncnn_DIR on the board (libncnn's lib/cmake/ncnn)"),
    ] = None,
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
    models: Annotated[
        list[str] | None,
        typer.Argument(help="models to run (default: every spec in models/); `merge REPORT…` joins shards"),
    ] = None,
    backends: BackendsOpt = None,
    precisions: Annotated[
        str, typer.Option("--precisions", help="comma-separated ncnn precisions: fp32,fp16,bf16,int8")
    ] = "fp32",
    jobs: Annotated[
        int | None, typer.Option("--jobs", help="worker processes (default: the number of cores)")
    ] = None,
    shard: Annotated[
        str | None, typer.Option("--shard", help="I/N: run only the I-th of N deterministic slices")
    ] = None,
    out: Annotated[Path, typer.Option("--out", help="folder for matrix.json, matrix.md, junit.xml")] = Path(
        "out/matrix"
    ),
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="redo every export, conversion and inference")
    ] = False,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="the stage cache folder (default: ~/.cache/deploytool/stages)"),
    ] = None,
) -> None:
    """Run model × backend × precision and write one table (matrix.md), matrix.json and junit.xml; exit 1
    when a cell fails, 3 when a job could not run. Export, conversion and outputs are cached (keyed by
    what decides them) under the deploytool cache, so an unchanged rerun only re-judges.
    `deploytool matrix merge A/matrix.json B/matrix.json --out DIR` joins shards into one report."""
    import os

    from .matrix import MatrixOptions, merge, parse_shard, run_matrix
    from .targets.build import cache_root

    names = list(models or [])
    if names[:1] == ["merge"]:
        result = merge([Path(n) for n in names[1:]], out)
    else:
        opts = MatrixOptions(
            models=tuple(names), backends=backends,
            precisions=tuple(p.strip() for p in precisions.split(",") if p.strip()),
            jobs=jobs if jobs is not None else (os.cpu_count() or 1), shard=parse_shard(shard), out=out,
            cache=None if no_cache else (cache or cache_root() / "stages"),
        )  # fmt: skip
        result = run_matrix(opts)
    from .matrix import markdown

    console.print(markdown(result), highlight=False, markup=False)
    console.print(f"wrote {out / 'matrix.md'}, {out / 'matrix.json'}, {out / 'junit.xml'}")
    raise typer.Exit(result.exit_code)


@command
def export(
    model: ModelArg,
    out: OutOpt = None,
    formats: Annotated[str, typer.Option("--formats", help="torchscript,onnx")] = "torchscript,onnx",
    opset: OpsetOpt = 17,
    input_shape: ShapeOpt = None,
    weights: WeightsOpt = None,
) -> None:
    """Export MODEL to TorchScript and/or ONNX."""
    from .pipeline import export

    spec = load_spec(model, input_shape)
    paths = export(spec, Path(out or Path("out") / spec.name), formats, opset, weights)
    for path in paths:
        console.print(f"wrote {path}")


@command
def convert(
    file: Annotated[Path, typer.Argument(help="model.pt (TorchScript) or model.onnx")],
    converter: Annotated[
        str | None,
        typer.Option("--converter", help="pnnx | pnnx-onnx | onnx2ncnn (default: from the file's suffix)"),
    ] = None,
    input_shape: ShapeOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="output folder (default: beside FILE)")] = None,
    onnx2ncnn: Onnx2ncnnOpt = None,
    fp16: Fp16Opt = False,
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
        source = spec.factory or spec.onnx  # a PyTorch factory, or the ONNX file a spec names
        console.print(f"{name:12} {spec.task:9} {','.join(map(str, spec.input_shape)):14} {source}")


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="print the version and exit")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines on stderr")] = False,
) -> None:
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

    from .atomic import interrupts_raise

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
