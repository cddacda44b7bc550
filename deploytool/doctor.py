"""What this machine has: versions, the Vulkan device, converters, libncnn, and every backend's status."""

from __future__ import annotations

import shutil
from dataclasses import dataclass


@dataclass(frozen=True)
class Fact:
    name: str
    value: str
    ok: bool = True


def facts() -> list[Fact]:
    """One line per tool and per registered backend; `ok` is False where something is missing."""
    from .backends import BACKENDS, get_backend
    from .backends.ncnn_runner import vulkan_device_name
    from .convert import find_onnx2ncnn, find_pnnx
    from .targets.build import ncnn_cmake_dir
    from .versions import versions

    out = [Fact(name, ver or "not installed", ver is not None) for name, ver in versions().items()]
    device = vulkan_device_name()
    out.append(
        Fact(
            "vulkan",
            device or "no device (apt-get install libvulkan1 mesa-vulkan-drivers)",
            device is not None,
        )
    )
    pnnx = find_pnnx()
    out.append(Fact("pnnx binary", pnnx or "missing (pip install pnnx)", pnnx is not None))
    onnx2ncnn = find_onnx2ncnn()
    out.append(
        Fact("onnx2ncnn", onnx2ncnn or "not on PATH (use --converter pnnx-onnx)", onnx2ncnn is not None)
    )
    libncnn = ncnn_cmake_dir()
    out.append(
        Fact(
            "libncnn",
            str(libncnn) if libncnn else "not built (make ncnn; for ncnn-cpp and bundles)",
            bool(libncnn),
        )
    )
    for tool, why in (
        ("aarch64-linux-gnu-g++", "ncnn-cpp@aarch64, bundle --target aarch64 (g++-aarch64-linux-gnu)"),
        ("qemu-aarch64", "ncnn-cpp@aarch64: the aarch64 runner under emulation (qemu-user)"),
        ("ssh", "deploy, ncnn-cpp@ssh:HOST (openssh-client)"),
    ):
        found = shutil.which(tool)
        out.append(Fact(tool, found or f"missing (for {why})", found is not None))
    for backend in [*BACKENDS.values(), get_backend("ncnn-cpp@aarch64")]:
        ok, reason = backend.available()
        precisions = f" [{'/'.join(backend.precisions)}]" if backend.takes_precision else ""
        text = f"available{precisions}: {backend.description}" if ok else f"unavailable: {reason}"
        out.append(Fact(f"backend {backend.name}", text, ok))
    return out
