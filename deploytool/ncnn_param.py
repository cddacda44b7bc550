"""Reader for ncnn's text .param format: layers, blobs and their parameters."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpecError

PARAM_MAGIC = "7767517"
ARRAY_KEY_BASE = -23300


@dataclass
class Layer:
    """One line of a .param file."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, int | float | str | list[int | float]] = field(default_factory=dict)

    def get(self, key: int, default=None):
        return self.params.get(key, default)


@dataclass
class NcnnGraph:
    """A parsed .param file, layers in file (= execution) order."""

    layers: list[Layer]

    @property
    def input_names(self) -> list[str]:
        return [top for layer in self.layers if layer.type == "Input" for top in layer.tops]

    @property
    def output_names(self) -> list[str]:
        """Blobs produced by some layer and consumed by none, in graph order."""
        consumed = {b for layer in self.layers for b in layer.bottoms}
        return [t for layer in self.layers for t in layer.tops if t not in consumed]

    def producer(self, blob: str) -> Layer | None:
        for layer in self.layers:
            if blob in layer.tops:
                return layer
        return None


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE") and not text.lstrip("-").isdigit():
        return float(text)
    return int(text)


def _parse_params(tokens: list[str], where: str) -> dict:
    params: dict[int, int | float | str | list[int | float]] = {}
    for token in tokens:
        key_text, sep, value = token.partition("=")
        if not sep:
            raise SpecError(f"{where}: malformed parameter {token!r} (expected key=value)")
        try:
            key = int(key_text)
            if value.startswith('"') and value.endswith('"') and len(value) >= 2:
                params[key] = value[1:-1]  # pnnx's shape expressions for dynamic sizes, e.g. "*(0h,0w),64"
            elif key <= ARRAY_KEY_BASE:
                items = value.split(",")
                params[ARRAY_KEY_BASE - key] = [_number(v) for v in items[1 : 1 + int(items[0])]]
            else:
                params[key] = _number(value)
        except ValueError as exc:
            raise SpecError(f"{where}: malformed parameter {token!r} ({exc})") from None
    return params


def parse_param_text(text: str, source: str = "<param>") -> NcnnGraph:
    """Parse the text of a .param file; raise SpecError naming the line that is wrong."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines or lines[0].strip() != PARAM_MAGIC:
        raise SpecError(f"{source} is not an ncnn .param file (first line must be {PARAM_MAGIC})")
    try:
        layer_count, _blob_count = (int(v) for v in lines[1].split())
    except (IndexError, ValueError):
        raise SpecError(f"{source}: line 2 must hold the layer and blob counts") from None
    layers = []
    for lineno, line in enumerate(lines[2:], start=3):
        tokens = line.split()
        where = f"{source}:{lineno}"
        try:
            n_in, n_out = int(tokens[2]), int(tokens[3])
            bottoms = tokens[4 : 4 + n_in]
            tops = tokens[4 + n_in : 4 + n_in + n_out]
        except (IndexError, ValueError):
            raise SpecError(f"{where}: malformed layer line {line!r}") from None
        if len(bottoms) != n_in or len(tops) != n_out:
            raise SpecError(f"{where}: layer {tokens[1]} lists fewer blobs than it declares")
        params = _parse_params(tokens[4 + n_in + n_out :], where)
        layers.append(Layer(tokens[0], tokens[1], bottoms, tops, params))
    if len(layers) != layer_count:
        raise SpecError(f"{source}: header declares {layer_count} layers but the file has {len(layers)}")
    return NcnnGraph(layers)


def read_param(path: Path | str) -> NcnnGraph:
    """Read and parse a .param file."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such .param file")
    return parse_param_text(path.read_text(), str(path))
