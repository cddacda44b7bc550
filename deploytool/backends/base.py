"""The Runner interface every backend implements (after Polygraphy's runners)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

import numpy as np

from ..errors import BackendError, BackendUnavailable


class Runner(ABC):
    """Loads a model on enter, runs `infer(feed)`, unloads on exit.

    Subclasses implement `_load`, `_infer` and `_unload`; the base class checks state and
    inputs, times each call (`last_latency_s`) and turns crashes into BackendError.
    """

    name: str = "?"

    def __init__(self) -> None:
        self.last_latency_s: float | None = None
        self._loaded = False

    @classmethod
    def available(cls) -> tuple[bool, str | None]:
        """(True, None) when this backend can run here, else (False, why)."""
        return True, None

    def device(self) -> str | None:
        """The device the backend runs on, for the report."""
        return "cpu"

    def __enter__(self) -> Runner:
        ok, reason = self.available()
        if not ok:
            raise BackendUnavailable(f"backend {self.name} is unavailable: {reason}")
        self._load()
        self._loaded = True
        return self

    def __exit__(self, *exc) -> None:
        self._loaded = False
        self._unload()

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one inference; returns outputs by name as float32 numpy arrays."""
        if not self._loaded:
            raise BackendError(f"{self.name}: infer() called outside `with runner:`")
        start = time.perf_counter()
        try:
            out = self._infer(feed)
        except Exception as exc:  # a backend crash is a tool failure, reported with its stage
            raise BackendError(f"backend {self.name} failed during inference: {exc}") from exc
        self.last_latency_s = time.perf_counter() - start
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _unload(self) -> None:  # noqa: B027 - optional hook: most runners have nothing to release
        """Release what _load acquired."""
