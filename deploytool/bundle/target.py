"""Where a bundle may be written: its files, the marker naming them, and the checks made before any work."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import SpecError
from ..runfolder import BIN_NAME, META, PARAM_NAME
from ..targets.build import runner_source_dir, runner_source_files

MARKER = ".deploytool-bundle"
MARKER_SCHEMA = 1


# `bundle --target`: x86_64 ships sources only (built on the board); aarch64 adds the cross-built,
# statically linked runner, checked under qemu-aarch64 before it is written.
TARGETS = ("x86_64", "aarch64")


def runner_path(arch: str) -> str:
    """Where a bundle keeps the runner cross-built for `arch`."""
    return f"bin/{arch}/deploytool_runner"


def bundle_files(with_report: bool = True, arches: tuple[str, ...] = ()) -> list[str]:
    """The files (relative, '/'-separated) of the bundle write_bundle writes, the marker excepted."""
    src = runner_source_dir()
    names = {PARAM_NAME, BIN_NAME, META, "README.md", *map(runner_path, arches)}
    names |= {f.relative_to(src).as_posix() for f in runner_source_files()}
    if with_report:
        names.add("report.json")
    return sorted(names)


@dataclass(frozen=True)
class BundleTarget:
    """Where a bundle goes and how: `new` (nothing there yet: the folder is renamed into place),
    `replace` (an earlier bundle, marked by MARKER: swapped for the new one; files in it that deploytool
    did not write are moved into the new one), `into` (an empty folder, or with --force one that
    deploytool did not write: the bundle's files are added, files of the same name replaced, nothing
    else touched)."""

    path: Path
    mode: str
    manifest: frozenset[str] = frozenset()


class DamagedMarker(Exception):
    pass


def read_marker(folder: Path) -> frozenset[str] | None:
    """The files an earlier bundle in `folder` wrote (from its MARKER), or None when it has no marker.
    Raises DamagedMarker for a marker that is not deploytool's JSON."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DamagedMarker(str(exc)) from exc
    return frozenset(f for f in files if f and not f.startswith("/") and ".." not in f.split("/"))


def _foreign(folder: Path, manifest: frozenset[str]) -> list[str]:
    """Entries of an earlier bundle that deploytool did not write (a `build/` from its README's cmake
    commands, the user's notes): files not in its manifest, and folders holding none of it."""
    ours = set(manifest) | {MARKER}
    tool_dirs = {"/".join(f.split("/")[:i]) for f in ours for i in range(1, f.count("/") + 1)}
    found = []

    def walk(d: Path, rel: str) -> None:
        for entry in sorted(d.iterdir()):
            r = f"{rel}{entry.name}"
            if r in tool_dirs and entry.is_dir() and not entry.is_symlink():
                walk(entry, r + "/")
            elif r not in ours:
                found.append(r)

    walk(folder, "")
    return found


def _clashes(path: str, files: list[str]) -> bool:
    """Whether an entry at `path` takes a name the bundle needs (a file, or a folder above one)."""
    return path in files or any(f.startswith(path + "/") or path.startswith(f + "/") for f in files)


def _in_the_way(folder: Path, files: list[str]) -> str | None:
    """The first entry of `folder` that stops a bundle file from being written: a folder where a file
    goes, or a file where a folder goes."""
    for f in files:
        parts = f.split("/")
        for i in range(1, len(parts)):
            p = folder.joinpath(*parts[:i])
            if p.exists() and not p.is_dir():
                return "/".join(parts[:i])
        p = folder / f
        if p.is_dir() and not p.is_symlink():
            return f
    return None


def _listing(folder: Path, limit: int = 3) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _relation(a: Path, b: Path) -> str | None:
    """How folder `a` stands to folder `b`: "is", "is inside", "contains", or None (apart)."""
    if a == b:
        return "is"
    if b in a.parents:
        return "is inside"
    if a in b.parents:
        return "contains"
    return None


def check_bundle_target(out: Path, work: Path | None = None, force: bool = False) -> BundleTarget:
    """Decide, before any work, whether a bundle may be written to `out`; raise SpecError (exit 2) if
    not. deploytool replaces only what it wrote itself: never a file, the current folder or one above
    it, the home folder, the run folder (`work`) or a folder inside or around it, or deploytool's own
    runner sources; a folder that is not empty and holds no bundle only with `force` (then the bundle's
    files are added to it and nothing else in it is touched)."""
    given = Path(out)
    real = given.resolve()
    shown = f"--out {given}"
    if real.exists() and not real.is_dir():
        raise SpecError(f"{shown} is an existing file; give the path of a folder for the bundle")
    cwd = Path.cwd().resolve()
    if real == cwd:
        raise SpecError(
            f"{shown} is the current folder; give the bundle a folder of its own, e.g. --out bundle"
        )
    if real in cwd.parents:
        raise SpecError(
            f"{shown} contains the current folder; give the bundle a folder of its own, e.g. --out bundle"
        )
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry
        home = None
    if home is not None and (real == home or real in home.parents):
        what = "is your home folder" if real == home else "contains your home folder"
        raise SpecError(f"{shown} {what}; give the bundle a folder of its own, e.g. --out ~/bundle")
    if work is not None:
        what = _relation(real, Path(work).resolve())
        if what:
            raise SpecError(
                f"{shown} {what} the run folder {work} (--work); give the bundle a folder of its own"
            )
    src = runner_source_dir().resolve()
    what = _relation(real, src)
    if what:
        raise SpecError(f"{shown} {what} deploytool's own runner sources ({src}); choose another folder")
    existing = real.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise SpecError(f"{shown}: {existing} is a file, so no folder can be made under it")
    if not real.exists():
        _check_writable(shown, existing)
        return BundleTarget(real, "new")
    files = bundle_files()
    try:
        empty = not any(real.iterdir())
        manifest = read_marker(real)
        foreign = [] if manifest is None else _foreign(real, manifest)
    except PermissionError as exc:
        raise SpecError(
            f"{shown}: cannot read {exc.filename} ({exc.strerror}); choose a folder you can write to"
        ) from None
    except DamagedMarker as exc:
        if not force:
            raise SpecError(
                f"{shown} has a damaged {MARKER} ({exc}); remove the folder or add --force to write the "
                "bundle into it (files of the same name are replaced, nothing else is deleted)"
            ) from None
        manifest = None
    if empty or manifest is None:
        if not empty and not force:
            raise SpecError(
                f"{shown} is a folder deploytool did not write (it holds {_listing(real)}); give a new or "
                "empty folder, or add --force to write the bundle into it (files of the same name are "
                "replaced, nothing else is deleted)"
            )
        blocker = _in_the_way(real, files + [MARKER])
        if blocker is not None:
            raise SpecError(f"{shown}: {blocker} in it is in the way of the bundle's files; move it away")
        _check_writable(shown, real)
        return BundleTarget(real, "into")
    clash = next((f for f in foreign if _clashes(f, files)), None)
    if clash is not None and not force:
        raise SpecError(
            f"{shown}: {clash} was not written by deploytool but the new bundle writes that name; move it "
            "away or add --force to replace it"
        )
    _check_writable(shown, real.parent)  # the new bundle is built beside the old one and renamed
    return BundleTarget(real, "replace", manifest)


def _check_writable(shown: str, folder: Path) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        raise SpecError(f"{shown}: no permission to write in {folder}; choose a folder you can write to")
