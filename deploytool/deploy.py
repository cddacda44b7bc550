"""`deploytool deploy BUNDLE --to [user@]host[:port]:DIR`: put a bundle and a working runner on a board.

The bundle is copied into a fresh folder beside DIR on the board (`DIR.tmp-XXXXXX`), the runner is
installed there (`cross`: the bundle's cross-built `bin/<arch>/deploytool_runner`; `native`: built on
the board with the bundle README's cmake commands against the board's libncnn), executed once on a
zero input to prove it loads the model and prints its JSON, and only then the folder is switched into
DIR by renames (an earlier deploy is replaced). Any failure removes the temporary folder and leaves DIR
as it was: nothing half-deployed ever sits at DIR.

On the board afterwards: DIR holds the bundle's files, `bin/deploytool_runner` and the bundle marker;
`ncnn-cpp@ssh:DEST` runs that runner (targets/ssh.py).
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .bundle.target import MARKER, DamagedMarker, read_marker, runner_path
from .errors import BackendUnavailable, DeployError, RemoteDeployError, SpecError
from .targets.build import RUNNER_EXE, build_commands, ncnn_wheel_version
from .targets.ssh import (
    RUNNER_REL,
    SshLink,
    client_available,
    parse_destination,
    probe,
    read_json,
)

BUILDS = ("auto", "cross", "native")
COPY_TIMEOUT_S = 900.0
BUILD_TIMEOUT_S = 3600.0  # a runner build on a small board
SMOKE_TIMEOUT_S = 600.0  # loading the model and one inference, maybe under an emulator


@dataclass(frozen=True)
class DeployResult:
    """What deploy() did, for the CLI to print."""

    destination: str  # DEST as given
    host: str
    dir: str  # DIR's absolute path on the board
    arch: str  # the board's architecture (DEPLOYTOOL_BOARD_ARCH or uname -m)
    emulated: bool  # the board runs the runner through DEPLOYTOOL_BOARD_EXEC (an emulator)
    runner: str  # "cross" (the bundle's binary installed) or "native" (built on the board)
    replaced: bool  # an earlier deploy at DIR was replaced
    steps: tuple[tuple[str, float], ...]  # (step, seconds) in order

    def lines(self) -> list[str]:
        how = "installed the bundle's cross-built runner" if self.runner == "cross" else "built the runner"
        board = f"{self.arch}{', emulated' if self.emulated else ''}"
        head = f"deployed to {self.host}:{self.dir} ({board}): {how}"
        head += ", replaced the earlier deploy" if self.replaced else ""
        steps = [f"  {name}: {seconds:.1f} s" for name, seconds in self.steps]
        return [head, *steps, f"run it with --backends ncnn-cpp@ssh:{self.destination}"]


def native_commands(ncnn_dir: str) -> list[str]:
    """The native build the bundle README gives (the board's own compiler, no cross options), as sh lines
    run in the bundle folder."""
    return [" ".join(cmd) for cmd in build_commands(".", "build", ncnn_dir, "x86_64", jobs='"$(nproc)"')]


def _native_script(ncnn_version: str | None) -> str:
    """sh run in the new bundle folder ($1: ncnn_DIR, or empty for the board's deploytool cache)."""
    default = f"$HOME/.cache/deploytool/ncnn-{ncnn_version}/lib/cmake/ncnn" if ncnn_version else ""
    configure, build = native_commands('"$ncnn_dir"')
    return f"""
ncnn_dir=${{1:-{default}}}
command -v cmake >/dev/null || {{
  echo "cmake is not on the board's PATH (apt-get install cmake)" >&2; exit 1; }}
command -v c++ >/dev/null || command -v g++ >/dev/null || {{
  echo "no C++ compiler (c++, g++) on the board's PATH (apt-get install build-essential)" >&2; exit 1; }}
[ -n "$ncnn_dir" ] && [ -f "$ncnn_dir/ncnnConfig.cmake" ] || {{
  echo "no libncnn for the board at ${{ncnn_dir:-(none)}}: build it there and give --ncnn-dir" >&2; exit 1; }}
{configure} || exit 1
{build} || exit 1
mkdir -p bin && cp build/{RUNNER_EXE} {RUNNER_REL}
"""


# $1 the new folder; DIR's state is checked again at the switch.
_SWITCH = r"""
stage=$1; d=$2
if [ -d "$d" ] && [ ! -f "$d/.deploytool-bundle" ] && [ -n "$(ls -A "$d")" ]; then
  echo "$d is no longer a deploytool deploy; nothing was changed" >&2; exit 1
fi
if [ -d "$d" ]; then
  mv "$d" "$stage/old" || exit 1
  if ! mv "$stage/new" "$d"; then mv "$stage/old" "$d"; exit 1; fi
else
  mv "$stage/new" "$d" || exit 1
fi
rm -rf "$stage"
"""


def check_bundle(bundle: Path) -> dict:
    """The bundle's meta.json; anything but a deploytool bundle is the user's error."""
    bundle = Path(bundle)
    if not bundle.is_dir():
        raise SpecError(
            f"{bundle}: no such folder; make a bundle with `deploytool bundle MODEL --out FOLDER`"
        )
    try:
        marked = read_marker(bundle)
    except DamagedMarker as exc:
        raise SpecError(f"{bundle}: damaged {MARKER} ({exc}); make the bundle again") from None
    if marked is None:
        raise SpecError(f"{bundle}: not a deploytool bundle (no {MARKER}); make one with `deploytool bundle`")
    try:
        return json.loads((bundle / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"{bundle}/meta.json: cannot read it ({exc}); make the bundle again") from None


def deploy(
    bundle: Path,
    dest: str,
    build: str = "auto",
    ncnn_dir: str | None = None,
    *,
    logs: Path | None = None,
) -> DeployResult:
    """Deploy `bundle` to `dest` (`[user@]host[:port]:DIR`). `build`: `cross` installs the bundle's
    runner for the board's architecture, `native` builds it on the board (cmake and a C++ compiler
    there, libncnn at `ncnn_dir` on the board, default ~/.cache/deploytool/ncnn-<version>/lib/cmake/ncnn),
    `auto` is cross when the bundle has a runner for the board, else native. Logs of every ssh/scp call go
    to `logs` (default: a temporary folder, removed after a success, named in any failure)."""
    if build not in BUILDS:
        raise SpecError(f"--build {build!r}: use one of {', '.join(BUILDS)}")
    bundle = Path(bundle)
    meta = check_bundle(bundle)
    d = parse_destination(dest)
    if d.dir is None:
        raise SpecError(f"--to {dest!r}: name the folder on the board, e.g. {d.login}:deploytool")
    if ncnn_dir is not None and not ncnn_dir.strip():
        raise SpecError("--ncnn-dir is empty; give libncnn's lib/cmake/ncnn folder on the board")
    ok, why = client_available()
    if not ok:
        raise BackendUnavailable(f"deploy: {why}")
    own_logs = logs is None
    logs = Path(logs) if logs is not None else Path(tempfile.mkdtemp(prefix="deploytool-deploy."))
    link = SshLink(d, logs, RemoteDeployError)
    steps: list[tuple[str, float]] = []

    def timed(name: str, fn):
        t = time.perf_counter()
        out = fn()
        steps.append((name, time.perf_counter() - t))
        return out

    facts = timed("connect", lambda: probe(link, f"deploy to {d.host}: connecting", d.dir))
    arch, state = facts["arch"], facts.get("state")
    if state == "file":
        raise SpecError(f"--to {dest}: {d.dir} on the board is a file; choose a folder")
    if state == "foreign":
        raise SpecError(
            f"--to {dest}: {d.dir} on the board is a folder deploytool did not deploy (it holds "
            f"{facts.get('holds', '').strip()}); choose another folder or empty it"
        )
    has_cross = (bundle / runner_path(arch)).is_file()
    if build == "cross" and not has_cross:
        raise SpecError(
            f"{bundle} has no runner for the board's {arch} ({runner_path(arch)}); make the bundle with "
            f"`deploytool bundle MODEL --target {arch}` or deploy with --build native"
        )
    how = "cross" if build == "cross" or (build == "auto" and has_cross) else "native"

    stage = None
    try:
        stage = timed(
            "prepare",
            lambda: link.sh(
                f"deploy to {d.host}: preparing a folder beside {d.dir}",
                'mkdir -p "$(dirname "$1")" && s=$(mktemp -d "$1.tmp-XXXXXX") && cd "$s" && pwd -P',
                [d.dir],
                where=posixpath.dirname(d.dir) or "~",
            ).strip(),
        )
        new = f"{stage}/new"
        timed("copy bundle", lambda: link.put(f"deploy to {d.host}: copying the bundle", bundle, new,
                                              timeout=COPY_TIMEOUT_S))  # fmt: skip
        if how == "cross":
            script = (
                f'cd "$1" && mkdir -p bin && cp {runner_path(arch)} {RUNNER_REL} && chmod +x {RUNNER_REL}'
            )
            timed("install runner", lambda: link.sh(f"deploy to {d.host}: installing the runner", script,
                                                    [new], where=new))  # fmt: skip
        else:
            script = f'cd "$1" && shift && {{ {_native_script(ncnn_wheel_version())}\n}}'
            timed(
                "build runner",
                lambda: link.sh(
                    f"deploy to {d.host}: building the runner on the board", script, [new, ncnn_dir or ""],
                    timeout=BUILD_TIMEOUT_S, where=new,
                ),
            )  # fmt: skip
        timed("smoke run", lambda: _smoke(link, d.host, bundle, meta, stage, logs))
        timed("switch", lambda: link.sh(f"deploy to {d.host}: switching {d.dir} to the new deploy", _SWITCH,
                                        [stage, d.dir], where=d.dir))  # fmt: skip
        stage = None
    except BaseException as exc:
        if stage is not None and not _remove(link, d.host, stage) and isinstance(exc, DeployError):
            raise type(exc)(f"{exc}; could not remove {stage} on the board: remove it by hand") from None
        raise
    if own_logs:
        shutil.rmtree(logs, ignore_errors=True)
    return DeployResult(
        destination=dest, host=d.host, dir=facts.get("dir") or _absolute(d.dir, facts.get("home", "")),
        arch=arch, emulated=bool(facts.get("exec", "").strip()), runner=how,
        replaced=state == "deployed", steps=tuple(steps),
    )  # fmt: skip


def _absolute(folder: str, home: str) -> str:
    return folder if folder.startswith("/") else f"{home.rstrip('/')}/{folder}"


def _smoke(link: SshLink, host: str, bundle: Path, meta: dict, stage: str, logs: Path) -> None:
    """Run the installed runner once on a zero input of the model's size: it must load the model, run
    it and print its JSON."""
    inp = meta.get("input", {})
    x = np.zeros((1, 3, int(inp.get("height", 1)), int(inp.get("width", 1))), np.float32)
    local = logs / "smoke.npy"
    np.save(local, x)
    step = f"deploy to {host}: smoke run of the runner on the board"
    link.put(step, local, f"{stage}/smoke.npy")
    script = (
        f'cd "$1/new" && ${{DEPLOYTOOL_BOARD_EXEC:-}} ./{RUNNER_REL} meta.json "$1/smoke.npy" --threads 1'
    )
    out = link.sh(step, script, [stage], timeout=SMOKE_TIMEOUT_S, where=stage)
    doc = read_json(out, step, RemoteDeployError)
    if len(doc.get("results") or []) != 1:
        raise RemoteDeployError(f"{step}: {RUNNER_EXE} printed no result for the input")


def _remove(link: SshLink, host: str, stage: str) -> bool:
    try:
        link.sh(f"deploy to {host}: removing {stage}", 'rm -rf -- "$1"', [stage], timeout=120)
        return True
    except DeployError:
        return False
