"""Convert TorchScript or ONNX to ncnn .param/.bin with pnnx or onnx2ncnn; logs kept beside the artifacts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .atomic import temp_path_for
from .errors import BackendUnavailable, ConvertError, SpecError
from .ncnn_param import read_param

CONVERTERS = ("pnnx", "pnnx-onnx", "onnx2ncnn")


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


def _run_tool(cmd: list[str], log: Path, cwd: Path, stage: str) -> None:
    """Run an external tool, keep its output in `log`, raise ConvertError on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        try:
            proc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, timeout=1800)
        except OSError as exc:
            raise ConvertError(f"{stage}: could not start {cmd[0]}: {exc}") from exc
        except subprocess.TimeoutExpired:
            raise ConvertError(f"{stage}: {cmd[0]} timed out after 30 minutes; log: {log}") from None
    if proc.returncode != 0:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:]
        hint = f" (last line: {tail[0].strip()[:200]})" if tail else ""
        raise ConvertError(
            f"{stage}: {Path(cmd[0]).name} exited with code {proc.returncode}{hint}; log: {log}"
        )


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
    try:
        if converter == "onnx2ncnn":
            tool = find_onnx2ncnn(onnx2ncnn)
            if tool is None:
                where = f"{onnx2ncnn} does not exist" if onnx2ncnn else "no onnx2ncnn on PATH"
                raise BackendUnavailable(
                    f"converter onnx2ncnn is unavailable: {where} (ncnn no longer builds it by default); "
                    "pass --onnx2ncnn PATH or use --converter pnnx-onnx"
                )
            _run_tool(
                [tool, str(source.resolve()), str(tmp_param.resolve()), str(tmp_bin.resolve())],
                log,
                out_dir,
                "convert (onnx2ncnn)",
            )
        else:
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
            _run_tool(cmd, log, work, f"convert ({converter})")
        _finish(tmp_param, tmp_bin, param, bin_, f"convert ({converter})", log)
    finally:
        for tmp in (tmp_param, tmp_bin):
            if tmp.exists():
                tmp.unlink()
    graph = read_param(param)
    return Converted(
        param, bin_, converter, log, graph.input_names, graph.output_names, input_shape2 is not None
    )


def pnnx_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pnnx")
    except PackageNotFoundError:
        return None
