"""The variants (files' recipe + runtime precision + backend) and the RunOptions that run one: ncnn's,
among which --budget and --precision auto choose, and peers (ONNX Runtime's int8) timed for comparison."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import SpecError
from ..options import Recipe, RunOptions
from ..quantize.ort import OrtQuantRecipe
from ..registry import default_backends, is_int8


@dataclass(frozen=True)
class Variant:
    """One way to run the model: its files' recipe (ncnn's conversion, or ONNX Runtime's quantization of
    the exported ONNX file), the runner's precision, the backend. A `peer` is timed beside its backend's
    own row as a point of comparison; it is never what --budget or --precision auto picks."""

    name: str
    backend: str
    description: str
    recipe: Recipe | OrtQuantRecipe = field(default_factory=Recipe)  # see files_for
    precision: str = "fp32"  # the runner's precision (set_precision in backends/ncnn_runner.py); judged at
    peer: bool = False

    @property
    def label(self) -> str:
        """The row's name: backend/variant."""
        return f"{self.backend}/{self.name}"

    @property
    def fp16_weights(self) -> bool:
        return isinstance(self.recipe, Recipe) and self.recipe.fp16_weights

    @property
    def int8(self) -> bool:
        """An int8-quantized model (ncnn's or ONNX Runtime's): judged at the int8 tolerance."""
        return is_int8(self.precision)

    def files_for(self, base: Recipe) -> Recipe | OrtQuantRecipe:
        """The recipe of this variant's files: for ncnn, the user's converter with this variant's weights;
        ONNX Runtime's quantization reads the exported ONNX file, whatever the converter."""
        if isinstance(self.recipe, OrtQuantRecipe):
            return self.recipe
        return replace(self.recipe, converter=base.converter, onnx2ncnn=base.onnx2ncnn)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "description": self.description,
            "fp16_weights": self.fp16_weights,
            "precision": self.precision,
        }


VARIANTS = (
    Variant("fp32", "ncnn-cpu", "fp32 weights; fp16/bf16 storage and arithmetic off"),
    Variant(
        "fp16-weights",
        "ncnn-cpu",
        "weights stored as fp16 in the .bin (pnnx fp16=1), expanded to fp32 at load; fp32 compute",
        recipe=Recipe(fp16_weights=True),
    ),
    Variant(
        "fp16",
        "ncnn-cpu",
        "ncnn's defaults: fp16 storage, packing and arithmetic in the layers that have them on this CPU",
        precision="fp16",
    ),
    Variant("bf16", "ncnn-cpu", "bf16 storage and packing on, fp16 off", precision="bf16"),
    Variant(
        "int8",
        "ncnn-cpu",
        "int8 weights and activations in convolutions and inner products (kl calibration, images/calib)",
        recipe=Recipe(quantize="kl"),
        precision="int8",
    ),
    Variant("vulkan", "ncnn-vulkan", "Vulkan compute, fp16 storage on the device, fp32 arithmetic"),
    Variant(
        "int8", "onnxruntime", OrtQuantRecipe().description, recipe=OrtQuantRecipe(), precision="int8",
        peer=True,
    ),
)  # fmt: skip
MIXED = "int8-mixed"  # bench --keep-fp32 adds this row: the int8 model with those layers kept fp32
MIXED_BACKEND = "ncnn-cpu"


def mixed_variant(keep_fp32: tuple[str, ...]) -> Variant:
    """The int8 variant with `keep_fp32` left in fp32 (the list `quantize --auto-mixed` prints)."""
    return Variant(
        MIXED, MIXED_BACKEND, f"int8 (kl) with {len(keep_fp32)} layers kept fp32: {', '.join(keep_fp32)}",
        recipe=Recipe(quantize="kl", keep_fp32=tuple(keep_fp32)), precision="int8",
    )  # fmt: skip


CANDIDATES = tuple(v for v in VARIANTS if not v.peer)  # what --budget and --precision auto choose among
VARIANT_NAMES = tuple(v.name for v in CANDIDATES)
BASELINE = VARIANTS[0]  # the other candidates' outputs are also compared with this one's (max_abs_vs_fp32)
VARIANT_BACKENDS = tuple(dict.fromkeys(v.backend for v in CANDIDATES))  # benched only as variants
# --budget picks among these rows (int8-mixed only exists when bench is given --keep-fp32; run
# --precision auto benches without it, so it never has to rebuild that row)
CANDIDATE_LABELS = frozenset([*(v.label for v in CANDIDATES), f"{MIXED_BACKEND}/{MIXED}"])


def get_variant(name: str) -> Variant:
    """The candidate variant `name` (peers are not run or picked by name)."""
    for v in CANDIDATES:
        if v.name == name:
            return v
    raise SpecError(f"unknown variant {name!r}; variants: {', '.join(VARIANT_NAMES)}")


def variant_run_options(name: str, opts: RunOptions) -> RunOptions:
    """`opts` changed so that `run` writes and checks the files of variant `name`: its weights in the
    recipe, its precision for the ncnn backends; a variant off the baseline's backend (Vulkan) replaces
    the other variant backends in the default set, so the run checks what was chosen."""
    v = get_variant(name)
    backends = opts.backends
    if backends is None and v.backend != BASELINE.backend:
        others = set(VARIANT_BACKENDS) - {v.backend}
        backends = ",".join(b for b in default_backends() if b not in others)
    return replace(
        opts,
        budget=None,
        ncnn_precision=v.precision,
        recipe=replace(opts.recipe, fp16_weights=v.fp16_weights, quantize=v.recipe.quantize),
        backends=backends,
    )
