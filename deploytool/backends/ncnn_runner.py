"""ncnn on CPU and on Vulkan through ncnn's Python binding.

The net runs in a worker process (backends/isolated.py): a native crash in ncnn or in the Vulkan driver
becomes this backend's BackendError ("backend ncnn-vulkan crashed (killed by SIGFPE) while running the
model; log: …") and the other backends and the report carry on. The .param and .bin are checked before
ncnn sees them (ncnn_param.read_model), so files that do not match are the user's error (SpecError).
With DEPLOYTOOL_NCNN_IN_PROCESS=1 (for a process that is itself a disposable worker, such as a bench
worker, whose memory readings must include the net) the net runs in this process.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np

from ..errors import BackendError, SpecError
from ..ncnn_param import NcnnModel, as_floats, read_model, read_param, requantized_blobs
from ..registry import NCNN_PRECISIONS
from ..runfolder import check_ncnn_options
from .base import Runner

IN_PROCESS_ENV = "DEPLOYTOOL_NCNN_IN_PROCESS"


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
    if precision not in NCNN_PRECISIONS:
        raise SpecError(f"unknown ncnn precision {precision!r}; use one of {', '.join(NCNN_PRECISIONS)}")
    if precision in ("fp32", "bf16", "int8"):  # int8: an int8 model, fp32 elsewhere (int8 inference is on)
        opt.use_fp16_packed = vulkan
        opt.use_fp16_storage = vulkan
        opt.use_fp16_arithmetic = False
        opt.use_bf16_storage = precision == "bf16"
        opt.use_bf16_packed = precision == "bf16"


def apply_options(opt, options: dict) -> dict:
    """Set `options` on an ncnn.Option; returns what the Option holds afterwards for those keys."""
    for key, value in options.items():
        setattr(opt, key, value)
    return {key: getattr(opt, key) for key in options}


class NcnnSession:
    """One loaded ncnn.Net: what a worker process holds (or the runner itself, in process).

    Every Extractor lives inside a `with` block, so none outlives the Net (ncnn's Python binding
    segfaults when a Net is cleared while an Extractor lives)."""

    def __init__(
        self, param: str, bin: str, use_vulkan: bool, precision: str, threads: int,
        input_names: list[str], output_names: list[str], options: dict | None = None, quiet: bool = False,
    ):  # fmt: skip
        import ncnn

        self.input_names, self.output_names = list(input_names), list(output_names)
        net = ncnn.Net()
        net.opt.num_threads = threads
        net.opt.use_vulkan_compute = use_vulkan
        set_precision(net.opt, precision, use_vulkan)
        self.applied = apply_options(net.opt, options or {})
        with quiet_stderr() if quiet else nullcontext():  # in a worker, ncnn's messages go to its log
            if net.load_param(param) != 0:
                raise SpecError(f"{param}: ncnn could not load this .param (malformed or unknown layer)")
            if net.load_model(bin) != 0:
                raise SpecError(
                    f"{bin} does not match {Path(param).name} (too short for its layers); "
                    "convert the model again so both files come from one run"
                )
        self.net = net

    def applied_options(self) -> dict:
        """The ncnn_options as the net's Option holds them (read back after setting)."""
        return self.applied

    def _feed(self, ex, feed: dict[str, np.ndarray]) -> None:
        import ncnn

        for name in self.input_names:
            arr = feed[name]
            mat = ncnn.Mat(arr[0] if arr.ndim == 4 and arr.shape[0] == 1 else arr)  # no batch axis
            # clone: a Mat over numpy's memory has no reference count, and a layer working in place on
            # the input blob (a graph starting with ReLU) dereferences it: SIGSEGV
            ex.input(name, mat.clone())

    def infer(self, feed: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """The outputs by name (batch axis restored) and the seconds the inference took here."""
        start = time.perf_counter()
        outs = {}
        with self.net.create_extractor() as ex:
            self._feed(ex, feed)
            for name in self.output_names:
                ret, mat = ex.extract(name)
                if ret != 0:
                    raise RuntimeError(f"extract({name!r}) returned {ret}")
                outs[name] = np.array(mat)[None]  # ncnn drops the batch axis
        return outs, time.perf_counter() - start

    def extract_all(self, feed: dict[str, np.ndarray], blobs: list[str]) -> dict[str, np.ndarray]:
        """Every blob of `blobs` that ncnn can extract, float32, in the given order."""
        found = {}
        with self.net.create_extractor() as ex:
            self._feed(ex, feed)
            for name in blobs:
                ret, mat = ex.extract(name)
                if ret == 0:
                    found[name] = np.array(mat).astype(np.float32)
        return found

    def placement(self) -> list[tuple[str, str, bool]]:
        """(layer name, type, runs on Vulkan) for every layer of the loaded net: ncnn's own decision
        (`support_vulkan` after load_param; a layer without a Vulkan kernel for its settings runs on
        the CPU inside a Vulkan net)."""
        return [(layer.name, layer.type, bool(layer.support_vulkan)) for layer in self.net.layers()]

    def close(self) -> None:
        if self.net is not None:
            self.net.clear()
            self.net = None


class NcnnRunner(Runner):
    """ncnn's CPU path; NcnnVulkanRunner switches on Vulkan compute. The net lives in a worker process
    unless `isolate` is False (default: isolated unless DEPLOYTOOL_NCNN_IN_PROCESS=1). `options` are
    ncnn.Option fields set after the precision's (a meta.json's "ncnn_options", see runfolder.OPTION_TYPES);
    extra() reports them as the loaded net's Option holds them."""

    name = "ncnn-cpu"
    use_vulkan = False

    def __init__(
        self, param: Path, bin: Path, precision: str = "fp32", threads: int = 2, isolate: bool | None = None,
        options: dict | None = None, model: NcnnModel | None = None,
    ):  # fmt: skip
        """`model`: these files already read (read_model), so that loading does not read them again."""
        super().__init__()
        self.param, self.bin = Path(param), Path(bin)
        self.precision = precision
        self.threads = threads
        self.options = check_ncnn_options(options or {}, f"{self.param.parent / 'meta.json'}")
        self._applied: dict | None = None
        self.isolate = os.environ.get(IN_PROCESS_ENV) != "1" if isolate is None else isolate
        self._model = model
        self._requantized: dict[str, float] = {}  # blob: scale, see extract_all
        self.graph = model.graph if model is not None else read_param(self.param)
        self.input_names = self.graph.input_names
        self.output_names = self.graph.output_names
        self._worker = None  # isolated.Worker
        self._session: NcnnSession | None = None  # in process
        self._inference_s: float | None = None

    @classmethod
    def available(cls):
        try:
            import ncnn  # noqa: F401
        except ImportError:
            return False, "the ncnn Python package is not installed (pip install ncnn)"
        return True, None

    @property
    def worker_log(self) -> Path | None:
        """The worker's log while it runs (and after it died), None in process."""
        return None if self._worker is None else self._worker.log

    def _load(self) -> None:
        if not self.bin.is_file():
            raise SpecError(f"{self.bin}: no such .bin file")
        if self.precision not in NCNN_PRECISIONS:
            choices = ", ".join(NCNN_PRECISIONS)
            raise SpecError(f"unknown ncnn precision {self.precision!r}; use one of {choices}")
        model = self._model or read_model(self.param, self.bin, self.graph)  # refuses what ncnn would misread
        self._requantized = requantized_blobs(model)
        args = (
            str(self.param.resolve()), str(self.bin.resolve()), self.use_vulkan, self.precision, self.threads,
            self.input_names, self.output_names, self.options,
        )  # fmt: skip
        if self.isolate:
            from .isolated import Worker

            self._worker = Worker(self.name, f"{__name__}:NcnnSession", *args)
        else:
            self._session = NcnnSession(*args, quiet=True)
        self._applied = self._call("applied_options", doing="reading its options")

    def _call(self, method: str, *args, doing: str):
        if self._worker is not None:
            return self._worker.call(method, *args, doing=doing)
        if self._session is None:
            raise BackendError(f"{self.name}: the model is not loaded; use `with runner:`")
        return getattr(self._session, method)(*args)

    def infer(self, feed):
        out = super().infer(feed)
        self.last_latency_s = self._inference_s  # the net's own time, not the trip to the worker and back
        return out

    def _infer(self, feed):
        outs, self._inference_s = self._call("infer", self._named(feed), doing="running the model")
        return outs

    def _named(self, feed) -> dict[str, np.ndarray]:
        """The feed by the .param's input names (by position when named after the spec: pnnx writes
        in0), as contiguous float32."""
        if set(feed) != set(self.input_names):
            if len(feed) != len(self.input_names):
                raise SpecError(f"the .param has inputs {self.input_names} but the feed has {list(feed)}")
            feed = dict(zip(self.input_names, feed.values(), strict=True))
        return {n: np.ascontiguousarray(feed[n], dtype=np.float32) for n in self.input_names}

    def _unload(self) -> None:
        if self._worker is not None:
            worker, self._worker = self._worker, None
            # a crash while unloading is reported unless an error is already on its way out
            worker.stop(check=sys.exc_info()[1] is None)
        if self._session is not None:
            self._session.close()
            self._session = None

    def extra(self) -> dict:
        """The ncnn_options the loaded net applied (none: ncnn's defaults for the precision)."""
        return {"ncnn_options": self._applied} if self._applied else {}

    def extract_all(self, feed) -> dict[str, np.ndarray]:
        """Every blob of the graph, in graph order (for per-layer comparisons)."""
        tops = [top for layer in self.graph.layers for top in layer.tops]
        blobs = self._call("extract_all", self._named(feed), tops, doing="extracting every blob")
        return as_floats(blobs, self._requantized)  # an int8 model's requantised blobs are int8 values


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

    def extra(self) -> dict:
        """Where ncnn ran each layer: a layer it cannot run on the device (an int8 layer on an ncnn
        without Vulkan int8 kernels) runs on the CPU, and the report says so instead of calling that
        result Vulkan's."""
        if self._worker is None and self._session is None:
            return {}
        placed = self._call("placement", doing="listing where each layer ran")
        int8 = set(self.graph.int8_layers)
        on_cpu = [name for name, kind, gpu in placed if not gpu and kind != "Input"]
        return {
            "layers_on_device": sum(1 for _, _, gpu in placed if gpu),
            "layers": len(placed),
            "layers_on_cpu": on_cpu,
            "int8_layers_on_device": sum(1 for name, _, gpu in placed if gpu and name in int8),
            "int8_layers": len(int8),
        }
