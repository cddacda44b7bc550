"""A float64 reference interpreter for ncnn graphs (.param + .bin), one numpy/torch op per layer."""

from .graph import NcnnInterpreter

__all__ = ["NcnnInterpreter"]
