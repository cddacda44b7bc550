"""Convert TorchScript or ONNX to ncnn .param/.bin with pnnx or onnx2ncnn; logs kept beside the artifacts."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import temp_path_for
from .errors import BackendUnavailable, ConvertError, SpecError
from .ncnn_param import read_param
from .progress import step
from .tools import run_tool

CONVERTERS = ("pnnx", "pnnx-onnx", "onnx2ncnn")
TOOL_TIMEOUT_S = 1800  # a converter that runs for 30 minutes is hung


@dataclass
class Converted:
    """The ncnn files a converter produced and what it said."""

    param: Path
    bin: Path
    converter: str
    log: Path
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    dynamic: bool = False


def find_pnnx() -> str | None:
    """The pnnx binary the pnnx package ships (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "pnnx"
    if beside.is_file():
        return str(beside)
    return shutil.which("pnnx")


def find_onnx2ncnn(explicit: str | None = None) -> str | None:
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("onnx2ncnn")


def shape_arg(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]f32"


def _command(
    converter: str,
    source: Path,
    out_dir: Path,
    tmp_param: Path,
    tmp_bin: Path,
    input_shape: tuple[int, ...],
    input_shape2: tuple[int, ...] | None,
    fp16_weights: bool,
    moduleop: list[str] | None,
    onnx2ncnn: str | None,
) -> tuple[list[str], Path]:
    """The converter's command line and the folder it runs in."""
    if converter == "onnx2ncnn":
        tool = find_onnx2ncnn(onnx2ncnn)
        if tool is None:
            where = f"{onnx2ncnn} does not exist" if onnx2ncnn else "no onnx2ncnn on PATH"
            raise BackendUnavailable(
                f"converter onnx2ncnn is unavailable: {where} (ncnn no longer builds it by default); "
                "pass --onnx2ncnn PATH or use --converter pnnx-onnx"
            )
        return [tool, str(source.resolve()), str(tmp_param.resolve()), str(tmp_bin.resolve())], out_dir
    tool = find_pnnx()
    if tool is None:
        raise BackendUnavailable("pnnx is not installed; pip install pnnx")
    work = out_dir / "pnnx"
    work.mkdir(exist_ok=True)
    stem = work.resolve() / "model"
    cmd = [
        tool,
        str(source.resolve()),
        f"inputshape={shape_arg(input_shape)}",
        f"fp16={int(fp16_weights)}",
        f"ncnnparam={tmp_param.resolve()}",
        f"ncnnbin={tmp_bin.resolve()}",
        f"pnnxparam={stem}.pnnx.param",
        f"pnnxbin={stem}.pnnx.bin",
        f"pnnxpy={stem}_pnnx.py",
        f"pnnxonnx={stem}.pnnx.onnx",
        f"ncnnpy={stem}_ncnn.py",
    ]
    if input_shape2 is not None:
        cmd.append(f"inputshape2={shape_arg(input_shape2)}")
    if moduleop:
        cmd.append("moduleop=" + ",".join(moduleop))
    return cmd, work


def _finish(tmp_param: Path, tmp_bin: Path, param: Path, bin_: Path, stage: str, log: Path) -> None:
    for tmp in (tmp_param, tmp_bin):
        if not tmp.is_file():
            raise ConvertError(f"{stage} reported success but wrote no {tmp.suffix} file; log: {log}")
    read_param(tmp_param)  # a converter writing a broken .param is a tool failure, caught here
    os.replace(tmp_bin, bin_)
    os.replace(tmp_param, param)


def convert(
    source: Path,
    out_dir: Path,
    converter: str = "pnnx",
    input_shape: tuple[int, ...] = (1, 3, 224, 224),
    input_shape2: tuple[int, ...] | None = None,
    fp16_weights: bool = False,
    moduleop: list[str] | None = None,
    onnx2ncnn: str | None = None,
) -> Converted:
    """Convert `source` (.pt for pnnx, .onnx for pnnx-onnx/onnx2ncnn) into out_dir/model.ncnn.{param,bin}."""
    if converter not in CONVERTERS:
        raise SpecError(f"unknown converter {converter!r}; choose one of {', '.join(CONVERTERS)}")
    source = Path(source)
    if not source.is_file():
        raise SpecError(f"{source} does not exist; export the model first or pass an existing file")
    out_dir.mkdir(parents=True, exist_ok=True)
    param, bin_ = out_dir / "model.ncnn.param", out_dir / "model.ncnn.bin"
    tmp_param, tmp_bin = temp_path_for(param), temp_path_for(bin_)
    log = out_dir / "logs" / f"{converter}.log"
    stage = f"convert ({converter})"
    with step(stage):
        try:
            cmd, cwd = _command(
                converter,
                source,
                out_dir,
                tmp_param,
                tmp_bin,
                input_shape,
                input_shape2,
                fp16_weights,
                moduleop,
                onnx2ncnn,
            )
            run_tool(cmd, log, stage, cwd=cwd, timeout=TOOL_TIMEOUT_S, error=ConvertError)
            _finish(tmp_param, tmp_bin, param, bin_, stage, log)
        finally:
            for tmp in (tmp_param, tmp_bin):
                if tmp.exists():
                    tmp.unlink()
    graph = read_param(param)
    return Converted(
        param, bin_, converter, log, graph.input_names, graph.output_names, input_shape2 is not None
    )


def convert_file(
    file: Path,
    converter: str | None = None,
    input_shape: str | None = None,
    out: Path | None = None,
    *,
    fp16_weights: bool = False,
    onnx2ncnn: str | None = None,
) -> Converted:
    """`deploytool convert`: `file` (.pt or .onnx) to ncnn in `out` (default: beside the file).

    The converter defaults to pnnx for .pt and pnnx-onnx otherwise; pnnx needs `input_shape`
    ("1,3,224,224"), onnx2ncnn does not."""
    from .spec import parse_shape

    file = Path(file)
    if not file.is_file():
        raise SpecError(f"{file} does not exist")
    if converter is None:
        converter = "pnnx" if file.suffix == ".pt" else "pnnx-onnx"
    if converter.startswith("pnnx") and input_shape is None:
        raise SpecError("pnnx needs the input shape: pass --input-shape 1,3,224,224")
    shape = parse_shape(input_shape) if input_shape else (1, 3, 224, 224)
    return convert(
        file,
        Path(out) if out else file.parent,
        converter,
        shape,
        fp16_weights=fp16_weights,
        onnx2ncnn=onnx2ncnn,
    )


def pnnx_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pnnx")
    except PackageNotFoundError:
        return None
