"""Where the C++ runner executes: the local machine, an emulated aarch64 CPU (qemu-aarch64), or a board
over SSH. A backend name may carry a target after '@': `ncnn-cpp`, `ncnn-cpp@aarch64`,
`ncnn-cpp@aarch64:max`, `ncnn-cpp@ssh:pi@board.local:2222:deploytool`."""

from __future__ import annotations

import re

from ..errors import SpecError
from .base import Session, Target

_CPU = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
FORMS = "aarch64, aarch64:CPU (a qemu-aarch64 -cpu name, e.g. max) or ssh:[user@]host[:port][:DIR]"


def check_target(text: str) -> None:
    """Check what follows '@' in a backend name without touching the target (no build, no connection)."""
    make_target(text)


def make_target(text: str) -> Target:
    """The Target named by what follows '@' ('' = this machine)."""
    kind, sep, rest = text.partition(":")
    if text == "":
        from .local import LocalTarget

        return LocalTarget()
    if kind == "aarch64" and (not sep or _CPU.fullmatch(rest)):
        from .qemu import QemuTarget

        return QemuTarget(rest or "cortex-a72")
    if kind == "ssh" and rest:
        from .ssh import SshTarget

        return SshTarget(rest)
    raise SpecError(f"unknown target {text!r} after '@'; use {FORMS}")


__all__ = ["FORMS", "Session", "Target", "check_target", "make_target"]
