"""ONNX Runtime's own static int8 model of the exported ONNX file (the bench peer `onnxruntime/int8`):
QDQ format, per-output-channel QInt8 weights, QUInt8 activations, MinMax calibration on the same photos and
the same preprocessing as ncnn's int8 model (inputs.calibration_feeds).

Why these settings (quantize_static's own guidance for x86-64, and measurements on this repo's models,
issue 11):
- QDQ: ORT's CPU kernels are written for it (DequantizeLinear -> Conv -> QuantizeLinear runs as QLinearConv).
- per-channel weights: ResNet-style weight ranges differ per output channel; ncnn's int8 is per-channel too.
- QUInt8 activations with QInt8 weights, reduce_range off: MLAS's u8 x s8 kernels (VNNI here) are its fast
  path. QInt8 activations measured 2.5x slower on seeded ResNet18 (24.8 vs 9.8 ms, 1 thread) with the same
  cosine (0.9995).
- MinMax: Entropy wrote identical scales on ResNet18 and EfficientNet-Lite0 with 12 calibration photos;
  Percentile (99.999) tightened them and lost top-5 agreement (0.97 vs 1.0).
- no quant_pre_process: no measurable change on ResNet18 or EfficientNet-Lite0 (same scales and cosine,
  latency within noise), and its symbolic shape inference fails on yolov8n's dynamic-size export."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_path
from ..errors import BackendError, DeployError
from ..inputs import calibration_feeds


@dataclass(frozen=True)
class OrtQuantRecipe:
    """How ONNX Runtime quantizes the exported model (calibrated on images/calib, like ncnn's int8)."""

    method: str = "minmax"  # onnxruntime's CalibrationMethod: minmax | entropy | percentile
    activations: str = "uint8"  # uint8 (QUInt8, asymmetric) | int8 (QInt8); weights are always QInt8

    @property
    def description(self) -> str:
        act = "QUInt8" if self.activations == "uint8" else "QInt8"
        return (
            f"ONNX Runtime's static int8 (quantize_static): QDQ, per-channel QInt8 weights, {act} "
            f"activations, {self.method} calibration (images/calib)"
        )


def int8_path(onnx: Path) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    return onnx.with_name(f"{onnx.stem}.int8{onnx.suffix}")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over inputs.calibration_feeds."""

    def __init__(self, feeds: Callable[[], Iterable[dict[str, np.ndarray]]]):
        self._feeds = feeds
        self._it = iter(feeds())

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds())


def quantize_onnx(
    spec, onnx: Path, calib: Iterable[Path | str], recipe: OrtQuantRecipe = OrtQuantRecipe(),
    out: Path | None = None,
) -> Path:  # fmt: skip
    """Write ONNX Runtime's static int8 model of `onnx` (default: model.int8.onnx beside it), calibrated
    on the spec's preprocessing of the `calib` photos. A failure inside onnxruntime is a BackendError."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    feeds = calibration_feeds(spec, list(calib))
    out = Path(out) if out is not None else int8_path(Path(onnx))
    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[recipe.method]  # fmt: skip
    activation = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[recipe.activations]
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs "consider pre-processing": measured, declined above
    try:
        with atomic_path(out) as target:
            quantize_static(
                str(onnx), str(target), _Reader(feeds), quant_format=QuantFormat.QDQ, per_channel=True,
                reduce_range=False, activation_type=activation, weight_type=QuantType.QInt8,
                calibrate_method=method,
            )  # fmt: skip
    except DeployError:  # an unreadable calibration photo is the user's input error
        raise
    except Exception as exc:  # onnxruntime raises bare Exceptions too
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BackendError(f"ONNX Runtime could not quantize {onnx} ({recipe.method}): {first}") from None
    finally:
        root.setLevel(level)
    return out
