#!/usr/bin/env bash
# Set up everything deploytool needs: Debian's Vulkan loader + Mesa's software driver, the SSH client
# (deploy, ncnn-cpp@ssh) and server (the test suite's own board on 127.0.0.1), and .venv.
# The C++ runner's packages (compilers, cmake, OpenCV, qemu-user) come with scripts/build_ncnn.sh.
# Idempotent; `make setup` runs it when pyproject.toml or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
SYSTEM_PACKAGES="libvulkan1 mesa-vulkan-drivers openssh-client openssh-server"

missing=""
for pkg in $SYSTEM_PACKAGES; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ]; then
        echo "setup: installing$missing (Vulkan for ncnn-vulkan; ssh for deploy and the test board)"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
    else
        echo "setup: packages missing (ncnn-vulkan, deploy or the ssh tests will be unavailable). Run as root:"
        echo "    apt-get install -y$missing"
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip
# torch first, pinned: this version's CPU build is what we test with; without the pin pip would
# pull the multi-GB CUDA build. Later packages accept the installed torch as it is.
"$VENV/bin/pip" install -q "torch==$TORCH_VERSION"
"$VENV/bin/pip" install -q -e ".[dev]"
# Third-party ONNX files for `deploytool run ppocr_det|ppocr_rec` (models/ppocr_*.toml): only the package's
# files, without its dependencies (its opencv-python would clash with opencv-python-headless).
"$VENV/bin/pip" install -q --no-deps rapidocr-onnxruntime==1.4.4
"$VENV/bin/python" -c "import deploytool, torch, ncnn, onnxruntime, cv2; print('setup: ok, torch', torch.__version__, 'ncnn', ncnn.__version__)"
