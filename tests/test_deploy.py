"""`deploy()` against a real local sshd (tests/sshd.py): cross install on an emulated aarch64 board,
native build on an x86 board, redeploy, and the faults, each one line naming the step, a non-zero exit
code, and the deploy folder left exactly as it was."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import sshd

from deploytool.bundle.readme import NCNN_DIR_PLACEHOLDER, readme_build_commands
from deploytool.bundle.target import runner_path
from deploytool.deploy import deploy, native_commands
from deploytool.errors import RemoteDeployError, SpecError
from deploytool.targets.build import ncnn_cmake_dir

pytestmark = pytest.mark.cpp  # the runner must build (skip, or fail under CI=true: conftest.py)


@pytest.fixture(autouse=True)
def board_env(request, monkeypatch, tmp_path):
    sshd.board_env(request, monkeypatch, tmp_path)


@pytest.fixture(scope="module")
def plain_bundle(tmp_path_factory) -> Path:
    """A bundle without a cross-built runner."""
    return sshd.tiny_bundle(tmp_path_factory.mktemp("plain"), seed=0)


@pytest.fixture(scope="module")
def bundles(plain_bundle, tmp_path_factory, arm_runner) -> tuple[Path, Path]:
    """Two bundles of different weights, both with the cross-built aarch64 runner."""
    d = tmp_path_factory.mktemp("bundles")
    first = shutil.copytree(plain_bundle, d / "first")
    sshd.add_runner(first, arm_runner)
    return first, sshd.tiny_bundle(d, arm_runner, seed=1)


def _earlier_deploy(board, name: str) -> Path:
    """A folder that looks like an earlier deploy (marker, a model file, the user's note)."""
    folder = board.space / name
    (folder / "bin").mkdir(parents=True)
    (folder / ".deploytool-bundle").write_text('{"schema": 1, "files": ["model.ncnn.bin"]}\n')
    (folder / "model.ncnn.bin").write_bytes(b"old weights")
    (folder / "bin" / "deploytool_runner").write_bytes(b"old runner")
    board.own(folder)
    return folder


def _leftovers(board) -> list[str]:
    return sorted(p.name for p in board.space.rglob("*.tmp-*"))


def _fails(exc_type, fn, *words: str) -> str:
    """`fn()` raises exc_type with one line holding every word; returns the line."""
    with pytest.raises(exc_type) as info:
        fn()
    msg = str(info.value)
    print(f"exit {info.value.exit_code}: {msg}")  # the line a user sees (pytest -s)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in: {msg}"
    assert info.value.exit_code != 0
    return msg


def test_cross_deploy_installs_the_bundles_runner_and_redeploy_replaces_it(arm_board, bundles):
    first, second = bundles
    app = arm_board.space / "app"
    res = deploy(first, arm_board.dest(app))
    print(*res.lines(), sep="\n")
    assert (res.runner, res.arch, res.emulated, res.replaced, res.dir) == (
        "cross",
        "aarch64",
        True,
        False,
        str(app),
    )
    assert [s for s, _ in res.steps] == ["connect", "prepare", "copy bundle", "install runner", "smoke run",
                                         "switch"]  # fmt: skip
    assert (app / "bin" / "deploytool_runner").read_bytes() == (first / runner_path("aarch64")).read_bytes()
    assert os.access(app / "bin" / "deploytool_runner", os.X_OK)
    assert (app / ".deploytool-bundle").read_bytes() == (first / ".deploytool-bundle").read_bytes()
    assert (app / "model.ncnn.bin").read_bytes() == (first / "model.ncnn.bin").read_bytes()
    assert app.stat().st_uid == arm_board.user.pw_uid  # written by the unprivileged board user
    assert _leftovers(arm_board) == []
    assert any("ncnn-cpp@ssh:" in line for line in res.lines())

    again = deploy(second, arm_board.dest(app), build="cross")
    assert again.replaced and again.runner == "cross"
    assert (app / "model.ncnn.bin").read_bytes() == (second / "model.ncnn.bin").read_bytes() != (
        first / "model.ncnn.bin").read_bytes()  # fmt: skip
    assert _leftovers(arm_board) == [] and sorted(p.name for p in arm_board.space.iterdir()) == ["app"]


def test_relative_dir_is_in_the_board_users_home(arm_board, bundles):
    name = f"deploytool-test-{os.getpid()}"
    home = Path(arm_board.user.pw_dir)
    try:
        res = deploy(bundles[0], arm_board.dest(f"~/{name}"))
        assert res.dir == str(home / name) and (home / name / "bin" / "deploytool_runner").is_file()
    finally:
        shutil.rmtree(home / name, ignore_errors=True)


def test_bundle_readme_gives_the_native_build_that_deploy_runs(bundles):
    readme = (bundles[0] / "README.md").read_text()
    commands = native_commands(NCNN_DIR_PLACEHOLDER["x86_64"])
    assert commands == readme_build_commands("x86_64") and len(commands) == 2
    assert all(f"\n{c}\n" in readme for c in commands)


@pytest.fixture(scope="module")
def x86_board():
    yield from sshd.running_board("x86")


@pytest.mark.slow
def test_native_build_on_an_x86_board(x86_board, plain_bundle, tmp_path):
    bundle = plain_bundle  # no bin/x86_64 runner: auto builds on the board
    ncnn = x86_board.root / "ncnn"  # the board's own libncnn (the user's cache is not the board user's)
    shutil.copytree(ncnn_cmake_dir().parents[2], ncnn, symlinks=True)
    x86_board.own(ncnn)
    app = x86_board.space / "native"
    res = deploy(bundle, x86_board.dest(app), ncnn_dir=str(ncnn / "lib" / "cmake" / "ncnn"))
    print(*res.lines(), sep="\n")
    assert (res.runner, res.arch, res.emulated) == ("native", "x86_64", False)
    assert "build runner" in dict(res.steps)
    elf = (app / "bin" / "deploytool_runner").read_bytes()[:20]
    assert elf[:4] == b"\x7fELF" and int.from_bytes(elf[18:20], "little") == 62  # e_machine EM_X86_64
    assert (app / "build" / "CMakeCache.txt").is_file()


@pytest.fixture(scope="module")
def bare_board():
    """An x86 board whose PATH has no cmake and no compiler."""
    yield from sshd.running_board("bare", minimal_path=True)


def test_missing_compiler_on_the_board(bare_board, plain_bundle):
    bundle = plain_bundle
    app = _earlier_deploy(bare_board, "app")
    before = sshd.snapshot(app)
    msg = _fails(RemoteDeployError, lambda: deploy(bundle, bare_board.dest(app), ncnn_dir="/nowhere"),
                 "building the runner on the board", "cmake is not on the board's PATH")  # fmt: skip
    assert "log: " in msg
    assert sshd.snapshot(app) == before and _leftovers(bare_board) == []


def test_unreachable_host(arm_board, bundles):
    port = sshd.free_port()  # nothing listens there
    _fails(RemoteDeployError, lambda: deploy(bundles[0], f"127.0.0.1:{port}:{arm_board.space}/app"),
           "connecting", f"127.0.0.1 port {port} is unreachable (Connection refused)")  # fmt: skip


def test_refused_key(arm_board, bundles):
    app = _earlier_deploy(arm_board, "refused")
    before = sshd.snapshot(app)
    _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(app, "badkey")),
           "connecting", "refused the key (Permission denied)")  # fmt: skip
    assert sshd.snapshot(app) == before


def test_unknown_host_key_is_never_accepted(arm_board, bundles):
    known = arm_board.client / "empty_known_hosts"
    _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(arm_board.space / "x", "nohostkey")),
           "connecting", "not in known_hosts", "never accepts", "ssh-keyscan")  # fmt: skip
    assert known.read_text() == "" and not (arm_board.space / "x").exists()


def test_changed_host_key(arm_board, bundles):
    _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(arm_board.space / "x", "changedkey")),
           "connecting", "host key of arm-changedkey changed",
           'ssh-keygen -f "', 'changed_known_hosts" -R "[127.0.0.1]:')  # fmt: skip


def test_runner_that_crashes_in_the_smoke_run(arm_board, bundles, tmp_path):
    bundle = tmp_path / "crashing"
    shutil.copytree(bundles[0], bundle)
    crash = sshd.aarch64_program(tmp_path, "segv", "*(volatile int *)0 = 1;")
    sshd.add_runner(bundle, crash)
    app = _earlier_deploy(arm_board, "crash")
    before = sshd.snapshot(app)
    _fails(RemoteDeployError, lambda: deploy(bundle, arm_board.dest(app)),
           "smoke run of the runner on the board", "was killed by SIGSEGV")  # fmt: skip
    assert sshd.snapshot(app) == before and _leftovers(arm_board) == []


def test_read_only_target_folder(arm_board, bundles):
    parent = arm_board.space / "ro"
    app = _earlier_deploy(arm_board, "ro/app")
    before = sshd.snapshot(parent)
    parent.chmod(0o555)
    try:
        _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(app)),
               "preparing a folder beside", "no permission to write", "Permission denied")  # fmt: skip
    finally:
        parent.chmod(0o755)
    assert sshd.snapshot(parent) == before


def test_full_target_folder(arm_board, bundles):
    full = arm_board.space / "full"
    why = sshd.mount_tmpfs(full, 1024 * 1024, arm_board.user)  # the bundle is ~9 MB with its runner
    if why:
        pytest.skip(why)
    app = _earlier_deploy(arm_board, "full/app")
    before = sshd.snapshot(full)
    _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(app)),
           "copying the bundle", "the board's disk is full", "No space left on device")  # fmt: skip
    assert sshd.snapshot(full) == before


def test_connection_dropped_mid_copy(arm_board, bundles):
    app = _earlier_deploy(arm_board, "dropped")
    before = sshd.snapshot(app)
    _fails(RemoteDeployError, lambda: deploy(bundles[0], arm_board.dest(app, "drop")),
           "copying the bundle", "dropped")  # fmt: skip
    assert sshd.snapshot(app) == before and _leftovers(arm_board) == []


def test_foreign_folder_bad_bundle_and_missing_cross_runner_are_user_errors(
    arm_board, bundles, plain_bundle, tmp_path
):
    foreign = arm_board.space / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    arm_board.own(foreign)
    _fails(SpecError, lambda: deploy(bundles[0], arm_board.dest(foreign)), "did not deploy", "notes.txt")
    assert sshd.snapshot(foreign) == {"notes.txt": b"mine"}
    _fails(
        SpecError, lambda: deploy(tmp_path, arm_board.dest(arm_board.space / "y")), "not a deploytool bundle"
    )
    plain = plain_bundle
    _fails(SpecError, lambda: deploy(plain, arm_board.dest(arm_board.space / "y"), build="cross"),
           "no runner for the board's aarch64", "--target aarch64")  # fmt: skip
    _fails(SpecError, lambda: deploy(plain, arm_board.name), "name the folder on the board")
    _fails(SpecError, lambda: deploy(plain, arm_board.dest("y"), build="fast"), "--build 'fast'")
    assert not (arm_board.space / "y").exists()
