"""Run an external tool (pnnx, onnx2ncnn, cmake, the C++ runner, a bench worker) with its output kept in a
log, its return code checked, and a failure reported as a DeployError that says what to read next.

    run_tool(["cmake", "--build", "b"], logs / "build.log", "ncnn-cpp: building the C++ runner",
             error=BackendError)

writes `$ cmake --build b` and then everything the tool printed to build.log; on failure it raises
`BackendError("ncnn-cpp: building the C++ runner: cmake exited with code 2 (last line: ...); log: ...")`.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DeployError

LAST_LINE_CHARS = 200
# Only the end of a log is read for its last line; build logs can be megabytes.
_TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class ToolRun:
    """A finished, successful tool run."""

    cmd: list[str]
    returncode: int
    log: Path
    seconds: float
    stdout: str | None = None  # only with capture_stdout=True


def exit_description(returncode: int) -> str:
    """`exited with code 2`, or `was killed by SIGSEGV` for a process a signal ended (returncode -11)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


# Lines that end a failed build without saying why: make's and ninja's trailers, gcc's sign-off and the
# source excerpt under a compiler diagnostic (`    8 | #include <cpu.h>`). The line before them is the cause.
_TRAILER = re.compile(
    r"(g?make(\[\d+\])?: \*\*\* .*|ninja: build stopped: .*|compilation terminated\.|\d*\s*\|.*)"
)


def last_line(text: str, limit: int = LAST_LINE_CHARS) -> str | None:
    """The last non-blank line of `text` that is not a build tool's trailer (make's `*** ... Error 2`),
    stripped and cut to `limit` characters; None when `text` has no non-blank line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return None
    line = next((ln for ln in reversed(lines) if not _TRAILER.fullmatch(ln)), lines[-1])
    return line if len(line) <= limit else line[: limit - 1] + "…"


def log_last_line(log: Path, start: int = 0, limit: int = LAST_LINE_CHARS) -> str | None:
    """The last non-blank line of the file `log` after byte offset `start` (None when there is none or
    the file cannot be read). Reads only the end of the file."""
    try:
        with open(log, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(start, size - _TAIL_BYTES))
            data = fh.read()
    except OSError:
        return None
    return last_line(data.decode(errors="replace"), limit)


def run_tool(
    cmd: list[str],
    log: Path,
    stage: str,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    error: type[DeployError] = DeployError,
    capture_stdout: bool = False,
    tool: str | None = None,
) -> ToolRun:
    """Run `cmd` with stdin closed, its output in `log`, and raise `error` unless it exits with 0.

    `log` (its folder is created) starts with `$ <cmd>`, then holds the tool's stdout and stderr as they
    come. With `capture_stdout`, stdout is returned as text in `ToolRun.stdout` instead and only stderr
    streams into the log (stdout is appended after the tool exits, under a `--- stdout ---` line).
    Failures raise `error(message)`, the message being `<stage>: <tool> <what happened>` with
    what happened one of: `could not start: ...`, `timed out after N s`, `exited with code N` or
    `was killed by SIGNAME`, followed by the last line the tool printed and the log's path.
    `tool` names the program in messages (default: the file name of cmd[0]).
    """
    cmd = [str(c) for c in cmd]
    name = tool or Path(cmd[0]).name
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log, "wb") as fh:
        fh.write(f"$ {shlex.join(cmd)}\n".encode())
        fh.flush()
        header = fh.tell()
        try:
            proc = subprocess.run(
                cmd,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture_stdout else fh,
                stderr=fh if capture_stdout else subprocess.STDOUT,
                timeout=timeout,
            )
        except OSError as exc:
            fh.write(f"could not start {cmd[0]}: {exc}\n".encode())
            raise error(f"{stage}: could not start {name}: {exc}; log: {log}") from exc
        except subprocess.TimeoutExpired as exc:
            tail = log_last_line(log, header)
            fh.write(f"\n[deploytool: killed after {timeout:g} s]\n".encode())
            raise error(f"{stage}: {name} timed out after {timeout:g} s{_hint(tail)}; log: {log}") from exc
    seconds = time.perf_counter() - started
    stdout = proc.stdout.decode(errors="replace") if capture_stdout else None
    tail = log_last_line(log, header) if proc.returncode != 0 else None
    if stdout:
        with open(log, "a", encoding="utf-8", errors="replace") as fh:
            fh.write("--- stdout ---\n" + stdout + ("" if stdout.endswith("\n") else "\n"))
    if proc.returncode != 0:
        if tail is None and stdout:
            tail = last_line(stdout)
        raise error(f"{stage}: {name} {exit_description(proc.returncode)}{_hint(tail)}; log: {log}")
    return ToolRun(cmd=cmd, returncode=proc.returncode, log=log, seconds=seconds, stdout=stdout)


def _hint(tail: str | None) -> str:
    return f" (last line: {tail})" if tail else ""
