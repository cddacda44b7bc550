"""What a command asks for, checked when it is made: the Recipe of the ncnn files, the RunOptions of
run, quantize, bundle and parity, and the rules that tie command-line flags together."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from . import judge
from .convert import check_converter, check_onnx2ncnn
from .errors import SpecError, did_you_mean
from .export import DEFAULT_OPSET, check_opset
from .inputs import calibration_images, collect_images
from .quantize.calibrate import METHODS
from .quantize.table import read_table
from .registry import BACKENDS, NCNN_PRECISIONS, REFERENCE, is_int8

DEFAULT_METHOD = METHODS[0]
# fp16 and bf16 are modes ncnn runs fp32 files in; the other precisions are files (what a bundle ships)
RUNTIME_PRECISIONS = ("fp16", "bf16")
FILE_PRECISIONS = tuple(p for p in NCNN_PRECISIONS if p not in RUNTIME_PRECISIONS)


def names(text: str | None) -> tuple[str, ...]:
    """'a, b,,c' -> ('a', 'b', 'c'): a comma-separated list of names (layers, backends)."""
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


@dataclass(frozen=True)
class Recipe:
    """How the ncnn files are made: the converter, the weights' precision, and int8 quantization
    (calibrated with `quantize` = kl | aciq | minmax on the `calib` photos, or from a `table`)."""

    converter: str = "pnnx"
    fp16_weights: bool = False
    onnx2ncnn: str | None = None  # the user's onnx2ncnn binary
    quantize: str | None = None  # calibration method; None: no int8
    calib: tuple[Path, ...] = ()  # calibration photos (default images/calib)
    table: Path | None = None  # an ncnn2table-format table to use instead of calibrating
    keep_fp32: tuple[str, ...] = ()  # layers left in fp32 (mixed precision)

    @property
    def int8(self) -> bool:
        return self.quantize is not None or self.table is not None

    @classmethod
    def from_flags(
        cls, converter: str = "pnnx", fp16: bool = False, onnx2ncnn: str | None = None, int8: bool = False,
        calib: list[Path] | None = None, method: str = DEFAULT_METHOD, table: Path | None = None,
        keep_fp32: str | None = None,
    ) -> Recipe:  # fmt: skip
        """The recipe the command line asks for; the int8 flags only mean something with int8 (else
        refused)."""
        given = [f for f, v in (("--calib", calib), ("--table", table), ("--keep-fp32", keep_fp32)) if v]
        if not int8 and (given or method != DEFAULT_METHOD):
            raise SpecError(f"{(given or ['--method'])[0]} is for int8 models; add --ncnn-precision int8")
        if table is not None and calib:
            raise SpecError("--table replaces calibration; drop --calib or drop --table")
        return cls(
            converter=converter, fp16_weights=fp16, onnx2ncnn=onnx2ncnn,
            quantize=method if int8 and table is None else None, calib=tuple(calib or ()), table=table,
            keep_fp32=names(keep_fp32),
        )  # fmt: skip


@dataclass(frozen=True)
class RunOptions:
    """Everything `deploytool run` takes besides the model; not changed after parsing."""

    out: Path
    backends: str | None = None  # None: the default set, unavailable ones reported and skipped
    images: tuple[Path, ...] = ()
    recipe: Recipe = field(default_factory=Recipe)
    opset: int = DEFAULT_OPSET
    weights: str | None = None
    ncnn_precision: str = "fp32"
    threads: int = 2
    save_vis: Path | None = None  # detectors: draw every backend's boxes on each photo here
    budget: str | None = None  # set: --precision auto, bench the variants and run the fastest within it
    int8_model: bool = False  # the ncnn files are int8 already (parity on a quantized model): no recipe
    cache: Path | None = None  # stage cache folder (deploytool.cache): reuse export/convert/outputs

    def __post_init__(self) -> None:
        """Every option checked when it is made, before any work."""
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        check_converter(self.recipe.converter)
        if self.recipe.converter == "onnx2ncnn" and self.recipe.onnx2ncnn is not None:
            check_onnx2ncnn(self.recipe.onnx2ncnn)
        check_opset(self.opset)
        _choice(self.ncnn_precision, NCNN_PRECISIONS, "--ncnn-precision")
        if (self.recipe.int8 or self.int8_model) != is_int8(self.ncnn_precision):
            raise SpecError("an int8 model runs at --ncnn-precision int8, and int8 needs a quantized model")
        if self.recipe.int8:
            if self.recipe.table is not None:
                read_table(self.recipe.table)  # a malformed table is refused before any work
            else:
                _choice(self.recipe.quantize, METHODS, "--method")
                collect_images(list(self.recipe.calib or calibration_images()))
            if self.recipe.fp16_weights:
                raise SpecError("--fp16 and int8 are two different weight formats; choose one")
        if self.threads < 1:
            raise SpecError(f"--threads must be at least 1, got {self.threads}")
        if self.budget is not None:
            judge.parse_budget(self.budget)


def _choice(value: str, choices: tuple[str, ...], flag: str) -> None:
    if value not in choices:
        hint = did_you_mean(value, choices)
        raise SpecError(f"unknown {flag} {value!r}; {hint}choose one of {', '.join(choices)}")


def auto_budget(precision: str | None, budget: str | None, ncnn_precision: str, fp16: bool) -> str | None:
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


def check_bundle_precision(precision: str) -> None:
    """A bundle ships model files: fp32 or int8 (fp16/bf16 are settings of the board's ncnn)."""
    if precision not in FILE_PRECISIONS:
        raise SpecError(
            f"bundle --ncnn-precision takes {' or '.join(FILE_PRECISIONS)} (got {precision!r}): "
            f"{'/'.join(RUNTIME_PRECISIONS)} are runtime settings of the board's ncnn, not files"
        )


def quantize_backends() -> str:
    """quantize's default --backends: the reference and the first default backend that runs int8."""
    first = next(b.name for b in BACKENDS.values() if b.default and "int8" in b.precisions)
    return f"{REFERENCE},{first}"


def thread_counts(text: str) -> tuple[int, ...]:
    """bench's --threads '1,2' -> (1, 2)."""
    try:
        counts = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        counts = ()
    if not counts or any(c < 1 for c in counts):
        raise SpecError(f"malformed --threads {text!r}: expected positive integers like 1,2")
    return counts
