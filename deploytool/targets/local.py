"""This machine as a target: the runner built here (build_runner), executed in a temporary work folder.
QemuTarget reuses LocalSession with `qemu-aarch64 -cpu CPU ...` in front of the executable."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ..errors import BackendError
from ..tools import run_tool
from .base import Session, Target
from .build import RUNNER_EXE, build_runner, runner_available

# One runner process (model load + every input of one call). Generous: ResNet18 under qemu takes
# 1-16 s; a process that runs this long is stuck.
RUN_TIMEOUT_S = 900.0


class LocalSession(Session):
    """A temporary work folder on this machine; the runner `exe` runs there as `[*prefix, exe, *args]`."""

    def __init__(
        self, exe: Path, stage: str, prefix: list[str] | None = None, timeout: float = RUN_TIMEOUT_S
    ):
        self.exe = Path(exe)
        self.stage = stage  # how failures name the step, e.g. "ncnn-cpp@aarch64"
        self.prefix = list(prefix or [])
        self.timeout = timeout
        self.work = Path(tempfile.mkdtemp(prefix="deploytool-target."))

    def _path(self, name: str) -> Path:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"{name!r} is not a plain file name")
        return self.work / name

    def put(self, local: Path, name: str) -> str:
        dest = self._path(name)
        dest.unlink(missing_ok=True)
        try:
            os.link(local, dest)  # the runner only reads it; a copy only across file systems
        except OSError:
            shutil.copyfile(local, dest)
        return str(dest)

    def run(self, args: list[str], log: Path) -> str:
        what = f"{RUNNER_EXE} under {Path(self.prefix[0]).name}" if self.prefix else RUNNER_EXE
        ran = run_tool(
            [*self.prefix, str(self.exe), *args],
            log,
            self.stage,
            cwd=self.work,
            timeout=self.timeout,
            error=BackendError,
            capture_stdout=True,
            tool=what,
        )
        return ran.stdout or ""

    def fetch(self, name: str, local: Path) -> Path:
        """The folder is already here: returns it in place (`local` is not used)."""
        path = self._path(name)
        if not path.is_dir():
            raise BackendError(f"{self.stage}: {RUNNER_EXE} wrote no {name}/ in its work folder {self.work}")
        return path

    def close(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class LocalTarget(Target):
    """This machine (x86_64): the runner built by build_runner() with OpenCV decoding images."""

    suffix = ""
    arch = "x86_64"
    emulated = False

    def available(self) -> tuple[bool, str | None]:
        return runner_available(self.arch)

    def open(self) -> LocalSession:
        return LocalSession(build_runner(arch=self.arch), stage="ncnn-cpp")

    def describe(self) -> str:
        return f"{self.arch}, this machine"
