"""PyTorch eager (the reference) and TorchScript runners."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import Runner


def _as_outputs(result, names: list[str]) -> dict[str, np.ndarray]:
    tensors = list(result) if isinstance(result, tuple | list) else [result]
    if len(tensors) != len(names):
        raise RuntimeError(f"model returned {len(tensors)} outputs but the spec names {len(names)}: {names}")
    return {n: t.detach().cpu().float().numpy() for n, t in zip(names, tensors, strict=True)}


class TorchRunner(Runner):
    """The eager nn.Module: the reference every other backend is compared with."""

    name = "torch"

    def __init__(self, model, input_names: list[str], output_names: list[str], threads: int = 2):
        super().__init__()
        self.model, self.input_names, self.output_names, self.threads = (
            model,
            input_names,
            output_names,
            threads,
        )

    def _load(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.model.eval()

    def _infer(self, feed):
        import torch

        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in self.input_names]
            return _as_outputs(self.model(*args), self.output_names)


class TorchScriptRunner(TorchRunner):
    """The traced TorchScript file, as pnnx reads it."""

    name = "torchscript"

    def __init__(self, path: Path, input_names: list[str], output_names: list[str], threads: int = 2):
        super().__init__(None, input_names, output_names, threads)
        self.path = Path(path)

    def _load(self) -> None:
        import torch

        torch.set_num_threads(self.threads)
        self.model = torch.jit.load(str(self.path), map_location="cpu").eval()

    def _unload(self) -> None:
        self.model = None
