"""Helpers shared by test modules (pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

from deploytool.convert import convert
from deploytool.export import export_onnx, export_torchscript


def convert_model(model, x, folder: Path, via: str = "torchscript") -> tuple[Path, Path]:
    """Export `model` (TorchScript or ONNX) and convert it with pnnx in fp32, as `deploytool run`
    does; returns (.param, .bin)."""
    folder.mkdir(parents=True, exist_ok=True)
    if via == "torchscript":
        source = export_torchscript(model, x, folder / "m.pt")
    else:
        source = export_onnx(model, x, folder / "m.onnx", ["input"], ["output"])
    converted = convert(source, folder, "pnnx" if via == "torchscript" else "pnnx-onnx", tuple(x.shape))
    return converted.param, converted.bin
