"""The board bundle: ncnn model files, meta.json, C++ and Python runners, build files, README."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .backends.ncnn_cpp import runner_source_dir, runner_source_files
from .errors import SpecError
from .ncnn_param import read_param

PARAM_NAME = "model.ncnn.param"
BIN_NAME = "model.ncnn.bin"
META_SCHEMA = 1
TASKS = ("classify", "detect")


def meta_for(spec, param: Path, labels: list[str] | None = None, num_classes: int | None = None) -> dict:
    """meta.json (schema 1) for a spec: ncnn blob names from the .param, preprocessing in ncnn's
    pixel units, so that value = (pixel - mean_vals) * norm_vals = (pixel * scale - mean) / std.

    `labels` default to the spec's task_args.names; a detector's `num_classes` (rows of its raw
    output minus 4) defaults to the number of labels."""
    if spec.task not in TASKS:
        raise SpecError(f"{spec.name}: task {spec.task!r} has no runner; bundles support {', '.join(TASKS)}")
    shape = spec.input_shape
    if len(shape) != 4 or shape[1] != 3:
        raise SpecError(f"{spec.name}: the runners take 3-channel images, input shape is {list(shape)}")
    graph = read_param(Path(param))
    if len(graph.input_names) != 1:
        raise SpecError(f"{param}: the runners need exactly one input blob, found {graph.input_names}")
    pre = spec.preprocess
    args = spec.task_args
    labels = list(labels if labels is not None else args.get("names", []))
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
        "top_k": int(args.get("top_k", 5)),
    }
    if spec.task == "detect":
        num_classes = num_classes or len(labels)
        if not num_classes:
            raise SpecError(
                f"{spec.name}: the runners need the detector's class count; give task_args.names "
                "or pass num_classes (rows of the raw output minus 4)"
            )
        meta["detect"] = {
            "confidence": float(args.get("confidence", 0.25)),
            "iou": float(args.get("iou", 0.45)),
            "max_det": int(args.get("max_det", 300)),
            "num_classes": int(num_classes),
        }
    return meta


def make_bundle(spec, opts, out_dir: Path):
    """Run the pipeline on torch, ncnn-cpu and (when libncnn is built) the C++ runner, write
    report.json into the run folder, and only if parity passed write the bundle. Returns
    (report, bundle path or None when parity failed)."""
    from dataclasses import replace

    from .backends import availability
    from .pipeline import run
    from .report import write_json

    if spec.task not in TASKS:
        raise SpecError(f"{spec.name}: bundles need a classify or detect spec with image input")
    backends = "torch,ncnn-cpu" + (",ncnn-cpp" if availability("ncnn-cpp")[0] else "")
    report = run(spec, replace(opts, backends=backends))
    report_path = write_json(report, Path(opts.out) / "report.json")
    if not report.passed:
        return report, None
    meta = json.loads((Path(opts.out) / "meta.json").read_text())
    param, bin_ = Path(report.artifacts["ncnn_param"]), Path(report.artifacts["ncnn_bin"])
    return report, write_bundle(out_dir, param, bin_, meta, report_path)


def write_bundle(out_dir: Path, param: Path, bin: Path, meta: dict, report_path: Path | None = None) -> Path:
    """Write the bundle folder; it appears complete or not at all (built beside it, then renamed)."""
    out_dir = Path(out_dir)
    param, bin = Path(param), Path(bin)
    for f in (param, bin):
        if not f.is_file():
            raise SpecError(f"{f}: no such file; convert the model first")
    if report_path is not None and not Path(report_path).is_file():
        raise SpecError(f"{report_path}: no such report file")
    for key in ("task", "input", "outputs"):
        if key not in meta:
            raise SpecError(f"bundle meta has no {key!r}; build it with deploytool.bundle.meta_for")
    sources = runner_source_files()
    if not (runner_source_dir() / "CMakeLists.txt").is_file():
        raise SpecError(f"the C++ runner sources are missing from {runner_source_dir()}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        shutil.copyfile(param, tmp / PARAM_NAME)
        shutil.copyfile(bin, tmp / BIN_NAME)
        meta = dict(meta, schema=META_SCHEMA, param=PARAM_NAME, bin=BIN_NAME)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        src_root = runner_source_dir()
        for f in sources:
            dest = tmp / f.relative_to(src_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        if report_path is not None:
            shutil.copyfile(report_path, tmp / "report.json")
        (tmp / "README.md").write_text(_readme(meta, report_path is not None))
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replace_dir(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an existing `target` is moved aside first and removed after."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except OSError:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _readme(meta: dict, has_report: bool) -> str:
    model = meta.get("model", "model")
    inp = meta["input"]
    report = "- `report.json`: the parity report this bundle was checked with\n" if has_report else ""
    outputs = ", ".join(f"`{o}`" for o in meta["outputs"])
    pre = f"{inp.get('color', 'rgb')}, {inp.get('resize', 'resize')}"
    return f"""# {model}: ncnn bundle

Made by deploytool. Task `{meta["task"]}`, input `{inp["name"]}` {inp["width"]}x{inp["height"]}
({pre}), outputs {outputs}.

- `model.ncnn.param`, `model.ncnn.bin`: the network
- `meta.json`: input name and size, preprocessing (value = (pixel - mean_vals) * norm_vals), outputs,
  labels, task settings
- `CMakeLists.txt`, `src/`: the C++ runner `deploytool_runner` (ncnn + OpenCV + nlohmann-json)
- `toolchains/aarch64-linux-gnu.cmake`: cross-compiling from an x86_64 host
- `run_ncnn.py`: the same runner in Python (ncnn, numpy, OpenCV only)
{report}
## C++ on the board

Needs libncnn built and installed for the board (see https://github.com/Tencent/ncnn/wiki/how-to-build),
then (Debian/Ubuntu):

```sh
sudo apt-get install -y build-essential cmake libopencv-dev nlohmann-json3-dev
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -Dncnn_DIR=/path/to/ncnn/install/lib/cmake/ncnn
cmake --build build -j"$(nproc)"
./build/deploytool_runner meta.json photo.jpg
```

Options: `--threads N`, `--repeat N` (average latency over N runs), `--dump-raw DIR` (writes every raw
output as `<image-stem>.<blob>.npy` and the preprocessed input as `<image-stem>.input.npy`).
An input ending in `.npy` is taken as an already preprocessed float32 (1,C,H,W) tensor.
It prints one JSON document: per image `top_k` (index, score, prob, label) or `detections`
(class_id, class name, score, box x1,y1,x2,y2 in original image pixels). Errors: one line on stderr,
exit 2.

## Cross-compiling for aarch64

```sh
sudo apt-get install -y g++-aarch64-linux-gnu
cmake -S . -B build-aarch64 -DCMAKE_BUILD_TYPE=Release \\
      -DCMAKE_TOOLCHAIN_FILE=toolchains/aarch64-linux-gnu.cmake \\
      -DCMAKE_SYSROOT=/path/to/arm64-sysroot -Dncnn_DIR=/path/to/ncnn-aarch64/lib/cmake/ncnn
cmake --build build-aarch64 -j"$(nproc)"
```

## Python

```sh
pip install ncnn numpy opencv-python-headless
python3 run_ncnn.py meta.json photo.jpg
```

Same options and the same JSON as the C++ runner; both preprocess with ncnn's own
`from_pixels_resize`, so their raw outputs agree to ~1e-5.
"""
