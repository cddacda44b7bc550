"""Progress of long steps (export, convert, building the C++ runner, a bench row) on stderr.

    with progress.step("convert (pnnx)"):
        ...

On a terminal a spinner shows every running step with its elapsed time; when a step ends the spinner
line becomes `✓ convert (pnnx) 1.2 s` (or `✗ ... failed after 0.5 s`). Anywhere else (CI logs, pipes,
pytest, typer's CliRunner) one plain line is written per step when it ends, nothing when it starts:

    deploytool: convert (pnnx) 1.23 s
    deploytool: export failed after 0.50 s

(`interrupted after` for Ctrl-C). Every plain line starts with PREFIX, so whoever wants only the CLI's
own messages can drop them. Nested steps are indented by two spaces per level. Nothing is ever written to
stdout, and a line that cannot be written (closed or missing stderr) is dropped rather than failing the
step. `configure(quiet=True)` (the CLI's --quiet) silences everything.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import TextIO

PREFIX = "deploytool:"

_quiet = False
_stream: TextIO | None = None  # None: sys.stderr as it is at the moment of writing
_depth: ContextVar[int] = ContextVar("deploytool_progress_depth", default=0)


def configure(quiet: bool = False, stream: TextIO | None = None) -> None:
    """Set process-wide progress output: `quiet` silences every step; `stream` replaces stderr
    (None: whatever sys.stderr is when a line is written). configure() restores the defaults."""
    global _quiet, _stream
    _quiet, _stream = bool(quiet), stream


def is_quiet() -> bool:
    """Whether progress output is switched off."""
    return _quiet


class Step:
    """A running or finished step; `seconds` is its elapsed time so far, frozen when it ends."""

    def __init__(self, name: str, depth: int = 0):
        self.name = name
        self.depth = depth
        self.outcome: str | None = None  # None while running, then "done", "failed" or "interrupted"
        self._started = time.perf_counter()
        self._seconds: float | None = None

    @property
    def seconds(self) -> float:
        if self._seconds is not None:
            return self._seconds
        return time.perf_counter() - self._started

    def _end(self, outcome: str) -> None:
        self._seconds = time.perf_counter() - self._started
        self.outcome = outcome

    def __repr__(self) -> str:
        return f"Step({self.name!r}, {self.outcome or 'running'}, {self.seconds:.2f} s)"


@contextmanager
def step(name: str) -> Iterator[Step]:
    """Show `name` and its elapsed time while the block runs; one line when it ends (see the module doc).

    Nestable and usable from any thread; yields the Step, whose `seconds` callers may record."""
    depth = _depth.get()
    token = _depth.set(depth + 1)
    current = Step(name, depth)
    stream = None if _quiet else _output()
    live = stream is not None and _isatty(stream) and _BOARD.add(current, stream)
    current._started = time.perf_counter()  # the display's start-up is not the step's time
    try:
        yield current
    except BaseException as exc:  # the step's line, then the exception goes on unchanged
        interrupted = isinstance(exc, (KeyboardInterrupt, SystemExit))
        current._end("interrupted" if interrupted else "failed")
        if live:
            _BOARD.remove(current)
        elif stream is not None:
            _write(stream, _plain_line(current))
        raise
    else:
        current._end("done")
        if live:
            _BOARD.remove(current)
        elif stream is not None:
            _write(stream, _plain_line(current))
    finally:
        try:
            _depth.reset(token)
        except ValueError:  # the block ended in another context than it started; depth is cosmetic
            pass


def _output() -> TextIO | None:
    stream = _stream if _stream is not None else sys.stderr
    # while the spinner shows, sys.stderr is rich's proxy in front of the real stream
    return getattr(stream, "rich_proxied_file", stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, OSError, ValueError):
        return False


def _write(stream: TextIO, line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError, AttributeError):  # closed, detached or missing stream
        pass


def _ending(s: Step, digits: int) -> str:
    secs = f"{s.seconds:.{digits}f} s"
    if s.outcome == "done":
        return secs
    return f"{s.outcome} after {secs}"


def _plain_line(s: Step) -> str:
    return f"{PREFIX} {'  ' * s.depth}{s.name} {_ending(s, 2)}"


class _Board:
    """The one rich Live display on the terminal: a spinner row per running step."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._steps: list[Step] = []
        self._spinners: dict[int, object] = {}
        self._live = None
        self._console = None
        self._stream: TextIO | None = None

    def add(self, s: Step, stream: TextIO) -> bool:
        """Show `s`; False when no live display can be used (then the caller writes a plain line)."""
        try:
            from rich.console import Console
            from rich.live import Live
            from rich.spinner import Spinner

            with self._lock:
                if self._live is None:
                    console = Console(file=stream, highlight=False)
                    live = Live(
                        console=console,
                        get_renderable=self._render,
                        transient=True,
                        refresh_per_second=8,
                        redirect_stdout=False,  # stdout is the caller's; never move it to stderr
                        # warnings printed to stderr meanwhile go above the spinner, not through it
                        redirect_stderr=stream is _output(),
                    )
                    self._steps, self._spinners = [], {}
                    self._console, self._stream = console, stream
                    self._steps.append(s)
                    self._spinners[id(s)] = Spinner("dots", style="cyan")
                    live.start()
                    self._live = live
                    return True
                if stream is not self._stream:
                    return False
                self._steps.append(s)
                self._spinners[id(s)] = Spinner("dots", style="cyan")
                return True
        except Exception:  # a display that cannot start must never stop the work
            with self._lock:
                if self._live is None:
                    self._steps, self._spinners = [], {}
            return False

    def remove(self, s: Step) -> None:
        """Replace `s`'s spinner row by its final line, printed above the display."""
        from rich.text import Text

        with self._lock:
            if s in self._steps:
                self._steps.remove(s)
            self._spinners.pop(id(s), None)
            live, console = self._live, self._console
            if live is None or console is None:
                return
            if not self._steps:
                self._live = None
            try:
                mark = Text("✓", style="green") if s.outcome == "done" else Text("✗", style="red")
                console.print(Text.assemble(mark, f" {'  ' * s.depth}{s.name} ", (_ending(s, 1), "dim")))
            except Exception:
                pass
            finally:
                try:
                    live.stop() if self._live is None else live.refresh()
                except Exception:
                    pass

    def _render(self):
        from rich.console import Group
        from rich.text import Text

        now = time.perf_counter()
        rows = []
        for s in list(self._steps):
            spinner = self._spinners.get(id(s))
            if spinner is None:
                continue
            spinner.update(text=Text.assemble(f"{'  ' * s.depth}{s.name} ", (f"{s.seconds:.1f} s", "dim")))
            rows.append(spinner.render(now))
        return Group(*rows)


_BOARD = _Board()


class StageTimer:
    """Seconds per stage for the report; each stage is also shown as a progress step."""

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}

    @contextmanager
    def stage(self, name: str, show: bool = True):
        """Time the block as stage `name`; `show=False` when the block shows its own progress step."""
        start = time.perf_counter()
        try:
            with step(name) if show else nullcontext():
                yield
        finally:
            self.stages[name] = {"seconds": round(time.perf_counter() - start, 4)}
