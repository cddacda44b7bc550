"""Building deploytool_runner (cmake/) against the libncnn that scripts/build_ncnn.sh builds, once per
change of its sources and per architecture, into the deploytool cache.

x86_64 is this machine's build (OpenCV decodes images). aarch64 is cross-compiled with Debian's
g++-aarch64-linux-gnu and cmake/toolchains/aarch64-linux-gnu.cmake into one static executable that
decodes images with ncnn's simpleocv (stb_image), so it runs on any aarch64 Linux with nothing
installed there (and here under qemu-aarch64)."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..errors import BackendError, BackendUnavailable, SpecError
from ..progress import step
from ..tools import run_tool

RUNNER_EXE = "deploytool_runner"
FIX = "run `make ncnn` (scripts/build_ncnn.sh: apt packages + libncnn from the ncnn sdist)"
ARCHES = ("x86_64", "aarch64")
CROSS_CXX = "aarch64-linux-gnu-g++"  # Debian's g++-aarch64-linux-gnu
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


def _check_arch(arch: str) -> None:
    if arch not in ARCHES:
        raise SpecError(f"unknown architecture {arch!r} for the C++ runner; use one of {', '.join(ARCHES)}")


def ncnn_prefix(arch: str = "x86_64") -> Path | None:
    """Install prefix of the libncnn built by scripts/build_ncnn.sh (ARCH=aarch64 for aarch64) for the
    installed wheel's version."""
    _check_arch(arch)
    ver = ncnn_wheel_version()
    if not ver:
        return None
    return cache_root() / (f"ncnn-{ver}" if arch == "x86_64" else f"ncnn-{ver}-{arch}")


def ncnn_cmake_dir(arch: str = "x86_64") -> Path | None:
    """ncnn_DIR for CMake, or None when libncnn was not built (or its build was interrupted, or an
    aarch64 build predates simpleocv)."""
    prefix = ncnn_prefix(arch)
    stamp = None if prefix is None else prefix / ".deploytool-stamp"
    if stamp is None or not stamp.is_file():
        return None
    if arch != "x86_64" and "simpleocv=ON" not in stamp.read_text().splitlines():
        return None
    d = prefix / "lib" / "cmake" / "ncnn"
    return d if (d / "ncnnConfig.cmake").is_file() else None


def cmake_options(arch: str = "x86_64", source: Path | str | None = None) -> list[str]:
    """The runner's configure options for `arch` besides ncnn_DIR; the toolchain file is the one in
    `source` (default: this repository's cmake/)."""
    _check_arch(arch)
    if arch == "x86_64":
        return []
    toolchain = f"{source if source is not None else runner_source_dir()}/toolchains/{arch}-linux-gnu.cmake"
    return [
        f"-DCMAKE_TOOLCHAIN_FILE={toolchain}",
        "-DDEPLOYTOOL_IMAGE_DECODER=simpleocv",
        "-DDEPLOYTOOL_STATIC=ON",
    ]


def build_commands(source, build, ncnn_dir, arch: str = "x86_64", jobs: int | str = 2) -> list[list[str]]:
    """The two cmake commands that build the runner: what build_runner runs here, what a bundle's
    README prints (with placeholders) and what `deploy --build native` runs on a board."""
    configure = ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-Dncnn_DIR={ncnn_dir}", *cmake_options(arch, source)]
    return [configure, ["cmake", "--build", str(build), "-j", str(jobs)]]


def runner_source_dir() -> Path:
    """The repository's cmake/ folder with the runner sources."""
    return Path(__file__).resolve().parents[2] / "cmake"


def runner_source_files() -> list[Path]:
    src = runner_source_dir()
    files = {Path(p) for pattern in SOURCE_GLOBS for p in glob.glob(str(src / pattern))}
    return sorted(f for f in files if f.is_file())


def sources_hash(arch: str = "x86_64") -> str:
    """Key of the runner build: runner sources plus the libncnn it links against (which names the
    architecture)."""
    h = hashlib.sha256()
    src = runner_source_dir()
    for f in runner_source_files():
        h.update(str(f.relative_to(src)).encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(str(ncnn_cmake_dir(arch)).encode())
    return h.hexdigest()[:16]


def _missing_system_parts(arch: str = "x86_64") -> list[str]:
    """What the runner build needs from the system and does not find (cmake, compiler, headers)."""
    _check_arch(arch)
    missing = []
    if shutil.which("cmake") is None:
        missing.append("cmake")
    if arch == "aarch64":
        if shutil.which(CROSS_CXX) is None:
            missing.append(f"the aarch64 cross compiler {CROSS_CXX} (g++-aarch64-linux-gnu)")
        headers = ("/usr/include/nlohmann/json.hpp", "/usr/local/include/nlohmann/json.hpp")
        if not any(os.path.isfile(h) for h in headers):
            missing.append("nlohmann-json headers (nlohmann-json3-dev)")
        return missing
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


def _for(arch: str) -> str:
    return "" if arch == "x86_64" else f" for {arch}"


def runner_available(arch: str = "x86_64") -> tuple[bool, str | None]:
    """Whether build_runner(arch) can build (or has built) the runner, and else one reason with its fix."""
    what = "the C++ runner" + _for(arch)
    if ncnn_wheel_version() is None:
        return False, "the ncnn Python package is not installed; its version picks the libncnn to use"
    missing = _missing_system_parts(arch)
    if missing:
        return False, f"{what}: missing {', '.join(missing)}; {FIX}"
    if ncnn_cmake_dir(arch) is None:
        lib = f"libncnn {ncnn_wheel_version()}" + ("" if arch == "x86_64" else f" for {arch} with simpleocv")
        return False, f"{what}: {lib} is not built in {cache_root()}; {FIX}"
    return True, None


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


def build_runner(jobs: int = 2, arch: str = "x86_64") -> Path:
    """Build deploytool_runner for `arch` once per source hash under the cache; returns the executable.

    Logs stay in <cache>/runner-<hash>.logs/ (runner-aarch64-<hash>.logs/ for aarch64). The build
    happens in a temporary folder that is renamed into place, so an interrupted build is redone.
    """
    ok, reason = runner_available(arch)
    if not ok:
        raise BackendUnavailable(f"ncnn-cpp: {reason}")
    ncnn_dir = ncnn_cmake_dir(arch)
    name = f"runner-{sources_hash(arch)}" if arch == "x86_64" else f"runner-{arch}-{sources_hash(arch)}"
    root = cache_root()
    final = root / name
    exe = final / RUNNER_EXE
    if exe.is_file():
        return exe
    with step("build C++ runner" + _for(arch)), _locked(root / f"{name}.lock"):
        if exe.is_file():  # another process built it while this one waited for the lock
            return exe
        logs = root / f"{name}.logs"
        logs.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
        try:
            build = work / "build"
            configure, compile_ = build_commands(runner_source_dir(), build, ncnn_dir, arch, jobs)
            run_tool(configure, logs / "configure.log", "ncnn-cpp: cmake configure of the C++ runner",
                     error=BackendError)  # fmt: skip
            run_tool(compile_, logs / "build.log", "ncnn-cpp: building the C++ runner", error=BackendError)
            out = work / "out"
            out.mkdir()
            shutil.copy2(build / RUNNER_EXE, out / RUNNER_EXE)
            os.replace(out, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return exe
