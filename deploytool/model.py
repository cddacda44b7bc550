"""From a spec to a PyTorch model: import the factory, build the nn.Module, load its weights safely
(weights_only=True). Every failure in the user's code is a SpecError naming the factory."""

from __future__ import annotations

import importlib
import inspect
import traceback
from pathlib import Path

from .errors import DeployError, SpecError
from .spec import ModelSpec


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else "(no message)"


def _where(exc: BaseException) -> str:
    """` (at FILE:LINE)` of the innermost frame of exc's traceback, '' when there is none."""
    tb = traceback.extract_tb(exc.__traceback__)
    return f" (at {tb[-1].filename}:{tb[-1].lineno})" if tb else ""


def _import_factory_module(module_name: str, factory: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise SpecError(
                f"cannot import {module_name!r} for factory {factory!r}: no module named {exc.name!r} "
                "(check the spelling, install the package or add its folder to PYTHONPATH)"
            ) from None
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} failed: {_first_line(exc)}{_where(exc)}"
        ) from None
    except SyntaxError as exc:
        raise SpecError(
            f"cannot import {module_name!r} for factory {factory!r}: SyntaxError: {exc.msg} "
            f"(at {exc.filename}:{exc.lineno})"
        ) from None
    except SystemExit as exc:
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} called sys.exit({exc.code!r}){_where(exc)}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"importing {module_name!r} for factory {factory!r} raised {type(exc).__name__}: "
            f"{_first_line(exc)}{_where(exc)}"
        ) from None


def build_model(spec: ModelSpec, weights: str | None = None):
    """Import the factory, build the nn.Module in eval mode, load `weights` if given. Whatever goes
    wrong in the user's factory (an import error, an exception, sys.exit, a missing argument, a
    return value that is not an nn.Module) is a SpecError naming the factory."""
    import torch

    if spec.onnx is not None:
        raise SpecError(
            f"{spec.source} names an ONNX file, not a PyTorch model: `deploytool run {spec.name}` checks it "
            "against ONNX Runtime"
        )
    module_name, _, attr = spec.factory.partition(":")
    if not module_name or not attr:
        raise SpecError(f"factory {spec.factory!r} must look like package.module:function")
    module = _import_factory_module(module_name, spec.factory)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpecError(f"{module_name} has no callable {attr!r} (from factory {spec.factory!r})")
    try:
        inspect.signature(factory).bind(**spec.factory_args)
    except TypeError as exc:
        given = ", ".join(spec.factory_args) or "no arguments"
        raise SpecError(
            f"factory {spec.factory} cannot be called with {given}: {exc}; give its arguments in the "
            "factory_args table of a .toml spec"
        ) from None
    except ValueError:  # no signature to check (a builtin): the call below says what is wrong
        pass
    try:
        model = factory(**spec.factory_args)
    except DeployError:
        raise
    except SystemExit as exc:
        raise SpecError(
            f"factory {spec.factory} called sys.exit({exc.code!r}) instead of returning a model{_where(exc)}"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"factory {spec.factory} raised {type(exc).__name__}: {_first_line(exc)}{_where(exc)}"
        ) from None
    if not isinstance(model, torch.nn.Module):
        raise SpecError(
            f"factory {spec.factory} returned {type(model).__name__}, not a torch.nn.Module; "
            "it must return the model"
        )
    if weights is not None:
        load_weights(model, weights)
    return model.eval()


def load_weights(model, path: str) -> None:
    """Load a state_dict checkpoint safely (weights_only=True); refuse anything else clearly."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise SpecError(f"weights file {path} does not exist")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "Unsupported class" in text:
            raise SpecError(
                f"{path} needs unsafe unpickling (it holds more than tensors); "
                "save a plain state_dict with torch.save(model.state_dict(), path)"
            ) from None
        # torch reports a file that is no pickle at all as a weights_only failure too
        detail = text.split("WeightsUnpickler error:", 1)[-1]
        first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), type(exc).__name__)
        raise SpecError(
            f"{path} is not a readable PyTorch checkpoint ({first}); pass a file written by "
            "torch.save(model.state_dict(), path)"
        ) from None
    except Exception as exc:
        raise SpecError(
            f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise SpecError(f"{path} does not hold a state_dict (got {type(state).__name__})")
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # tensor shape mismatch
        first = str(exc).strip().splitlines()[-1].strip()
        raise SpecError(f"{path} does not fit this model: {first}") from None
    if result.missing_keys or result.unexpected_keys:
        raise SpecError(
            f"{path} does not fit this model: missing {list(result.missing_keys)[:3]}, "
            f"unexpected {list(result.unexpected_keys)[:3]}"
        )
