"""Export an nn.Module to TorchScript (trace) and ONNX (TorchScript-based exporter + onnx.checker)."""

from __future__ import annotations

import warnings
from pathlib import Path

from .atomic import atomic_path, write_text
from .errors import ExportError, SpecError

DEFAULT_OPSET = 17
# The --opset range accepted: what the TorchScript-based exporter writes and onnx.checker passes.
MIN_OPSET, MAX_OPSET = 7, 21


def check_opset(opset: int) -> int:
    """`opset` if the ONNX exporter supports it; anything else is the user's error (--opset), raised
    before the model is built."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise SpecError(
            f"--opset {opset} is outside what the ONNX exporter supports ({MIN_OPSET}..{MAX_OPSET}); "
            f"try --opset {DEFAULT_OPSET}"
        )
    return opset


def export_torchscript(model, example, path: Path) -> Path:
    """Trace `model` on `example` and save it atomically to `path`."""
    import torch

    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)  # tracing is deliberate: pnnx reads it
            traced = torch.jit.trace(model, example)
    except Exception as exc:
        raise _failure("torch.jit.trace failed", exc, path) from exc
    with atomic_path(path) as tmp:
        traced.save(str(tmp))
    return path


def export_onnx(
    model,
    example,
    path: Path,
    input_names: list[str],
    output_names: list[str],
    opset: int = DEFAULT_OPSET,
    dynamic: bool = False,
) -> Path:
    """Export with torch's TorchScript-based ONNX exporter (dynamo=False, chosen deliberately:
    it needs no onnxscript and keeps the spec's input/output names), then run onnx.checker."""
    import onnx
    import torch

    check_opset(opset)
    # An image's H and W are declared dynamic (any other rank: every axis but the batch, e.g. a sequence's
    # length); the exporter derives the outputs' shapes.
    axes = (
        {2: "height", 3: "width"} if example.dim() == 4 else {i: f"dim{i}" for i in range(1, example.dim())}
    )
    dynamic_axes = {input_names[0]: axes} if dynamic else None
    with atomic_path(path) as tmp:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    model,
                    (example,),
                    str(tmp),
                    dynamo=False,
                    opset_version=opset,
                    input_names=input_names,
                    output_names=output_names,
                    dynamic_axes=dynamic_axes,
                )
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise _failure("onnx.checker rejected the exported model", exc, path) from exc
        except Exception as exc:
            raise _failure("ONNX export failed", exc, path) from exc
    return path


def _failure(what: str, exc: Exception, path: Path) -> ExportError:
    """One line for the user: the exception's first line; its whole text (torch's can hold the entire
    graph, kilobytes) goes to logs/export-<file>.log beside the output."""
    text = str(exc).strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if len(first) > 300:
        first = first[:300] + "…"
    msg = f"{what}: {type(exc).__name__}: {first}"
    if text != first:
        log = Path(path).parent / "logs" / f"export-{Path(path).name}.log"
        write_text(log, f"{what}: {type(exc).__name__}\n{text}\n")
        msg += f"; full message: {log}"
    return ExportError(msg)


def example_tensor(x):
    """The torch tensor that tracing and export run on (from a numpy array)."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))


def try_forward(model, example, spec) -> None:
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
