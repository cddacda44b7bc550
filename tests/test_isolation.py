"""ncnn runs in a worker process: a native crash is that backend's BackendError, not deploytool's end."""

from __future__ import annotations

import re
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from deploytool.backends import isolated
from deploytool.backends.isolated import CRASH_ENV
from deploytool.backends.ncnn_runner import IN_PROCESS_ENV, NcnnRunner, NcnnVulkanRunner
from deploytool.errors import BackendError, SpecError
from deploytool.registry import Artifacts, RunnerConfig, get_backend

X = np.linspace(-1.0, 1.0, 16, dtype=np.float32)


@pytest.fixture(autouse=True)
def worker_folders_in_tmp_path(tmp_path, monkeypatch):
    """The folders workers log into (kept when one dies) go under tmp_path, not the system's /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def write(
    folder: Path, lines: list[str], weights: bytes = b"", blobs: int | None = None
) -> tuple[Path, Path]:
    param, bin_ = folder / "m.param", folder / "m.bin"
    tops = sum(int(line.split()[3]) for line in lines)
    param.write_text(f"7767517\n{len(lines)} {blobs or tops}\n" + "\n".join(lines) + "\n")
    bin_.write_bytes(weights)
    return param, bin_


def relu_graph(folder: Path) -> tuple[Path, Path]:
    return write(folder, ["Input in0 0 1 in0 0=16", "ReLU relu 1 1 in0 out0"])


def fp32(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def log_path(message: str) -> Path:
    match = re.search(r"log: (\S+)$", message)
    assert match, message
    return Path(match.group(1))


def test_runner_works_through_a_worker_and_removes_its_folder(tmp_path):
    param, bin_ = relu_graph(tmp_path)
    with NcnnRunner(param, bin_) as runner:
        folder = runner.worker_log.parent
        assert folder.is_dir() and runner.isolate
        out = runner.infer({"x": X})  # named after the spec: fed by position
        np.testing.assert_array_equal(out["out0"], np.maximum(X, 0)[None])
        assert set(runner.extract_all({"in0": X})) == {"in0", "out0"}
    assert not folder.exists()  # a clean stop leaves nothing behind


@pytest.mark.parametrize(
    "hook, doing, signame",
    [("infer:SIGFPE", "running the model", "SIGFPE"), ("__init__:SIGSEGV", "loading the model", "SIGSEGV"),
     ("extract_all:SIGABRT", "extracting every blob", "SIGABRT")],
)  # fmt: skip
def test_worker_killed_by_a_signal_is_a_backend_error_and_the_next_runner_works(
    tmp_path, monkeypatch, hook, doing, signame
):
    param, bin_ = relu_graph(tmp_path)
    monkeypatch.setenv(CRASH_ENV, hook)
    with pytest.raises(BackendError) as info:
        with NcnnRunner(param, bin_) as runner:
            runner.infer({"in0": X})
            runner.extract_all({"in0": X})
    message = str(info.value)
    assert message.startswith(f"backend ncnn-cpu crashed (killed by {signame}) while {doing}")
    log = log_path(message)
    assert log.is_file(), "the log of a worker that died is kept"
    text = log.read_text()
    assert f"[deploytool: worker killed by {signame} while {doing}]" in text
    assert "Fatal Python error" in text  # faulthandler's stack of the crash
    monkeypatch.delenv(CRASH_ENV)
    with NcnnRunner(param, bin_) as runner:  # this process lives on, and so do new workers
        np.testing.assert_array_equal(runner.infer({"in0": X})["out0"], np.maximum(X, 0)[None])


def test_crash_names_the_backend_the_registry_gave_it(tmp_path, monkeypatch):
    """The hook can target one backend: the other ncnn backend of the same run is not touched."""
    param, bin_ = relu_graph(tmp_path)
    art = Artifacts(ncnn_param=param, ncnn_bin=bin_)
    config = RunnerConfig(("in0",), ("out0",))
    monkeypatch.setenv(CRASH_ENV, "ncnn-vulkan:infer:SIGFPE")
    runner = get_backend("ncnn-cpu").create(art, config)
    runner.name = "ncnn-vulkan"  # as the registry names it, without needing a Vulkan device here
    with pytest.raises(
        BackendError, match=r"^backend ncnn-vulkan crashed \(killed by SIGFPE\) while running"
    ):
        with runner:
            runner.infer({"in0": X})
    with get_backend("ncnn-cpu").create(art, config) as cpu:
        assert cpu.infer({"in0": X})["out0"].shape == (1, 16)


@pytest.mark.vulkan
def test_a_real_native_crash_on_vulkan_is_reported_not_fatal(tmp_path):
    """An InnerProduct whose weight count (5) is not its input's size (16) passes every file check but
    crashes ncnn 1.0.20261020's Vulkan path (convert_packing, then SIGSEGV); it used to end deploytool."""
    param, bin_ = write(
        tmp_path,
        ["Input in0 0 1 in0 0=16", "InnerProduct fc 1 1 in0 out0 0=1 1=1 2=5"],
        struct.pack("<I", 0) + fp32(np.ones(5)) + fp32([0.5]),
    )
    with pytest.raises(BackendError) as info:
        with NcnnVulkanRunner(param, bin_) as runner:
            runner.infer({"in0": X})
    message = str(info.value)
    assert re.match(r"backend ncnn-vulkan crashed \(killed by SIG[A-Z]+\) while ", message), message
    assert log_path(message).is_file()
    with NcnnRunner(param, bin_) as cpu:  # the same files on the CPU: the process is fine
        assert cpu.infer({"in0": X})["out0"].shape == (1, 1)


def test_overreading_inner_product_is_refused_before_ncnn_sees_it(tmp_path, monkeypatch):
    """1600 weights declared, 160 stored: SpecError naming the layer, and no worker is started."""
    param, bin_ = write(
        tmp_path,
        ["Input in0 0 1 in0 0=16", "InnerProduct fc 1 1 in0 out0 0=10 1=1 2=1600"],
        struct.pack("<I", 0) + fp32(np.zeros(160)) + fp32(np.zeros(10)),
    )
    started = []
    monkeypatch.setattr(isolated, "Worker", lambda *a, **k: started.append(a))
    with pytest.raises(
        SpecError, match=r"layer fc \(InnerProduct\) reads weights from byte 0 up to byte 6444"
    ):
        with NcnnRunner(param, bin_):
            pass
    assert not started


def test_a_param_ncnn_refuses_is_still_a_spec_error_from_the_worker(tmp_path):
    """A layer type ncnn does not know passes the file checks; ncnn's refusal comes back as SpecError."""
    param, bin_ = write(tmp_path, ["Input in0 0 1 in0 0=16", "NoSuchLayer x 1 1 in0 out0"])
    with pytest.raises(SpecError, match="ncnn could not load this .param"):
        with NcnnRunner(param, bin_):
            pass


def test_latency_is_the_workers_inference_time_not_the_round_trip(tmp_path, monkeypatch):
    param, bin_ = relu_graph(tmp_path)
    real_call = isolated.Worker.call

    def slow_trip(self, method, *args, doing):
        got = real_call(self, method, *args, doing=doing)
        if method == "infer":
            time.sleep(0.2)  # a slow trip back
            return got[0], 0.001234
        return got

    monkeypatch.setattr(isolated.Worker, "call", slow_trip)
    with NcnnRunner(param, bin_) as runner:
        runner.infer({"in0": X})
        assert runner.last_latency_s == 0.001234
        seconds, _ = runner.warm_latency({"in0": X}, [runner.last_latency_s])
        assert seconds == 0.001234


def test_in_process_mode_for_disposable_workers(tmp_path, monkeypatch):
    """DEPLOYTOOL_NCNN_IN_PROCESS=1 (a bench worker, whose peak RSS must include the net): no worker."""
    param, bin_ = relu_graph(tmp_path)
    monkeypatch.setenv(IN_PROCESS_ENV, "1")
    with NcnnRunner(param, bin_) as runner:
        assert runner.worker_log is None and not runner.isolate
        out = runner.infer({"in0": X})
        assert runner.last_latency_s is not None and runner.last_latency_s > 0
        np.testing.assert_array_equal(out["out0"], np.maximum(X, 0)[None])


def test_crash_hint_is_the_last_line_the_backend_printed(tmp_path):
    """Not faulthandler's stack, deploytool's note, or the device list ncnn prints when Vulkan starts."""
    log = tmp_path / "worker.log"
    log.write_text(
        "[0 llvmpipe (LLVM 15.0.6, 256 bits)]  queueC=0[1]  queueT=0[1]\n"
        "convert_packing from int32/int8 to fp32/fp16/bf16 is not supported\n"
        "[0 llvmpipe (LLVM 15.0.6, 256 bits)]  fp16-cm=0  int8-cm=0\n"
        "Fatal Python error: Segmentation fault\n\nCurrent thread 0x7f (most recent call first):\n"
        '  File "ncnn_runner.py", line 117 in infer\n'
        "[deploytool: worker killed by SIGSEGV while running the model]\n"
    )
    assert isolated.crash_hint(log) == "convert_packing from int32/int8 to fp32/fp16/bf16 is not supported"
    log.write_text(
        "[0 llvmpipe (LLVM 15.0.6, 256 bits)]  fp16-cm=0\nFatal Python error: Floating-point exception\n"
    )
    assert isolated.crash_hint(log) is None
