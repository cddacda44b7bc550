"""What a target is: a place where deploytool_runner executes. A target builds (or finds) the runner
for itself, and opens sessions: a work folder there into which files are put, in which the runner is
executed, and from which its outputs are fetched back. The ncnn-cpp backend talks only to this."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path


class Session(ABC):
    """A work folder on the target for the lifetime of one loaded runner (`with target.open() as s`)."""

    @abstractmethod
    def put(self, local: Path, name: str) -> str:
        """Copy the local file `local` into the work folder as `name` (a plain file name); returns the
        path the runner is given for it."""

    @abstractmethod
    def run(self, args: list[str], log: Path) -> str:
        """Execute the runner with `args` (paths as put() returned them, or names in the work folder)
        in the work folder; returns its stdout. Its stderr and stdout go to `log`. A non-zero exit, a
        signal or a lost connection raises BackendError naming the step and the log."""

    @abstractmethod
    def fetch(self, name: str, local: Path) -> Path:
        """Bring the folder `name` that the runner wrote in the work folder back as `local`."""

    @abstractmethod
    def close(self) -> None:
        """Remove the work folder."""

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Target(ABC):
    """Where the runner executes. `suffix` is what follows '@' in a backend name ('' for local)."""

    suffix: str = ""
    arch: str = "x86_64"
    emulated: bool = False  # times measured there say nothing about a board

    @abstractmethod
    def available(self) -> tuple[bool, str | None]:
        """Whether the runner can execute here, and why not."""

    @abstractmethod
    def open(self) -> Session:
        """Build or find the runner for this target and open a work folder there."""

    def describe(self) -> str:
        """One line for reports: the machine the runner executed on."""
        return f"{self.arch}" + (" (emulated)" if self.emulated else "")
