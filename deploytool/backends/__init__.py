"""Backends: the Runner interface (base.py), the registry that declares each backend once, as data
(registry.py), and one module per runner."""

from ..registry import (
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
    role,
    select_backends,
)
from .base import Runner

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
    "role",
    "select_backends",
]
