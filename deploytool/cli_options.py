"""Every command-line argument and option of cli.py, declared once. Options that several commands share
mean the same in each; where a command's differs (its own default, what it accepts), it has its own
name here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import quantize_backends
from .registry import NCNN_PRECISIONS, default_backends

ModelArg = Annotated[
    str, typer.Argument(help="name in models/ (resnet18), a .toml spec, or pkg.module:factory")
]

# --out: the run folder, or what the command writes
OutOpt = Annotated[Path | None, typer.Option("--out", help="artifact folder (default: out/MODEL)")]
BenchOutOpt = Annotated[Path | None, typer.Option("--out", help="folder (default: out/MODEL/bench)")]
BundleOutOpt = Annotated[
    Path, typer.Option("--out", help="the bundle folder: a new or empty one, or an earlier bundle")
]
MatrixOutOpt = Annotated[Path, typer.Option("--out", help="folder for matrix.json, matrix.md, junit.xml")]
ConvertOutOpt = Annotated[Path | None, typer.Option("--out", help="output folder (default: beside FILE)")]

# the model and its files
ShapeOpt = Annotated[
    str | None, typer.Option("--input-shape", help="e.g. 1,3,224,224 (required for pkg:factory)")
]
WeightsOpt = Annotated[
    str | None, typer.Option("--weights", help="state_dict checkpoint (loaded weights_only)")
]
OpsetOpt = Annotated[int, typer.Option("--opset", help="ONNX opset")]
ConverterOpt = Annotated[str, typer.Option("--converter", help="pnnx | pnnx-onnx | onnx2ncnn")]
RunConverterOpt = Annotated[
    str | None,
    typer.Option("--converter", help="pnnx | pnnx-onnx | onnx2ncnn (default pnnx; pnnx-onnx for ONNX files)"),
]
FileConverterOpt = Annotated[
    str | None,
    typer.Option("--converter", help="pnnx | pnnx-onnx | onnx2ncnn (default: from the file's suffix)"),
]
Onnx2ncnnOpt = Annotated[str | None, typer.Option("--onnx2ncnn", help="path to an onnx2ncnn binary")]
Fp16Opt = Annotated[bool, typer.Option("--fp16", help="let pnnx write fp16 weights (default fp32)")]

# which backends, how they run
BackendsOpt = Annotated[
    str | None,
    typer.Option("--backends", help=f"comma-separated; default {','.join(default_backends())}"),
]
QuantizeBackendsOpt = Annotated[
    str | None,
    typer.Option("--backends", help=f"backends that check the int8 model (default {quantize_backends()})"),
]
BenchBackendsOpt = Annotated[
    str | None, typer.Option("--backends", help="default: every backend that bench times (see doctor)")
]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="CPU threads for every backend")]
ThreadCountsOpt = Annotated[str, typer.Option("--threads", help="thread counts, e.g. 1,2")]
ImagesOpt = Annotated[list[Path] | None, typer.Option("--images", help="image file or folder (repeatable)")]

# --ncnn-precision: every value of registry.NCNN_PRECISIONS in run; see options.py for the others
PrecisionOpt = Annotated[
    str, typer.Option("--ncnn-precision", help="fp32 (parity), fp16 (ncnn's fast defaults) or bf16")
]
ParityPrecisionOpt = Annotated[
    str | None,
    typer.Option("--ncnn-precision", help="fp32, fp16 or bf16; an int8 model runs as int8 (default)"),
]
BundlePrecisionOpt = Annotated[
    str, typer.Option("--ncnn-precision", help="fp32 (default) or int8: the model the board gets")
]
AutoOpt = Annotated[
    str | None,
    typer.Option(
        "--precision", help="auto: bench every ncnn variant and convert/run the fastest within --budget"
    ),
]
BudgetOpt = Annotated[
    str | None,
    typer.Option("--budget", help='accuracy budget, e.g. "top1=1.0,rel=1e-2" (det=1.0 for detectors)'),
]

# int8
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
BenchKeepFp32Opt = Annotated[
    str | None,
    typer.Option(
        "--keep-fp32",
        help="also time int8 with these layers kept fp32 (row ncnn-cpu/int8-mixed), e.g. the list "
        "`quantize --auto-mixed` prints",
    ),
]
ExplainOpt = Annotated[
    bool,
    typer.Option(
        "--explain",
        help="rank the int8 layers by how much each alone degrades the output, and show the error "
        "growth blob by blob (sensitivity.json, ## int8 sensitivity in the Markdown, sensitivity.png)",
    ),
]
AutoMixedOpt = Annotated[
    str | None,
    typer.Option(
        "--auto-mixed",
        help="keep the most sensitive layers fp32 until the int8 model meets this budget against torch, "
        'e.g. "top1=1.0,cosine=0.999" (implies --explain)',
    ),
]

# what is written
VisOpt = Annotated[
    Path | None, typer.Option("--save-vis", help="detectors: draw each backend's boxes on the photos in DIR")
]
ReportOpt = Annotated[Path | None, typer.Option("--report", help="also write report.json here")]
JunitOpt = Annotated[Path | None, typer.Option("--junit", help="write JUnit XML here")]
MarkdownOpt = Annotated[
    Path | None, typer.Option("--markdown", help="also write the Markdown summary (and its PNGs) here")
]

# parity
ParityTargetArg = Annotated[
    Path, typer.Argument(help="a `run` --out folder, a .param (with its .bin), or an .onnx")
]
ParityModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="spec the artifacts came from (default: the folder's report.json)"),
]
InputsOpt = Annotated[Path | None, typer.Option("--inputs", help="FILE.npz with the input tensor")]
GoldenOpt = Annotated[Path | None, typer.Option("--golden", help="compare against this golden FILE.npz")]
SaveGoldenOpt = Annotated[
    Path | None, typer.Option("--save-golden", help="store inputs and reference outputs in FILE.npz")
]
ReferenceOpt = Annotated[str | None, typer.Option("--reference", help="backend to compare against")]
LayerwiseOpt = Annotated[
    bool, typer.Option("--layerwise", help="compare every blob and name the first layer that diverges")
]

# bench
RunsOpt = Annotated[int, typer.Option("--runs", help="timed runs per backend")]
WarmupOpt = Annotated[int, typer.Option("--warmup", help="untimed runs first")]
RetriesOpt = Annotated[int, typer.Option("--retries", help="re-measure noisy rows up to N times")]
TuneOpt = Annotated[
    bool,
    typer.Option(
        "--tune",
        help="also search ncnn's runtime options (Winograd, sgemm, packing, ...) of the fp32 and int8 "
        "variants; the fastest set within --budget goes into meta.json as ncnn_options",
    ),
]

# bundle and deploy
WorkOpt = Annotated[Path | None, typer.Option("--work", help="run folder (default: out/MODEL)")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force",
        help="also write into a non-empty folder that is not a deploytool bundle: the bundle's files "
        "are added to it, files of the same name replaced, nothing else in it deleted",
    ),
]
TargetOpt = Annotated[
    str,
    typer.Option(
        "--target",
        help="x86_64 (default: sources, built on the board) or aarch64 (also the cross-built runner, "
        "checked under qemu-aarch64)",
    ),
]
BundleArg = Annotated[Path, typer.Argument(metavar="BUNDLE", help="a folder `deploytool bundle` wrote")]
ToOpt = Annotated[
    str,
    typer.Option(
        "--to",
        metavar="[USER@]HOST[:PORT]:DIR",
        help="the board and the folder there (relative: to the home folder); HOST may be an alias "
        "from your ssh config",
    ),
]
BuildOpt = Annotated[
    str,
    typer.Option(
        "--build",
        help="auto (the bundle's cross-built runner when it has one for the board's CPU, else native), "
        "cross, or native (cmake on the board against --ncnn-dir)",
    ),
]
NcnnDirOpt = Annotated[
    str | None,
    typer.Option("--ncnn-dir", help="native builds: ncnn_DIR on the board (libncnn's lib/cmake/ncnn)"),
]

# matrix
ModelsArg = Annotated[
    list[str] | None,
    typer.Argument(help="models to run (default: every spec in models/); `merge REPORT…` joins shards"),
]
PrecisionsOpt = Annotated[
    str, typer.Option("--precisions", help=f"comma-separated ncnn precisions: {','.join(NCNN_PRECISIONS)}")
]
JobsOpt = Annotated[
    int | None, typer.Option("--jobs", help="worker processes (default: the number of cores)")
]
ShardOpt = Annotated[
    str | None, typer.Option("--shard", help="I/N: run only the I-th of N deterministic slices")
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="redo every export, conversion and inference")]
CacheOpt = Annotated[
    Path | None,
    typer.Option("--cache", help="the stage cache folder (default: ~/.cache/deploytool/stages)"),
]

# export
FormatsOpt = Annotated[str, typer.Option("--formats", help="torchscript,onnx")]
FileArg = Annotated[Path, typer.Argument(help="model.pt (TorchScript) or model.onnx")]

# the app itself
VersionOpt = Annotated[bool, typer.Option("--version", help="print the version and exit")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress lines on stderr")]
