"""A YOLOv8-style anchor-free detector (scales n and s) whose forward returns decoded boxes and scores."""

from __future__ import annotations

import math

import torch
from torch import nn

from .init import randomise_batchnorm

# (depth multiple, width multiple, max channels) per scale, as in the YOLOv8 family.
SCALES = {"n": (0.33, 0.25, 1024), "s": (0.33, 0.50, 1024)}
STRIDES = (8, 16, 32)
REG_MAX = 16
# Feature maps up to this many cells per side get exact anchor grids (2048 px at stride 8).
GRID_MAX = 256


class ConvBnAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm -> SiLU, 'same' padding for odd kernels."""

    def __init__(self, c_in: int, c_out: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    """Two 3x3 convolutions with an optional residual connection."""

    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = ConvBnAct(c, c, 3)
        self.cv2 = ConvBnAct(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    """Split the 1x1 projection in two, run bottlenecks on one half, concatenate every stage."""

    def __init__(self, c_in: int, c_out: int, n: int, shortcut: bool):
        super().__init__()
        self.hidden = c_out // 2
        self.cv1 = ConvBnAct(c_in, 2 * self.hidden, 1)
        self.cv2 = ConvBnAct((2 + n) * self.hidden, c_out, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.hidden, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv1(x)
        # Two fixed-size slices rather than chunk(): converts to a plain Crop/Slice everywhere.
        parts = [y[:, : self.hidden], y[:, self.hidden :]]
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.cv2(torch.cat(parts, 1))


class SPPF(nn.Module):
    """Three chained 5x5 max-pools, concatenated: a cheap spatial pyramid."""

    def __init__(self, c_in: int, c_out: int, k: int = 5):
        super().__init__()
        hidden = c_in // 2
        self.cv1 = ConvBnAct(c_in, hidden, 1)
        self.cv2 = ConvBnAct(hidden * 4, c_out, 1)
        self.pool = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv1(x)]
        for _ in range(3):
            y.append(self.pool(y[-1]))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: expected value of a softmax over REG_MAX bins per box side."""

    def __init__(self, bins: int = REG_MAX):
        super().__init__()
        self.bins = bins
        self.proj = nn.Conv2d(bins, 1, 1, bias=False).requires_grad_(False)
        with torch.no_grad():
            self.proj.weight.copy_(torch.arange(bins, dtype=torch.float32).view(1, bins, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [1, 4*bins, N] -> [1, bins, 4, N]; softmax over bins; a 1x1 conv takes the expectation.
        p = x.view(1, 4, self.bins, -1).transpose(1, 2).softmax(1)
        return self.proj(p).view(1, 4, -1)


class Detect(nn.Module):
    """Decoupled head (box distribution branch + class branch per level) with box decoding.

    Output [1, 4 + nc, N]: rows 0..3 are cx, cy, w, h in input pixels, rows 4.. sigmoid class scores;
    N = sum over strides of (H/stride)*(W/stride), levels in stride order, cells row-major.
    """

    def __init__(self, num_classes: int, channels: tuple[int, ...], strides: tuple[int, ...] = STRIDES):
        super().__init__()
        self.nc = num_classes
        self.strides = strides
        c_box = max(16, channels[0] // 4, 4 * REG_MAX)
        c_cls = max(channels[0], min(num_classes, 100))
        self.box = nn.ModuleList(
            nn.Sequential(
                ConvBnAct(c, c_box, 3), ConvBnAct(c_box, c_box, 3), nn.Conv2d(c_box, 4 * REG_MAX, 1)
            )
            for c in channels
        )
        self.cls = nn.ModuleList(
            nn.Sequential(
                ConvBnAct(c, c_cls, 3), ConvBnAct(c_cls, c_cls, 3), nn.Conv2d(c_cls, num_classes, 1)
            )
            for c in channels
        )
        self.dfl = DFL(REG_MAX)
        # Running-count kernels for _grid: weight k counts input x + k - (GRID_MAX - 1) for k < GRID_MAX.
        count = torch.cat([torch.ones(GRID_MAX), torch.zeros(GRID_MAX - 1)])
        self.register_buffer("count_x", count.view(1, 1, 1, -1), persistent=False)
        self.register_buffer("count_y", count.view(1, 1, -1, 1), persistent=False)

    def _grid(self, feat: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres [1, 2, h*w] and strides [1, 1, h*w] in input pixels, from the feature map itself.

        A running count of ones along x and y gives 1..w and 1..h. It is computed as a convolution
        with a fixed kernel (ones on one half, zeros on the other, 'same' padding), not with
        arange/meshgrid on traced sizes nor cumsum (which pnnx's ONNX importer lacks), so the graph
        traced at one size stays right at every size and converts to plain ncnn Convolutions.
        """
        ones = feat[:, :1] * 0.0 + 1.0
        x = nn.functional.conv2d(ones, self.count_x, padding=(0, GRID_MAX - 1)) - 0.5
        y = nn.functional.conv2d(ones, self.count_y, padding=(GRID_MAX - 1, 0)) - 0.5
        centres = torch.cat([x, y], 1).reshape(1, 2, -1) * float(stride)
        return centres, ones.reshape(1, 1, -1) * float(stride)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        dist, logits, centres, strides = [], [], [], []
        for i, f in enumerate(feats):
            dist.append(self.box[i](f).reshape(1, 4 * REG_MAX, -1))
            logits.append(self.cls[i](f).reshape(1, self.nc, -1))
            c, s = self._grid(f, self.strides[i])
            centres.append(c)
            strides.append(s)
        ltrb = self.dfl(torch.cat(dist, 2))  # distances to left, top, right, bottom, in cells
        centre = torch.cat(centres, 2)
        stride = torch.cat(strides, 2)
        lt, rb = ltrb[:, :2], ltrb[:, 2:]
        cxcy = centre + (rb - lt) * 0.5 * stride
        wh = (lt + rb) * stride
        return torch.cat([cxcy, wh, torch.cat(logits, 2).sigmoid()], 1)


class YOLOv8(nn.Module):
    """Backbone (Conv + C2f stages, SPPF), FPN/PAN neck, anchor-free DFL head."""

    def __init__(self, scale: str = "n", num_classes: int = 80):
        super().__init__()
        depth, width, max_c = SCALES[scale]

        def ch(c: int) -> int:
            return int(math.ceil(min(c, max_c) * width / 8) * 8)

        def n(k: int) -> int:
            return max(round(k * depth), 1)

        c1, c2, c3, c4, c5 = ch(64), ch(128), ch(256), ch(512), ch(1024)
        self.stem = ConvBnAct(3, c1, 3, 2)  # /2
        self.stage2 = nn.Sequential(ConvBnAct(c1, c2, 3, 2), C2f(c2, c2, n(3), True))  # /4
        self.stage3 = nn.Sequential(ConvBnAct(c2, c3, 3, 2), C2f(c3, c3, n(6), True))  # /8
        self.stage4 = nn.Sequential(ConvBnAct(c3, c4, 3, 2), C2f(c4, c4, n(6), True))  # /16
        self.stage5 = nn.Sequential(ConvBnAct(c4, c5, 3, 2), C2f(c5, c5, n(3), True), SPPF(c5, c5))  # /32
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.top_down4 = C2f(c5 + c4, c4, n(3), False)
        self.top_down3 = C2f(c4 + c3, c3, n(3), False)
        self.down3 = ConvBnAct(c3, c3, 3, 2)
        self.bottom_up4 = C2f(c3 + c4, c4, n(3), False)
        self.down4 = ConvBnAct(c4, c4, 3, 2)
        self.bottom_up5 = C2f(c4 + c5, c5, n(3), False)
        self.head = Detect(num_classes, (c3, c4, c5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p3 = self.stage3(self.stage2(self.stem(x)))
        p4 = self.stage4(p3)
        p5 = self.stage5(p4)
        t4 = self.top_down4(torch.cat([self.up(p5), p4], 1))
        n3 = self.top_down3(torch.cat([self.up(t4), p3], 1))
        n4 = self.bottom_up4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bottom_up5(torch.cat([self.down4(n4), p5], 1))
        return self.head([n3, n4, n5])


def _seeded_init(model: YOLOv8, seed: int, cls_std: tuple[float, float, float]) -> YOLOv8:
    """Seeded weights that give an untrained model some, but not thousands of, boxes on photos.

    - Convolutions: He-normal; BatchNorm: random affine parameters (randomise_batchnorm), running
      statistics then measured on two seeded 1/f-noise images (_calibration_images), so activations
      stay O(1) on photographs instead of growing with depth.
    - Head, YOLO's priors: box-distribution bias 1.0, class bias log(5 / nc / (640 / stride)^2)
      (about five objects per 640x640 image).
    - The last box and class convolutions are rescaled so their outputs have a set standard deviation
      on the calibration images: BOX_LOGIT_STD (soft DFL distributions: box coordinates then depend
      smoothly on the logits, which keeps converter round-off at ~1e-4 px instead of ~5e-2 px) and
      `cls_std` per level (P3, P4, P5).

    Tuning, measured on images/ (astronaut, chelsea, coffee, rocket) at 640x640, 320x320 and 384x640
    (HxW), confidence 0.25: an untrained random network's response scales with image contrast, and
    astronaut/coffee give 3-10x larger class logits than chelsea/rocket, so no single setting gives
    "a few" boxes on all four. The chosen values keep P3/P4 nearly silent (0.04) and let P5 produce
    the boxes: yolov8n (0.54): 1 to 75 boxes per image and size, every photo has some; yolov8s (0.78):
    16 to 65 on astronaut/coffee, none on chelsea/rocket. tests/test_yolo.py checks yolov8n's range.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m is not model.head.dfl.proj:
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
    randomise_batchnorm(model, generator)
    x = _calibration_images(generator)
    _calibrate_batchnorm(model, x)
    head = model.head
    finals = [seq[-1] for seq in head.box] + [seq[-1] for seq in head.cls]
    spread = _output_std(model, finals, x)
    targets = [BOX_LOGIT_STD] * len(head.box) + list(cls_std)
    for conv, std, target in zip(finals, spread, targets, strict=True):
        with torch.no_grad():
            conv.weight.mul_(target / std)
    for box, cls, stride in zip(head.box, head.cls, head.strides, strict=True):
        with torch.no_grad():
            box[-1].bias.fill_(1.0)
            cls[-1].bias.fill_(math.log(5 / head.nc / (640 / stride) ** 2))
    return model.eval()


BOX_LOGIT_STD = 0.2


def _calibration_images(generator: torch.Generator, n: int = 2, size: int = 320) -> torch.Tensor:
    """Seeded photo-like inputs in [0, 1]: noise with equal energy per octave (natural images' 1/f
    spectrum), so BatchNorm statistics measured on them fit real photographs."""
    x = torch.zeros(n, 3, size, size)
    cells = 2
    while cells <= size:
        octave = torch.rand(n, 3, cells, cells, generator=generator) - 0.5
        x += nn.functional.interpolate(octave, size=(size, size), mode="bilinear", align_corners=False)
        cells *= 2
    x = (x - x.mean()) / x.std()
    return (0.45 + 0.25 * x).clamp(0, 1)


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Replace BatchNorm running statistics by those measured on `x` (affine parameters stay random)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the calibration passes
    model.train()
    with torch.no_grad():
        for xi in x:
            model(xi[None])
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _output_std(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[float]:
    """Standard deviation of each layer's output over the calibration inputs (eval mode)."""
    outs: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(layers))}
    hooks = [
        layer.register_forward_hook(lambda _m, _i, o, i=i: outs[i].append(o.flatten()))
        for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            for xi in x:
                model(xi[None])
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(outs[i]).std().item() for i in range(len(layers))]


def yolov8n(num_classes: int = 80, seed: int = 0) -> YOLOv8:
    """YOLOv8-n sized detector (depth 0.33, width 0.25); seeded weights without a checkpoint."""
    return _seeded_init(YOLOv8("n", num_classes), seed, cls_std=(0.04, 0.04, 0.54))


def yolov8s(num_classes: int = 80, seed: int = 0) -> YOLOv8:
    """YOLOv8-s sized detector (depth 0.33, width 0.50); seeded weights without a checkpoint."""
    return _seeded_init(YOLOv8("s", num_classes), seed, cls_std=(0.04, 0.04, 0.78))
