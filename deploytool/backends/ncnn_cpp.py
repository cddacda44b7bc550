"""ncnn through the C++ runner (cmake/), executed on a target: this machine, an emulated aarch64 CPU, or a
board over SSH (deploytool/targets)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendError, SpecError
from ..registry import NCNN_CPP_PRECISIONS
from ..runfolder import META, ncnn_options_of, with_model_files, write_meta
from ..targets.build import RUNNER_EXE, ncnn_wheel_version
from .base import Runner

# --ncnn-precision for the C++ runner: fp32 turns every reduced-precision path off (the runner's
# default); fp16 turns on what ncnn turns on by default where the CPU has it (fp16 storage everywhere,
# fp16 arithmetic on ARMv8.2); int8 is an int8 model, fp32 elsewhere.
FP16_OPTIONS = {"use_fp16_packed": True, "use_fp16_storage": True, "use_fp16_arithmetic": True}
HOST_DECODER = "opencv"  # what deploytool's Python preprocessing decodes photos with (cv2.imread)


class NcnnCppRunner(Runner):
    """Runs deploytool_runner (C++, libncnn, fp32 CPU) as a subprocess.

    The C++ program preprocesses images itself, so there are two ways in:
    `run_images(paths)` gives the program image files (the deployed path, preprocessing included);
    `infer(feed)` writes the already preprocessed tensor to .npy, which the program feeds as is.
    Either way the raw outputs come back through `--dump-raw` .npy files. meta.json's "ncnn_options"
    (bench --tune) are checked here (a bad one is the user's error) and set by the program; extra()
    reports them as the program's ncnn::Option held them.
    """

    name = "ncnn-cpp"
    latency_repeats = 0  # every call is a fresh process: the runner's own timing of each call is quoted

    def __init__(
        self, param: Path, bin: Path, meta: dict, threads: int = 2, precision: str = "fp32", target=None
    ):
        super().__init__()
        self.param, self.bin = Path(param).resolve(), Path(bin).resolve()
        if precision not in NCNN_CPP_PRECISIONS:
            choices = ", ".join(NCNN_CPP_PRECISIONS)
            raise SpecError(f"ncnn-cpp: precision {precision!r} is not one of {choices}")
        tuned = ncnn_options_of(meta, f"{self.param.parent / 'meta.json'}")  # before any work
        options = {**(FP16_OPTIONS if precision == "fp16" else {}), **tuned}  # tuned ones last, as ncnn-cpu
        self.meta = dict(meta, ncnn_options=options) if options else dict(meta)
        self.threads, self.precision = threads, precision
        self.target = target  # a targets.base.Target; None: this machine
        self._applied: dict | None = None  # the program's report of the ncnn_options it set
        self._session = None
        self._local: Path | None = None  # this side's files: feeds, meta.json, the dumps fetched back
        self._calls = 0
        self._last_json_latency_s: float | None = None
        self._image_path: dict | None = None  # what the runner's own image decoding did (extra())
        self._logs: Path | None = None  # one log per runner process, stderr then stdout
        self._keep_logs = False

    @classmethod
    def available(cls) -> tuple[bool, str | None]:
        """The target's own check (compiler, libncnn, qemu, ssh) comes with its Backend."""
        if ncnn_wheel_version() is None:
            return False, "the ncnn Python package is not installed; its version picks the libncnn to use"
        return True, None

    def _target(self):
        if self.target is None:
            from ..targets import make_target

            self.target = make_target("")
        return self.target

    def device(self) -> str | None:
        return f"cpu (C++ runner, {self._target().describe()})"

    def _load(self) -> None:
        for f in (self.param, self.bin):
            if not f.is_file():
                raise SpecError(f"{f}: no such file")
        self._local = Path(tempfile.mkdtemp(prefix="deploytool-ncnn-cpp."))
        write_meta(self._local / META, with_model_files(self.meta, "model.param", "model.bin"))
        self._session = self._target().open()
        for local, name in ((self.param, "model.param"), (self.bin, "model.bin"), (self._local / META, META)):
            self._session.put(local, name)

    def _unload(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._local is not None:
            shutil.rmtree(self._local, ignore_errors=True)
            self._local = None
        if self._logs is not None and not self._keep_logs:
            shutil.rmtree(self._logs, ignore_errors=True)
        self._logs, self._keep_logs = None, False

    def _run(self, inputs: list[Path]) -> tuple[Path, dict]:
        """One runner process over `inputs` (distinct stems) on the target; returns the local copy of
        its dump folder and its JSON."""
        self._calls += 1
        names = [self._session.put(p, p.name) for p in inputs]
        dump = f"call{self._calls}"
        args = ["meta.json", *names, "--dump-raw", dump, "--threads", str(self.threads)]
        if self._logs is None:
            self._logs = Path(tempfile.mkdtemp(prefix="deploytool-ncnn-cpp-logs."))
        log = self._logs / f"call{self._calls}.log"
        try:
            stdout = self._session.run(args, log)
            local = self._session.fetch(dump, self._local / dump)
        except BackendError:
            self._keep_logs = True  # the message points at the log: keep it after unload
            raise
        try:
            doc = json.loads(stdout or "")
        except json.JSONDecodeError as exc:
            self._keep_logs = True
            raise BackendError(
                f"{self.name}: {RUNNER_EXE} printed no valid JSON ({exc}); log: {log}"
            ) from exc
        self._applied = doc.get("ncnn_options")
        return local, doc

    def _load_npy(self, path: Path) -> np.ndarray:
        try:
            return np.load(path)
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"{self.name}: {RUNNER_EXE} did not write a readable {path.name} ({exc})"
            ) from exc

    def _outputs(self, dump: Path, stem: str) -> dict[str, np.ndarray]:
        return {name: self._load_npy(dump / f"{stem}.{name}.npy") for name in self.meta["outputs"]}

    def run_images(self, paths: list[Path]) -> list[tuple[dict[str, np.ndarray], np.ndarray, dict]]:
        """For each image: (raw outputs by blob name with batch axis, preprocessed input (1,C,H,W),
        the runner's JSON result for that image: top_k or detections in original pixels)."""
        if self._session is None:
            raise BackendError(f"{self.name}: run_images() called outside `with runner:`")
        paths = [Path(p) for p in paths]
        results: list = [None] * len(paths)
        pending = list(range(len(paths)))
        while pending:  # the runner names dumps by file stem, so one call per set of distinct stems
            batch, stems = [], set()
            for i in pending:
                if paths[i].stem not in stems:
                    batch.append(i)
                    stems.add(paths[i].stem)
            pending = [i for i in pending if i not in batch]
            dump, doc = self._run([paths[i] for i in batch])
            for i, item in zip(batch, doc["results"], strict=True):
                stem = paths[i].stem
                results[i] = (self._outputs(dump, stem), self._load_npy(dump / f"{stem}.input.npy"), item)
        return results

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.meta["input"]["name"]
        if name not in feed and len(feed) != 1:  # a single input named after the spec is taken as is
            raise SpecError(f"ncnn-cpp: feed has no input {name!r} (it has {', '.join(feed)})")
        self._calls += 1
        x = self._local / f"feed{self._calls}.npy"
        np.save(x, np.ascontiguousarray(feed.get(name, next(iter(feed.values()))), dtype=np.float32))
        dump, doc = self._run([x])
        self._last_json_latency_s = doc["results"][0]["latency_ms"] / 1000
        return self._outputs(dump, x.stem)

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """As Runner.infer; `last_latency_s` is the network time the runner measured, without the
        process start and model load that a subprocess call adds."""
        out = super().infer(feed)
        if self._last_json_latency_s is not None:
            self.last_latency_s = self._last_json_latency_s
        return out

    def infer_item(self, item) -> dict[str, np.ndarray]:
        """A photo at the spec's input shape goes in twice, in one runner process: as the image file,
        so the runner's own image decoding and (ncnn) preprocessing are under test, and as Python's
        preprocessed tensor, so the network alone is. Where the runner decodes photos as Python does
        (OpenCV), the image run is judged; where it decodes differently (stb_image on a board), the
        tensor run is, and what the decoder changed (input tensor and outputs) is reported apart
        (extra()["image_path"]), so a mismatch is not blamed on the model. Other inputs go in as tensors."""
        if item.image is None or not item.at_spec_shape:
            return self.infer(item.feed)
        x_py = np.ascontiguousarray(item.tensor, dtype=np.float32)
        image = Path(item.image)
        tensor = self._local / f"{image.stem}.host.npy"
        np.save(tensor, x_py)
        dump, doc = self._run([image, tensor])
        img_doc, tensor_doc = doc["results"]
        by_image, by_tensor = self._outputs(dump, image.stem), self._outputs(dump, tensor.stem)
        x_cpp = self._load_npy(dump / f"{image.stem}.input.npy")
        decoder = doc.get("image_decoder", HOST_DECODER)
        self._note_image_path(decoder, x_cpp, x_py, by_image, by_tensor)
        judged, judged_doc = (by_image, img_doc) if decoder == HOST_DECODER else (by_tensor, tensor_doc)
        self.last_latency_s = judged_doc.get("latency_ms", 0.0) / 1000
        return judged

    def _note_image_path(self, decoder: str, x_cpp, x_py, by_image: dict, by_tensor: dict) -> None:
        """Keep the largest differences the runner's image path made: its input tensor against
        Python's, and each output on the image against the output on Python's tensor."""
        seen = self._image_path or {"decoder": decoder, "host_decoder": HOST_DECODER, "photos": 0,
                                    "input_max_abs": 0.0, "input_mean_levels": 0.0,
                                    "output_max_abs": {}}  # fmt: skip
        seen["photos"] += 1
        seen["input_max_abs"] = max(seen["input_max_abs"], _max_abs(x_cpp.ravel(), x_py.ravel()))
        seen["input_mean_levels"] = max(seen["input_mean_levels"], self._mean_levels(x_cpp, x_py))
        for name, out in by_image.items():
            d = _max_abs(out, by_tensor[name])
            seen["output_max_abs"][name] = max(seen["output_max_abs"].get(name, 0.0), d)
        seen["judged"] = "image" if decoder == HOST_DECODER else "tensor"
        self._image_path = seen

    def _mean_levels(self, x_cpp: np.ndarray, x_py: np.ndarray) -> float:
        """Mean |difference| of two preprocessed inputs in 0..255 pixel levels (undoing norm_vals): a
        JPEG decoder moves a pixel by a level or two, a swapped channel order by tens."""
        if x_cpp.size != x_py.size:
            return float("inf")
        norm = np.asarray(self.meta["input"].get("norm_vals") or [1.0], dtype=np.float64)
        diff = np.abs(x_cpp.reshape(x_py.shape).astype(np.float64) - x_py)  # (1, C, H, W)
        per_channel = diff.reshape(diff.shape[1], -1).mean(axis=1) if diff.ndim == 4 else diff.mean()
        return float(np.mean(per_channel / np.broadcast_to(norm, np.shape(per_channel))))

    def warm_latency(self, feed: dict[str, np.ndarray], first_calls: list[float]) -> tuple[float, str]:
        seconds, method = super().warm_latency(feed, first_calls)
        if self._target().emulated:
            method += ", emulated (says nothing about a board's speed)"
        return seconds, method

    def extra(self) -> dict:
        out: dict = {"target": self._target().describe()}
        if self._target().emulated:
            out["emulated"] = True
        if self._image_path is not None:
            out["image_path"] = self._image_path
            out["preprocess_max_abs"] = self._image_path["input_max_abs"]
        if self._applied:
            out["ncnn_options"] = self._applied
        return out


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
