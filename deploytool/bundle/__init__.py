"""The board bundle: ncnn model files, meta.json, C++ and Python runners, build files, README.

target.py  where a bundle may go (checked before any work), its files and marker
write.py   writes the folder atomically, keeping the user's files
readme.py  the README with the build and run commands
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..errors import SpecError
from ..runfolder import META, TASKS, read_meta
from .target import TARGETS, check_bundle_target
from .write import write_bundle


def make_bundle(spec, opts, out_dir: Path, force: bool = False, target: str = "x86_64"):
    """Check the bundle folder (check_bundle_target, before any work), run the pipeline on torch,
    ncnn-cpu and (when libncnn is built) the C++ runner, write report.json into the run folder, and
    only if parity passed write the bundle. `target` aarch64 also checks the cross-built runner under
    qemu-aarch64 (ncnn-cpp@aarch64, required) and puts it into the bundle. Returns (report, bundle
    path or None when parity failed)."""
    from ..backends import availability
    from ..pipeline import run
    from ..report import write_json
    from ..targets.build import build_runner

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
    meta = read_meta(Path(opts.out) / META)
    param, bin_ = Path(report.artifacts["ncnn_param"]), Path(report.artifacts["ncnn_bin"])
    runners = {"aarch64": build_runner(arch="aarch64")} if target == "aarch64" else {}
    return report, write_bundle(
        out_dir, param, bin_, meta, report_path, work=opts.out, force=force, runners=runners
    )
