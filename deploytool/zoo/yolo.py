"""A YOLOv8-style anchor-free detector (scales n and s) whose forward returns decoded boxes and scores."""

from __future__ import annotations

import math

import torch
from torch import nn

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


def _seeded_init(model: YOLOv8, seed: int, cls_std: float) -> YOLOv8:
    """Seeded weights conditioned like a trained network's: moderate activations on photographs, a
    few detections per image, and outputs that fp16 storage (ncnn on Vulkan) reproduces.

    - Convolutions: He-normal. BatchNorm: running statistics measured on seeded synthetic photographs
      (_calibration_images), so each BN normalises its input to zero mean and unit variance on
      photo-like data; affine parameters gamma ~ U(0.3, 0.6), beta ~ U(1, 2).
    - Why that affine range: an untrained BN + SiLU network with gamma ~ 1, beta ~ 0 is chaotic. SiLU is
      curved around 0, so a perturbation's share of the signal grows by ~10 % per layer (mean-field
      variance gain E[silu'(y)^2] Var(y) / Var(silu(y)) = 1.21 for y ~ N(0, 1)), and it turns a photo's
      extra contrast into channel offsets that the fixed BN statistics do not remove, which compound
      through the neck: fp16 rounding (2^-11) reached 4 % of the head's activations, and astronaut and
      coffee gave head activations 20-50x those of chelsea and rocket. With y ~ N(1..2, 0.3..0.6) SiLU
      is close to linear where the data lie (gain 1.00-1.02) yet still not linear; relative fp16
      error stays ~1e-3 and every photo's activations stay within ~1.5x of the calibration scale.
    - Box branch: the last convolution is scaled so DFL logits have standard deviation BOX_LOGIT_STD
      on the calibration images, and the bias falls by DFL_BIAS_SLOPE per bin: distributions peaked
      at a few cells (box sides of ~2 cells on average, like a trained model's), whose expectation is
      well conditioned.
    - Class branch: zero padding makes every image border a strong edge, which an untrained head
      turns into rows of near-equal border detections (NMS then breaks their ties differently on
      each backend). The last convolution is made blind to the main directions (BORDER_ENERGY of the
      variance) in which a flat letterbox-grey image's features differ between border and centre
      cells, scaled to a logit standard deviation `cls_std` on the calibration images, and its bias
      puts the flat image at YOLO's prior log(5 / nc / cells) (about five objects per 640x640 image):
      logits sit far below the 0.25 threshold except a tail of textured cells, unsaturated (the best
      score per image is 0.45-0.85, not 1.0).

    Measured on images/ (astronaut, chelsea, coffee, rocket) at 320x320, 640x640 and 384x640
    (HxW), confidence 0.25: yolov8n gives 2 to 18 detections per image and size, yolov8s 4 to 26;
    ncnn on Vulkan (fp16 storage) stays within 0.6 px and 0.015 in score of torch (it was 24 px and
    0.12). tests/test_yolo.py checks the counts and the Vulkan detections.
    """
    generator = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d) and m is not model.head.dfl.proj:
            fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            with torch.no_grad():
                m.weight.normal_(0.0, (2.0 / fan_in) ** 0.5, generator=generator)
                if m.bias is not None:
                    m.bias.zero_()
        elif isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(*BN_GAMMA, generator=generator)
                m.bias.uniform_(*BN_BETA, generator=generator)
    x = _calibration_images(generator)
    _calibrate_batchnorm(model, x)
    head = model.head
    finals = [seq[-1] for seq in head.box] + [seq[-1] for seq in head.cls]
    spread = _output_std(model, finals, x)
    targets = [BOX_LOGIT_STD] * len(head.box) + [cls_std] * len(head.cls)
    for conv, std, target in zip(finals, spread, targets, strict=True):
        with torch.no_grad():
            conv.weight.mul_(target / std)
    bins = torch.arange(REG_MAX, dtype=torch.float32).repeat(4)
    for box in head.box:
        with torch.no_grad():
            box[-1].bias.copy_(-DFL_BIAS_SLOPE * bins)
    # A flat letterbox-grey image: its features differ between cells only near the borders, where
    # zero padding makes an edge. The class convolutions are made blind to the strongest of those
    # border directions (else every flat border lights up as a row of near-equal detections), then
    # the bias puts the flat image at the prior.
    finals = [seq[-1] for seq in head.cls]
    feats = _inputs_of(model, finals, torch.full((1, 3, 320, 320), LETTERBOX_GREY))
    for conv, f in zip(finals, feats, strict=True):
        c = f.shape[1]
        centre = f[0, :, f.shape[2] // 2, f.shape[3] // 2]
        border = (f[0] - centre.view(-1, 1, 1)).reshape(c, -1)
        u, sv, _ = torch.linalg.svd(border, full_matrices=False)
        k = int((sv.square().cumsum(0) / sv.square().sum() < BORDER_ENERGY).sum()) + 1
        k = min(k, c // BORDER_MAX_FRACTION)
        with torch.no_grad():
            w = conv.weight.view(conv.out_channels, c)
            w -= (w @ u[:, :k]) @ u[:, :k].T
    spread = _output_std(model, finals, x)
    for conv, std, f, stride in zip(finals, spread, feats, head.strides, strict=True):
        prior = math.log(5 / head.nc / (640 / stride) ** 2)
        centre = f[0, :, f.shape[2] // 2, f.shape[3] // 2]
        with torch.no_grad():
            conv.weight.mul_(cls_std / std)
            conv.bias.copy_(prior - conv.weight.view(conv.out_channels, -1) @ centre)
    return model.eval()


BN_GAMMA = (0.3, 0.6)
BN_BETA = (1.0, 2.0)
BOX_LOGIT_STD = 1.5
DFL_BIAS_SLOPE = 0.5
LETTERBOX_GREY = 114 / 255
BORDER_ENERGY = 0.5
BORDER_MAX_FRACTION = 8


def _calibration_images(generator: torch.Generator, n: int = 4, size: int = 320) -> torch.Tensor:
    """Seeded photo-like inputs in [0, 1]: a 'dead leaves' picture (overlapping opaque discs whose
    radii follow the r^-3 law that gives natural images their scale invariance: flat regions, sharp
    edges, a 1/f spectrum) with a faint 1/f texture, so BatchNorm statistics measured on them fit
    real photographs."""
    coords = torch.arange(size, dtype=torch.float32)
    yy, xx = coords.view(-1, 1), coords.view(1, -1)
    shapes, r_min, r_max = 400, 2.0, size / 2
    images = []
    for _ in range(n):
        img = torch.rand(3, 1, 1, generator=generator).expand(3, size, size).clone()
        u = torch.rand(shapes, generator=generator)
        radius = (r_min**-2 - u * (r_min**-2 - r_max**-2)) ** -0.5  # density ~ r^-3
        radius = radius.sort(descending=True).values  # large discs first, small ones on top
        centre = torch.rand(shapes, 2, generator=generator) * size
        grey = torch.rand(shapes, 1, generator=generator)
        colour = (grey + 0.6 * (torch.rand(shapes, 3, generator=generator) - 0.5)).clamp(0, 1)
        for r, (cx, cy), c in zip(radius, centre, colour, strict=True):
            img[:, (xx - cx) ** 2 + (yy - cy) ** 2 < r**2] = c.view(3, 1)
        images.append(img)
    x = torch.stack(images)
    texture = torch.zeros_like(x)
    cells = 4
    while cells <= size:
        octave = torch.rand(n, 3, cells, cells, generator=generator) - 0.5
        texture += nn.functional.interpolate(octave, size=(size, size), mode="bilinear", align_corners=False)
        cells *= 2
    x = x + 0.05 * texture / texture.std()
    x = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)  # soft edges
    return x.clamp(0, 1)


def _calibrate_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    """Replace BatchNorm running statistics by those of `x`, one batch, each layer seeing its inputs
    as normalised by the layers before it (affine parameters are kept)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average: after one pass, exactly this batch's statistics
    model.train()
    with torch.no_grad():
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    model.eval()


def _capture(model: nn.Module, layers: list[nn.Module], x: torch.Tensor, outputs: bool) -> list[torch.Tensor]:
    """What each of `layers` receives (or, with `outputs`, returns) when the model runs on `x` (eval)."""
    got: dict[int, torch.Tensor] = {}
    hooks = [
        layer.register_forward_hook(lambda _m, i, o, n=n: got.__setitem__(n, o if outputs else i[0]))
        for n, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in hooks:
            h.remove()
    return [got[n] for n in range(len(layers))]


def _inputs_of(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    return _capture(model, layers, x, outputs=False)


def _output_std(model: nn.Module, layers: list[nn.Module], x: torch.Tensor) -> list[float]:
    """Standard deviation of each layer's output over the calibration inputs (eval mode)."""
    return [out.std().item() for out in _capture(model, layers, x, outputs=True)]


def yolov8n(num_classes: int = 80, seed: int = 0) -> YOLOv8:
    """YOLOv8-n sized detector (depth 0.33, width 0.25); seeded weights without a checkpoint."""
    return _seeded_init(YOLOv8("n", num_classes), seed, cls_std=6.6)


def yolov8s(num_classes: int = 80, seed: int = 0) -> YOLOv8:
    """YOLOv8-s sized detector (depth 0.33, width 0.50); seeded weights without a checkpoint."""
    return _seeded_init(YOLOv8("s", num_classes), seed, cls_std=6.6)
