"""The versions of deploytool and every tool that computes a result: for reports and cache keys."""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version

from . import __version__

_DISTRIBUTIONS = (
    ("torch", "torch"),
    ("onnx", "onnx"),
    ("onnxruntime", "onnxruntime"),
    ("ncnn", "ncnn"),
    ("opencv", "opencv-python-headless"),
)


def _installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def pnnx_version() -> str | None:
    return _installed("pnnx")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"deploytool": __version__, "python": platform.python_version()}
    for key, dist in _DISTRIBUTIONS:
        out[key] = _installed(dist)
    out["pnnx"] = pnnx_version()
    return out
