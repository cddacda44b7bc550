"""The run folder's contract: the file names a run writes, its marker, and meta.json (the one place that
builds, checks and writes it) for the C++ runner, bundles and run_ncnn.py."""

from __future__ import annotations

import json
from pathlib import Path

from . import __version__
from .atomic import writable_folder, write_text
from .errors import SpecError
from .ncnn_param import read_param
from .spec import IMAGE_TASKS

# What a run writes into its folder: a new run first removes these, so that a folder never presents
# files from two runs as one (an interrupted re-run leaves no earlier report beside new model files).
RUN_MARKER = ".deploytool-run"
RUN_FILES = (
    "model.pt", "model.onnx", "model.ncnn.param", "model.ncnn.bin", "meta.json", "report.json",
    "junit.xml", "report.md", "errors.png", "layers.png", "bench.json", "model.table", "model.int8.param",
    "model.int8.bin", "model.int8.onnx", "sensitivity.json", "sensitivity.png",
)  # fmt: skip
# The files of each cached stage (stages.StageCache): int8_layers.json only lives in the cache.
EXPORT_FILES = ("model.pt", "model.onnx")
NCNN_FILES = ("model.ncnn.param", "model.ncnn.bin")
INT8_PARAM, INT8_BIN, TABLE = "model.int8.param", "model.int8.bin", "model.table"
INT8_FILES = (TABLE, INT8_PARAM, INT8_BIN, "int8_layers.json")

META = "meta.json"
PARAM_NAME, BIN_NAME = NCNN_FILES  # the names a bundle gives the model files
META_SCHEMA = 1
TASKS = IMAGE_TASKS  # the tasks the runners (C++, bundle) post-process

# The ncnn.Option fields that meta.json's "ncnn_options" may set (`bench --tune` writes them), with their
# type. They are applied after the precision's settings, before the model loads. The C++ runner
# (cmake/src/main.cpp) and the bundle's run_ncnn.py accept exactly these keys.
OPTION_TYPES: dict[str, type] = {
    "lightmode": bool,
    "openmp_blocktime": int,
    "use_winograd_convolution": bool,
    "use_winograd23_convolution": bool,
    "use_winograd43_convolution": bool,
    "use_winograd63_convolution": bool,
    "use_sgemm_convolution": bool,
    "use_packing_layout": bool,
    "use_fp16_packed": bool,
    "use_fp16_storage": bool,
    "use_fp16_arithmetic": bool,
    "use_bf16_packed": bool,
    "use_bf16_storage": bool,
}


def prepare_run_folder(out: Path) -> None:
    """Make `out` ready for a new run: created if missing; a folder an earlier run wrote (it holds the
    marker) loses that run's files; a folder of someone else's that holds a file of the same name as
    one the run writes is refused, so nothing of the user's is overwritten."""
    writable_folder(out, f"--out {out}")
    marker = out / RUN_MARKER
    clash = [n for n in RUN_FILES if (out / n).exists()]
    if clash and not marker.is_file():
        raise SpecError(
            f"--out {out} holds {', '.join(clash)} that deploytool did not write; choose an empty or new "
            "folder (nothing was changed)"
        )
    for name in clash:
        (out / name).unlink()
    write_text(marker, f"deploytool {__version__} run folder: a new run replaces {', '.join(RUN_FILES)}\n")


def check_ncnn_options(options, where: str) -> dict:
    """meta.json's "ncnn_options" ({ncnn.Option field: value}) as a dict; anything else is a SpecError
    naming `where` and the first bad entry."""
    if not isinstance(options, dict):
        raise SpecError(f'{where}: "ncnn_options" must be an object of ncnn.Option fields, not {options!r}')
    for key, value in options.items():
        kind = OPTION_TYPES.get(key)
        if kind is None:
            raise SpecError(
                f'{where}: unknown ncnn option {key!r} in "ncnn_options"; known: {", ".join(OPTION_TYPES)}'
            )
        # bool is an int in Python: compare the exact type; openmp_blocktime is milliseconds, >= 0
        if type(value) is not kind or (kind is int and value < 0):
            want = "true or false" if kind is bool else "a whole number of milliseconds, 0 or more"
            raise SpecError(f'{where}: "ncnn_options" {key} must be {want}, got {value!r}')
    return dict(options)


def ncnn_options_of(meta: dict | None, where: str = META) -> dict:
    """The checked "ncnn_options" of a meta.json (empty when it has none: ncnn's defaults)."""
    if not meta or "ncnn_options" not in meta:
        return {}
    return check_ncnn_options(meta["ncnn_options"], where)


def meta_for(
    spec, param: Path, labels: list[str] | None = None, num_classes: int | None = None,
    ncnn_options: dict | None = None,
) -> dict:  # fmt: skip
    """meta.json (schema 1) for a spec: ncnn blob names from the .param, preprocessing in ncnn's
    pixel units, so that value = (pixel - mean_vals) * norm_vals = (pixel * scale - mean) / std.

    `labels` default to the spec's class names; a detector's `num_classes` (rows of its raw
    output minus 4) defaults to the number of labels. `ncnn_options` (optional: without it every runner
    uses ncnn's defaults for fp32) are ncnn.Option fields that every runner sets after its fp32
    defaults, e.g. {"use_winograd63_convolution": false} from `bench --tune`; the keys and their types
    are OPTION_TYPES, an unknown key is refused by each runner."""
    if spec.task not in TASKS:
        raise SpecError(f"{spec.name}: task {spec.task!r} has no runner; bundles support {', '.join(TASKS)}")
    shape = spec.input_shape
    if len(shape) != 4 or shape[1] != 3:
        raise SpecError(f"{spec.name}: the runners take 3-channel images, input shape is {list(shape)}")
    graph = read_param(Path(param))
    if len(graph.input_names) != 1:
        raise SpecError(f"{param}: the runners need exactly one input blob, found {graph.input_names}")
    pre = spec.preprocess
    task = spec.detect if spec.task == "detect" else spec.classify
    labels = list(labels if labels is not None else task.names)
    meta = {
        "schema": META_SCHEMA,
        "model": spec.name,
        "task": spec.task,
        "param": PARAM_NAME,
        "bin": BIN_NAME,
        "input": {
            "name": graph.input_names[0],
            "width": shape[3],
            "height": shape[2],
            "color": pre.color,
            "resize": pre.resize,
            "pad_value": pre.pad_value,
            "mean_vals": [m / pre.scale for m in pre.mean],
            "norm_vals": [pre.scale / s for s in pre.std],
        },
        "outputs": graph.output_names,
        "labels": labels,
        "top_k": spec.classify.top_k,
    }
    if ncnn_options is not None:
        meta["ncnn_options"] = check_ncnn_options(ncnn_options, f"{spec.name} meta.json")
    if spec.task == "detect":
        num_classes = num_classes or len(labels)
        if not num_classes:
            raise SpecError(
                f"{spec.name}: the runners need the detector's class count; give task_args.names "
                "or pass num_classes (rows of the raw output minus 4)"
            )
        meta["detect"] = {
            "confidence": float(spec.detect.conf),
            "iou": float(spec.detect.iou),
            "max_det": int(spec.detect.max_det),
            "num_classes": int(num_classes),
        }
    return meta


def run_meta(spec, param: Path) -> dict | None:
    """meta.json's content for a run's model files when the spec is an image classifier or detector
    (the runners' tasks), else None."""
    if spec.task not in TASKS:
        return None
    return meta_for(spec, param, num_classes=spec.factory_args.get("num_classes"))


def write_meta(path: Path, meta: dict | None) -> dict | None:
    """Write `meta` as meta.json at `path` (atomically): the one writer of the file. None writes nothing."""
    if meta is not None:
        write_text(Path(path), json.dumps(meta, indent=2) + "\n")
    return meta


def read_meta(path: Path) -> dict:
    """A meta.json's content (a SpecError when it is not JSON)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{path}: cannot read meta.json ({exc}); rerun the conversion") from None


def with_model_files(meta: dict | None, param: Path, bin: Path) -> dict | None:
    """`meta` naming the model files the runners load (the int8 files once a model is quantized)."""
    return meta and dict(meta, param=Path(param).name, bin=Path(bin).name)
