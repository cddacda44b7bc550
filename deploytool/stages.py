"""The stages that make a run's model files: export (TorchScript, ONNX), convert (ncnn fp32) and quantize
(ncnn int8), each looking itself up in the stage cache (cache.StageCache) before doing the work. The
run folder ends each stage with the files the runners load and, for image tasks, one meta.json."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import __version__, progress
from .atomic import write_text
from .backends import Artifacts
from .cache import StageCache, digest, file_digest
from .convert import convert
from .export import DEFAULT_OPSET, example_tensor, export_onnx, export_torchscript, try_forward
from .inputs import calibration_feeds, calibration_images, collect_images
from .model import build_model
from .progress import StageTimer
from .runfolder import (
    EXPORT_FILES,
    INT8_BIN,
    INT8_FILES,
    INT8_PARAM,
    META,
    NCNN_FILES,
    TABLE,
    prepare_run_folder,
    run_meta,
    with_model_files,
    write_meta,
)  # fmt: skip
from .spec import ModelSpec
from .versions import versions

EXPORT_FORMATS = ("torchscript", "onnx")
_LAYERS = "int8_layers.json"  # the quantized layers, kept beside the int8 files in the cache only


def export_model(
    spec: ModelSpec, model, x: np.ndarray, out: Path, opset: int = DEFAULT_OPSET,
    formats: tuple[str, ...] = EXPORT_FORMATS,
) -> Artifacts:  # fmt: skip
    """Export TorchScript and/or ONNX into `out` (the model must run on `x`: see export.try_forward)."""
    example = example_tensor(x)
    art = Artifacts(model=model)
    if "torchscript" in formats:
        art.torchscript = export_torchscript(model, example, out / "model.pt")
    if "onnx" in formats:
        art.onnx = export_onnx(
            model, example, out / "model.onnx", [spec.input_name], spec.output_names, opset=opset,
            dynamic=bool(spec.dynamic_shapes),
        )  # fmt: skip
    return art


def build_artifacts(
    spec: ModelSpec, opts, x: np.ndarray, out: Path, timer: StageTimer, convert_ncnn: bool = True,
    cache: StageCache | None = None,
) -> Artifacts:  # fmt: skip
    """Build the model and check it runs on `x`, then (and only then) make `out` ready, export the model
    and (when an ncnn backend runs) convert it, timing each stage. With the stage cache, files it holds
    for the same inputs are copied back instead (the model is then built only if a backend needs it)."""
    cache = cache or StageCache(None)
    keys = stage_keys(spec, opts) if cache.on else {}
    if cache.has("export", keys.get("export", ""), EXPORT_FILES):
        prepare_run_folder(out)
        with timer.stage("export"):
            cache.restore("export", keys["export"], out, EXPORT_FILES)
        art = Artifacts(torchscript=out / "model.pt", onnx=out / "model.onnx")
    else:
        with timer.stage("load"):
            model = build_model(spec, opts.weights)
            try_forward(model, example_tensor(x), spec)
        prepare_run_folder(out)
        with timer.stage("export"):
            art = export_model(spec, model, x, out, opts.opset)
        cache.store("export", keys.get("export", ""), out, EXPORT_FILES)
    if convert_ncnn:
        with timer.stage("convert", show=False):  # convert() shows "convert (pnnx)" itself
            art = convert_stage(spec, art, opts.recipe, out, cache, keys)
    return art


def convert_stage(
    spec: ModelSpec, art: Artifacts, recipe, out: Path, cache: StageCache | None = None,
    keys: dict | None = None,
) -> Artifacts:  # fmt: skip
    """The ncnn files of `recipe` in `out` (the fp32 conversion, then the int8 model when the recipe
    quantizes), each from the cache when it holds them; meta.json is written once, for the files the
    runners load. The exported files are shared with `art`."""
    cache, keys = cache or StageCache(None), keys or {}
    fp32 = _convert(spec, art, recipe, out, cache, keys.get("convert", ""))
    if not recipe.int8:
        return _with_meta(spec, fp32, out)
    return _with_meta(spec, _quantize(spec, fp32, recipe, out, cache, keys.get("quantize", "")), out)


def quantize_stage(spec: ModelSpec, fp32: Artifacts, recipe, out: Path) -> Artifacts:
    """The int8 model of `fp32`'s ncnn files in `out` (not cached), and meta.json naming them."""
    return _with_meta(spec, _quantize(spec, fp32, recipe, out, StageCache(None), ""), out)


def _with_meta(spec: ModelSpec, art: Artifacts, out: Path) -> Artifacts:
    meta = with_model_files(run_meta(spec, art.ncnn_param), art.ncnn_param, art.ncnn_bin)
    return replace(art, meta=write_meta(out / META, meta))


def _convert(spec: ModelSpec, art: Artifacts, recipe, out: Path, cache: StageCache, key: str) -> Artifacts:
    """The fp32 ncnn files (with the spec's first dynamic shape as pnnx's second shape)."""
    param, bin_ = (out / n for n in NCNN_FILES)
    if cache.restore("convert", key, out, NCNN_FILES):
        return replace(art, ncnn_param=param, ncnn_bin=bin_, converter=recipe.converter)
    source = art.torchscript if recipe.converter == "pnnx" else art.onnx
    converted = convert(
        source, out, recipe.converter, spec.input_shape,
        spec.dynamic_shapes[0] if spec.dynamic_shapes else None,
        fp16_weights=recipe.fp16_weights, moduleop=spec.pnnx_moduleop, onnx2ncnn=recipe.onnx2ncnn,
    )  # fmt: skip
    cache.store("convert", key, out, NCNN_FILES)
    return replace(
        art, ncnn_param=converted.param, ncnn_bin=converted.bin, converter=recipe.converter,
        converter_log=converted.log,
    )  # fmt: skip


def _quantize(spec: ModelSpec, art: Artifacts, recipe, out: Path, cache: StageCache, key: str) -> Artifacts:
    """The int8 model of `art`'s fp32 ncnn files: calibrate on the spec's preprocessing of the calibration
    photos (or read the user's table), write the table (ncnn2table format) and model.int8.param/.bin."""
    param, bin_, table_path = out / INT8_PARAM, out / INT8_BIN, out / TABLE
    if cache.restore("quantize", key, out, INT8_FILES):
        layers = json.loads((out / _LAYERS).read_text())
        (out / _LAYERS).unlink()
    else:
        from .ncnn_param import read_model
        from .quantize.calibrate import calibrate
        from .quantize.table import read_table, write_table
        from .quantize.write import quantize_model

        with progress.step(f"quantize ({recipe.quantize or 'table'})"):
            model = read_model(art.ncnn_param, art.ncnn_bin)
            if recipe.table is not None:
                table = read_table(recipe.table, model.graph)
            else:
                feeds = calibration_feeds(spec, list(recipe.calib or calibration_images()))
                table = calibrate(model, feeds, recipe.quantize)
            write_table(table_path, table)
            layers = quantize_model(model, table, param, bin_, recipe.keep_fp32)
        if cache.on:
            write_text(out / _LAYERS, json.dumps(list(layers)))
            cache.store("quantize", key, out, INT8_FILES)
            (out / _LAYERS).unlink()
    return replace(art, ncnn_param=param, ncnn_bin=bin_, int8_table=table_path, int8_layers=tuple(layers))


def stage_keys(spec: ModelSpec, opts) -> dict[str, str]:
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
