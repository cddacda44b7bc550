"""Wires the stages for one model: spec -> model -> export -> convert -> every backend -> judge -> report."""

from __future__ import annotations

import difflib
import json
import platform
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from . import __version__, judge, progress
from .atomic import atomic_path, writable_folder, write_text
from .backends import REFERENCE, Artifacts, RunnerConfig, create_runner, get_backend, select_backends
from .backends.base import by_spec_name
from .backends.registry import NCNN_PRECISIONS
from .convert import convert, pnnx_version
from .errors import BackendError, SpecError
from .export import DEFAULT_OPSET, check_opset, export_onnx, export_torchscript
from .inputs import collect_images, input_source, inputs_for
from .results import BackendResult, InputItem, RunReport
from .spec import ModelSpec, build_model
from .stages import StageCache, digest, file_digest

EXPORT_FORMATS = ("torchscript", "onnx")


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
    cache: Path | None = None  # stage cache folder (deploytool.stages): reuse export/convert/outputs

    def __post_init__(self) -> None:
        """Every option checked when it is made, before any work."""
        from .convert import check_converter, check_onnx2ncnn
        from .export import check_opset

        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "images", tuple(Path(p) for p in self.images))
        check_converter(self.recipe.converter)
        if self.recipe.converter == "onnx2ncnn" and self.recipe.onnx2ncnn is not None:
            check_onnx2ncnn(self.recipe.onnx2ncnn)
        check_opset(self.opset)
        _choice(self.ncnn_precision, NCNN_PRECISIONS, "--ncnn-precision")
        if (self.recipe.int8 or self.int8_model) != (self.ncnn_precision == "int8"):
            raise SpecError("an int8 model runs at --ncnn-precision int8, and int8 needs a quantized model")
        if self.recipe.int8:
            from .quantize import METHODS, read_table

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
        close = difflib.get_close_matches(value, choices, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise SpecError(f"unknown {flag} {value!r}; {hint}choose one of {', '.join(choices)}")


# What a run writes into its folder: a new run first removes these, so that a folder never presents
# files from two runs as one (an interrupted re-run leaves no earlier report beside new model files).
RUN_MARKER = ".deploytool-run"
RUN_FILES = (
    "model.pt", "model.onnx", "model.ncnn.param", "model.ncnn.bin", "meta.json", "report.json",
    "junit.xml", "report.md", "errors.png", "layers.png", "bench.json", "model.table", "model.int8.param",
    "model.int8.bin", "model.int8.onnx", "sensitivity.json", "sensitivity.png",
)  # fmt: skip


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


class StageTimer:
    """Seconds per stage for the report; each stage is also shown as a progress step."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str, show: bool = True):
        """Time the block as stage `name`; `show=False` when the block shows its own progress step."""
        start = time.perf_counter()
        try:
            with progress.step(name) if show else nullcontext():
                yield
        finally:
            self.stages[name] = {"seconds": round(time.perf_counter() - start, 4)}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"deploytool": __version__, "python": platform.python_version()}
    for key, dist in (
        ("torch", "torch"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("ncnn", "ncnn"),
        ("opencv", "opencv-python-headless"),
    ):
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = None
    out["pnnx"] = pnnx_version()
    return out


def run(spec: ModelSpec, opts: RunOptions) -> RunReport:
    """Run the whole pipeline. Never raises for a parity failure: `report.passed` says it.
    With `opts.budget` (--precision auto), first bench every ncnn variant and run the fastest that
    stays within the budget."""
    notes = []
    if opts.budget is not None:
        from .bench import choose_variant

        opts, reason = choose_variant(spec, opts)
        notes.append(f"precision auto: {reason}")
    timer = StageTimer()
    backends, found = select_backends(opts.backends)
    items = inputs_for(spec, list(opts.images))
    out = Path(opts.out)
    needs_ncnn = any(get_backend(b).family == "ncnn" for b in backends)
    cache = StageCache(opts.cache)
    art = build_artifacts(spec, opts, items[0].tensor, out, timer, convert_ncnn=needs_ncnn, cache=cache)
    outputs, results = infer_all(spec, art, opts, backends, items, timer, cache=cache)
    report = judge_run(spec, art, opts, items, outputs, results, timer, found=found)
    if cache.hits:
        notes.append(f"reused from the stage cache {opts.cache}: {', '.join(cache.hits)}")
        for kind in cache.hits:  # report.json: stages.<kind>.cached
            report.stages.setdefault(kind, {"seconds": 0.0})["cached"] = True
    report.notes += notes
    return report


def write_meta(spec: ModelSpec, param: Path, path: Path) -> dict | None:
    """meta.json for the runners (C++, bundle) when the model is an image classifier or detector."""
    from .bundle import TASKS, meta_for

    if spec.task not in TASKS:
        return None
    meta = meta_for(spec, param, num_classes=spec.factory_args.get("num_classes"))
    write_text(path, json.dumps(meta, indent=2) + "\n")
    return meta


def export_model(
    spec: ModelSpec, model, x: np.ndarray, out: Path, opset: int = DEFAULT_OPSET,
    formats: tuple[str, ...] = EXPORT_FORMATS,
) -> Artifacts:  # fmt: skip
    """Export TorchScript and/or ONNX into `out` (the model must run on `x`: see _try_forward)."""
    example = _example_tensor(x)
    art = Artifacts(model=model)
    if "torchscript" in formats:
        art.torchscript = export_torchscript(model, example, out / "model.pt")
    if "onnx" in formats:
        art.onnx = export_onnx(
            model, example, out / "model.onnx", [spec.input_name], spec.output_names, opset=opset,
            dynamic=bool(spec.dynamic_shapes),
        )  # fmt: skip
    return art


def export(spec: ModelSpec, out: Path, formats: str, opset: int = DEFAULT_OPSET, weights: str | None = None):
    """`deploytool export`: build the model and write the requested formats; returns the paths."""
    check_opset(opset)
    wanted = tuple(f.strip() for f in formats.split(",") if f.strip())
    bad = [f for f in wanted if f not in EXPORT_FORMATS]
    if bad or not wanted:
        raise SpecError(f"unknown format(s) {', '.join(bad) or '(none)'}; use --formats torchscript,onnx")
    timer = StageTimer()
    with timer.stage("load"):
        model = build_model(spec, weights)
        x = np.zeros(spec.input_shape, np.float32)
        _try_forward(model, _example_tensor(x), spec)
    with timer.stage("export"):
        art = export_model(spec, model, x, out, opset, wanted)
    return [p for p in (art.torchscript, art.onnx) if p is not None]


def convert_stage(spec: ModelSpec, art: Artifacts, recipe: Recipe, out: Path) -> Artifacts:
    """The ncnn files of `recipe` in `out` (with the spec's first dynamic shape as pnnx's second
    shape), and meta.json for the runners; the exported files are shared with `art`."""
    source = art.torchscript if recipe.converter == "pnnx" else art.onnx
    converted = convert(
        source, out, recipe.converter, spec.input_shape,
        spec.dynamic_shapes[0] if spec.dynamic_shapes else None,
        fp16_weights=recipe.fp16_weights, moduleop=spec.pnnx_moduleop, onnx2ncnn=recipe.onnx2ncnn,
    )  # fmt: skip
    art = replace(
        art, ncnn_param=converted.param, ncnn_bin=converted.bin, converter=recipe.converter,
        converter_log=converted.log, meta=write_meta(spec, converted.param, out / "meta.json"),
    )  # fmt: skip
    return quantize_stage(spec, art, recipe, out) if recipe.int8 else art


def calibration_images() -> tuple[Path, ...]:
    """The default calibration photos: images/calib (public-domain photos, disjoint from images/eval)."""
    from .inputs import default_images

    return (default_images()[0] / "calib",)


def quantize_stage(spec: ModelSpec, art: Artifacts, recipe: Recipe, out: Path) -> Artifacts:
    """The int8 model of `art`'s fp32 ncnn files: calibrate on the spec's preprocessing of the calibration
    photos (or read the user's table), write the table (ncnn2table format) and model.int8.param/.bin."""
    from .quantize import calibrate, calibration_feeds, quantize_model, read_table, write_table

    with progress.step(f"quantize ({recipe.quantize or 'table'})"):
        if recipe.table is not None:
            from .ncnn_param import read_param

            table = read_table(recipe.table, read_param(art.ncnn_param))
        else:
            feeds = calibration_feeds(spec, list(recipe.calib or calibration_images()))
            table = calibrate(art.ncnn_param, art.ncnn_bin, feeds, recipe.quantize)
        table_path = out / "model.table"
        write_table(table_path, table)
        param, bin_ = out / "model.int8.param", out / "model.int8.bin"
        layers = quantize_model(art.ncnn_param, art.ncnn_bin, table, param, bin_, recipe.keep_fp32)
    meta = art.meta
    if meta is not None:  # the runners (C++, bundle) read the int8 files from now on
        meta = dict(meta, param=param.name, bin=bin_.name)
        write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return replace(
        art, ncnn_param=param, ncnn_bin=bin_, int8_table=table_path, int8_layers=tuple(layers), meta=meta
    )


EXPORT_FILES = ["model.pt", "model.onnx"]
NCNN_FILES = ["model.ncnn.param", "model.ncnn.bin"]
INT8_FILES = ["model.table", "model.int8.param", "model.int8.bin", "int8_layers.json"]


def build_artifacts(
    spec: ModelSpec, opts: RunOptions, x: np.ndarray, out: Path, timer: StageTimer, convert_ncnn: bool = True,
    cache: StageCache | None = None,
) -> Artifacts:  # fmt: skip
    """Build the model and check it runs on `x`, then (and only then) make `out` ready, export the model
    and (when an ncnn backend runs) convert it, timing each stage. With the stage cache, files it holds
    for the same inputs are copied back instead (the model is then built only if a backend needs it)."""
    cache = cache or StageCache(None)
    keys = stage_keys(spec, opts) if cache.on else {}
    if cache.on and cache.has("export", keys["export"], EXPORT_FILES):
        prepare_run_folder(out)
        with timer.stage("export"):
            cache.restore("export", keys["export"], out, EXPORT_FILES)
        art = Artifacts(torchscript=out / "model.pt", onnx=out / "model.onnx")
    else:
        with timer.stage("load"):
            model = build_model(spec, opts.weights)
            _try_forward(model, _example_tensor(x), spec)
        prepare_run_folder(out)
        with timer.stage("export"):
            art = export_model(spec, model, x, out, opts.opset)
        cache.store("export", keys.get("export", ""), out, EXPORT_FILES)
    if convert_ncnn:
        with timer.stage("convert", show=False):  # convert() shows "convert (pnnx)" itself
            art = _cached_convert(spec, art, opts.recipe, out, cache, keys)
    return art


def _cached_convert(
    spec: ModelSpec, art: Artifacts, recipe: Recipe, out: Path, cache: StageCache, keys: dict
) -> Artifacts:
    """convert_stage, or its files from the cache (meta.json is rewritten from the spec either way)."""
    if not cache.restore("convert", keys.get("convert", ""), out, NCNN_FILES):
        fp32 = convert_stage(spec, art, replace(recipe, quantize=None, table=None), out)
        cache.store("convert", keys.get("convert", ""), out, NCNN_FILES)
    else:
        param = out / NCNN_FILES[0]
        fp32 = replace(art, ncnn_param=param, ncnn_bin=out / NCNN_FILES[1], converter=recipe.converter,
                       meta=write_meta(spec, param, out / "meta.json"))  # fmt: skip
    if not recipe.int8:
        return fp32
    if cache.restore("quantize", keys.get("quantize", ""), out, INT8_FILES):
        layers = json.loads((out / "int8_layers.json").read_text())
        (out / "int8_layers.json").unlink()
        meta = fp32.meta and dict(fp32.meta, param="model.int8.param", bin="model.int8.bin")
        if meta is not None:
            write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
        return replace(fp32, ncnn_param=out / "model.int8.param", ncnn_bin=out / "model.int8.bin",
                       int8_table=out / "model.table", int8_layers=tuple(layers), meta=meta)  # fmt: skip
    art = quantize_stage(spec, fp32, recipe, out)
    if cache.on:
        (out / "int8_layers.json").write_text(json.dumps(list(art.int8_layers)))
        cache.store("quantize", keys["quantize"], out, INT8_FILES)
        (out / "int8_layers.json").unlink()
    return art


def stage_keys(spec: ModelSpec, opts: RunOptions) -> dict[str, str]:
    """What decides each stage's files: the model (factory, its module's source, arguments, weights),
    the input/output declaration, the opset, the recipe, the calibration photos and the tool versions.
    Tolerances, task settings and preprocessing are not in them (preprocessing is in the inputs' key)."""
    import importlib.util

    module = spec.factory.partition(":")[0]
    try:
        origin = importlib.util.find_spec(module).origin
    except (ImportError, AttributeError, ValueError):
        origin = None
    ver = versions()
    export = digest(
        "export", spec.factory, spec.factory_args, file_digest(origin) if origin else module,
        file_digest(opts.weights), spec.input_name, spec.input_shape, spec.dynamic_shapes, spec.output_names,
        opts.opset, ver["torch"], ver["onnx"], __version__,
    )  # fmt: skip
    r = opts.recipe
    convert_key = digest(export, r.converter, r.fp16_weights, file_digest(r.onnx2ncnn), spec.pnnx_moduleop,
                         ver["pnnx"])  # fmt: skip
    calib = [] if r.table is not None or not r.int8 else collect_images(list(r.calib or calibration_images()))
    quantize = digest(convert_key, r.quantize, file_digest(r.table), r.keep_fp32,
                      [file_digest(p) for p in calib], spec.preprocess)  # fmt: skip
    return {"export": export, "convert": convert_key, "quantize": quantize}


def infer_all(
    spec: ModelSpec, art: Artifacts, opts: RunOptions, backends: list[str], items: list[InputItem],
    timer: StageTimer, reference: str = REFERENCE, cache: StageCache | None = None,
) -> tuple[dict[str, list[dict]], dict[str, BackendResult]]:  # fmt: skip
    """Run every backend on the same inputs: ({backend: [outputs by spec name, one per input]},
    {backend: what it was and how fast}). A backend other than the reference that fails (a crash,
    native or not) is recorded with its error and the others still run."""
    config = RunnerConfig(
        tuple([spec.input_name]), tuple(spec.output_names), opts.ncnn_precision, opts.threads
    )
    outputs: dict[str, list[dict]] = {}
    results: dict[str, BackendResult] = {}
    cache = cache or StageCache(None)
    for name in backends:
        key = _infer_key(name, art, opts, items) if cache.on and "@ssh" not in name else None
        got = cache.load_outputs(f"infer:{name}", key) if key else None
        if got is not None:
            outputs[name], results[name] = got[0], BackendResult(name, **got[1])
            continue
        try:
            if "model" in get_backend(name).needs and art.model is None:  # files came from the cache
                with timer.stage("load"):
                    art.model = build_model(spec, opts.weights)
            with timer.stage(f"infer:{name}"):
                outputs[name], results[name] = _infer_one(name, spec, art, opts, config, items)
            if key:
                cache.store_outputs(f"infer:{name}", key, outputs[name], _cacheable(results[name]))
        except BackendError as exc:
            if name == reference:
                raise
            results[name] = BackendResult(name, error=str(exc))
    return outputs, results


def _infer_key(name: str, art: Artifacts, opts: RunOptions, items: list[InputItem]) -> str:
    """What decides a backend's outputs: the files it runs (by content), the inputs (tensors and photos),
    its precision and threads, and the versions of everything that computes them."""
    from .targets.build import sources_hash

    files = (
        [art.ncnn_param, art.ncnn_bin, art.onnx, art.torchscript]
        if get_backend(name).family != "torch"
        else [art.torchscript, opts.weights]
    )
    ver = versions()
    runner = sources_hash() if name.startswith("ncnn-cpp") else None
    return digest(
        "infer", name, [file_digest(f) for f in files],
        [(i.label, i.feed, file_digest(i.image)) for i in items], opts.ncnn_precision, opts.threads,
        (art.meta or {}).get("ncnn_options"), runner, ver,
    )  # fmt: skip


def _cacheable(result: BackendResult) -> dict:
    """The fields of a BackendResult that come back with cached outputs; its latency is marked as from
    the run that made them."""
    method = f"{result.latency_method} (cached run)" if result.latency_method else None
    return {"device": result.device, "latency_ms_median": result.latency_ms_median, "latency_method": method,
            "precision": result.precision, "extra": dict(result.extra, cached=True)}  # fmt: skip


def _infer_one(
    name: str, spec: ModelSpec, art: Artifacts, opts: RunOptions, config: RunnerConfig, items: list[InputItem]
) -> tuple[list[dict], BackendResult]:
    with create_runner(name, art, config) as runner:
        outs, firsts = [], []
        for item in items:
            outs.append(by_spec_name(runner.infer_item(item), spec.output_names))
            if item.at_spec_shape:
                firsts.append(runner.last_latency_s)
        first = next(i for i in items if i.at_spec_shape)
        seconds, method = runner.warm_latency(first.feed, firsts)
        takes = opts.ncnn_precision if get_backend(name).takes_precision else None
        return outs, BackendResult(
            name, device=runner.device(), latency_ms_median=round(seconds * 1e3, 3),
            latency_method=method, precision=takes, extra=runner.extra(),
        )  # fmt: skip


def judge_run(
    spec: ModelSpec, art: Artifacts, opts: RunOptions, items: list[InputItem], outputs: dict[str, list[dict]],
    results: dict[str, BackendResult], timer: StageTimer, reference: str = REFERENCE,
    found: dict[str, tuple[bool, str | None]] | None = None,
) -> RunReport:  # fmt: skip
    """Judge every backend against the reference and build the report."""
    backends = dict(results)
    for info in results.values():
        if "image_path" in info.extra:
            info.extra["image_path"] = judge.judge_image_path(info.extra["image_path"])
    for name, (ok, reason) in (found or {}).items():
        if not ok:
            backends[name] = BackendResult(name, available=False, reason=reason)
    report = RunReport(
        model=spec.name,
        spec=spec.source,
        reference=reference,
        versions=versions(),
        artifacts={
            "torchscript": _str(art.torchscript),
            "onnx": _str(art.onnx),
            "ncnn_param": _str(art.ncnn_param),
            "ncnn_bin": _str(art.ncnn_bin),
            "converter": art.converter,
            "converter_log": _str(art.converter_log),
            "fp16_weights": opts.recipe.fp16_weights,
            "int8_table": _str(art.int8_table),
            "int8_layers": list(art.int8_layers),
            "int8_method": opts.recipe.quantize if opts.recipe.int8 and opts.recipe.table is None else None,
            "weights": str(Path(opts.weights).resolve()) if opts.weights else None,
        },
        input={
            "name": spec.input_name,
            "shape": list(spec.input_shape),
            "dynamic_shapes": [list(d) for d in spec.dynamic_shapes],  # also checked, from the same files
            "source": input_source(spec, opts.images),  # photos, [inputs] (generator or .npy) or random
        },
        backends=backends,
        stages=timer.stages,
        histograms={"edges_log10": judge.HIST_EDGES_LOG10},
    )
    with timer.stage("compare"):
        for backend, outs in outputs.items():
            if backend == reference:
                continue
            verdict = judge.judge_backend(
                spec, backend, reference, items, outputs[reference], outs, opts.ncnn_precision,
                opts.recipe.fp16_weights,
            )  # fmt: skip
            report.comparisons += verdict.comparisons
            report.histograms[backend] = verdict.histograms
            if verdict.task is not None:
                report.task[backend] = verdict.task
            if opts.save_vis is not None:
                _draw(spec, verdict, Path(opts.save_vis))
    return report


def _draw(spec: ModelSpec, verdict: judge.Verdict, folder: Path) -> None:
    """Each photo with the reference's and the backend's boxes, `PHOTO_HxW.BACKEND.jpg`."""
    from .detect import DetectSettings, draw
    from .inputs import read_image

    settings = DetectSettings.from_task_args(spec.task_args, spec.source)
    for pair in verdict.decoded:
        if pair.item.image is None:
            continue
        img = read_image(pair.item.image)
        h, w = pair.item.size or spec.input_shape[2:]
        for who, dets in ((verdict.reference, pair.ref), (verdict.backend, pair.got)):
            path = folder / f"{pair.item.image.stem}_{h}x{w}.{who}.jpg"
            _write_jpeg(path, draw(img, dets, settings.names, settings.conf))


def _str(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _try_forward(model, example, spec: ModelSpec) -> None:
    """Run the eager model once so a shape it cannot take is reported as the user's input error."""
    import torch

    try:
        with torch.no_grad():
            model(example)
    except (RuntimeError, ValueError) as exc:
        shape = ",".join(map(str, spec.input_shape))
        first = str(exc).strip().splitlines()[0]
        raise SpecError(
            f"{spec.name} cannot run on input shape {shape} ({first}); check --input-shape"
        ) from None


def _example_tensor(x: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", img)
    if not ok:
        raise SpecError(f"OpenCV could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
