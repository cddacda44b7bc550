"""Images to input tensors with OpenCV, exactly as the spec's preprocessing says; for models that do
not take photos, the inputs their spec's [inputs] declares (a seeded generator or an .npy file)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from .errors import SpecError
from .results import Geometry, InputItem
from .spec import InputSource, ModelSpec, Preprocess

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def default_images() -> list[Path]:
    """The photos shipped in images/ (./images when run from a checkout)."""
    here = Path.cwd() / "images"
    return [here if here.is_dir() else Path(__file__).resolve().parent.parent / "images"]


def calibration_images() -> tuple[Path, ...]:
    """The default calibration photos: images/calib (public-domain photos, disjoint from images/eval)."""
    return (default_images()[0] / "calib",)


def calibration_feeds(
    spec: ModelSpec, images: Sequence[Path | str]
) -> Callable[[], Iterable[dict[str, np.ndarray]]]:
    """The calibration photos preprocessed by the spec's own preprocessing, one at a time (a function
    returning a fresh generator, so calibration can read them twice without holding them all)."""
    paths = collect_images([Path(p) for p in images])
    height, width = spec.input_shape[2], spec.input_shape[3]

    def feeds():
        for path in paths:
            x, _ = preprocess(read_image(path), spec.preprocess, width, height)
            yield {spec.input_name: x}

    return feeds


def images_or_default(images: list[Path] | None, task: str) -> tuple[Path, ...]:
    """The user's --images, else the bundled photos for image models; none for raw models."""
    if images:
        return tuple(images)
    return () if task == "raw" else tuple(default_images())


def collect_images(paths: list[Path]) -> list[Path]:
    """Expand folders into their image files (sorted); every path must exist."""
    found: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            found += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            raise SpecError(f"image path {p} does not exist; pass an image file or a folder with --images")
    if not found:
        raise SpecError(
            f"no images found in {', '.join(map(str, paths))} (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return found


JPEG_SOI, JPEG_EOI = b"\xff\xd8", b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IMAGE_FIX = "replace the file or leave it out of --images"


def _jpeg_scan_start(data: bytes) -> int | None:
    """Offset of the first start-of-scan (SOS) segment of a JPEG, found by walking the marker segments
    from SOI (so an EXIF thumbnail inside APP1 is skipped); None when the headers end before a scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return pos
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def check_image_bytes(path: Path, data: bytes) -> None:
    """Refuse an image file that is empty, truncated or corrupt, with one line naming it. OpenCV decodes
    a truncated JPEG with only a libjpeg warning on stderr (the missing rows grey), so a photo cut short
    by a copy would otherwise be compared as if it were whole. Checks: a JPEG must have an end-of-image
    marker (FF D9) after its first scan, a PNG its IEND chunk; JPEGs and PNGs must then decode with
    Pillow (when it is installed), which refuses truncated and broken data streams."""
    if not data:
        raise SpecError(f"{path} is empty (0 bytes); {_IMAGE_FIX}")
    if data.startswith(JPEG_SOI):
        scan = _jpeg_scan_start(data)
        if scan is None or data.find(JPEG_EOI, scan) < 0:
            raise SpecError(
                f"{path} is a truncated or corrupt JPEG (no end-of-image marker FF D9 after its image "
                f"data); {_IMAGE_FIX}"
            )
        _check_with_pillow(path, "JPEG")
    elif data.startswith(PNG_SIGNATURE):
        if b"IEND" not in data:
            raise SpecError(f"{path} is a truncated PNG (no IEND chunk); {_IMAGE_FIX}")
        _check_with_pillow(path, "PNG")


def _check_with_pillow(path: Path, kind: str) -> None:
    """Decode with Pillow, if it is installed, and turn a decoding error into a SpecError."""
    try:
        from PIL import Image
    except ImportError:
        return
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
    except Image.DecompressionBombError:
        return  # very large, not corrupt: OpenCV decides
    except (OSError, SyntaxError, ValueError) as exc:  # what Pillow raises for broken data
        raise SpecError(f"{path} is a truncated or corrupt {kind} image ({exc}); {_IMAGE_FIX}") from None


def read_image(path: Path) -> np.ndarray:
    """Read an image as OpenCV does (BGR, uint8), after check_image_bytes: an empty, truncated or
    corrupt file is a SpecError naming it."""
    import cv2

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read image {path}: {exc.strerror or exc}") from None
    check_image_bytes(Path(path), data)
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise SpecError(f"{path} is not a readable image (OpenCV could not decode it)")
    return img


def letterbox(img: np.ndarray, width: int, height: int, pad_value: float) -> tuple[np.ndarray, Geometry]:
    """Resize keeping aspect ratio, then pad evenly (left/top get the smaller half)."""
    import cv2

    h, w = img.shape[:2]
    r = min(width / w, height / h)
    new_w, new_h = round(w * r), round(h * r)
    resized = cv2.resize(img, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    left, top = (width - new_w) // 2, (height - new_h) // 2
    out = cv2.copyMakeBorder(
        resized,
        top,
        height - new_h - top,
        left,
        width - new_w - left,
        cv2.BORDER_CONSTANT,
        value=(pad_value,) * 3,
    )
    return out, Geometry(w, h, new_w / w, new_h / h, left, top)


def preprocess(img_bgr: np.ndarray, pre: Preprocess, width: int, height: int) -> tuple[np.ndarray, Geometry]:
    """BGR uint8 image -> float32 NCHW tensor (batch 1) plus its geometry."""
    import cv2

    h, w = img_bgr.shape[:2]
    if pre.resize == "letterbox":
        img, geom = letterbox(img_bgr, width, height, pre.pad_value)
    else:
        img = cv2.resize(img_bgr, (width, height), interpolation=cv2.INTER_LINEAR)
        geom = Geometry(w, h, width / w, height / h, 0.0, 0.0)
    if pre.color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    x = img.astype(np.float32) * np.float32(pre.scale)
    x = (x - np.asarray(pre.mean, np.float32)) / np.asarray(pre.std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), geom


def load_inputs(spec: ModelSpec, images: list[Path], shape: tuple[int, ...] | None = None) -> list[InputItem]:
    """Every image preprocessed per the spec, at `shape` (default: the spec's input shape; another
    shape is recorded as the item's dynamic size)."""
    target = shape or spec.input_shape
    if len(target) != 4 or target[1] != 3:
        raise SpecError(f"image inputs need a shape like 1,3,H,W; got {','.join(map(str, target))}")
    height, width = target[2], target[3]
    items = []
    for path in collect_images(images):
        x, geom = preprocess(read_image(path), spec.preprocess, width, height)
        size = (height, width) if shape is not None else None
        items.append(InputItem(str(path), {spec.input_name: x}, geom, Path(path), size))
    return items


def inputs_for(spec: ModelSpec, images: list[Path], dynamic: bool = True) -> list[InputItem]:
    """The photos preprocessed per the spec at its input shape and then (with `dynamic`) at each of
    its dynamic shapes; for a spec with [inputs], the inputs it declares (see declared_inputs); without
    either, one seeded random input."""
    if spec.inputs is not None:
        if images:
            raise SpecError(
                f"{spec.name} takes the inputs its spec declares ([inputs] source = {spec.inputs.source!r}), "
                "not photos; leave out --images"
            )
        return declared_inputs(spec, dynamic)
    if not images:
        return [InputItem("random(seed=0)", random_input(spec))]
    found = collect_images(images)
    items = load_inputs(spec, found)
    for shape in spec.dynamic_shapes if dynamic else []:
        items += load_inputs(spec, found, shape)
    return items


def random_input(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded normal input for models that do not take images."""
    return {spec.input_name: generate("normal", spec.input_shape, np.random.default_rng(seed))}


def generate(kind: str, shape: tuple[int, ...], rng: np.random.Generator, axis: int = -1) -> np.ndarray:
    """One float32 input of `shape` drawn from `rng`. normal: standard normal; uniform: in [-1, 1);
    sine: along `axis`, each series a sum of three sines (periods 4-64 steps, amplitudes 0.2-1, random
    phases) plus normal noise of 0.05."""
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1.0, 1.0, shape)
    elif kind == "sine":
        if not -len(shape) < axis < len(shape) or axis == 0:
            raise SpecError(f"inputs.axis {axis} is not a time axis of the input shape {list(shape)}")
        series = tuple(np.delete(np.asarray(shape), axis))
        t = np.arange(shape[axis])
        period = rng.uniform(4.0, 64.0, (*series, 3, 1))
        amplitude = rng.uniform(0.2, 1.0, (*series, 3, 1))
        phase = rng.uniform(0.0, 2 * np.pi, (*series, 3, 1))
        waves = (amplitude * np.sin(2 * np.pi * t / period + phase)).sum(axis=-2)  # (*series, T)
        x = np.moveaxis(waves + 0.05 * rng.standard_normal(waves.shape), -1, axis)
    else:
        raise SpecError(f"unknown input generator {kind!r}")
    return np.ascontiguousarray(x, dtype=np.float32)


def declared_inputs(spec: ModelSpec, dynamic: bool = True) -> list[InputItem]:
    """The inputs of a spec's [inputs]: a generator's `count` inputs at the input shape, then (with
    `dynamic`) at each dynamic shape, each shape drawn afresh from the seed (so with `normal` a longer
    sequence begins with a shorter one's steps); or the rows of its .npy file. Labels say where each
    came from: `sine(seed=0)#2` (`@HxW`, the last two dimensions, at a dynamic shape), `eeg.npy#0`."""
    src = spec.inputs
    if src.source == "npy":
        rows = npy_rows(src, spec.input_shape)
        return [InputItem(f"{src.path.name}#{i}", {spec.input_name: r}) for i, r in enumerate(rows)]
    items = []
    for shape in [spec.input_shape, *(spec.dynamic_shapes if dynamic else [])]:
        rng = np.random.default_rng(src.seed)
        size = None if shape == spec.input_shape else (tuple(shape[-2:]) if len(shape) > 1 else (1, shape[0]))
        for i in range(src.count):
            x = generate(src.kind, shape, rng, src.axis)
            items.append(InputItem(f"{src.kind}(seed={src.seed})#{i}", {spec.input_name: x}, size=size))
    return items


def npy_rows(src: InputSource, shape: tuple[int, ...]) -> list[np.ndarray]:
    """The first `src.count` rows (all by default) of the .npy array at `src.path`, each as one float32
    input of `shape`: the file must hold a finite numeric array (N, *shape[1:])."""
    path = src.path
    try:
        arr = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SpecError(f"{path} is not a readable .npy array ({exc}); write it with numpy.save") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        what = arr.dtype if isinstance(arr, np.ndarray) else type(arr).__name__
        raise SpecError(f"{path} must hold a numeric array, not {what}")
    if arr.ndim != len(shape) or arr.shape[1:] != tuple(shape[1:]) or not arr.shape[0]:
        raise SpecError(
            f"{path} holds an array of shape {list(arr.shape)}; the spec's input {list(shape)} needs "
            f"(N, {', '.join(map(str, shape[1:]))}) with N >= 1"
        )
    count = src.count or arr.shape[0]
    if count > arr.shape[0]:
        raise SpecError(f"inputs.count = {count} but {path} has only {arr.shape[0]} rows")
    if not np.isfinite(arr[:count]).all():
        raise SpecError(f"{path} holds NaN or infinite values in its first {count} rows")
    return [np.ascontiguousarray(arr[i : i + 1], dtype=np.float32) for i in range(count)]


def input_source(spec: ModelSpec, images: list[Path] | tuple[Path, ...]) -> dict:
    """What report.json's input.source says the inputs were: the spec's [inputs] (an .npy file with its
    sha256), the photos, or the one seeded random input."""
    src = spec.inputs
    if src is None:
        if images:
            return {"source": "images", "paths": [str(p) for p in images]}
        return {"source": "random", "kind": "normal", "seed": 0, "count": 1}
    if src.source == "npy":
        digest = hashlib.sha256(src.path.read_bytes()).hexdigest()
        count = src.count or np.load(src.path, mmap_mode="r", allow_pickle=False).shape[0]
        return {"source": "npy", "path": str(src.path), "sha256": digest, "count": count}
    out = {"source": "generator", "kind": src.kind, "seed": src.seed, "count": src.count}
    return {**out, "axis": src.axis} if src.kind == "sine" else out
