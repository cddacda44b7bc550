"""targets/ssh.py: destination parsing, and the ssh:DEST target's session against a real local sshd
(tests/sshd.py) whose board runs the cross-built aarch64 runner under qemu: put, run, fetch, compared
with the local x86 runner; a runner killed on the board; a board without a deploy."""

from __future__ import annotations

import json
import shutil
import subprocess
import time

import numpy as np
import pytest
import sshd

from deploytool.deploy import deploy
from deploytool.errors import BackendError, BackendUnavailable, SpecError
from deploytool.targets.build import build_runner
from deploytool.targets.ssh import Destination, SshTarget, parse_destination


@pytest.fixture(autouse=True)
def board_env(request, monkeypatch, tmp_path):
    sshd.board_env(request, monkeypatch, tmp_path)


@pytest.mark.parametrize(
    "text, want",
    [
        ("board", Destination("board", "board", dir="deploytool")),
        ("pi@board.local:2222:apps/cls",
         Destination("pi@board.local:2222:apps/cls", "board.local", "pi", 2222, "apps/cls")),
        ("pi@10.0.0.7:/opt/app/", Destination("pi@10.0.0.7:/opt/app/", "10.0.0.7", "pi", None, "/opt/app")),
        ("root@[::1]:22:~/x", Destination("root@[::1]:22:~/x", "::1", "root", 22, "x")),
        ("[fe80::1%eth0]", Destination("[fe80::1%eth0]", "fe80::1%eth0", dir="deploytool")),
        ("h:2222", Destination("h:2222", "h", port=2222, dir="deploytool")),
        ("h:./2222", Destination("h:./2222", "h", dir="./2222")),
        ("h:x@y", Destination("h:x@y", "h", dir="x@y")),
    ],
)  # fmt: skip
def test_destinations(text, want):
    assert parse_destination(text, "deploytool") == want


def test_destination_helpers():
    d = parse_destination("pi@[::1]:2222:app")
    assert (d.login, d.remote("/tmp/f"), d.ssh_hint()) == ("pi@::1", "pi@[::1]:/tmp/f", "ssh -p 2222 pi@::1")
    assert parse_destination("board").dir is None


@pytest.mark.parametrize(
    "text, why",
    [
        ("", "empty"),
        ("-oProxyCommand=x", "not a host name"),
        ("pi@", "no host"),
        ("bad user@h", "not a user name"),
        ("[::1", "closing ']'"),
        ("[host]", "not an IPv6"),
        ("h:70000:x", "between 1 and 65535"),
        ("h:22:", "nothing after the port"),
        ("h:my dir", "no spaces, quotes"),
        ("h:-rf", "no spaces, quotes"),
        ("h:a;rm -rf b", "no spaces, quotes"),
        ("h:~", "home or root"),
        ("h:/", "home or root"),
        ("h:..", "home or root"),
        ("[::1]x", "unexpected"),
    ],
)
def test_malformed_destinations_are_one_line(text, why):
    with pytest.raises(SpecError) as info:
        parse_destination(text, "deploytool")
    msg = str(info.value)
    assert why in msg and "[user@]host[:port][:DIR]" in msg and "\n" not in msg and info.value.exit_code == 2


def test_missing_ssh_config_file_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("DEPLOYTOOL_SSH_CONFIG", str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="DEPLOYTOOL_SSH_CONFIG=.*nope: no such file"):
        SshTarget(f"127.0.0.1:{sshd.free_port()}:x").open()


def test_available_does_not_connect():
    target = SshTarget(f"127.0.0.1:{sshd.free_port()}:x")  # nothing listens there
    assert target.available() == (True, None)
    assert target.suffix.startswith("ssh:127.0.0.1:") and target.arch == "unknown"


@pytest.fixture(scope="module")
def deployed(arm_board, arm_runner, tmp_path_factory) -> tuple[str, object]:
    """A bundle deployed (cross) to the aarch64 board; returns (DEST, bundle)."""
    bundle = sshd.tiny_bundle(tmp_path_factory.mktemp("b"), arm_runner)
    dest = arm_board.dest(arm_board.space / "app")
    mp = pytest.MonkeyPatch()
    mp.setenv("DEPLOYTOOL_SSH_CONFIG", str(arm_board.config))
    try:
        deploy(bundle, dest)
    finally:
        mp.undo()
    return dest, bundle


def _local_runner(bundle, x_path, dump) -> dict:
    exe = build_runner()
    cmd = [str(exe), str(bundle / "meta.json"), str(x_path), "--dump-raw", str(dump), "--threads", "1"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120).stdout)


# Measured: the aarch64 runner (NEON, under qemu Cortex-A72) and the x86 one (AVX) on the tiny net's
# logits differ by ~1e-7; 1e-5 leaves room for kernel order without hiding a wrong input or model.
ATOL = 1e-5


@pytest.mark.cpp  # the local x86 runner is the reference
def test_session_runs_the_deployed_runner_and_matches_the_local_runner(deployed, arm_board, tmp_path):
    dest, bundle = deployed
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    target = SshTarget(dest)
    with target.open() as s:
        assert (target.arch, target.emulated) == ("aarch64", True)
        assert "aarch64 (emulated)" in target.describe()
        for name in ("meta.json", "model.ncnn.param", "model.ncnn.bin"):
            s.put(bundle / name, name)
        remote_x = s.put(tmp_path / "x.npy", "x.npy")
        assert remote_x == f"{s.work}/x.npy"
        started = time.perf_counter()
        out = s.run(["meta.json", remote_x, "--dump-raw", "dump", "--threads", "1"], tmp_path / "run.log")
        print(f"ssh run (qemu cortex-a72): {time.perf_counter() - started:.2f} s")
        got = s.fetch("dump", tmp_path / "dump")
        work = s.work
    assert not (arm_board.space / "app" / work.rsplit("/", 1)[-1]).exists()  # close() removed it
    doc = json.loads(out)
    local = _local_runner(bundle, tmp_path / "x.npy", tmp_path / "local")
    for blob in json.loads((bundle / "meta.json").read_text())["outputs"]:
        remote_out, local_out = np.load(got / f"x.{blob}.npy"), np.load(tmp_path / "local" / f"x.{blob}.npy")
        assert remote_out.shape == local_out.shape
        print(f"{blob}: max |aarch64 - x86| = {np.abs(remote_out - local_out).max():.2e}")
        np.testing.assert_allclose(remote_out, local_out, rtol=0, atol=ATOL)
    assert [r["index"] for r in doc["results"][0]["top_k"]] == [
        r["index"] for r in local["results"][0]["top_k"]
    ]
    # and the comparison can fail: the other input's logits are not within ATOL
    _local_runner(bundle, _save(tmp_path / "y.npy", -x), tmp_path / "other")
    blob = json.loads((bundle / "meta.json").read_text())["outputs"][0]
    assert np.abs(np.load(tmp_path / "other" / f"y.{blob}.npy") - np.load(got / f"x.{blob}.npy")).max() > ATOL


def _save(path, x):
    np.save(path, x)
    return path


def test_runner_killed_on_the_board(deployed, arm_board, tmp_path):
    dest, _ = deployed
    killed = arm_board.space / "killed"
    shutil.copytree(arm_board.space / "app", killed, symlinks=True)
    shutil.copy2(sshd.aarch64_program(tmp_path, "kill", "kill(getpid(), SIGKILL);"), killed / "bin" /
                 "deploytool_runner")  # fmt: skip
    arm_board.own(killed)
    with SshTarget(arm_board.dest(killed)).open() as s:
        with pytest.raises(BackendError) as info:
            s.run(["meta.json"], tmp_path / "run.log")
    msg = str(info.value)
    assert "running deploytool_runner on the board" in msg and "was killed by SIGKILL" in msg
    assert f"log: {tmp_path / 'run.log'}" in msg and "\n" not in msg


def test_runner_error_names_its_last_stderr_line(deployed, tmp_path):
    with SshTarget(deployed[0]).open() as s:
        with pytest.raises(BackendError) as info:
            s.run(["no-such-meta.json", "x.npy"], tmp_path / "run.log")
    msg = str(info.value)
    assert "exited with code 2" in msg and "no-such-meta.json" in msg and "\n" not in msg


def test_board_without_a_deploy_says_to_deploy(arm_board):
    dest = arm_board.dest(arm_board.space / "never")
    with pytest.raises(BackendUnavailable) as info:
        SshTarget(dest).open()
    assert f"run `deploytool deploy BUNDLE --to {dest}` first" in str(info.value)


def test_unreachable_board_fails_at_open(tmp_path):
    port = sshd.free_port()
    with pytest.raises(BackendError, match=f"connecting: 127.0.0.1 port {port} is unreachable"):
        SshTarget(f"127.0.0.1:{port}:x", logs=tmp_path).open()
