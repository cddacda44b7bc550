"""Building deploytool_runner (cmake/) against the libncnn that scripts/build_ncnn.sh builds, once per
change of its sources, into the deploytool cache."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import BackendError, BackendUnavailable
from ..progress import step
from ..tools import run_tool

RUNNER_EXE = "deploytool_runner"
FIX = "run `make ncnn` (scripts/build_ncnn.sh: apt packages + libncnn from the ncnn sdist)"
# Files of cmake/ that make up the runner; their bytes key the build cache and go into bundles.
SOURCE_GLOBS = ("CMakeLists.txt", "src/*", "toolchains/*", "run_ncnn.py")


def cache_root() -> Path:
    """$DEPLOYTOOL_CACHE, else ~/.cache/deploytool (shared with scripts/build_ncnn.sh)."""
    env = os.environ.get("DEPLOYTOOL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "deploytool"


def ncnn_wheel_version() -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version("ncnn")
    except PackageNotFoundError:
        return None


def ncnn_prefix() -> Path | None:
    """Install prefix of the libncnn built by scripts/build_ncnn.sh for the installed wheel's version."""
    ver = ncnn_wheel_version()
    return cache_root() / f"ncnn-{ver}" if ver else None


def ncnn_cmake_dir() -> Path | None:
    """ncnn_DIR for CMake, or None when libncnn was not built (or its build was interrupted)."""
    prefix = ncnn_prefix()
    if prefix is None or not (prefix / ".deploytool-stamp").is_file():
        return None
    d = prefix / "lib" / "cmake" / "ncnn"
    return d if (d / "ncnnConfig.cmake").is_file() else None


def runner_source_dir() -> Path:
    """The repository's cmake/ folder with the runner sources."""
    return Path(__file__).resolve().parents[2] / "cmake"


def runner_source_files() -> list[Path]:
    src = runner_source_dir()
    files = {Path(p) for pattern in SOURCE_GLOBS for p in glob.glob(str(src / pattern))}
    return sorted(f for f in files if f.is_file())


def sources_hash() -> str:
    """Key of the runner build: runner sources plus the libncnn it links against."""
    h = hashlib.sha256()
    src = runner_source_dir()
    for f in runner_source_files():
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(str(ncnn_cmake_dir()).encode())
    return h.hexdigest()[:16]


def _missing_system_parts() -> list[str]:
    """What the runner build needs from the system and does not find (cmake, compiler, headers)."""
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if not any(shutil.which(c) for c in (os.environ.get("CXX", ""), "c++", "g++", "clang++") if c):
        missing.append("a C++17 compiler (g++)")
    roots = ["/usr", "/usr/local", os.environ.get("OpenCV_DIR", "")]
    patterns = ("lib/*/cmake/opencv4/OpenCVConfig.cmake", "lib/cmake/opencv4/OpenCVConfig.cmake")
    if not os.environ.get("OpenCV_DIR") and not any(
        glob.glob(os.path.join(r, p)) for r in roots if r for p in patterns
    ):
        missing.append("OpenCV for C++ (libopencv-dev)")
    json_patterns = ("share/cmake/nlohmann_json", "lib/*/cmake/nlohmann_json", "lib/cmake/nlohmann_json")
    if not any(glob.glob(os.path.join(r, p)) for r in ("/usr", "/usr/local") for p in json_patterns):
        missing.append("nlohmann-json (nlohmann-json3-dev)")
    return missing


@contextmanager
def _locked(path: Path):
    """An exclusive file lock, so parallel test workers build the runner once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build_runner(jobs: int = 2) -> Path:
    """Build deploytool_runner once per source hash under the cache; returns the executable.

    Logs stay in <cache>/runner-<hash>.logs/. The build happens in a temporary folder that is
    renamed into place, so an interrupted build is redone.
    """
    ncnn_dir = ncnn_cmake_dir()
    if ncnn_dir is None:
        raise BackendUnavailable(f"ncnn-cpp: libncnn {ncnn_wheel_version()} is not built; {FIX}")
    key = sources_hash()
    root = cache_root()
    final = root / f"runner-{key}"
    exe = final / RUNNER_EXE
    if exe.is_file():
        return exe
    with step("build C++ runner"), _locked(root / f"runner-{key}.lock"):
        if exe.is_file():  # another process built it while this one waited for the lock
            return exe
        logs = root / f"runner-{key}.logs"
        logs.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".runner-{key}.", dir=root))
        try:
            build = work / "build"
            run_tool(
                [
                    "cmake",
                    "-S",
                    str(runner_source_dir()),
                    "-B",
                    str(build),
                    "-DCMAKE_BUILD_TYPE=Release",
                    f"-Dncnn_DIR={ncnn_dir}",
                ],
                logs / "configure.log",
                "ncnn-cpp: cmake configure of the C++ runner",
                error=BackendError,
            )
            run_tool(
                ["cmake", "--build", str(build), "-j", str(jobs)],
                logs / "build.log",
                "ncnn-cpp: building the C++ runner",
                error=BackendError,
            )
            out = work / "out"
            out.mkdir()
            shutil.copy2(build / RUNNER_EXE, out / RUNNER_EXE)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return exe
