"""An emulated aarch64 CPU as a target: the cross-built (static, simpleocv) runner executed here under
`qemu-aarch64 -cpu CPU` (Debian qemu-user). cortex-a72 is an ARMv8.0 core (Raspberry Pi 4: NEON fp32);
`max` has every extension qemu knows (ARMv8.2+ fp16 arithmetic, dot product), which ncnn picks at run
time. Times measured here say nothing about a board (emulated=True)."""

from __future__ import annotations

import functools
import shutil

from ..errors import BackendError, BackendUnavailable, SpecError, did_you_mean
from ..tools import run_tool
from .base import Target
from .build import FIX, build_runner, cache_root, runner_available
from .local import LocalSession

QEMU = "qemu-aarch64"
SYSROOT = "/usr/aarch64-linux-gnu"  # Debian's aarch64 libraries (libc6-arm64-cross); the runner is static
DEFAULT_CPU = "cortex-a72"


@functools.cache
def qemu_cpus() -> tuple[str, ...]:
    """The CPU names `qemu-aarch64 -cpu help` lists."""
    log = cache_root() / "logs" / "qemu-aarch64-cpu-help.log"
    try:
        run_tool([QEMU, "-cpu", "help"], log, "listing qemu-aarch64 CPUs", timeout=60, error=BackendError)
    except BackendError:
        pass  # qemu-user (7.2) exits with 1 after printing the list; what counts is the list
    text = log.read_text(errors="replace") if log.is_file() else ""
    _, found, rest = text.partition("Available CPUs:")
    cpus = tuple(ln.split()[0] for ln in rest.splitlines() if ln.strip())
    if not found or not cpus:
        raise BackendError(f"{QEMU} -cpu help listed no CPUs; log: {log}")
    return cpus


class QemuTarget(Target):
    """The aarch64 runner under qemu-aarch64 emulating `cpu`; backend suffix `aarch64` (cortex-a72)
    or `aarch64:CPU`."""

    arch = "aarch64"
    emulated = True

    def __init__(self, cpu: str = DEFAULT_CPU):
        self.cpu = cpu
        self.suffix = "aarch64" if cpu == DEFAULT_CPU else f"aarch64:{cpu}"

    def available(self) -> tuple[bool, str | None]:
        """Raises SpecError for a CPU qemu does not know (the user's error), with a did-you-mean."""
        if shutil.which(QEMU) is None:
            return False, f"{QEMU} is not installed (Debian qemu-user); {FIX}"
        cpus = qemu_cpus()
        if self.cpu not in cpus:
            hint = did_you_mean(self.cpu, cpus)
            raise SpecError(
                f"ncnn-cpp@{self.suffix}: {QEMU} has no CPU {self.cpu!r}; {hint}known: {', '.join(cpus)}"
            )
        return runner_available(self.arch)

    def open(self) -> LocalSession:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"ncnn-cpp@{self.suffix}: {reason}")
        exe = build_runner(arch=self.arch)
        prefix = [QEMU, "-cpu", self.cpu, "-L", SYSROOT]
        return LocalSession(exe, stage=f"ncnn-cpp@{self.suffix}", prefix=prefix)

    def describe(self) -> str:
        return f"aarch64 {self.cpu} (emulated by {QEMU} -cpu {self.cpu})"


__all__ = ["DEFAULT_CPU", "QEMU", "QemuTarget", "qemu_cpus"]
