"""Typed errors; cli.py maps each class to its exit code."""

import difflib


class DeployError(Exception):
    """Base class: the message says what failed, why, and which flag fixes it."""

    exit_code = 3


class ParityError(DeployError):
    """A parity check failed (exit 1)."""

    exit_code = 1


class SpecError(DeployError):
    """The user's input is wrong: unknown model, bad shape, missing or corrupt file (exit 2)."""

    exit_code = 2


class ExportError(DeployError):
    """Exporting to TorchScript or ONNX failed (exit 3)."""

    exit_code = 3


class ConvertError(DeployError):
    """A converter (pnnx, onnx2ncnn) failed (exit 3)."""

    exit_code = 3


class BackendError(DeployError):
    """A backend crashed while loading or running a model (exit 3)."""

    exit_code = 3


class BackendUnavailable(DeployError):
    """A required backend or tool is not installed or has no device (exit 4)."""

    exit_code = 4


class RemoteDeployError(DeployError):
    """A step of `deploytool deploy` on a board failed: connecting, copying, building or running the
    runner there (exit 3)."""

    exit_code = 3


def did_you_mean(word: str, choices) -> str:
    """The hint `did you mean 'CLOSEST'? ` (with its trailing space) for the choice closest to `word`,
    or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""
