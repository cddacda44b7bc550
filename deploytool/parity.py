"""Parity on artifacts that already exist (a run folder, a .param/.bin pair, an .onnx) and golden files."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .backends import BACKENDS, REFERENCE, Artifacts, get_backend, role, select_backends
from .errors import SpecError
from .foreign import is_onnx_file, spec_for_file, synth_spec
from .infer import infer_all
from .inputs import default_images, inputs_for
from .model import build_model
from .ncnn_param import read_param
from .options import RunOptions
from .pipeline import judge_run
from .progress import StageTimer
from .registry import is_int8
from .results import BackendResult, InputItem, RunReport
from .runfolder import TASKS, meta_for, ncnn_options_of
from .spec import ModelSpec
from .spec_toml import load_spec, parse_shape
from .versions import versions

GOLDEN = "golden"


@dataclass(frozen=True)
class ParityOptions:
    """Everything `deploytool parity` takes besides the target; not changed after parsing."""

    backends: str | None = None
    images: tuple[Path, ...] = ()
    weights: str | None = None
    ncnn_precision: str | None = None  # None: int8 for an int8 model, else fp32
    threads: int = 2
    save_vis: Path | None = None
    model: str | None = None  # spec of the model the artifacts came from (enables the torch reference)
    input_shape: str | None = None
    inputs_npz: Path | None = None
    golden: Path | None = None
    save_golden: Path | None = None
    reference: str | None = None
    layerwise: bool = False

    def __post_init__(self) -> None:
        """Conflicting flags are refused, never resolved silently: a golden file and an .npz bring their
        own inputs."""
        givers = [
            (flag, given)
            for flag, given in (
                ("--golden", self.golden),
                ("--inputs", self.inputs_npz),
                ("--input-shape", self.input_shape),
                ("--images", self.images),
            )
            if given
        ]
        if self.golden is not None and self.reference is not None:
            raise SpecError("--golden is the reference; drop --reference or drop --golden")
        if len(givers) > 1 and givers[0][0] in ("--golden", "--inputs"):
            others = ", ".join(flag for flag, _ in givers[1:])
            raise SpecError(f"{givers[0][0]} brings its own inputs; drop {others}")
        self.run_options(Path("."), None)  # the options parity shares with run, checked the same way

    def run_options(self, out: Path, weights: str | None, precision: str | None = None) -> RunOptions:
        return RunOptions(
            out=out, backends=self.backends, images=self.images, weights=weights,
            ncnn_precision=precision or self.ncnn_precision or "fp32", threads=self.threads,
            save_vis=self.save_vis, int8_model=is_int8(precision or self.ncnn_precision),
        )  # fmt: skip

    def precision_for(self, art: Artifacts) -> str:
        """The ncnn precision to run and judge at: an int8 model (8= layers in its .param) is int8;
        a given --ncnn-precision that contradicts the model is refused, not changed."""
        int8 = art.ncnn_param is not None and bool(read_param(art.ncnn_param).int8_layers)
        wanted = self.ncnn_precision
        if int8 and wanted is not None and not is_int8(wanted):
            raise SpecError(
                f"{art.ncnn_param} is an int8 model; drop --ncnn-precision {wanted} (it runs as int8)"
            )
        if wanted is not None and is_int8(wanted) and not int8:
            raise SpecError(
                f"--ncnn-precision int8: {art.ncnn_param or 'the target'} has no int8 layer; "
                "make one with `deploytool quantize` or `run --ncnn-precision int8`"
            )
        return "int8" if int8 else wanted or "fp32"


def locate(target: Path) -> tuple[Artifacts, dict]:
    """The artifacts in a run folder or a single file, and what a run folder's report.json recorded
    (`spec`, `weights`)."""
    target = Path(target)
    art = Artifacts()
    recorded: dict = {}
    if target.is_dir():
        files = {"torchscript": "model.pt", "onnx": "model.onnx", "ncnn_param": "model.ncnn.param"}
        for attr, name in files.items():
            if (target / name).is_file():
                setattr(art, attr, target / name)
        report = target / "report.json"
        if report.is_file():
            try:
                data = json.loads(report.read_text())
                recorded_art = data.get("artifacts") or {}
                weights = recorded_art.get("weights")
                recorded = {"spec": data.get("spec"), "weights": weights}
                # the ncnn model the run checked (model.int8.param after an int8 run), when it is here
                param = Path(str(recorded_art.get("ncnn_param") or "")).name
                if param.endswith(".param") and (target / param).is_file():
                    art.ncnn_param = target / param
            except (ValueError, AttributeError):
                recorded = {}
    elif target.is_file() and target.suffix in (".param", ".onnx", ".pt"):
        attr = {".param": "ncnn_param", ".onnx": "onnx", ".pt": "torchscript"}[target.suffix]
        setattr(art, attr, target)
    else:
        raise SpecError(f"{target} is neither a run folder nor a .param/.onnx/.pt file")
    if art.ncnn_param is not None:
        art.ncnn_bin = art.ncnn_param.with_suffix(".bin")
        meta = art.ncnn_param.parent / "meta.json"  # the deployment's own preprocessing, for ncnn-cpp
        if meta.is_file():
            try:
                art.meta = json.loads(meta.read_text())
            except ValueError:
                raise SpecError(f"{meta} is not valid JSON; fix it or delete it") from None
            ncnn_options_of(art.meta, str(meta))  # bench --tune's options: checked before any work
        if not art.ncnn_bin.is_file():
            raise SpecError(
                f"{art.ncnn_bin} is missing: a .param needs its .bin beside it, with the same stem"
            )
    if not any((art.torchscript, art.onnx, art.ncnn_param)):
        raise SpecError(
            f"{target} holds no model.pt, model.onnx or model.ncnn.param; run `deploytool run` first"
        )
    return art, recorded


def _pick_reference(opts: ParityOptions, art: Artifacts, has_spec: bool) -> str:
    """--golden, --reference, torch when the spec is known, else the first backend (in the registry's
    order) whose files are here."""
    if opts.golden is not None:
        return GOLDEN
    if opts.reference is not None:
        return get_backend(opts.reference).name
    if has_spec:
        return REFERENCE
    for backend in BACKENDS.values():
        if backend.name != REFERENCE and not backend.missing(art):
            return backend.name
    raise SpecError("nothing to use as the reference; pass --model, --golden or --reference")


def _default_backends(art: Artifacts, reference: str) -> list[str]:
    """The standard backends (run's and bench's sets) whose files are here."""
    return [
        b.name
        for b in BACKENDS.values()
        if (b.default or b.bench) and b.name not in (REFERENCE, reference) and not b.missing(art)
    ]


def run_parity(target: Path, opts: ParityOptions) -> RunReport:
    """Compare backends on existing artifacts; write a golden file if asked."""
    timer = StageTimer()
    art, recorded = locate(target)
    folder = Path(target) if Path(target).is_dir() else Path(target).parent
    model = opts.model or recorded.get("spec")
    # the weights the run used, unless the user names other weights or another model
    weights = opts.weights or (recorded.get("weights") if opts.model is None else None)
    shape = parse_shape(opts.input_shape) if opts.input_shape else None
    if model is None:
        spec = synth_spec(art, Path(target).stem, shape)
    elif is_onnx_file(model):  # an earlier `run FILE.onnx`
        spec = spec_for_file(Path(model), opts.input_shape)
    else:
        spec = load_spec(model, opts.input_shape)
    # a spec that names an ONNX file has no PyTorch model: onnxruntime is the reference
    reference = _pick_reference(opts, art, model is not None and spec.onnx is None)
    if art.meta is None and art.ncnn_param is not None and model is not None and spec.task in TASKS:
        art.meta = meta_for(spec, art.ncnn_param, num_classes=spec.factory_args.get("num_classes"))
    # the inputs first: a bad input file is reported before any backend is looked at
    preset: dict[str, list[dict]] = {}
    if opts.golden is not None:
        items, preset[GOLDEN], meta = read_golden(opts.golden)
        first = items[0].feed
        changes = {"output_names": list(preset[GOLDEN][0])}
        if len(first) == 1:
            name = next(iter(first))
            changes.update(input_name=name, input_shape=tuple(first[name].shape))
        spec = replace(spec, **changes)
    elif opts.inputs_npz is not None:
        item = _npz_item(opts.inputs_npz, spec)
        spec = replace(spec, input_shape=tuple(item.tensor.shape))
        items = [item]
    elif opts.images and model is None:
        raise SpecError("--images needs --model (its spec says how to preprocess); or pass --inputs FILE.npz")
    elif model is None and shape is None:
        raise SpecError(
            "say what to feed: --inputs FILE.npz, --golden FILE.npz, --images with --model, "
            "or --input-shape for a seeded random input"
        )
    else:
        if shape is not None:
            spec = replace(spec, input_shape=shape)
        images = list(opts.images)
        if not images and model is not None and spec.task != "raw":
            images = default_images()
        items = inputs_for(spec, images)

    backends, found = select_backends(opts.backends, reference, default=_default_backends(art, reference))
    for backend in backends:
        missing = [m for m in get_backend(backend).missing(art) if m != "model"]
        if missing:
            raise SpecError(
                f"{target} has no {missing[0]} file for backend {backend}; drop it from --backends"
            )
    if REFERENCE in backends:
        if model is None:
            raise SpecError("the torch backend needs the model: pass --model")
        with timer.stage("load"):
            art.model = build_model(spec, weights)

    if opts.golden is not None:
        found[GOLDEN] = (True, None)

    precision = opts.precision_for(art)
    run_opts = opts.run_options(folder, weights, precision)
    outputs = dict(preset)
    new_outputs, results = infer_all(spec, art, run_opts, backends, items, timer, reference)
    outputs.update(new_outputs)
    if opts.save_golden is not None:
        write_golden(
            opts.save_golden, items, outputs[reference], {"model": spec.name, "reference": reference}
        )
    report = judge_run(spec, art, run_opts, items, outputs, results, timer, reference, found)
    if opts.golden is not None:
        golden = report.backends.setdefault(GOLDEN, BackendResult(GOLDEN))
        golden.device, golden.extra = meta.get("reference"), {"file": str(opts.golden)}
    if opts.layerwise:
        if art.ncnn_param is None:
            raise SpecError(f"--layerwise compares ncnn blobs, but {target} has no .param")
        from .layerwise import layerwise

        with timer.stage("layerwise"):
            report.layers, report.first_failure = layerwise(
                art.ncnn_param, art.ncnn_bin, items[0].feed, art.model,
                vulkan=role("layerwise_gpu") in backends, precision=precision, threads=opts.threads,
            )  # fmt: skip
        report.layer_input = items[0].label
    return report


def _npz_item(path: Path, spec: ModelSpec) -> InputItem:
    arrays = _load_npz(path)
    if spec.input_name not in arrays:
        if len(arrays) != 1:
            raise SpecError(f"{path} holds {sorted(arrays)}; it needs an array named {spec.input_name!r}")
        arrays = {spec.input_name: next(iter(arrays.values()))}
    x = arrays[spec.input_name]
    if x.dtype.kind not in "fiub":
        raise SpecError(
            f"{path}: array {spec.input_name!r} holds {x.dtype} values; the input must be numbers"
        )
    return InputItem(str(path), {spec.input_name: np.ascontiguousarray(x, dtype=np.float32)})


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive of named arrays")
        with data:
            return {k: data[k] for k in data.files}
    except Exception as exc:  # zipfile, pickle and format errors all mean: not a usable .npz
        raise SpecError(f"{path} is not a readable .npz file ({type(exc).__name__}: {exc})") from None


def write_golden(path: Path, items: list[InputItem], outputs: list[dict], meta: dict) -> Path:
    """Store inputs and the reference's outputs, so another machine or version can be checked against them."""
    arrays: dict[str, np.ndarray] = {}
    labels = []
    for i, (item, out) in enumerate(zip(items, outputs, strict=True)):
        labels.append(item.label)
        arrays.update({f"in{i}/{k}": v for k, v in item.feed.items()})
        arrays.update({f"out{i}/{k}": v for k, v in out.items()})
    meta = dict(meta, golden=1, labels=labels, versions=versions())
    arrays["meta"] = np.array(json.dumps(meta))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def read_golden(path: Path) -> tuple[list[InputItem], list[dict], dict]:
    """(items, reference outputs, meta) from a golden file written by write_golden."""
    arrays = _load_npz(path)
    try:
        meta = json.loads(str(arrays.pop("meta")))
        labels = meta["labels"]
    except (KeyError, ValueError):
        raise SpecError(
            f"{path} is not a deploytool golden file (no meta); write one with --save-golden"
        ) from None
    items, outputs = [], []
    for i, label in enumerate(labels):
        feed = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"in{i}/")}
        outs = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"out{i}/")}
        items.append(InputItem(str(label), feed))
        outputs.append(outs)
    return items, outputs, meta
