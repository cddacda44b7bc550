"""The Runner interface every backend implements (after Polygraphy's runners)."""

from __future__ import annotations

import re
import statistics
import time
from abc import ABC, abstractmethod

import numpy as np

from ..errors import BackendError, BackendUnavailable, DeployError, SpecError


class Runner(ABC):
    """Loads a model on enter, runs `infer(feed)`, unloads on exit.

    Subclasses implement `_load`, `_infer` and `_unload`; the base class checks state and
    inputs, times each call (`last_latency_s`) and turns crashes into BackendError.
    """

    name: str = "?"
    # After the parity calls, `warm_latency` repeats the first call this often and reports the median.
    # A runner that times itself per call from a fresh process (the C++ runner) sets it to 0.
    latency_repeats: int = 5

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
        except DeployError:
            raise
        except Exception as exc:  # a backend crash is a tool failure, reported with its stage
            raise BackendError(f"backend {self.name} failed during inference: {exc}") from exc
        self.last_latency_s = time.perf_counter() - start
        return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}

    def infer_item(self, item) -> dict[str, np.ndarray]:
        """Run one results.InputItem; runners that take the photo itself (the C++ runner) override it."""
        return self.infer(item.feed)

    def warm_latency(self, feed: dict[str, np.ndarray], first_calls: list[float]) -> tuple[float, str]:
        """Median seconds of `latency_repeats` calls on `feed` after the model has run at least once,
        and how it was measured (for the report); without repeats, the median of `first_calls`."""
        if self.latency_repeats < 1:
            return statistics.median(first_calls), f"median of {len(first_calls)} calls, one per input"
        samples = []
        for _ in range(self.latency_repeats):
            self.infer(feed)
            samples.append(self.last_latency_s)
        return statistics.median(samples), f"median of {self.latency_repeats} warm calls"

    def extra(self) -> dict:
        """Backend-specific facts for the report (e.g. how far its own preprocessing is from Python's)."""
        return {}

    @abstractmethod
    def _load(self) -> None: ...

    @abstractmethod
    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def _unload(self) -> None:  # noqa: B027 - optional hook: most runners have nothing to release
        """Release what _load acquired."""


def by_spec_name(result: dict[str, np.ndarray], spec_names: list[str]) -> dict[str, np.ndarray]:
    """Name a backend's outputs as the spec does: by name when they agree, else by position
    (pnnx's out0, out1, … in numeric order)."""
    if set(result) == set(spec_names):
        return {n: result[n] for n in spec_names}
    keys = list(result)
    if all(re.fullmatch(r"out\d+", k) for k in keys):
        keys.sort(key=lambda k: int(k[3:]))
    if len(keys) != len(spec_names):
        raise SpecError(f"backend produced outputs {keys} but the spec names {spec_names}; fix output.names")
    return {n: result[k] for n, k in zip(spec_names, keys, strict=True)}
