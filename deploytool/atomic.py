"""Atomic file output: write to a temporary name beside the target, rename on success.

And interrupts: `interrupts_raise()` turns SIGINT, SIGTERM and SIGHUP into an `Interrupted` exception (a
KeyboardInterrupt) in the main thread, so that every `finally` block, including atomic_path's, removes
its temporary files before the process exits; `deferred_signals()` holds them while a few renames that
must happen together run."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The signals that end a run early: Ctrl-C, `kill` / a CI job's cancel, a closed terminal.
INTERRUPT_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def temp_path_for(path: Path) -> Path:
    """A temporary name in the same folder (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree if it is there."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def atomic_path(path: Path | str):
    """Yield a temporary path to write; it replaces `path` only if the block succeeds. Whatever ends
    the block otherwise (an exception, KeyboardInterrupt, an Interrupted signal, SystemExit), the
    temporary file (or folder, for writers that make one) is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        remove_path(tmp)


def write_text(path: Path | str, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


class Interrupted(KeyboardInterrupt):
    """A signal (SIGINT, SIGTERM, SIGHUP) ended the run; `signum` says which."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def interrupts_raise(signums: tuple[int, ...] = INTERRUPT_SIGNALS) -> Iterator[list[int]]:
    """While the block runs, the first of `signums` raises Interrupted(signum) in the main thread (the
    same way Ctrl-C raises KeyboardInterrupt), so cleanup code runs. Later signals are ignored: the
    cleanup the first one started runs undisturbed. Yields the list of received signals (empty, or the
    first one). A signal the process inherited as ignored (nohup, a background job) stays ignored;
    outside the main thread nothing is installed. The previous handlers come back when the block ends."""
    received: list[int] = []

    def handler(signum, frame):
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {}
    if _in_main_thread():
        for s in signums:
            if signal.getsignal(s) is signal.SIG_IGN:
                continue
            previous[s] = signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)


@contextmanager
def deferred_signals(signums: tuple[int, ...] = INTERRUPT_SIGNALS) -> Iterator[None]:
    """Hold `signums` while the block runs (a few renames that must not be separated by an interrupt);
    the first one that arrived is handed to the previous handler when the block ends."""
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for s in signums:
        previous[s] = signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, signal.SIG_DFL if old is None else old)
        if pending:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler) -> None:
    """Act on a held signal as its handler would have."""
    if callable(handler):
        handler(signum, None)
    elif handler in (signal.SIG_DFL, None):
        os.kill(os.getpid(), signum)


def writable_folder(folder: Path, what: str) -> Path:
    """Create `folder` if needed and check it can be written; `what` names it in the error (e.g.
    "--out out/x"). A file in the way, a folder that cannot be made or written is the user's error."""
    from .errors import SpecError

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise SpecError(f"{what}: {folder} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpecError(f"{what}: cannot create {folder} ({exc.strerror}); choose another path") from None
    if not os.access(folder, os.W_OK):
        raise SpecError(f"{what}: {folder} is not writable; choose another path")
    return folder
