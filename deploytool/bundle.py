"""The board bundle: ncnn model files, meta.json, C++ and Python runners, build files, README."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .atomic import deferred_signals
from .backends.ncnn_runner import check_ncnn_options, ncnn_options_of
from .errors import SpecError
from .ncnn_param import read_param
from .targets.build import runner_source_dir, runner_source_files

PARAM_NAME = "model.ncnn.param"
BIN_NAME = "model.ncnn.bin"
META_SCHEMA = 1
TASKS = ("classify", "detect")


def meta_for(
    spec, param: Path, labels: list[str] | None = None, num_classes: int | None = None,
    ncnn_options: dict | None = None,
) -> dict:  # fmt: skip
    """meta.json (schema 1) for a spec: ncnn blob names from the .param, preprocessing in ncnn's
    pixel units, so that value = (pixel - mean_vals) * norm_vals = (pixel * scale - mean) / std.

    `labels` default to the spec's task_args.names; a detector's `num_classes` (rows of its raw
    output minus 4) defaults to the number of labels. `ncnn_options` (optional: without it every runner
    uses ncnn's defaults for fp32) are ncnn.Option fields that every runner sets after its fp32
    defaults, e.g. {"use_winograd63_convolution": false} from `bench --tune`; the keys and their types
    are backends/ncnn_runner.OPTION_TYPES, an unknown key is refused by each runner."""
    if spec.task not in TASKS:
        raise SpecError(f"{spec.name}: task {spec.task!r} has no runner; bundles support {', '.join(TASKS)}")
    shape = spec.input_shape
    if len(shape) != 4 or shape[1] != 3:
        raise SpecError(f"{spec.name}: the runners take 3-channel images, input shape is {list(shape)}")
    graph = read_param(Path(param))
    if len(graph.input_names) != 1:
        raise SpecError(f"{param}: the runners need exactly one input blob, found {graph.input_names}")
    pre = spec.preprocess
    args = spec.task_args
    labels = list(labels if labels is not None else args.get("names", []))
    meta = {
        "schema": META_SCHEMA,
        "model": spec.name,
        "task": spec.task,
        "param": PARAM_NAME,
        "bin": BIN_NAME,
        "input": {
            "name": graph.input_names[0],
            "width": shape[3],
            "height": shape[2],
            "color": pre.color,
            "resize": pre.resize,
            "pad_value": pre.pad_value,
            "mean_vals": [m / pre.scale for m in pre.mean],
            "norm_vals": [pre.scale / s for s in pre.std],
        },
        "outputs": graph.output_names,
        "labels": labels,
        "top_k": int(args.get("top_k", 5)),
    }
    if ncnn_options is not None:
        meta["ncnn_options"] = check_ncnn_options(ncnn_options, f"{spec.name} meta.json")
    if spec.task == "detect":
        num_classes = num_classes or len(labels)
        if not num_classes:
            raise SpecError(
                f"{spec.name}: the runners need the detector's class count; give task_args.names "
                "or pass num_classes (rows of the raw output minus 4)"
            )
        meta["detect"] = {
            "confidence": float(args.get("confidence", 0.25)),
            "iou": float(args.get("iou", 0.45)),
            "max_det": int(args.get("max_det", 300)),
            "num_classes": int(num_classes),
        }
    return meta


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
    names = {PARAM_NAME, BIN_NAME, "meta.json", "README.md", *map(runner_path, arches)}
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


class _DamagedMarker(Exception):
    pass


def read_marker(folder: Path) -> frozenset[str] | None:
    """The files an earlier bundle in `folder` wrote (from its MARKER), or None when it has no marker.
    Raises _DamagedMarker for a marker that is not deploytool's JSON."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        files = data["files"]
        if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
            raise TypeError("files is not a list of names")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise _DamagedMarker(str(exc)) from exc
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
    except _DamagedMarker as exc:
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


def make_bundle(spec, opts, out_dir: Path, force: bool = False, target: str = "x86_64"):
    """Check the bundle folder (check_bundle_target, before any work), run the pipeline on torch,
    ncnn-cpu and (when libncnn is built) the C++ runner, write report.json into the run folder, and
    only if parity passed write the bundle. `target` aarch64 also checks the cross-built runner under
    qemu-aarch64 (ncnn-cpp@aarch64, required) and puts it into the bundle. Returns (report, bundle
    path or None when parity failed)."""
    from dataclasses import replace

    from .backends import availability
    from .pipeline import run
    from .report import write_json
    from .targets.build import build_runner

    if spec.task not in TASKS:
        raise SpecError(f"{spec.name}: bundles need a classify or detect spec with image input")
    if target not in TARGETS:
        raise SpecError(f"bundle --target {target!r}: use one of {', '.join(TARGETS)}")
    check_bundle_target(out_dir, opts.out, force)
    backends = "torch,ncnn-cpu" + (",ncnn-cpp" if availability("ncnn-cpp")[0] else "")
    if target == "aarch64":
        backends += ",ncnn-cpp@aarch64"
    report = run(spec, replace(opts, backends=backends))
    report_path = write_json(report, Path(opts.out) / "report.json")
    if not report.passed:
        return report, None
    meta = json.loads((Path(opts.out) / "meta.json").read_text())
    param, bin_ = Path(report.artifacts["ncnn_param"]), Path(report.artifacts["ncnn_bin"])
    runners = {"aarch64": build_runner(arch="aarch64")} if target == "aarch64" else {}
    return report, write_bundle(
        out_dir, param, bin_, meta, report_path, work=opts.out, force=force, runners=runners
    )


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
            raise SpecError(f"bundle meta has no {key!r}; build it with deploytool.bundle.meta_for")
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
        meta = dict(meta, schema=META_SCHEMA, param=PARAM_NAME, bin=BIN_NAME)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
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
        (tmp / "README.md").write_text(_readme(meta, report_path is not None, tuple(runners or ())))
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


NCNN_DIR_PLACEHOLDER = {"x86_64": "/path/to/ncnn/install/lib/cmake/ncnn",
                        "aarch64": "/path/to/ncnn-aarch64/lib/cmake/ncnn"}  # fmt: skip


def readme_build_commands(arch: str) -> list[str]:
    """The build commands a bundle's README gives for `arch` (x86_64: natively on the board; aarch64:
    cross-compiling on an x86_64 host): targets.build.build_commands, which build_runner runs here and
    `deploy --build native` runs on a board, with placeholders for the paths."""
    from .targets.build import build_commands

    build = "build" if arch == "x86_64" else f"build-{arch}"
    cmds = build_commands(".", build, NCNN_DIR_PLACEHOLDER[arch], arch, jobs='"$(nproc)"')
    return [" ".join(cmd) for cmd in cmds]


def _readme(meta: dict, has_report: bool, arches: tuple[str, ...] = ()) -> str:
    model = meta.get("model", "model")
    inp = meta["input"]
    report = "- `report.json`: the parity report this bundle was checked with\n" if has_report else ""
    outputs = ", ".join(f"`{o}`" for o in meta["outputs"])
    pre = f"{inp.get('color', 'rgb')}, {inp.get('resize', 'resize')}"
    native = "\n".join(readme_build_commands("x86_64"))
    cross = "\n".join(readme_build_commands("aarch64"))
    shipped = "".join(f"- `{runner_path(a)}`: the runner cross-built for {a} (static, checked under qemu)\n"
                      for a in arches)  # fmt: skip
    prebuilt = (
        f"""
## The cross-built runner in this bundle

`{runner_path(arches[0])}` is one statically linked file: it needs nothing installed on the board (no
libncnn, no OpenCV; it decodes photos with ncnn's own stb_image-based reader). deploytool checked it
under `qemu-aarch64 -cpu cortex-a72` before writing this bundle (report.json, backend
`ncnn-cpp@aarch64`). On the board:

```sh
./{runner_path(arches[0])} meta.json photo.jpg
```

or from the machine that made the bundle: `deploytool deploy . --to pi@board:models/{model}`.
"""
        if arches
        else ""
    )
    return f"""# {model}: ncnn bundle

Made by deploytool. Task `{meta["task"]}`, input `{inp["name"]}` {inp["width"]}x{inp["height"]}
({pre}), outputs {outputs}.

- `model.ncnn.param`, `model.ncnn.bin`: the network
- `meta.json`: input name and size, preprocessing (value = (pixel - mean_vals) * norm_vals), outputs,
  labels, task settings and, when tuned (`deploytool bench --tune`), `ncnn_options`: the ncnn::Option
  fields both runners set (printed back in their JSON)
- `CMakeLists.txt`, `src/`: the C++ runner `deploytool_runner` (ncnn + OpenCV + nlohmann-json)
- `toolchains/aarch64-linux-gnu.cmake`: cross-compiling from an x86_64 host
- `run_ncnn.py`: the same runner in Python (ncnn, numpy, OpenCV only)
{shipped}{report}- `.deploytool-bundle`: lists the files above; `deploytool bundle` replaces only
  these (anything else you put here, such as `build/`, is kept)
{prebuilt}
## C++ on the board (native build)

Needs libncnn built and installed for the board (see https://github.com/Tencent/ncnn/wiki/how-to-build),
then (Debian/Ubuntu):

```sh
sudo apt-get install -y build-essential cmake libopencv-dev nlohmann-json3-dev
{native}
./build/deploytool_runner meta.json photo.jpg
```

`deploytool deploy . --to USER@BOARD:DIR --build native --ncnn-dir /path/to/ncnn/install/lib/cmake/ncnn`
runs these same two cmake commands on the board over SSH.

Options: `--threads N`, `--repeat N` (average latency over N runs), `--dump-raw DIR` (writes every raw
output as `<image-stem>.<blob>.npy` and the preprocessed input as `<image-stem>.input.npy`).
An input ending in `.npy` is taken as an already preprocessed float32 (1,C,H,W) tensor.
It prints one JSON document: per image `top_k` (index, score, prob, label) or `detections`
(class_id, class name, score, box x1,y1,x2,y2 in original image pixels). Errors: one line on stderr,
exit 2.

## Cross-compiling for aarch64 (on an x86_64 Debian/Ubuntu host)

libncnn for aarch64 with ncnn's simpleocv (from deploytool's repository: `ARCH=aarch64
scripts/build_ncnn.sh`, or ncnn's own CMake with this toolchain file and `-DNCNN_SIMPLEOCV=ON`), then:

```sh
sudo apt-get install -y g++-aarch64-linux-gnu cmake nlohmann-json3-dev
{cross}
```

The result, `build-aarch64/deploytool_runner`, is static and decodes photos with stb_image (no OpenCV
on the board). stb_image and OpenCV's libjpeg decode JPEG slightly differently (about 0.1 pixel level on
average here); deploytool reports that apart from the model's own error (`image_path` in report.json).

## Python

```sh
pip install ncnn numpy opencv-python-headless
python3 run_ncnn.py meta.json photo.jpg
```

Same options and the same JSON as the C++ runner; both preprocess with ncnn's own
`from_pixels_resize`, so their raw outputs agree to ~1e-5.
"""
