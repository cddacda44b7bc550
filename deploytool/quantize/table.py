"""Calibration tables in the text format ncnn2table writes and ncnn2int8 reads.

One line `LAYER_param_0 s1 s2 ... ` of weight scales per int8 layer, then one line `LAYER s ` of the
scale of that layer's bottom blob; a line starting with `#` keeps its layer fp32. Scales follow ncnn's
convention: int8 = round(x * scale), clamped to [-127, 127].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import SpecError
from ..ncnn_param import INT8_TERM_TYPES, Layer, NcnnGraph

PARAM_SUFFIX = "_param_"


def scale_count(layer: Layer) -> int:
    """How many weight scales ncnn loads for an int8 layer: num_output, or group for depthwise."""
    if layer.type == "ConvolutionDepthWise":
        return int(layer.get(7, 1))
    return int(layer.get(0, 0))


@dataclass
class CalibrationTable:
    """Scales by layer name. `weight_scales[layer]`: one per output channel (per group for depthwise);
    `blob_scales[layer]`: the scale of the layer's first bottom blob (one value, as ncnn2table writes);
    `fp32_layers`: layers whose lines are commented out with `#` (kept fp32; their scales are kept too).
    `extra`: other `LAYER_param_N` lines (Embed, MultiHeadAttention, RNN... in ncnn2table), kept for the
    round trip; `order`: line keys in file order when read from a file (writing keeps it); `commented`:
    the keys whose lines were commented (a layer in `fp32_layers` without any has all its lines commented)."""

    weight_scales: dict[str, np.ndarray] = field(default_factory=dict)
    blob_scales: dict[str, np.ndarray] = field(default_factory=dict)
    fp32_layers: set[str] = field(default_factory=set)
    extra: dict[str, np.ndarray] = field(default_factory=dict)
    order: list[str] | None = None
    commented: set[str] = field(default_factory=set)  # line keys read with `#` (for the exact round trip)

    def layers(self) -> list[str]:
        """Layers with a weight or bottom-blob scale, weight lines' order first."""
        return list(dict.fromkeys([*self.weight_scales, *self.blob_scales]))

    def _entries(self) -> dict[str, np.ndarray]:
        entries = {f"{name}{PARAM_SUFFIX}0": s for name, s in self.weight_scales.items()}
        entries.update(self.blob_scales)
        entries.update(self.extra)
        return entries

    def validate(self, graph: NcnnGraph, source: str = "calibration table") -> None:
        """Refuse scales for layers the graph does not have or cannot quantise, scale counts that do not
        match the layer, and scales that are not finite and positive."""
        by_name = {layer.name: layer for layer in graph.layers}
        for name in sorted({*self.layers(), *self.fp32_layers}):
            layer = by_name.get(name)
            if layer is None:
                raise SpecError(f"{source}: layer {name!r} is not in the model's .param")
            if layer.type not in INT8_TERM_TYPES:
                only = ", ".join(INT8_TERM_TYPES)
                raise SpecError(f"{source}: layer {name} is a {layer.type}; only {only} are quantised")
        for name, scales in self.weight_scales.items():
            want = scale_count(by_name[name])
            if len(scales) != want:
                raise SpecError(
                    f"{source}: {name}{PARAM_SUFFIX}0 has {len(scales)} weight scales; "
                    f"{by_name[name].type} {name} needs {want}"
                )
        for name, scales in self.blob_scales.items():
            if len(scales) != 1:
                raise SpecError(f"{source}: {name} has {len(scales)} bottom-blob scales; ncnn needs 1")
        for key, scales in self._entries().items():
            if not np.all(np.isfinite(scales)) or np.any(scales <= 0):
                raise SpecError(f"{source}: {key} has a scale that is not a finite positive number")


def _format_line(key: str, scales: np.ndarray, commented: bool) -> str:
    values = "".join(f"{float(v):f} " for v in np.asarray(scales, dtype=np.float32))  # ncnn2table's "%f "
    return f"{'#' if commented else ''}{key} {values}\n"


def _layer_of_key(key: str) -> str:
    head, sep, tail = key.rpartition(PARAM_SUFFIX)
    return head if sep and tail.isdigit() else key


def write_table(path: Path | str, table: CalibrationTable) -> None:
    """Write `table` (atomically) as ncnn2table does: weight lines, then bottom-blob lines, then other
    lines (or in the order the table was read in); a layer in `fp32_layers` has its lines commented out."""
    entries = table._entries()
    keys = [k for k in table.order or [] if k in entries]
    keys += [k for k in entries if k not in keys]
    marked = {_layer_of_key(k) for k in table.commented}

    def commented(key: str) -> bool:
        layer = _layer_of_key(key)
        return layer in table.fp32_layers and (key in table.commented or layer not in marked)

    write_text(path, "".join(_format_line(k, entries[k], commented(k)) for k in keys))


def parse_table(text: str, source: str = "<table>") -> CalibrationTable:
    """Parse the text of an ncnn2table calibration table; SpecError names a malformed line."""
    table = CalibrationTable(order=[])
    for lineno, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens or tokens == ["#"]:
            continue
        key, commented = tokens[0], tokens[0].startswith("#")
        if commented:
            key = key[1:]
        where = f"{source}:{lineno}"
        if not key or len(tokens) < 2:
            raise SpecError(f"{where}: expected `NAME scale ...`, got {line.strip()!r}")
        try:
            scales = np.array([float(t) for t in tokens[1:]], dtype=np.float32)
        except ValueError:
            raise SpecError(f"{where}: {key} has a scale that is not a number: {line.strip()!r}") from None
        if key in table.order:
            raise SpecError(f"{where}: {key} appears twice in the table")
        table.order.append(key)
        layer = _layer_of_key(key)
        if key.endswith(f"{PARAM_SUFFIX}0") and layer != key:
            table.weight_scales[layer] = scales
        elif layer != key:
            table.extra[key] = scales
        else:
            table.blob_scales[key] = scales
        if commented:
            table.fp32_layers.add(layer)
            table.commented.add(key)
    return table


def read_table(path: Path | str, graph: NcnnGraph | None = None) -> CalibrationTable:
    """Read an ncnn2table calibration table; with `graph`, also validate it against the model."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such calibration table")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise SpecError(f"{path} is not a calibration table (not text)") from None
    table = parse_table(text, str(path))
    if graph is not None:
        table.validate(graph, str(path))
    return table
