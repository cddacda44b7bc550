"""Convert TorchScript or ONNX to ncnn .param/.bin with pnnx or onnx2ncnn; logs kept beside the artifacts."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import BackendUnavailable, ConvertError, SpecError, did_you_mean
from .ncnn_param import read_param
from .progress import step
from .tools import run_tool

CONVERTERS = ("pnnx", "pnnx-onnx", "onnx2ncnn")
# The file each converter takes: pnnx converts TorchScript, pnnx-onnx and onnx2ncnn convert ONNX.
CONVERTER_SOURCE = {"pnnx": ".pt", "pnnx-onnx": ".onnx", "onnx2ncnn": ".onnx"}
SOURCE_KINDS = {".pt": "TorchScript", ".onnx": "ONNX"}
TOOL_TIMEOUT_S = 1800  # a converter that runs for 30 minutes is hung
# pnnx's side outputs (its own graph, Python re-creations): kept under out/pnnx/ when the conversion succeeds.
PNNX_SIDE_FILES = {
    "pnnxparam": "model.pnnx.param",
    "pnnxbin": "model.pnnx.bin",
    "pnnxpy": "model_pnnx.py",
    "pnnxonnx": "model.pnnx.onnx",
    "ncnnpy": "model_ncnn.py",
}


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


def check_converter(name: str) -> str:
    """`name` if it is a converter deploytool runs; otherwise the user's error (--converter), with the
    closest name suggested. Cheap: call it before exporting anything."""
    if name not in CONVERTERS:
        hint = did_you_mean(str(name), CONVERTERS)
        raise SpecError(
            f"unknown converter {name!r}; {hint}choose one of {', '.join(CONVERTERS)} (--converter)"
        )
    return name


def find_pnnx() -> str | None:
    """The pnnx binary the pnnx package ships (next to this Python), else one on PATH."""
    beside = Path(sys.executable).parent / "pnnx"
    if beside.is_file():
        return str(beside)
    return shutil.which("pnnx")


def find_onnx2ncnn(explicit: str | None = None) -> str | None:
    """`explicit` if it is an executable file, else None; without it, the onnx2ncnn on PATH (or None)."""
    if explicit:
        path = Path(explicit)
        return explicit if path.is_file() and os.access(path, os.X_OK) else None
    return shutil.which("onnx2ncnn")


def check_onnx2ncnn(explicit: str | None = None) -> str:
    """The onnx2ncnn binary to run: `explicit` (--onnx2ncnn), which must be an executable file (else
    SpecError: a folder, a missing or a non-executable file is the user's error), or the one on PATH
    (BackendUnavailable when there is none)."""
    if explicit:
        path = Path(explicit)
        if path.is_dir():
            inside = path / "onnx2ncnn"
            hint = f" (there is one at {inside})" if inside.is_file() else ""
            raise SpecError(
                f"--onnx2ncnn {explicit} is a folder, not an executable; "
                f"pass the onnx2ncnn binary itself{hint}"
            )
        if not path.exists():
            raise SpecError(
                f"--onnx2ncnn {explicit} does not exist; pass the path of an onnx2ncnn binary "
                "or use --converter pnnx-onnx"
            )
        if not path.is_file() or not os.access(path, os.X_OK):
            raise SpecError(
                f"--onnx2ncnn {explicit} is not an executable file; pass the onnx2ncnn binary "
                "(or make it executable with chmod +x)"
            )
        return os.path.abspath(explicit)  # the converter runs in a scratch folder
    tool = shutil.which("onnx2ncnn")
    if tool is None:
        raise BackendUnavailable(
            "converter onnx2ncnn is unavailable: no onnx2ncnn on PATH (ncnn no longer builds it by default); "
            "pass --onnx2ncnn PATH or use --converter pnnx-onnx"
        )
    return os.path.abspath(tool)


def converter_tool(converter: str, onnx2ncnn: str | None = None) -> str:
    """The binary `converter` runs; raises before any work when it is missing or unusable."""
    check_converter(converter)
    if converter == "onnx2ncnn":
        return check_onnx2ncnn(onnx2ncnn)
    tool = find_pnnx()
    if tool is None:
        raise BackendUnavailable("pnnx is not installed; pip install pnnx")
    return os.path.abspath(tool)


def shape_arg(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]f32"


def _command(
    converter: str,
    tool: str,
    source: str,
    param: str,
    bin_: str,
    input_shape: tuple[int, ...],
    input_shape2: tuple[int, ...] | None,
    fp16_weights: bool,
    moduleop: list[str] | None,
) -> list[str]:
    """The converter's command line; file names are relative to the scratch folder it runs in."""
    if converter == "onnx2ncnn":
        return [tool, source, param, bin_]
    cmd = [
        tool,
        source,
        f"inputshape={shape_arg(input_shape)}",
        f"fp16={int(fp16_weights)}",
        f"ncnnparam={param}",
        f"ncnnbin={bin_}",
        *(f"{key}={name}" for key, name in PNNX_SIDE_FILES.items()),
    ]
    if input_shape2 is not None:
        cmd.append(f"inputshape2={shape_arg(input_shape2)}")
    if moduleop:
        cmd.append("moduleop=" + ",".join(moduleop))
    return cmd


@contextmanager
def _scratch(out_dir: Path) -> Iterator[Path]:
    """A hidden temporary folder inside `out_dir` (so results move out of it by an atomic rename),
    removed with everything in it however the block ends (Ctrl-C included)."""
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _place_source(source: Path, folder: Path) -> str:
    """Make `source` visible as folder/model.<suffix> and return that path relative to folder's parent.
    pnnx writes scratch files beside its input (NAME.foldable_constants.zip, NAME.pnnxsim.onnx), so the
    input it sees must live in the scratch folder, never beside the user's file."""
    folder.mkdir()
    link = folder / f"model{source.suffix.lower()}"
    try:
        link.symlink_to(source.resolve())
    except OSError:  # no symlinks on this filesystem
        shutil.copyfile(source, link)
    return f"{folder.name}/{link.name}"


# What to try when a converter cannot handle an operator.
OTHER_CONVERTER = {
    "pnnx-onnx": "--converter onnx2ncnn (with --onnx2ncnn PATH), or --converter pnnx (from TorchScript) "
    "when you have the PyTorch model",
    "onnx2ncnn": "--converter pnnx-onnx, or --converter pnnx (from TorchScript) when you have the "
    "PyTorch model",
    "pnnx": "--converter pnnx-onnx or --converter onnx2ncnn (from the ONNX export)",
}


def unknown_layers(param: Path) -> list[tuple[str, str]]:
    """(type, name) of each layer in `param` whose type ncnn does not have: what pnnx and onnx2ncnn
    write for an operator they cannot convert (pnnx logs `ignore OP NAME`), which ncnn then refuses."""
    import ncnn

    return [
        (layer.type, layer.name) for layer in read_param(param).layers if ncnn.layer_to_index(layer.type) < 0
    ]


def check_operators(param: Path, converter: str, source: Path, stage: str, log: Path) -> None:
    """ConvertError naming the first operator the converter left unconverted, its node(s) in the
    ONNX graph (found by op type: converters rename layers) and the converter to try instead."""
    unknown = unknown_layers(param)
    if not unknown:
        return
    op, layer = unknown[0]
    where = f"layer {layer!r}"
    if source.suffix.lower() == ".onnx":
        import onnx

        graph = onnx.load(str(source), load_external_data=False).graph
        nodes = [n.name or n.output[0] for n in graph.node if n.op_type == op]
        if nodes:
            shown = ", ".join(repr(n) for n in nodes[:3]) + (
                f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
            )
            where = f"node {shown} (ncnn layer {layer!r})"
    more = f"; {len(unknown) - 1} more unconverted layer(s)" if len(unknown) > 1 else ""
    raise ConvertError(
        f"{stage}: {converter} cannot convert operator {op} at {where}: it wrote a layer type ncnn does "
        f"not have{more}; try {OTHER_CONVERTER[converter]}; log: {log}"
    )


def _finish(
    work: Path, param: Path, bin_: Path, converter: str, tool: str, stage: str, log: Path, source: Path
) -> None:
    """Check what the converter wrote into `work` and move it into place (the .param last)."""
    made_param, made_bin = work / param.name, work / bin_.name
    missing = [p.suffix for p in (made_param, made_bin) if not p.is_file()]
    if missing:
        hint = ", so it is probably not onnx2ncnn (check --onnx2ncnn)" if converter == "onnx2ncnn" else ""
        raise ConvertError(
            f"{stage}: {tool} exited with code 0 but wrote no {'/'.join(missing)} file{hint}; log: {log}"
        )
    try:
        read_param(made_param)
    except SpecError as exc:  # a converter writing a broken .param is a tool failure
        raise ConvertError(f"{stage} wrote a .param that ncnn cannot read ({exc}); log: {log}") from None
    check_operators(made_param, converter, source, stage, log)
    if converter != "onnx2ncnn":
        side = param.parent / "pnnx"
        side.mkdir(exist_ok=True)
        for name in PNNX_SIDE_FILES.values():
            if (work / name).is_file():
                os.replace(work / name, side / name)
    os.replace(made_bin, bin_)
    os.replace(made_param, param)


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
    """Convert `source` (.pt for pnnx, .onnx for pnnx-onnx/onnx2ncnn) into out_dir/model.ncnn.{param,bin}.

    The converter runs in a temporary folder inside out_dir, on a link to `source`: its scratch files
    never land beside the source or in out_dir, and nothing is left behind when it fails or is
    interrupted. On success the .param/.bin are moved into out_dir and pnnx's side files into
    out_dir/pnnx/; the log is out_dir/logs/<converter>.log."""
    tool = converter_tool(converter, onnx2ncnn)
    source = Path(source)
    if not source.is_file():
        raise SpecError(f"{source} does not exist; export the model first or pass an existing file")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    param, bin_ = out_dir / "model.ncnn.param", out_dir / "model.ncnn.bin"
    log = out_dir / "logs" / f"{converter}.log"
    stage = f"convert ({converter})"
    with step(stage), _scratch(out_dir) as work:
        src = _place_source(source, work / "source")
        cmd = _command(
            converter, tool, src, param.name, bin_.name, input_shape, input_shape2, fp16_weights, moduleop
        )
        run_tool(cmd, log, stage, cwd=work, timeout=TOOL_TIMEOUT_S, error=ConvertError)
        _finish(work, param, bin_, converter, tool, stage, log, source)
    graph = read_param(param)
    return Converted(
        param, bin_, converter, log, graph.input_names, graph.output_names, input_shape2 is not None
    )


def check_torchscript_file(path: Path) -> None:
    """Refuse a .pt that is not a readable TorchScript archive (a zip with code/, as torch.jit.save
    writes): a text file, a truncated or corrupt archive, or a torch.save checkpoint."""
    again = "export the model again (deploytool export MODEL writes model.pt)"
    if not zipfile.is_zipfile(path):
        raise SpecError(f"{path} is not a TorchScript file (TorchScript files are zip archives); {again}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise SpecError(f"{path} is a corrupt TorchScript archive ({exc}); {again}") from None
    if bad is not None:
        raise SpecError(f"{path} is a corrupt TorchScript archive ({bad} fails its CRC check); {again}")
    if not any("code" in name.split("/")[:-1] for name in names):
        raise SpecError(
            f"{path} is a torch.save checkpoint, not TorchScript (it has no code/); pnnx needs a traced "
            "model: deploytool export MODEL --weights FILE writes one"
        )


def check_onnx_file(path: Path):
    """The ModelProto of `path` (without external data); a file onnx cannot parse, or that
    onnx.checker rejects, is a SpecError."""
    import onnx

    again = "export it again (deploytool export MODEL writes model.onnx)"
    if path.stat().st_size == 0:
        raise SpecError(f"{path} is empty (0 bytes), not an ONNX model; {again}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and whatever a broken file makes onnx raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecError(f"{path} is not a readable ONNX model ({first}); {again}") from None
    try:
        onnx.checker.check_model(str(path))
    except (onnx.checker.ValidationError, ValueError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpecError(f"{path} is not a valid ONNX model (onnx.checker: {first}); {again}") from None
    return model


def onnx_declared_input(model) -> tuple[str, tuple[int | None, ...]] | None:
    """The first graph input's name and declared shape (None for a symbolic or unknown dimension),
    or None when the graph declares no input shape."""
    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs or not inputs[0].type.tensor_type.HasField("shape"):
        return None
    dims = inputs[0].type.tensor_type.shape.dim
    # exporters write a dynamic dimension as a name, or as a value of -1 or 0 (PaddlePaddle's paddle2onnx)
    return inputs[0].name, tuple(d.dim_value if d.dim_value > 0 else None for d in dims)


def _dims_text(dims: tuple[int | None, ...]) -> str:
    return ",".join("?" if d is None else str(d) for d in dims)


def check_declared_shape(
    file: Path, shape: tuple[int, ...], declared: tuple[str, tuple[int | None, ...]]
) -> None:
    """`shape` (--input-shape) must have the rank and every fixed dimension of the ONNX input."""
    name, dims = declared
    given = ",".join(map(str, shape))
    problem = None
    if len(shape) != len(dims):
        problem = f"rank {len(dims)}, not {len(shape)}"
    else:
        wrong = [i for i, (d, s) in enumerate(zip(dims, shape, strict=True)) if d is not None and d != s]
        if wrong:
            problem = f"dimension {wrong[0]} is {dims[wrong[0]]}, not {shape[wrong[0]]}"
    if problem:
        raise SpecError(
            f"--input-shape {given} does not fit {file}: its input {name!r} is declared {_dims_text(dims)} "
            f"({problem}); pass an --input-shape that matches it"
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

    The converter defaults to pnnx for .pt and pnnx-onnx for .onnx; pnnx needs `input_shape`
    ("1,3,224,224"), onnx2ncnn does not. Everything is checked before the converter starts, in this
    order: the file's suffix, the converter's name and that it takes this kind of file, the shape's
    syntax, that the converter is installed, the file's content (a readable TorchScript archive or ONNX
    model) and that the shape fits the ONNX graph's declared input."""
    from .spec_toml import parse_shape

    file = Path(file)
    if file.is_dir():
        raise SpecError(f"{file} is a folder; pass a TorchScript .pt or an .onnx file")
    if not file.is_file():
        raise SpecError(f"{file} does not exist")
    suffix = file.suffix.lower()
    if suffix not in SOURCE_KINDS:
        raise SpecError(
            f"{file}: deploytool convert takes a TorchScript .pt or an .onnx file, not "
            f"{suffix or 'a file without suffix'} (rename a TorchScript file with another suffix to .pt)"
        )
    if converter is None:
        converter = "pnnx" if suffix == ".pt" else "pnnx-onnx"
    check_converter(converter)
    if CONVERTER_SOURCE[converter] != suffix:
        fits = " or ".join(c for c, s in CONVERTER_SOURCE.items() if s == suffix)
        takes = SOURCE_KINDS[CONVERTER_SOURCE[converter]]
        raise SpecError(
            f"--converter {converter} converts {takes} files, and {file} is {SOURCE_KINDS[suffix]}: "
            f"use --converter {fits}"
        )
    shape = parse_shape(input_shape) if input_shape is not None else None
    if suffix == ".pt" and shape is None:
        raise SpecError("pnnx needs the input shape: pass --input-shape 1,3,224,224")
    converter_tool(converter, onnx2ncnn)
    if suffix == ".pt":
        check_torchscript_file(file)
    else:
        declared = onnx_declared_input(check_onnx_file(file))
        if shape is not None and declared is not None:
            check_declared_shape(file, shape, declared)
        if shape is None and converter.startswith("pnnx"):
            known = declared is not None and all(d is not None for d in declared[1])
            example = _dims_text(declared[1]) if known else "1,3,224,224"
            where = f" (the shape {file} declares)" if known else ""
            raise SpecError(f"pnnx needs the input shape: pass --input-shape {example}{where}")
    return convert(
        file,
        Path(out) if out else file.parent,
        converter,
        shape or (1, 3, 224, 224),  # onnx2ncnn reads the shape from the graph
        fp16_weights=fp16_weights,
        onnx2ncnn=onnx2ncnn,
    )
