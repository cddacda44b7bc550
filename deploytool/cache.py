"""The stage cache: export, conversion (and quantization) and each backend's outputs, keyed by a hash of
everything that decides them (the spec, the factory's source, the weights, the inputs, the recipe, the
tool versions), stored under <cache>/stages/. A rerun with nothing changed copies the files back and
reuses the outputs; a changed tolerance is not part of any key, so it re-judges without re-running;
a changed spec, weight file, factory source, input or tool version misses and re-runs what it decides.

    cache = StageCache(root)                    # StageCache(None): off
    key = cache.key("export", spec_key, opset)
    if not cache.restore("export", key, out, files):
        ... produce the files in out ...
        cache.store("export", key, out, files)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .atomic import atomic_path

MARK = ".complete"


def file_digest(path: Path | str | None) -> str | None:
    """sha256 of a file's bytes (None for None)."""
    if path is None:
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _jsonable(part):
    if isinstance(part, Path):
        return str(part)
    if isinstance(part, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(part).tobytes() + str(part.shape).encode()).hexdigest()
    if isinstance(part, dict):
        return {str(k): _jsonable(v) for k, v in sorted(part.items(), key=lambda kv: str(kv[0]))}
    if isinstance(part, list | tuple):
        return [_jsonable(p) for p in part]
    return part if isinstance(part, str | int | float | bool | type(None)) else repr(part)


def digest(*parts) -> str:
    """A key from any mix of strings, numbers, paths (by name), arrays (by bytes), dicts and lists."""
    text = json.dumps([_jsonable(p) for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


class StageCache:
    """Files and outputs of finished stages under `root` (None: the cache is off and nothing is kept)."""

    def __init__(self, root: Path | str | None):
        self.root = Path(root) if root is not None else None
        self.hits: list[str] = []  # "export", "convert", "infer:ncnn-cpu", … reused in this run

    @property
    def on(self) -> bool:
        return self.root is not None

    def _dir(self, kind: str, key: str) -> Path:
        return self.root / f"{kind.replace(':', '-').replace('@', '_')}-{key}"

    def has(self, kind: str, key: str, names: list[str]) -> bool:
        """Whether (kind, key) is stored complete with `names`."""
        src = self._dir(kind, key) if self.on else None
        return src is not None and (src / MARK).is_file() and all((src / n).is_file() for n in names)

    def restore(self, kind: str, key: str, out: Path, names: list[str]) -> bool:
        """Copy the cached `names` of (kind, key) into `out`, each file atomically; False when not cached
        (or the cache is off)."""
        if not self.has(kind, key, names):
            return False
        src = self._dir(kind, key)
        for n in names:
            with atomic_path(Path(out) / n) as tmp:
                shutil.copyfile(src / n, tmp)
        self.hits.append(kind)
        return True

    def store(self, kind: str, key: str, out: Path, names: list[str]) -> None:
        """Keep `names` from `out` as (kind, key): written beside and renamed, so a half-stored stage
        never reads as complete."""
        if not self.on:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        final = self._dir(kind, key)
        if (final / MARK).is_file():
            return
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.root))
        try:
            for n in names:
                shutil.copyfile(Path(out) / n, tmp / n)
            (tmp / MARK).write_text(json.dumps({"kind": kind, "files": names}) + "\n")
            try:
                os.replace(tmp, final)
            except OSError:  # another worker stored the same stage first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def load_outputs(self, kind: str, key: str) -> tuple[list[dict], dict] | None:
        """A backend's cached outputs (one dict per input) and its recorded result fields, or None."""
        if not self.on:
            return None
        src = self._dir(kind, key)
        if not (src / MARK).is_file():
            return None
        with np.load(src / "outputs.npz") as data:
            arrays = {k: data[k] for k in data.files}
        info = json.loads((src / "result.json").read_text())
        outs = [{name: arrays[f"{i}/{name}"] for name in info["outputs"]} for i in range(info["inputs"])]
        self.hits.append(kind)
        return outs, info["result"]

    def store_outputs(self, kind: str, key: str, outs: list[dict], result: dict) -> None:
        if not self.on:
            return
        with tempfile.TemporaryDirectory() as tmp:
            arrays = {f"{i}/{name}": np.asarray(v) for i, out in enumerate(outs) for name, v in out.items()}
            np.savez(Path(tmp) / "outputs.npz", **arrays)
            names = list(outs[0]) if outs else []
            info = {"inputs": len(outs), "outputs": names, "result": result}
            (Path(tmp) / "result.json").write_text(json.dumps(info, default=str) + "\n")
            self.store(kind, key, Path(tmp), ["outputs.npz", "result.json"])
