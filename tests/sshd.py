"""A throwaway OpenSSH server on 127.0.0.1 for the SSH tests: the "board".

The board is unprivileged. sshd runs as the board user itself (a non-root sshd can log in only the user
it runs as, needs no privilege separation and no PAM), so everything deploytool does there, and every
permission check, is an ordinary user's. Under root (here and in CI) that user is `deploytool-board`,
created with useradd if it does not exist; otherwise the board user is the current user.

Everything lives in two temporary folders: the board's (sshd_config, host key, authorized_keys, and
`space/` for deploy folders; owned by the board user) and the client's (user keys, known_hosts, the ssh
client config that DEPLOYTOOL_SSH_CONFIG names). The client config has one Host alias per way of
reaching the board: NAME (the good way), NAME-badkey (a key not in authorized_keys), NAME-nohostkey (an
empty known_hosts), NAME-changedkey (known_hosts holds another host key) and NAME-drop (a ProxyCommand
that forwards DROP_AFTER bytes towards the board and then closes: a connection dropped mid-copy).

    python tests/sshd.py proxy HOST PORT LIMIT   # that ProxyCommand
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SSHD = "/usr/sbin/sshd"
BOARD_USER = "deploytool-board"
DROP_AFTER = 256 * 1024  # bytes towards the board before NAME-drop's proxy closes the connection
START_TIMEOUT_S = 15.0
QEMU_EXEC = "qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu"
# What a minimal board without a compiler has on its PATH (with legacy scp's `scp -t` on the board).
MINIMAL_TOOLS = ("sh", "ls", "mkdir", "mktemp", "cp", "mv", "rm", "cat", "uname", "dirname", "head", "tr",
                 "chmod", "pwd", "scp", "env")  # fmt: skip


def missing_reason() -> str | None:
    """Why no test sshd can be started here (None: it can)."""
    for tool, pkg in ((SSHD, "openssh-server"), ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install -y {pkg})"
    if os.geteuid() == 0 and shutil.which("useradd") is None and not _user_exists(BOARD_USER):
        return "running as root, and no useradd to make the unprivileged board user"
    return None


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def board_account() -> pwd.struct_passwd:
    """The unprivileged board user: deploytool-board under root (made once), else the current user."""
    if os.geteuid() != 0:
        return pwd.getpwuid(os.geteuid())
    if not _user_exists(BOARD_USER):
        made = subprocess.run(["useradd", "--system", "--create-home", "--shell", "/bin/sh", BOARD_USER],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
        if made.returncode != 0 and not _user_exists(BOARD_USER):  # else: a parallel worker made it
            raise RuntimeError(f"useradd {BOARD_USER} failed: {made.stderr.strip()}")
    return pwd.getpwnam(BOARD_USER)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    if os.geteuid() != 0:
        return
    for root, dirs, files in os.walk(path):
        for n in [root, *(os.path.join(root, x) for x in dirs + files)]:
            os.lchown(n, uid, gid)


def _keygen(path: Path) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "deploytool-test", "-f", str(path)],
                   check=True, capture_output=True, timeout=30)  # fmt: skip


@dataclass
class Board:
    name: str  # the good Host alias in `config`
    port: int
    user: pwd.struct_passwd
    root: Path  # the board's folder (board user's)
    space: Path  # where tests put deploy folders (board user's)
    client: Path  # the client's folder
    config: Path  # ssh client config: DEPLOYTOOL_SSH_CONFIG
    proc: subprocess.Popen

    def dest(self, folder: str | Path, alias: str = "") -> str:
        return f"{self.name}{'-' + alias if alias else ''}:{folder}"

    def own(self, path: Path) -> None:
        """Give `path` (made by the test) to the board user."""
        _chown_tree(Path(path), self.user.pw_uid, self.user.pw_gid)

    def log(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        full = self.space / "full"
        if full.is_mount():
            subprocess.run(["umount", "-l", str(full)], capture_output=True, timeout=30)
        for d in (self.root, self.client):
            shutil.rmtree(d, ignore_errors=True)


def start_board(name: str, setenv: dict[str, str] | None = None, minimal_path: bool = False) -> Board:
    """Start sshd as the board user on a free port of 127.0.0.1; returns once it answers with its banner.
    `setenv`: the board's session environment (sshd_config SetEnv). `minimal_path`: the board's PATH holds
    only MINIMAL_TOOLS (no cmake, no compiler)."""
    user = board_account()
    root = Path(tempfile.mkdtemp(prefix=f"deploytool-board-{name}."))
    client = Path(tempfile.mkdtemp(prefix=f"deploytool-client-{name}."))
    space = root / "space"
    space.mkdir()
    _keygen(root / "host_key")
    _keygen(client / "user_key")
    _keygen(client / "other_key")
    _keygen(client / "other_host_key")  # what a reinstalled board's old host key looks like
    (root / "authorized_keys").write_text((client / "user_key.pub").read_text())
    env = dict(setenv or {})
    if minimal_path:
        bin_ = root / "minbin"
        bin_.mkdir()
        for tool in MINIMAL_TOOLS:
            (bin_ / tool).symlink_to(shutil.which(tool))
        env["PATH"] = str(bin_)
    host_pub = (root / "host_key.pub").read_text().split()[:2]
    for _attempt in range(5):
        port = free_port()
        setenv_line = " ".join(f'"{k}={v}"' for k, v in env.items())
        (root / "sshd_config").write_text(
            f"ListenAddress 127.0.0.1:{port}\n"
            f"HostKey {root}/host_key\n"
            "PidFile none\n"
            "UsePAM no\n"
            # The files are in /tmp (world-writable), which StrictModes refuses for authorized_keys.
            "StrictModes no\n"
            f"AuthorizedKeysFile {root}/authorized_keys\n"
            "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"AllowUsers {user.pw_name}\n"
            "Subsystem sftp internal-sftp\n"
            "MaxStartups 100\nMaxSessions 100\n" + (f"SetEnv {setenv_line}\n" if env else "")
        )
        (client / "known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(host_pub)}\n")
        (client / "empty_known_hosts").write_text("")
        old_pub = (client / "other_host_key.pub").read_text().split()[:2]
        (client / "changed_known_hosts").write_text(f"[127.0.0.1]:{port} {' '.join(old_pub)}\n")
        proxy = f"{sys.executable} {Path(__file__).resolve()} proxy 127.0.0.1 {port} {DROP_AFTER}"
        aliases = {
            "": (client / "user_key", client / "known_hosts", None),
            "-badkey": (client / "other_key", client / "known_hosts", None),
            "-nohostkey": (client / "user_key", client / "empty_known_hosts", None),
            "-changedkey": (client / "user_key", client / "changed_known_hosts", None),
            "-drop": (client / "user_key", client / "known_hosts", proxy),
        }
        text = ""
        for suffix, (key, known, proxy_cmd) in aliases.items():
            text += (
                f"Host {name}{suffix}\n  HostName 127.0.0.1\n  Port {port}\n  User {user.pw_name}\n"
                f"  IdentityFile {key}\n  IdentitiesOnly yes\n  IdentityAgent none\n"
                f"  UserKnownHostsFile {known}\n  GlobalKnownHostsFile /dev/null\n"
                + (f"  ProxyCommand {proxy_cmd}\n" if proxy_cmd else "")
            )
        (client / "ssh_config").write_text(text)
        _chown_tree(root, user.pw_uid, user.pw_gid)
        log = open(root / "sshd.log", "wb")
        kwargs = {}
        if os.geteuid() == 0:
            kwargs = dict(user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(root / "sshd_config")], stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root,
                                **kwargs)  # fmt: skip
        log.close()
        board = Board(name, port, user, root, space, client, client / "ssh_config", proc)
        if _wait_banner(proc, port):
            return board
        proc.kill()
        proc.wait(10)
        if "Address already in use" not in board.log():  # else: another process took the port; retry
            break
    raise RuntimeError(f"test sshd did not start on 127.0.0.1:{port}: {board.log().strip()[-300:]}")


def _wait_banner(proc: subprocess.Popen, port: int) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                if s.recv(64).startswith(b"SSH-2.0"):
                    return True
        except OSError:
            time.sleep(0.05)
    return False


def mount_tmpfs(path: Path, size: int, user: pwd.struct_passwd) -> str | None:
    """Mount a tmpfs of `size` bytes at `path` for the board user (root only); None when done, else why
    not."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a small tmpfs (a full disk) needs root"
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755,uid={user.pw_uid},gid={user.pw_gid}"
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "deploytool-full", str(path)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    return None if proc.returncode == 0 else f"cannot mount a tmpfs here: {proc.stderr.strip()}"


def proxy(host: str, port: int, limit: int) -> None:
    """ProxyCommand: relay stdin/stdout to host:port, and close both after `limit` bytes towards it."""
    sock = socket.create_connection((host, port), timeout=10)
    sock.settimeout(None)

    def back() -> None:
        while data := sock.recv(65536):
            os.write(1, data)
        os._exit(0)

    threading.Thread(target=back, daemon=True).start()
    sent = 0
    while data := os.read(0, 65536):
        data = data[: limit - sent]
        sock.sendall(data)
        sent += len(data)
        if sent >= limit:
            break
    sock.close()
    os._exit(0)


if __name__ == "__main__" and sys.argv[1:2] == ["proxy"]:
    proxy(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))


def tiny_bundle(folder: Path, runner: Path | None = None, seed: int = 0) -> Path:
    """A deploytool bundle of a tiny classifier (3x32x32 -> 10, converted with pnnx) at folder/bundle,
    with `runner` (the cross-built aarch64 runner, or any program standing in for it) at
    bin/aarch64/deploytool_runner, where `deploytool bundle --target aarch64` puts it."""
    import torch
    from helpers import convert_model

    from deploytool.bundle.write import write_bundle
    from deploytool.ncnn_param import read_param

    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(), torch.nn.Linear(8, 10),
    ).eval()  # fmt: skip
    param, bin_ = convert_model(model, torch.rand(1, 3, 32, 32), folder / f"model{seed}")
    graph = read_param(param)
    meta = {
        "schema": 1, "model": "tiny", "task": "classify",
        "input": {"name": graph.input_names[0], "width": 32, "height": 32, "color": "rgb",
                  "resize": "resize", "pad_value": 114, "mean_vals": [0, 0, 0], "norm_vals": [1 / 255] * 3},
        "outputs": graph.output_names, "labels": [f"c{i}" for i in range(10)], "top_k": 3,
    }  # fmt: skip
    out = write_bundle(folder / f"bundle{seed}", param, bin_, meta)
    if runner is not None:
        add_runner(out, runner)
    return out


def add_runner(bundle: Path, runner: Path, arch: str = "aarch64") -> None:
    """Put `runner` into the bundle as its cross-built runner for `arch` (listed in the marker)."""
    import json

    from deploytool.bundle.target import MARKER, runner_path

    dest = bundle / runner_path(arch)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(runner, dest)
    marker = json.loads((bundle / MARKER).read_text())
    marker["files"] = sorted({*marker["files"], runner_path(arch)})
    (bundle / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def aarch64_program(folder: Path, name: str, body: str) -> Path:
    """A static aarch64 C program `int main(void) { body }` (the runner's stand-in for crashes)."""
    src = folder / f"{name}.c"
    src.write_text(f"#include <signal.h>\n#include <unistd.h>\nint main(void) {{ {body} return 0; }}\n")
    exe = folder / name
    subprocess.run(["aarch64-linux-gnu-gcc", "-static", "-O0", "-o", str(exe), str(src)], check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    return exe


def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (relative path -> bytes, None for a folder), to show it unchanged."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {
        p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes())
        for p in sorted(folder.rglob("*"))
    }


# What the test modules' fixtures do.


def running_board(name: str, **kw):
    """Yield a started board and stop it afterwards; skip when sshd is missing, fail if CI is set."""
    why = missing_reason()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set but the SSH tests cannot run: {why}")
        pytest.skip(why)
    board = start_board(name, **kw)
    try:
        yield board
    finally:
        board.stop()


def arm_board():
    """An aarch64 board: its runner executes under qemu-aarch64 (Cortex-A72)."""
    yield from running_board(
        "arm", setenv={"DEPLOYTOOL_BOARD_ARCH": "aarch64", "DEPLOYTOOL_BOARD_EXEC": QEMU_EXEC}
    )


def arm_runner() -> Path:
    """The cross-built static aarch64 runner."""
    from deploytool.targets.build import build_runner, runner_available

    ok, why = runner_available("aarch64")
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the aarch64 runner cannot be built: {why}")
        pytest.skip(why)
    return build_runner(arch="aarch64")


def board_env(request, monkeypatch, tmp_path) -> None:
    """DEPLOYTOOL_SSH_CONFIG names the test's board; the logs a failure keeps go to tmp_path."""
    for name in ("arm_board", "x86_board", "bare_board"):
        if name in request.fixturenames:
            monkeypatch.setenv("DEPLOYTOOL_SSH_CONFIG", str(request.getfixturevalue(name).config))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
