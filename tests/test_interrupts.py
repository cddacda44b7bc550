"""Interrupts: SIGINT, SIGTERM and SIGHUP end a run with one line and 128 + the signal's number, and every
temporary file is removed on the way out (atomic_path, the bundle swap)."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deploytool.atomic import Interrupted, atomic_path, deferred_signals, interrupts_raise, write_text

IMAGES = Path(__file__).resolve().parent.parent / "images"


# ---- atomic_path: the temporary file goes whatever ends the block ----


@pytest.mark.parametrize("exc", [ValueError("bug"), KeyboardInterrupt(), SystemExit(3), Interrupted(15)])
def test_atomic_path_removes_its_temp_file_on_any_exception(tmp_path, exc):
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous")
    with pytest.raises(type(exc)):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise exc
    assert target.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_atomic_path_removes_a_temp_folder(tmp_path):
    """Some writers make a folder at the path they are given."""
    with pytest.raises(Interrupted):
        with atomic_path(tmp_path / "out.d") as tmp:
            tmp.mkdir()
            (tmp / "part").write_bytes(b"x")
            raise Interrupted(signal.SIGTERM)
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_success_replaces(tmp_path):
    write_text(tmp_path / "a.txt", "one")
    write_text(tmp_path / "a.txt", "two")
    assert (tmp_path / "a.txt").read_text() == "two" and len(list(tmp_path.iterdir())) == 1


# ---- interrupts_raise / deferred_signals, in this process ----


def test_sigterm_raises_interrupted_once_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with interrupts_raise() as received:
        with pytest.raises(Interrupted) as info:
            signal.raise_signal(signal.SIGTERM)
        assert info.value.signum == signal.SIGTERM and isinstance(info.value, KeyboardInterrupt)
        signal.raise_signal(signal.SIGTERM)  # a second one while cleaning up: ignored
        signal.raise_signal(signal.SIGINT)
        assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM) == before


def test_an_inherited_ignored_signal_stays_ignored():
    """nohup sets SIGHUP to ignored; deploytool must not undo that."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with interrupts_raise() as received:
            signal.raise_signal(signal.SIGHUP)
            assert received == []
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_deferred_signals_hold_an_interrupt_until_the_block_ends():
    steps = []
    with interrupts_raise():
        with pytest.raises(Interrupted):
            with deferred_signals():
                signal.raise_signal(signal.SIGTERM)
                steps.append("renamed both")  # not separated by the interrupt
        assert steps == ["renamed both"]


# ---- the console script, killed while it exports ----


def _deploytool_cmd() -> list[str]:
    script = Path(sys.executable).parent / "deploytool"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from deploytool.cli import main; main()"]


def _default_signals():
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, signal.SIG_DFL)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=lambda s: s.name)
def test_interrupt_during_export_exits_128_plus_signal_and_leaves_no_temp_file(tmp_path, sig):
    out = tmp_path / "run"
    cmd = _deploytool_cmd() + ["run", "resnet18", "--backends", "torch,onnxruntime"]
    cmd += ["--out", str(out), "--images", str(IMAGES / "chelsea.jpg")]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_signals,  # as from a terminal, even if this test runs as a background job
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            names = [p.name for p in out.iterdir()] if out.is_dir() else []
            if any(n.startswith(".model.pt.tmp") or n == "model.pt" for n in names):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before its export started: " + proc.stderr.read()
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + sig, stderr
    assert "Traceback" not in stderr + stdout
    assert f"interrupted ({sig.name})" in stderr.splitlines(), stderr
    assert [str(p) for p in out.rglob("*") if ".tmp" in p.name] == []


def test_main_exit_code_for_a_normal_run_is_unchanged(tmp_path):
    """main() passes the app's own exit codes through (here 2: an unknown model)."""
    proc = subprocess.run(
        _deploytool_cmd() + ["run", "resnet19", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "interrupted" not in proc.stderr


def test_sigterm_to_a_python_process_runs_finally_blocks(tmp_path):
    """Under interrupts_raise, SIGTERM removes atomic_path's temp file (without it the process would
    die at once and leave it)."""
    code = (
        "import os, signal, sys\n"
        "from deploytool.atomic import atomic_path, interrupts_raise\n"
        "with interrupts_raise() as received:\n"
        "    try:\n"
        f"        with atomic_path({str(tmp_path / 'model.pt')!r}) as tmp:\n"
        "            tmp.write_bytes(b'half')\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            signal.pause()\n"
        "    except KeyboardInterrupt:\n"
        "        sys.exit(128 + received[0])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 143, proc.stderr
    assert list(tmp_path.iterdir()) == []
