#!/usr/bin/env bash
# Build libncnn (C++ library, CPU) from the PyPI sdist of the installed ncnn wheel into the deploytool cache.
#
#   scripts/build_ncnn.sh            # what `make ncnn` runs
#
# Result: ${DEPLOYTOOL_CACHE:-$HOME/.cache/deploytool}/ncnn-<version>/{lib/cmake/ncnn,include,...}
# (pass -Dncnn_DIR=<that>/lib/cmake/ncnn to cmake). The folder is reused when its stamp file exists;
# the stamp is written last, so an interrupted build is redone from scratch. Logs: <that>.logs/.
#
# Environment:
#   DEPLOYTOOL_CACHE   cache root (default $HOME/.cache/deploytool)
#   PYTHON             interpreter whose ncnn wheel gives the version (default .venv/bin/python, else python3)
#   NCNN_VERSION       override the version (e.g. 1.0.20261020) instead of asking the wheel
#   JOBS               parallel build jobs (default 2)
#   NCNN_VULKAN        ON to also build the Vulkan path (bundled glslang, ~2x build time); default OFF.
#                      The C++ runner checks fp32 CPU parity, so OFF is enough for it.
#   ARCH               aarch64 to cross-compile for 64-bit Arm boards with Debian's g++-aarch64-linux-gnu
#                      and cmake/toolchains/aarch64-linux-gnu.cmake, into ncnn-<version>-aarch64 (ncnn's
#                      Arm kernels: NEON, and the ARMv8.2 fp16 / dot-product paths it picks at run time).
#                      This build also has ncnn's simpleocv (NCNN_SIMPLEOCV=ON: cv::imread with stb_image),
#                      so the runner built against it needs no OpenCV on the board; it needs Debian's
#                      qemu-user (qemu-aarch64) to run that runner here. Default: the host (x86_64).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
die() { echo "build_ncnn.sh: error: $*" >&2; exit 1; }

# --- system packages: compiler, cmake, OpenCV and nlohmann-json headers for the runner -------------
need_pkgs=()
arch="${ARCH:-host}"
[[ $arch == host || $arch == aarch64 ]] || die "ARCH must be aarch64 or unset (the host), got '$arch'"
pkgs=(build-essential cmake libopencv-dev nlohmann-json3-dev)
[[ $arch == aarch64 ]] && pkgs=(cmake g++-aarch64-linux-gnu nlohmann-json3-dev qemu-user)
for pkg in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_pkgs+=("$pkg")
done
if ((${#need_pkgs[@]})); then
    cmd="apt-get install -y --no-install-recommends ${need_pkgs[*]}"
    if [[ $(id -u) -eq 0 ]]; then
        echo "build_ncnn.sh: installing ${need_pkgs[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        DEBIAN_FRONTEND=noninteractive $cmd >/dev/null || die "'$cmd' failed"
    else
        die "missing Debian packages; run: sudo $cmd"
    fi
fi

# --- which version ----------------------------------------------------------------------------------
py="${PYTHON:-}"
if [[ -z $py ]]; then
    if [[ -x $here/.venv/bin/python ]]; then py="$here/.venv/bin/python"; else py=python3; fi
fi
version="${NCNN_VERSION:-}"
if [[ -z $version ]]; then
    version="$("$py" -c 'import importlib.metadata as m; print(m.version("ncnn"))')" \
        || die "cannot read the installed ncnn wheel's version with $py (set NCNN_VERSION=1.0.YYYYMMDD)"
fi
[[ $version =~ ^[0-9]+\.[0-9]+\.([0-9]+)$ ]] || die "unexpected ncnn version '$version'"
patch="${BASH_REMATCH[1]}"

cache="${DEPLOYTOOL_CACHE:-$HOME/.cache/deploytool}"
vulkan="${NCNN_VULKAN:-OFF}"
suffix=""
[[ $vulkan == ON ]] && suffix="-vulkan"
cross=()
extra_stamp=""
if [[ $arch == aarch64 ]]; then
    suffix="$suffix-aarch64"
    cross=(-DCMAKE_TOOLCHAIN_FILE="$here/cmake/toolchains/aarch64-linux-gnu.cmake" -DNCNN_SIMPLEOCV=ON)
    extra_stamp=$'simpleocv=ON\n'
fi
prefix="$cache/ncnn-$version$suffix"
stamp="$prefix/.deploytool-stamp"
logs="$prefix.logs"

# A stamp counts when it exists and (aarch64) says the build has simpleocv; an older aarch64 build
# without it is rebuilt.
built() { [[ -f $stamp ]] && { [[ -z $extra_stamp ]] || grep -qx 'simpleocv=ON' "$stamp"; }; }
if built; then
    echo "libncnn $version already built: $prefix"
    exit 0
fi

# One build at a time per version (parallel CI jobs, a second terminal); the winner's stamp ends it.
mkdir -p "$cache"
exec 9>"$prefix.lock"
flock 9 || die "cannot lock $prefix.lock"
if built; then
    echo "libncnn $version already built: $prefix"
    exit 0
fi

rm -rf "$prefix" "$logs" "$cache/.ncnn-$version-build."*  # leftovers of an interrupted build
mkdir -p "$logs"
work="$(mktemp -d "$cache/.ncnn-$version-build.XXXXXX")"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

# --- fetch the sdist --------------------------------------------------------------------------------
# The sdist's setup.py derives its version from today's date, so `pip download ncnn==X --no-binary
# :all:` rejects it ("inconsistent version"). Instead ask the package index (pip's configured
# index-url; PEP 691 JSON or PEP 503 HTML) for the file's URL and sha256, then let pip download
# that exact URL with the hash checked.
index="$("$py" -m pip config get global.index-url 2>/dev/null || true)"
index="${index:-${PIP_INDEX_URL:-https://pypi.org/simple}}"
url="$("$py" - "$index" "$version" <<'EOF'
import json, re, sys, urllib.parse, urllib.request
index, version = sys.argv[1].rstrip("/"), sys.argv[2]
page = f"{index}/ncnn/"
accept = "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
with urllib.request.urlopen(urllib.request.Request(page, headers={"Accept": accept}), timeout=60) as r:
    body, ctype = r.read().decode(), r.headers.get("Content-Type", "")
name = f"ncnn-{version}.tar.gz"
if "json" in ctype:  # PEP 691
    files = json.loads(body)["files"]
    links = [(f["filename"], f["url"], f.get("hashes", {}).get("sha256")) for f in files]
else:  # PEP 503 HTML
    links = []
    for href in re.findall(r'href="([^"]+)"', body):
        url, _, frag = urllib.parse.urljoin(page, href.replace("&amp;", "&")).partition("#")
        filename = urllib.parse.unquote(url.rsplit("/", 1)[-1])
        links.append((filename, url, frag.partition("sha256=")[2] or None))
for filename, url, sha256 in links:
    if filename == name and sha256:
        print(f"{urllib.parse.urljoin(page, url.split('#')[0])}#sha256={sha256}")
        break
else:
    sys.exit(f"{name} (with a sha256) is not listed on {page}")
EOF
)" || die "cannot find the ncnn $version sdist on $index"

echo "build_ncnn.sh: downloading ncnn $version sdist"
"$py" -m pip download --no-deps --no-build-isolation --dest "$work" "ncnn @ $url" \
    >"$logs/download.log" 2>&1 || die "pip download failed; see $logs/download.log"
tar -xzf "$work/ncnn-$version.tar.gz" -C "$work" || die "cannot unpack ncnn-$version.tar.gz"
src="$work/ncnn-$version"
[[ -f $src/CMakeLists.txt ]] || die "no CMakeLists.txt in the sdist"

# --- configure, build, install ----------------------------------------------------------------------
echo "build_ncnn.sh: configuring (log: $logs/configure.log)"
cmake -S "$src" -B "$work/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$prefix" \
    "${cross[@]}" \
    -DNCNN_VERSION="$patch" \
    -DNCNN_VULKAN="$vulkan" \
    -DNCNN_BUILD_TOOLS=OFF \
    -DNCNN_BUILD_EXAMPLES=OFF \
    -DNCNN_BUILD_BENCHMARK=OFF \
    -DNCNN_BUILD_TESTS=OFF \
    -DNCNN_PYTHON=OFF \
    >"$logs/configure.log" 2>&1 || die "cmake configure failed; see $logs/configure.log"

echo "build_ncnn.sh: building with ${JOBS:-2} jobs (log: $logs/build.log)"
cmake --build "$work/build" -j "${JOBS:-2}" >"$logs/build.log" 2>&1 \
    || die "cmake build failed; see $logs/build.log"
cmake --install "$work/build" >"$logs/install.log" 2>&1 \
    || die "cmake install failed; see $logs/install.log"
[[ -f $prefix/lib/cmake/ncnn/ncnnConfig.cmake ]] || die "install did not produce lib/cmake/ncnn/ncnnConfig.cmake"

secs=$(($(date +%s) - start))
printf 'version=%s\nvulkan=%s\narch=%s\n%sseconds=%s\n' "$version" "$vulkan" "$arch" "$extra_stamp" "$secs" >"$stamp"
echo "libncnn $version built in ${secs}s: $prefix"
echo "use: cmake -Dncnn_DIR=$prefix/lib/cmake/ncnn ..."
