"""Writing a bundle folder: built beside its place and renamed into it, the user's files kept."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path

from .. import __version__
from ..atomic import deferred_signals
from ..errors import SpecError
from ..runfolder import BIN_NAME, META, META_SCHEMA, PARAM_NAME, ncnn_options_of, write_meta
from ..targets.build import runner_source_dir, runner_source_files
from .readme import readme
from .target import MARKER, MARKER_SCHEMA, _clashes, _foreign, check_bundle_target, runner_path


def write_bundle(
    out_dir: Path,
    param: Path,
    bin: Path,
    meta: dict,
    report_path: Path | None = None,
    *,
    work: Path | None = None,
    force: bool = False,
    runners: dict[str, Path] | None = None,
) -> Path:
    """Write the bundle folder after check_bundle_target's rules. It is built beside its place and
    renamed into it, so a new or replaced bundle appears complete or not at all; files in an earlier
    bundle that deploytool did not write are kept. `runners` ({arch: executable}) are cross-built
    runners shipped at runner_path(arch). A MARKER listing the bundle's files is written last."""
    out_dir = Path(out_dir)
    param, bin = Path(param), Path(bin)
    for f in (param, bin):
        if not f.is_file():
            raise SpecError(f"{f}: no such file; convert the model first")
    if report_path is not None and not Path(report_path).is_file():
        raise SpecError(f"{report_path}: no such report file")
    for key in ("task", "input", "outputs"):
        if key not in meta:
            raise SpecError(f"bundle meta has no {key!r}; build it with deploytool.runfolder.meta_for")
    ncnn_options_of(meta, "bundle meta.json")  # carried to the board as measured, so checked here
    sources = runner_source_files()
    if not (runner_source_dir() / "CMakeLists.txt").is_file():
        raise SpecError(f"the C++ runner sources are missing from {runner_source_dir()}")
    target = check_bundle_target(out_dir, work, force)

    # Built on the same filesystem as its place: beside it, or inside the folder it is added to.
    home = target.path if target.mode == "into" else target.path.parent
    home.mkdir(parents=True, exist_ok=True)
    tmp = _new_dir(home, f".{target.path.name}.tmp")
    try:
        shutil.copyfile(param, tmp / PARAM_NAME)
        shutil.copyfile(bin, tmp / BIN_NAME)
        meta = write_meta(tmp / META, dict(meta, schema=META_SCHEMA, param=PARAM_NAME, bin=BIN_NAME))
        src_root = runner_source_dir()
        for f in sources:
            dest = tmp / f.relative_to(src_root)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dest)
        for arch, exe in (runners or {}).items():
            dest = tmp / runner_path(arch)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(exe, dest)
        if report_path is not None:
            shutil.copyfile(report_path, tmp / "report.json")
        (tmp / "README.md").write_text(readme(meta, report_path is not None, tuple(runners or ())))
        written = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        marker = {"schema": MARKER_SCHEMA, "deploytool": __version__, "files": written}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        if target.mode == "into":
            _move_into(tmp, target.path, written)
        else:
            _replace_dir(tmp, target.path, target.manifest, written)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _new_name(folder: Path, prefix: str) -> Path:
    """A name in `folder` that nothing has: `prefix` + pid + random."""
    while True:
        path = folder / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


def _new_dir(folder: Path, prefix: str) -> Path:
    """Make a new folder in `folder` (with the umask's permissions, unlike tempfile.mkdtemp's 0700, since
    it becomes the bundle); an existing one is never reused."""
    while True:
        path = _new_name(folder, prefix)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


def _move_into(new: Path, target: Path, files: list[str]) -> None:
    """Move the bundle's files from `new` into the existing folder `target`, each by a rename (files of
    the same name are replaced), the marker last; nothing else in `target` is touched."""
    for rel in files + [MARKER]:
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(new / rel, dest)


def _replace_dir(
    new: Path, target: Path, manifest: frozenset[str] = frozenset(), written: tuple[str, ...] | list[str] = ()
) -> None:
    """Rename `new` to `target`. An earlier bundle at `target` is moved aside first; the entries in it
    that its manifest does not list (the user's) are moved into the new bundle, then it is removed.
    Interrupts are held meanwhile, so the swap is never left half done."""
    with deferred_signals():
        old = None
        if target.exists():
            old = _new_name(target.parent, f".{target.name}.old")
        try:
            if old is not None:
                os.replace(target, old)
            os.replace(new, target)
        except BaseException:
            if old is not None and old.exists() and not target.exists():
                os.replace(old, target)
            raise
        if old is None:
            return
        ours = [*written, MARKER]
        for rel in _foreign(old, manifest):
            dest = target / rel
            if dest.exists() or dest.is_symlink() or _clashes(rel, ours):
                continue  # --force: the new bundle's file takes the name
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(old / rel, dest)
        # Only when everything of the user's has been moved: a failure above keeps `old` (and it).
        shutil.rmtree(old, ignore_errors=True)
