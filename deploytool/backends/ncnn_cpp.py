"""ncnn through the C++ runner built from cmake/ against the libncnn that `make ncnn` builds."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import BackendError, SpecError
from ..targets.build import (
    FIX,
    RUNNER_EXE,
    _missing_system_parts,
    build_runner,
    cache_root,
    ncnn_cmake_dir,
    ncnn_wheel_version,
)
from ..tools import run_tool
from .base import Runner
from .ncnn_runner import ncnn_options_of


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

    def __init__(self, param: Path, bin: Path, meta: dict, threads: int = 2):
        super().__init__()
        self.param, self.bin = Path(param).resolve(), Path(bin).resolve()
        self.meta = dict(meta)
        ncnn_options_of(self.meta, f"{self.param.parent / 'meta.json'}")  # before any work
        self.threads = threads
        self._applied: dict | None = None  # the program's report of the ncnn_options it set
        self.exe: Path | None = None
        self._work: Path | None = None
        self._calls = 0
        self._last_json_latency_s: float | None = None
        self._preprocess_max_abs: float | None = None
        self._logs: Path | None = None  # one log per runner process, stderr then stdout
        self._keep_logs = False

    @classmethod
    def available(cls) -> tuple[bool, str | None]:
        if ncnn_wheel_version() is None:
            return False, "the ncnn Python package is not installed; its version picks the libncnn to use"
        missing = _missing_system_parts()
        if missing:
            return False, f"missing {', '.join(missing)}; {FIX}"
        if ncnn_cmake_dir() is None:
            return False, f"libncnn {ncnn_wheel_version()} is not built in {cache_root()}; {FIX}"
        return True, None

    def device(self) -> str | None:
        return "cpu (C++ runner)"

    def _load(self) -> None:
        for f in (self.param, self.bin):
            if not f.is_file():
                raise SpecError(f"{f}: no such file")
        self.exe = build_runner()
        self._work = Path(tempfile.mkdtemp(prefix="deploytool-ncnn-cpp."))
        meta = dict(self.meta, param=str(self.param), bin=str(self.bin))
        (self._work / "meta.json").write_text(json.dumps(meta, indent=2))

    def _unload(self) -> None:
        if self._work is not None:
            shutil.rmtree(self._work, ignore_errors=True)
            self._work = None
        if self._logs is not None and not self._keep_logs:
            shutil.rmtree(self._logs, ignore_errors=True)
        self._logs, self._keep_logs = None, False

    def _run(self, inputs: list[Path]) -> tuple[Path, dict]:
        """One runner process over `inputs` (distinct stems); returns its dump folder and JSON."""
        self._calls += 1
        dump = self._work / f"call{self._calls}"
        cmd = [str(self.exe), str(self._work / "meta.json"), *map(str, inputs)]
        cmd += ["--dump-raw", str(dump), "--threads", str(self.threads)]
        if self._logs is None:
            self._logs = Path(tempfile.mkdtemp(prefix="deploytool-ncnn-cpp-logs."))
        log = self._logs / f"call{self._calls}.log"
        try:
            ran = run_tool(cmd, log, "ncnn-cpp", error=BackendError, capture_stdout=True)
        except BackendError:
            self._keep_logs = True  # the message points at the log: keep it after unload
            raise
        try:
            doc = json.loads(ran.stdout or "")
        except json.JSONDecodeError as exc:
            self._keep_logs = True
            raise BackendError(f"ncnn-cpp: {RUNNER_EXE} printed no valid JSON ({exc}); log: {log}") from exc
        self._applied = doc.get("ncnn_options")
        return dump, doc

    def _load_npy(self, path: Path) -> np.ndarray:
        try:
            return np.load(path)
        except (OSError, ValueError) as exc:
            raise BackendError(
                f"ncnn-cpp: {RUNNER_EXE} did not write a readable {path.name} ({exc})"
            ) from exc

    def _outputs(self, dump: Path, stem: str) -> dict[str, np.ndarray]:
        return {name: self._load_npy(dump / f"{stem}.{name}.npy") for name in self.meta["outputs"]}

    def run_images(self, paths: list[Path]) -> list[tuple[dict[str, np.ndarray], np.ndarray, dict]]:
        """For each image: (raw outputs by blob name with batch axis, preprocessed input (1,C,H,W),
        the runner's JSON result for that image: top_k or detections in original pixels)."""
        if self._work is None:
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
        x = self._work / f"feed{self._calls}.npy"
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
        """A photo at the spec's input shape goes in as the image file, so the runner's own (ncnn)
        preprocessing is under test too; how far its input tensor is from Python's is kept for the
        report (`preprocess_max_abs`). Other inputs go in as tensors."""
        if item.image is None or not item.at_spec_shape:
            return self.infer(item.feed)
        [(raw, x_cpp, doc)] = self.run_images([item.image])
        x_py = item.tensor
        diff = (
            float(np.abs(x_cpp.reshape(x_py.shape) - x_py).max()) if x_cpp.size == x_py.size else float("inf")
        )
        self._preprocess_max_abs = max(self._preprocess_max_abs or 0.0, diff)
        self.last_latency_s = doc.get("latency_ms", 0.0) / 1000
        return raw

    def extra(self) -> dict:
        out = {} if self._preprocess_max_abs is None else {"preprocess_max_abs": self._preprocess_max_abs}
        if self._applied:
            out["ncnn_options"] = self._applied
        return out
