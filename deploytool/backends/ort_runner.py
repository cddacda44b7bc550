"""ONNX Runtime on CPU."""

from __future__ import annotations

from pathlib import Path

from .base import Runner


class OnnxRuntimeRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: Path, threads: int = 2, optimize: bool = True):
        super().__init__()
        self.path, self.threads, self.optimize = Path(path), threads, optimize
        self.session = None

    @classmethod
    def available(cls):
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return False, "onnxruntime is not installed (pip install onnxruntime)"
        return True, None

    def _load(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        if not self.optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])

    def _infer(self, feed):
        names = [o.name for o in self.session.get_outputs()]
        wanted = [i.name for i in self.session.get_inputs()]
        if set(wanted) <= set(feed):
            inputs = {k: feed[k] for k in wanted}
        else:  # the feed is named after another backend's inputs: match by position
            inputs = dict(zip(wanted, feed.values(), strict=True))
        return dict(zip(names, self.session.run(names, inputs), strict=True))

    def _unload(self) -> None:
        self.session = None
