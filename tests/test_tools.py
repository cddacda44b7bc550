"""deploytool.tools.run_tool: logs, return codes, signals, missing binaries, timeouts, captured stdout."""

from __future__ import annotations

import sys

import pytest

from deploytool.errors import BackendError, ConvertError, DeployError
from deploytool.tools import exit_description, last_line, run_tool

PY = sys.executable


def test_success_writes_command_and_output_to_the_log(tmp_path):
    log = tmp_path / "logs" / "deep" / "tool.log"  # the folder does not exist yet
    code = "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"
    ran = run_tool([PY, "-c", code], log, "stage")
    assert ran.returncode == 0 and ran.log == log and ran.stdout is None and ran.seconds > 0
    text = log.read_text()
    assert text.splitlines()[0].startswith(f"$ {PY} -c ")
    assert "to stdout" in text and "to stderr" in text


def test_nonzero_exit_names_stage_tool_code_last_line_and_log(tmp_path):
    log = tmp_path / "fail.log"
    code = "import sys; print('first'); print('the real reason ' + 'x' * 500); print('   '); sys.exit(3)"
    with pytest.raises(ConvertError) as info:
        run_tool([PY, "-c", code], log, "convert (pnnx)", error=ConvertError, tool="pnnx")
    msg = str(info.value)
    assert msg.startswith("convert (pnnx): pnnx exited with code 3 (last line: the real reason xxx")
    quoted = msg[msg.index("(last line: ") + len("(last line: ") : msg.index("); log: ")]
    assert quoted.startswith("the real reason") and len(quoted) == 200  # the last non-blank line, cut
    assert msg.endswith(f"; log: {log}")
    assert info.value.exit_code == 3 and "the real reason" in log.read_text()


def test_silent_failure_does_not_quote_the_command_as_last_line(tmp_path):
    with pytest.raises(DeployError) as info:
        run_tool([PY, "-c", "raise SystemExit(2)"], tmp_path / "x.log", "stage")
    msg = str(info.value)
    assert "exited with code 2" in msg and "last line" not in msg


def test_killed_by_signal_names_the_signal(tmp_path):
    with pytest.raises(BackendError) as info:
        run_tool(
            ["sh", "-c", "echo about to crash; kill -SEGV $$"],
            tmp_path / "c.log",
            "bench",
            error=BackendError,
        )
    msg = str(info.value)
    assert "sh was killed by SIGSEGV" in msg and "(last line: about to crash)" in msg
    assert "exited with code" not in msg


def test_exit_description():
    assert exit_description(1) == "exited with code 1"
    assert exit_description(-9) == "was killed by SIGKILL"
    assert exit_description(-200) == "was killed by signal 200"


def test_missing_binary_is_a_deploy_error_not_an_oserror(tmp_path):
    log = tmp_path / "m.log"
    with pytest.raises(ConvertError) as info:
        run_tool([str(tmp_path / "no-such-tool"), "x"], log, "convert (onnx2ncnn)", error=ConvertError)
    msg = str(info.value)
    assert msg.startswith("convert (onnx2ncnn): could not start no-such-tool:") and str(log) in msg
    assert isinstance(info.value.__cause__, OSError)
    assert "could not start" in log.read_text()


def test_timeout_kills_the_tool_and_says_so(tmp_path):
    log = tmp_path / "t.log"
    code = "import time; print('working', flush=True); time.sleep(30)"
    with pytest.raises(BackendError) as info:
        run_tool([PY, "-c", code], log, "bench", timeout=0.5, error=BackendError, tool="worker")
    msg = str(info.value)
    assert msg.startswith("bench: worker timed out after 0.5 s (last line: working)") and str(log) in msg
    assert "killed after 0.5 s" in log.read_text()


def test_capture_stdout_returns_stdout_and_logs_stderr(tmp_path):
    log = tmp_path / "r.log"
    code = "import sys; print('{\"results\": []}'); print('loading model', file=sys.stderr)"
    ran = run_tool([PY, "-c", code], log, "ncnn-cpp", capture_stdout=True)
    assert ran.stdout.strip() == '{"results": []}'
    header, *rest = log.read_text().splitlines()
    assert header.startswith("$ ") and rest == ["loading model", "--- stdout ---", '{"results": []}']


def test_capture_stdout_failure_quotes_stderr_not_stdout(tmp_path):
    code = "import sys; print('{}'); print('cannot open model.param', file=sys.stderr); sys.exit(1)"
    with pytest.raises(BackendError, match=r"^ncnn-cpp: runner exited with code 1 \(last line: cannot open"):
        run_tool(
            [PY, "-c", code],
            tmp_path / "r.log",
            "ncnn-cpp",
            error=BackendError,
            capture_stdout=True,
            tool="runner",
        )


def test_cwd_and_env_are_passed(tmp_path):
    code = "import os; print(os.getcwd()); print(os.environ['DEPLOYTOOL_TOOLS_TEST'])"
    ran = run_tool(
        [PY, "-c", code],
        tmp_path / "e.log",
        "s",
        cwd=tmp_path,
        env={"DEPLOYTOOL_TOOLS_TEST": "42"},
        capture_stdout=True,
    )
    assert ran.stdout.splitlines() == [str(tmp_path.resolve()), "42"]


def test_last_line():
    assert last_line("a\nb\n\n  \n") == "b"
    assert last_line("\n \n") is None
    assert last_line("y" * 300, limit=10) == "y" * 9 + "…"


def test_last_line_skips_build_tool_trailers():
    build_log = """[ 50%] Building CXX object CMakeFiles/deploytool_runner.dir/src/main.cpp.o
/src/main.cpp:8:10: fatal error: cpu.h: No such file or directory
    8 | #include <cpu.h>
      |          ^~~~~~~
compilation terminated.
gmake[2]: *** [CMakeFiles/deploytool_runner.dir/build.make:76: main.cpp.o] Error 1
gmake: *** [Makefile:136: all] Error 2
"""
    assert last_line(build_log) == "/src/main.cpp:8:10: fatal error: cpu.h: No such file or directory"
    assert last_line("make: *** [all] Error 2\n") == "make: *** [all] Error 2"  # nothing better
