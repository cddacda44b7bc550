"""ncnn on CPU and on Vulkan through ncnn's Python binding."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..errors import SpecError
from ..ncnn_param import read_param
from .base import Runner

PRECISIONS = ("fp32", "fp16", "bf16")


@contextmanager
def quiet_stderr():
    """Silence what ncnn's C++ code prints on fd 2 (GPU enumeration lines)."""
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def ncnn_version() -> str | None:
    try:
        import ncnn
    except ImportError:
        return None
    return getattr(ncnn, "__version__", "unknown")


def vulkan_device_name() -> str | None:
    """Name of ncnn's default Vulkan device, or None when there is none."""
    try:
        import ncnn
    except ImportError:
        return None
    with quiet_stderr():
        if ncnn.get_gpu_count() < 1:
            return None
        return ncnn.get_gpu_info(ncnn.get_default_gpu_index()).device_name()


def set_precision(opt, precision: str, vulkan: bool) -> None:
    """fp32: no reduced-precision storage or arithmetic (on Vulkan fp16 storage stays, as deployed);
    fp16: ncnn's fast defaults; bf16: bf16 storage and packing (CPUs with bf16 support), fp16 off."""
    if precision not in PRECISIONS:
        raise SpecError(f"unknown ncnn precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision in ("fp32", "bf16"):
        opt.use_fp16_packed = vulkan
        opt.use_fp16_storage = vulkan
        opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = precision == "bf16"
        opt.use_bf16_packed = precision == "bf16"


class NcnnRunner(Runner):
    """ncnn's CPU path; NcnnVulkanRunner switches on Vulkan compute."""

    name = "ncnn-cpu"
    use_vulkan = False

    def __init__(self, param: Path, bin: Path, precision: str = "fp32", threads: int = 2):
        super().__init__()
        self.param, self.bin = Path(param), Path(bin)
        self.precision = precision
        self.threads = threads
        self.graph = read_param(self.param)
        self.input_names = self.graph.input_names
        self.output_names = self.graph.output_names
        self.net = None

    @classmethod
    def available(cls):
        try:
            import ncnn  # noqa: F401
        except ImportError:
            return False, "the ncnn Python package is not installed (pip install ncnn)"
        return True, None

    def _load(self) -> None:
        import ncnn

        if not self.bin.is_file():
            raise SpecError(f"{self.bin}: no such .bin file")
        net = ncnn.Net()
        net.opt.num_threads = self.threads
        net.opt.use_vulkan_compute = self.use_vulkan
        set_precision(net.opt, self.precision, self.use_vulkan)
        with quiet_stderr():
            if net.load_param(str(self.param)) != 0:
                raise SpecError(f"{self.param}: ncnn could not load this .param (malformed or unknown layer)")
            if net.load_model(str(self.bin)) != 0:
                raise SpecError(
                    f"{self.bin} does not match {self.param.name} (too short for its layers); "
                    "convert the model again so both files come from one run"
                )
        self.net = net

    def _infer(self, feed):

        outs = {}
        with self.net.create_extractor() as ex:
            self._feed(ex, feed)
            for name in self.output_names:
                ret, mat = ex.extract(name)
                if ret != 0:
                    raise RuntimeError(f"extract({name!r}) returned {ret}")
                outs[name] = np.array(mat)[None]  # ncnn drops the batch axis
        return outs

    def _feed(self, ex, feed) -> None:
        import ncnn

        if set(feed) != set(self.input_names):  # named after the spec (pnnx writes in0): by position
            if len(feed) != len(self.input_names):
                raise SpecError(f"the .param has inputs {self.input_names} but the feed has {list(feed)}")
            feed = dict(zip(self.input_names, feed.values(), strict=True))
        for name in self.input_names:
            arr = np.ascontiguousarray(feed[name], dtype=np.float32)
            ex.input(name, ncnn.Mat(arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr))  # no batch axis

    def _unload(self) -> None:
        if self.net is not None:
            self.net.clear()
            self.net = None

    def extract_all(self, feed) -> dict[str, np.ndarray]:
        """Every blob of the graph, in graph order (for per-layer comparisons)."""

        blobs = {}
        with self.net.create_extractor() as ex:
            self._feed(ex, feed)
            for layer in self.graph.layers:
                for top in layer.tops:
                    ret, mat = ex.extract(top)
                    if ret == 0:
                        blobs[top] = np.array(mat).astype(np.float32)
        return blobs


class NcnnVulkanRunner(NcnnRunner):
    name = "ncnn-vulkan"
    use_vulkan = True

    @classmethod
    def available(cls):
        ok, reason = super().available()
        if not ok:
            return ok, reason
        if vulkan_device_name() is None:
            return False, (
                "ncnn sees no Vulkan device; install a driver "
                "(apt-get install -y libvulkan1 mesa-vulkan-drivers gives a software one)"
            )
        return True, None

    def device(self) -> str | None:
        return vulkan_device_name()
