"""Backends: the Runner interface (base.py), the registry that declares each backend once
(registry.py), and one module per runner."""

from .base import Runner
from .registry import (
    BACKENDS,
    REFERENCE,
    Artifacts,
    Backend,
    RunnerConfig,
    availability,
    bench_backends,
    create_runner,
    default_backends,
    get_backend,
    parse_backends,
    select_backends,
)

__all__ = [
    "BACKENDS",
    "REFERENCE",
    "Artifacts",
    "Backend",
    "Runner",
    "RunnerConfig",
    "availability",
    "bench_backends",
    "create_runner",
    "default_backends",
    "get_backend",
    "parse_backends",
    "select_backends",
]
