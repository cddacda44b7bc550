"""A board reached over SSH: the destination text, a link that runs commands and copies files with the
system `ssh` and `scp` clients, and the `ssh:DEST` target whose sessions run the deployed runner there.

DEST is `[user@]host[:port][:DIR]`: host may be an alias from the user's ssh config or an IPv6 literal
in brackets, port is all digits, DIR a folder on the board (relative: to the board user's home). Only
the user's own keys, agent and ssh config are used; no password is ever asked for (BatchMode) and host
keys are checked (StrictHostKeyChecking=yes: an unknown board must be added to known_hosts by the user
once). `DEPLOYTOOL_SSH_CONFIG=FILE` adds `-F FILE` (ssh reads ~/.ssh/config from the passwd entry's
home, not $HOME, so unusual setups and the tests name their config this way).

A board that runs the runner through an emulator says so in its session environment:
`DEPLOYTOOL_BOARD_ARCH` (else `uname -m`) and `DEPLOYTOOL_BOARD_EXEC` (a command prefix for the runner,
e.g. `qemu-aarch64 -cpu cortex-a72 -L /usr/aarch64-linux-gnu`). Real boards need neither.

Every failure becomes one line naming the step and the cause (host unreachable, key refused, host key
unknown or changed, connection dropped, the board's disk full or read-only, a remote command's own
last stderr line) and the local log of the ssh/scp call.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BackendError, BackendUnavailable, DeployError, SpecError
from ..tools import exit_description, last_line, run_tool
from .base import Session, Target
from .build import RUNNER_EXE

SSH_CONFIG_ENV = "DEPLOYTOOL_SSH_CONFIG"
DEFAULT_DIR = "deploytool"
CONNECT_TIMEOUT_S = 10
COMMAND_TIMEOUT_S = 120.0  # a short remote command or a small copy
RUNNER_REL = f"bin/{RUNNER_EXE}"
FORMAT = "[user@]host[:port][:DIR], e.g. pi@board.local:2222:deploytool"
# Names that pass unquoted through ssh, scp's remote shell and sh alike.
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_HOST = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?")
_DIR = re.compile(r"[A-Za-z0-9._/+,=@%-]+")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")
# Printed by every remote script with its exit status: its presence tells a command that ran on the
# board and failed from an ssh that never got there or lost its connection (both exit 255).
_STATUS = "deploytool-remote-status"
_STATUS_LINE = re.compile(rf"^{_STATUS} (\d+)\s*$", re.M)


@dataclass(frozen=True)
class Destination:
    """A parsed DEST. `dir` is None only where DEST gave none and no default was asked for."""

    text: str
    host: str
    user: str | None = None
    port: int | None = None
    dir: str | None = None

    @property
    def login(self) -> str:
        """What ssh takes as its destination."""
        return f"{self.user}@{self.host}" if self.user else self.host

    def remote(self, path: str) -> str:
        """scp's `[user@]host:path` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user + '@' if self.user else ''}{host}:{path}"

    def ssh_hint(self) -> str:
        """The plain ssh command a user types to reach the board (for messages)."""
        return shlex.join(["ssh", *(["-p", str(self.port)] if self.port else []), self.login])


def parse_destination(text: str, default_dir: str | None = None) -> Destination:
    """Parse `[user@]host[:port][:DIR]`; a malformed one is SpecError (one line with the format). DIR
    defaults to `default_dir`; `~/x` means x (relative to the board user's home)."""

    def bad(why: str) -> SpecError:
        return SpecError(f"destination {text!r}: {why}; write {FORMAT}")

    rest = text.strip()
    if not rest:
        raise bad("it is empty")
    user = None
    at = rest.find("@")
    if at >= 0 and ":" not in rest[:at] and "/" not in rest[:at]:
        user, rest = rest[:at], rest[at + 1 :]
        if not _USER.fullmatch(user):
            raise bad(f"user {user!r} is not a user name")
    if rest.startswith("["):
        end = rest.find("]")
        if end < 0:
            raise bad("an IPv6 address needs its closing ']'")
        host, rest = rest[1:end], rest[end + 1 :]
        if not _IPV6.fullmatch(host) or ":" not in host:
            raise bad(f"[{host}] is not an IPv6 address")
    else:
        host, sep, tail = rest.partition(":")
        rest = sep + tail
        if not host:
            raise bad("no host")
        if not _HOST.fullmatch(host):
            raise bad(f"host {host!r} is not a host name or address (IPv6 goes in brackets: [::1])")
    port = None
    folder = default_dir
    if rest:
        if not rest.startswith(":"):
            raise bad(f"unexpected {rest!r} after the host")
        rest = rest[1:]
        m = re.match(r"(\d+)(:|$)", rest)
        if m:
            port = int(m.group(1))
            if not 0 < port < 65536:
                raise bad(f"port {port} is not between 1 and 65535")
            rest = rest[m.end() :]
            if m.group(2) and not rest:
                raise bad("nothing after the port's ':'")
        if rest:
            folder = rest
    if folder is not None:
        folder = _check_dir(folder, bad)
    return Destination(text=text, host=host, user=user, port=port, dir=folder)


def _check_dir(folder: str, bad) -> str:
    if folder == "~" or folder.startswith("~/"):
        folder = folder[2:]
    if folder.strip("/") in ("", ".", ".."):
        raise bad(f"folder {folder or '~'!r} is the home or root folder; give the deploy a folder of its own")
    folder = folder.rstrip("/")
    if not _DIR.fullmatch(folder) or folder.startswith("-"):
        raise bad(
            f"folder {folder!r} may only hold letters, digits and . _ - + , = @ % / (no spaces, quotes)"
        )
    return folder


def ssh_options(dest: Destination, connect_timeout: int = CONNECT_TIMEOUT_S) -> list[str]:
    """Options common to ssh and scp: no prompts, host keys checked, bounded connect, dead links noticed,
    and -F from DEPLOYTOOL_SSH_CONFIG."""
    opts = []
    config = os.environ.get(SSH_CONFIG_ENV)
    if config:
        if not Path(config).is_file():
            raise SpecError(f"{SSH_CONFIG_ENV}={config}: no such file; point it at an ssh client config")
        opts += ["-F", config]
    for o in (
        "BatchMode=yes",
        "StrictHostKeyChecking=yes",
        f"ConnectTimeout={connect_timeout}",
        "ServerAliveInterval=5",
        "ServerAliveCountMax=3",
    ):
        opts += ["-o", o]
    return opts


def _stderr_of(log: Path) -> str:
    """What ssh/scp and the remote command wrote to stderr: the log without its `$ cmd` header and the
    stdout that run_tool appends after a failure."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    text = text.split("\n--- stdout ---\n", 1)[0]
    return text.split("\n", 1)[1] if text.startswith("$ ") and "\n" in text else text


def classify(stderr: str, dest: Destination, status: int | None, where: str) -> str:
    """The cause of a failed ssh/scp call in words. `status` is the remote script's exit status when it
    ran on the board (None: ssh never got there or lost its connection); `where` names the folder being
    written, for the disk causes."""
    s = stderr
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in s:
        m = re.search(r"ssh-keygen -f \S+ -R \S+", s)  # ssh names the known_hosts file and the entry
        remove = m.group(0) if m else f"ssh-keygen -R {dest.host}"
        return (
            f"the host key of {dest.host} changed since it was recorded in known_hosts (Host key "
            f"verification failed); if the board was reinstalled, remove the old key with `{remove}` and "
            f"connect once with `{dest.ssh_hint()}` to check and record the new one"
        )
    if "Host key verification failed" in s or "host key is known for" in s:
        return (
            f"the host key of {dest.host} is not in known_hosts (Host key verification failed); deploytool "
            f"never accepts one by itself: connect once with `{dest.ssh_hint()}` and check the fingerprint, "
            f"or add it with `ssh-keyscan{' -p ' + str(dest.port) if dest.port else ''} {dest.host} >> "
            "~/.ssh/known_hosts` after checking it"
        )
    if re.search(r"Permission denied \((publickey|password|keyboard|gssapi|hostbased)", s):
        return (
            f"the board refused the key (Permission denied): add your public key to ~/.ssh/authorized_keys "
            f"of {dest.user or 'the user'} on {dest.host} (ssh-copy-id), or name the key in your ssh config"
        )
    m = re.search(
        r"(Could not resolve hostname [^:\s]+|Connection refused"
        r"|Connection timed out( during banner exchange)?|No route to host|Network is unreachable"
        r"|Name or service not known|timed out)",
        s,
    )
    if status is None and m:
        port = f" port {dest.port}" if dest.port else ""
        why = m.group(0)
        return f"{dest.host}{port} is unreachable ({why}); check the host, the port and that sshd runs there"
    for pattern, what in (
        ("No space left on device", "the board's disk is full"),
        ("Disk quota exceeded", "the board user's disk quota is exceeded"),
        ("File too large", "the board refused a file that large (a file size limit)"),
        ("Read-only file system", "the board's file system is read-only"),
    ):
        if pattern in s:
            return f"{what} at {where} ({pattern})"
    if status is None:
        m = re.search(
            r"(Connection closed|Connection reset|Broken pipe|lost connection|closed by remote host"
            r"|client_loop: send disconnect|Timeout, server [^ ]+ not responding|Connection to .* closed)",
            s,
        )
        if m:
            return f"the connection to {dest.host} dropped ({m.group(0)}); check the network and retry"
    if "Permission denied" in s:
        line = last_line("\n".join(ln for ln in s.splitlines() if "Permission denied" in ln)) or ""
        return f"no permission to write at {where} on the board ({line})"
    tail = last_line(_STATUS_LINE.sub("", s))
    if status is not None:
        # sh reports a child that a signal ended as 128 + the signal's number
        code = exit_description(128 - status if status > 128 else status)
        return f"the command on the board {code}" + (f" (last line: {tail})" if tail else "")
    return "ssh failed" + (f" ({tail})" if tail else "")


@dataclass
class SshLink:
    """ssh and scp to one destination, each call through run_tool with a timeout and a log in `logs`;
    failures raise `error` with `<step>: <cause>; log: <file>`."""

    dest: Destination
    logs: Path
    error: type[DeployError] = BackendError
    connect_timeout: int = CONNECT_TIMEOUT_S
    calls: int = field(default=0, init=False)

    def _log(self, step: str) -> Path:
        self.calls += 1
        slug = re.sub(r"[^a-z0-9]+", "-", step.lower()).strip("-")[:40]
        return self.logs / f"{self.calls:02d}-{slug}.log"

    def _call(self, cmd: list[str], step: str, log: Path, timeout: float, where: str, capture: bool):
        try:
            return run_tool(cmd, log, step, timeout=timeout, error=self.error, capture_stdout=capture)
        except DeployError as exc:
            if "timed out after" in str(exc) or "could not start" in str(exc):
                raise  # run_tool's own line says it all
            stderr = _stderr_of(log)
            status = _STATUS_LINE.findall(stderr)
            cause = classify(stderr, self.dest, int(status[-1]) if status else None, where)
            raise self.error(f"{step}: {cause}; log: {log}") from None

    def sh(
        self,
        step: str,
        script: str,
        args: list[str] = (),
        timeout: float = COMMAND_TIMEOUT_S,
        where: str | None = None,
        log: Path | None = None,
    ) -> str:
        """Run the POSIX sh `script` with `args` ($1...) on the board; returns its stdout."""
        wrapped = f'( {script}\n) ; s=$? ; echo "{_STATUS} $s" >&2 ; exit $s'
        remote = shlex.join(["sh", "-c", wrapped, "sh", *map(str, args)])
        cmd = ["ssh", *ssh_options(self.dest, self.connect_timeout)]
        cmd += [*(["-p", str(self.dest.port)] if self.dest.port else []), "--", self.dest.login, remote]
        log = log or self._log(step)
        ran = self._call(cmd, step, log, timeout, where or self.dest.dir or "~", capture=True)
        return ran.stdout or ""

    def _scp(self, step: str, sources: list[str], target: str, timeout: float, where: str) -> None:
        # -O: the original scp protocol, whose errors carry the board's errno text ("No space left on
        # device"); over SFTP (scp's default since OpenSSH 9.0) a full disk reads "Failure".
        cmd = ["scp", "-O", "-r", *ssh_options(self.dest, self.connect_timeout)]
        cmd += [*(["-P", str(self.dest.port)] if self.dest.port else []), "--", *sources, target]
        self._call(cmd, step, self._log(step), timeout, where, capture=False)

    def put(self, step: str, local: Path, remote: str, timeout: float = 600.0) -> None:
        """Copy the local file or folder `local` to the board as `remote` (which must not exist for a
        folder: scp copies a folder into an existing one)."""
        self._scp(step, [str(local)], self.dest.remote(remote), timeout, remote)

    def get(self, step: str, remote: str, local: Path, timeout: float = 600.0) -> None:
        """Copy the board's file or folder `remote` here as `local` (which must not exist)."""
        self._scp(step, [self.dest.remote(remote)], str(local), timeout, str(local))


def client_available() -> tuple[bool, str | None]:
    missing = [c for c in ("ssh", "scp") if shutil.which(c) is None]
    if missing:
        return False, f"no {' or '.join(missing)} client on PATH (apt-get install -y openssh-client)"
    return True, None


# Facts about the board, one `key=value` a line: its architecture, the runner's exec prefix, the DIR's
# absolute path and state (absent, empty, deployed: has the bundle marker, foreign, file) and whether the
# runner is installed there.
PROBE = r"""
d=$1
printf 'arch=%s\n' "${DEPLOYTOOL_BOARD_ARCH:-$(uname -m)}"
printf 'exec=%s\n' "${DEPLOYTOOL_BOARD_EXEC:-}"
printf 'home=%s\n' "$HOME"
if [ -d "$d" ]; then
  printf 'dir=%s\n' "$(cd "$d" && pwd -P)"
  if [ -f "$d/.deploytool-bundle" ]; then echo state=deployed
  elif [ -z "$(ls -A "$d")" ]; then echo state=empty
  else echo state=foreign; printf 'holds=%s\n' "$(ls -A "$d" | head -n 4 | tr '\n' ' ')"
  fi
  if [ -x "$d/bin/deploytool_runner" ]; then echo runner=yes; else echo runner=no; fi
elif [ -e "$d" ] || [ -L "$d" ]; then echo state=file
else echo state=absent
fi
"""


def normal_arch(arch: str) -> str:
    return {"arm64": "aarch64", "amd64": "x86_64"}.get(arch, arch)


def probe(link: SshLink, step: str, folder: str) -> dict[str, str]:
    out = link.sh(step, PROBE, [folder])
    facts = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    facts["arch"] = normal_arch(facts.get("arch", "").strip() or "unknown")
    return facts


class SshTarget(Target):
    """The runner deployed at DIR on a board (`deploytool deploy BUNDLE --to DEST`), run over SSH."""

    def __init__(self, dest: str, logs: Path | None = None):
        self.dest = parse_destination(dest, DEFAULT_DIR)
        self.suffix = f"ssh:{dest}"
        self.arch = "unknown"  # known after open(): the board says
        self.emulated = False
        self._logs = logs

    def available(self) -> tuple[bool, str | None]:
        return client_available()

    def describe(self) -> str:
        return f"{super().describe()} at {self.dest.login} (ssh)"

    def open(self) -> SshSession:
        ok, why = self.available()
        if not ok:
            raise BackendUnavailable(f"{self.suffix}: {why}")
        logs = self._logs or Path(tempfile.mkdtemp(prefix="deploytool-ssh."))
        link = SshLink(self.dest, logs, BackendError)
        step = f"{self.suffix}: connecting"
        facts = probe(link, step, self.dest.dir)
        if facts.get("runner") != "yes":
            raise BackendUnavailable(
                f"{self.suffix}: no runner at {self.dest.dir}/{RUNNER_REL} on {self.dest.host}; run "
                f"`deploytool deploy BUNDLE --to {self.dest.text}` first"
            )
        self.arch = facts["arch"]
        self.emulated = bool(facts.get("exec", "").strip())
        root = facts["dir"]
        work = link.sh(
            f"{self.suffix}: making a work folder", 'mktemp -d "$1/.work.XXXXXX"', [root], where=root
        )
        return SshSession(link, self.suffix, root, work.strip(), own_logs=self._logs is None)


class SshSession(Session):
    """A work folder in DIR on the board; `run` executes DIR/bin/deploytool_runner in it."""

    def __init__(self, link: SshLink, name: str, root: str, work: str, own_logs: bool = False):
        self.link, self.name, self.root, self.work = link, name, root, work
        self._own_logs = own_logs
        self._failed = False

    def _step(self, what: str):
        return f"{self.name}: {what}"

    def put(self, local: Path, name: str) -> str:
        if not _NAME.fullmatch(name):
            raise SpecError(f"{self.name}: {name!r} is not a plain file name")
        remote = f"{self.work}/{name}"
        self._guard(lambda: self.link.put(self._step(f"copying {name} to the board"), Path(local), remote))
        return remote

    def run(self, args: list[str], log: Path) -> str:
        # The exec prefix (an emulator on a test board) is split into words by the board's sh.
        runner = shlex.quote(f"{self.root}/{RUNNER_REL}")
        script = f'cd "$1" && shift && ${{DEPLOYTOOL_BOARD_EXEC:-}} {runner} "$@"'
        step = self._step(f"running {RUNNER_EXE} on the board")
        return self._guard(
            lambda: self.link.sh(step, script, [self.work, *map(str, args)], timeout=1800, where=self.work,
                                 log=Path(log))
        )  # fmt: skip

    def fetch(self, name: str, local: Path) -> Path:
        if not _NAME.fullmatch(name):
            raise SpecError(f"{self.name}: {name!r} is not a plain folder name")
        local = Path(local)
        self._guard(lambda: self.link.get(self._step(f"fetching {name}"), f"{self.work}/{name}", local))
        return local

    def _guard(self, fn):
        try:
            return fn()
        except DeployError:
            self._failed = True
            raise

    def close(self) -> None:
        try:
            self.link.sh(self._step("removing the work folder"), 'rm -rf -- "$1"', [self.work], timeout=60)
        except DeployError:
            self._failed = True  # the board may be gone; the folder is hidden in DIR and harmless
        if self._own_logs and not self._failed:
            shutil.rmtree(self.link.logs, ignore_errors=True)


def read_json(text: str, step: str, error: type[DeployError]) -> dict:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{step}: {RUNNER_EXE} printed no valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise error(f"{step}: {RUNNER_EXE} printed JSON that is not an object")
    return doc
