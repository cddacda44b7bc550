"""Run a native backend in a child process, so that a crash inside it (SIGSEGV, SIGFPE, abort) ends that
backend with a BackendError instead of ending deploytool with it.

    worker = Worker("ncnn-vulkan", "deploytool.backends.ncnn_runner:NcnnSession", param, bin, ...)
    outputs, seconds = worker.call("infer", feed, doing="running the model")
    worker.stop()

The child is a fresh interpreter (`python -c`, never a fork: the parent may have initialised Vulkan) that
builds `target(*args)` and then answers method calls on it: requests and replies are pickled over two
pipes of their own, so nothing a native library prints can corrupt them. The child's stdout and stderr go
to `worker.log` in a temporary folder; the folder is removed after a clean stop and kept when the child
dies, and the BackendError names the backend, how the child ended (`killed by SIGFPE`), what it was doing
and the log:

    backend ncnn-vulkan crashed (killed by SIGFPE) while running the model; log: /tmp/deploytool-…/worker.log

An exception raised by the object in the child (e.g. SpecError for a .param ncnn cannot load) is sent back
and raised again in the parent unchanged.
"""

from __future__ import annotations

import faulthandler
import importlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

from ..errors import BackendError
from ..tools import exit_description, last_line

# Test hook: "[BACKEND:]METHOD:SIGNAME" (e.g. "ncnn-vulkan:infer:SIGFPE") makes a worker (of BACKEND only,
# when given) kill itself with SIGNAME when it is asked to run METHOD ("__init__" is the load; "*" any),
# as a native crash would end it.
CRASH_ENV = "DEPLOYTOOL_TEST_WORKER_CRASH"
STOP_TIMEOUT_S = 30.0
_TAIL_BYTES = 64 * 1024
_DEVICE_LINE = re.compile(r"\[\d+ [^\]]*\] ")
_CHILD = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "from deploytool.backends.isolated import serve; serve(*sys.argv[2:])"
)


class Worker:
    """A child process holding `target(*args)` (target is "package.module:callable")."""

    def __init__(self, name: str, target: str, *args: Any, doing: str = "loading the model"):
        self.name = name
        self.folder = Path(tempfile.mkdtemp(prefix=f"deploytool-{name}-"))
        self.log = self.folder / "worker.log"
        self.died = False
        self._how = ""
        root = str(Path(__file__).resolve().parents[2])  # the deploytool this process runs, not another
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        try:
            with open(self.log, "wb") as log:
                self.proc = subprocess.Popen(
                    [sys.executable, "-c", _CHILD, root, name, target, str(request_r), str(reply_w)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(request_r, reply_w),
                    cwd=self.folder,  # a core file, if the system writes one, lands beside the log
                )
        except OSError as exc:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            shutil.rmtree(self.folder, ignore_errors=True)
            raise BackendError(f"backend {name}: could not start its worker process: {exc}") from exc
        os.close(request_r)  # the child's ends
        os.close(reply_w)
        self._requests = os.fdopen(request_w, "wb")
        self._replies = os.fdopen(reply_r, "rb")
        try:
            self.call("__init__", *args, doing=doing)
        except BaseException:
            self.stop(check=False)
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def call(self, method: str, *args: Any, doing: str) -> Any:
        """`method(*args)` on the child's object; its result, or its exception raised here. The child's
        death is a BackendError naming `doing` (e.g. "running the model")."""
        if self.died or self.proc.poll() is not None:
            raise self._death(doing)
        try:
            pickle.dump((method, args), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
            self._requests.flush()
            status, value = pickle.load(self._replies)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._death(doing) from None
        if status == "error":
            raise value
        return value

    def stop(self, check: bool = True, doing: str = "unloading the model") -> None:
        """Ask the child to release its object and exit; kill it if it does not within STOP_TIMEOUT_S.
        The folder is removed when the child exits cleanly. With `check`, a child that dies while
        stopping raises BackendError (its log kept)."""
        if self.proc.poll() is None and not self.died:
            try:
                pickle.dump(("close", ()), self._requests, protocol=pickle.HIGHEST_PROTOCOL)
                self._requests.flush()
            except OSError:
                pass
        for pipe in (self._requests, self._replies):
            try:
                pipe.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            self._note(f"worker did not exit within {STOP_TIMEOUT_S:g} s of being asked to; killed")
            self.died, self._how = True, "killed: it did not stop"
        if self.died:
            return
        if self.proc.returncode != 0:
            error = self._death(doing)
            if check:
                raise error
            return
        shutil.rmtree(self.folder, ignore_errors=True)

    def _death(self, doing: str) -> BackendError:
        """The BackendError for a child that ended while `doing`; its folder is kept."""
        if not self.died:
            try:
                self.proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:  # it closed its pipe but lives on: end it
                self.proc.kill()
                self.proc.wait()
            self.died = True
            self._how = exit_description(self.proc.returncode).removeprefix("was ")
            self._note(f"worker {self._how} while {doing}")
        tail = crash_hint(self.log)
        hint = f" (last line: {tail})" if tail else ""
        return BackendError(f"backend {self.name} crashed ({self._how}) while {doing}{hint}; log: {self.log}")

    def _note(self, text: str) -> None:
        try:
            with open(self.log, "a", encoding="utf-8") as fh:
                fh.write(f"[deploytool: {text}]\n")
        except OSError:
            pass


def crash_hint(log: Path) -> str | None:
    """The last line the child printed before it died: the end of its log, less faulthandler's report
    (`Fatal Python error: …` and the stack under it), deploytool's own notes and ncnn's device list
    (`[0 llvmpipe (LLVM 15.0.6, 256 bits)]  queueC=0[1] …`, printed whenever Vulkan starts)."""
    try:
        with open(log, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - _TAIL_BYTES))
            text = fh.read().decode(errors="replace")
    except OSError:
        return None
    cut = text.rfind("Fatal Python error:")
    if cut >= 0:
        text = text[:cut]
    lines = [
        ln for ln in text.splitlines() if not ln.startswith("[deploytool: ") and not _DEVICE_LINE.match(ln)
    ]
    return last_line("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# the child


def _crash_hook(name: str) -> tuple[str | None, signal.Signals | None]:
    """(method, signal) from CRASH_ENV when it applies to backend `name`, else (None, None)."""
    parts = os.environ.get(CRASH_ENV, "").split(":")
    if len(parts) < 2 or (len(parts) == 3 and parts.pop(0) != name):
        return None, None
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ImportError, ValueError, OSError):
        pass
    return parts[0], signal.Signals[parts[1]]


def serve(name: str, target: str, request_fd: str, reply_fd: str) -> None:
    """The child's loop: build `target(*args)` on "__init__", answer each (method, args) with
    ("ok", result) or ("error", exception); on "close" (or when the parent goes away) call the
    object's close() and exit at once, skipping interpreter teardown in native libraries."""
    faulthandler.enable()  # a native crash prints the Python stack into the log, then ends as it would
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    crash_method, crash_signal = _crash_hook(name)
    requests = os.fdopen(int(request_fd), "rb")
    replies = os.fdopen(int(reply_fd), "wb")
    module, _, attr = target.partition(":")
    obj = None
    while True:
        try:
            method, args = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):
            break
        if method == "close":
            break
        if crash_signal is not None and crash_method in ("*", method):
            os.kill(os.getpid(), crash_signal)
        try:
            if method == "__init__":
                obj = getattr(importlib.import_module(module), attr)(*args)
                result = None
            else:
                result = getattr(obj, method)(*args)
            reply = ("ok", result)
        except Exception as exc:
            traceback.print_exc()
            reply = ("error", _sendable(exc))
        try:
            pickle.dump(reply, replies, protocol=pickle.HIGHEST_PROTOCOL)
            replies.flush()
        except OSError:
            break
    close = getattr(obj, "close", None)
    if close is not None:
        close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _sendable(exc: Exception) -> Exception:
    """`exc` if it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
