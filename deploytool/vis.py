"""Detections drawn on the photos: each backend's boxes beside the reference's (`run --save-vis`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .errors import SpecError


def draw_verdict(spec, verdict, folder: Path) -> None:
    """Each photo with the reference's and the backend's boxes, `PHOTO_HxW.BACKEND.jpg`."""
    from .detect import draw
    from .inputs import read_image

    settings = spec.detect
    for pair in verdict.decoded:
        if pair.item.image is None:
            continue
        img = read_image(pair.item.image)
        h, w = pair.item.size or spec.input_shape[2:]
        for who, dets in ((verdict.reference, pair.ref), (verdict.backend, pair.got)):
            path = folder / f"{pair.item.image.stem}_{h}x{w}.{who}.jpg"
            _write_jpeg(path, draw(img, dets, settings.names, settings.conf))


def _write_jpeg(path: Path, img: np.ndarray) -> None:
    import cv2

    ok, data = cv2.imencode(".jpg", img)
    if not ok:
        raise SpecError(f"OpenCV could not encode {path}")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.tobytes())
