"""deploytool.progress: one plain line per finished step off a terminal, a spinner on one, quiet is quiet."""

from __future__ import annotations

import io
import re
import time

import pytest

from deploytool import progress
from deploytool.errors import ConvertError


@pytest.fixture(autouse=True)
def _defaults():
    progress.configure()
    yield
    progress.configure()


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_line_when_the_step_ends_with_name_and_seconds(capsys):
    with progress.step("export") as s:
        time.sleep(0.05)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"deploytool: export (\d+\.\d\d) s\n", captured.err), captured.err
    shown = float(captured.err.split()[-2])
    assert shown >= 0.05 and abs(shown - s.seconds) < 0.006 and s.outcome == "done"


def test_nothing_is_written_when_a_step_starts(capsys):
    with progress.step("convert (pnnx)"):
        assert capsys.readouterr() == ("", "")
    assert capsys.readouterr().err.startswith("deploytool: convert (pnnx) ")


def test_failure_line_names_the_step_and_the_exception_passes_through(capsys):
    with pytest.raises(RuntimeError, match="boom"), progress.step("convert"):
        raise RuntimeError("boom")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(r"deploytool: convert failed after \d+\.\d\d s\n", captured.err), captured.err


def test_interrupt_is_reported_as_such(capsys):
    with pytest.raises(KeyboardInterrupt), progress.step("bench"):
        raise KeyboardInterrupt
    assert re.fullmatch(r"deploytool: bench interrupted after \d+\.\d\d s\n", capsys.readouterr().err)


def test_deploy_error_gets_the_failure_line_too(capsys):
    with pytest.raises(ConvertError, match="exited with code 1"), progress.step("convert (pnnx)") as s:
        raise ConvertError("convert (pnnx): pnnx exited with code 1")
    assert s.outcome == "failed" and s.seconds >= 0
    err = capsys.readouterr().err
    assert err.startswith(f"{progress.PREFIX} convert (pnnx) failed after ") and err.count("\n") == 1


def test_nested_steps_print_their_own_lines_indented(capsys):
    with progress.step("run"):
        with progress.step("export"):
            pass
        with progress.step("convert"):
            pass
    lines = capsys.readouterr().err.splitlines()
    assert [re.sub(r" \d+\.\d\d s$", "", ln) for ln in lines] == [
        "deploytool:   export",
        "deploytool:   convert",
        "deploytool: run",
    ]


def test_quiet_prints_nothing(capsys):
    progress.configure(quiet=True)
    assert progress.is_quiet()
    with progress.step("export"):
        pass
    with pytest.raises(RuntimeError), progress.step("convert"):
        raise RuntimeError("x")
    assert capsys.readouterr() == ("", "")


def test_quiet_silences_a_terminal_too():
    tty = _Tty()
    progress.configure(quiet=True, stream=tty)
    with progress.step("export"):
        pass
    assert tty.getvalue() == ""


def test_stream_is_looked_up_when_writing(monkeypatch, capsys):
    """A stderr replaced after import (pytest, typer's CliRunner) gets the line, not the original one."""
    replaced = io.StringIO()
    monkeypatch.setattr("sys.stderr", replaced)
    with progress.step("export"):
        pass
    assert replaced.getvalue().startswith("deploytool: export ")
    assert capsys.readouterr() == ("", "")


def test_a_closed_stream_does_not_break_the_step():
    closed = io.StringIO()
    closed.close()
    progress.configure(stream=closed)
    with progress.step("export") as s:
        pass
    assert s.outcome == "done"


def test_terminal_shows_a_check_mark_line_and_nothing_on_stdout(capsys):
    tty = _Tty()
    progress.configure(stream=tty)
    with progress.step("build C++ runner"):
        with progress.step("configure"):
            time.sleep(0.3)  # long enough for the spinner to draw
    with pytest.raises(ValueError), progress.step("convert"):
        raise ValueError("x")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", tty.getvalue())  # without colours and cursor moves
    assert re.search(r"✓ build C\+\+ runner \d+\.\d s", text), text
    assert re.search(r"✓   configure \d+\.\d s", text), text
    assert re.search(r"✗ convert failed after \d+\.\d s", text), text
    assert "deploytool:" not in text  # no plain lines on a terminal
    assert capsys.readouterr() == ("", "")
