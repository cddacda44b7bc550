"""The float64 ncnn interpreter against torch in float64 and against ncnn itself, blob by blob."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import convert_model
from torch import nn

from deploytool.backends.ncnn_runner import NcnnRunner
from deploytool.errors import SpecError
from deploytool.interpreter import NcnnInterpreter
from deploytool.interpreter.blobs import UnsupportedLayerError
from deploytool.interpreter.graph import supported_types
from deploytool.zoo.init import randomise_batchnorm
from deploytool.zoo.resnet import resnet18

PNNX = Path(sys.executable).parent / "pnnx"


def peak_rel(a: np.ndarray, ref: np.ndarray) -> float:
    """max |a - ref| / max |ref|."""
    a = np.asarray(a, dtype=np.float64).reshape(np.shape(ref))
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def ncnn_blobs(param: Path, bin_: Path, x: np.ndarray, precision: str = "fp32") -> dict[str, np.ndarray]:
    with NcnnRunner(param, bin_, precision=precision) as runner:
        return runner.extract_all({"in0": x})


def worst_blob(blobs: dict, ref: dict) -> tuple[str, float]:
    errors = {k: peak_rel(blobs[k], v) for k, v in ref.items() if np.abs(v).max() > 0}
    blob = max(errors, key=errors.get)
    return blob, errors[blob]


# --- a small YOLOv8-style detector: Conv-BN-SiLU, C2f, SPPF, nearest upsample, DFL and anchor grid


class ConvBNSiLU(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)

    def forward(self, x):
        return F.silu(self.bn(self.conv(x)))


class C2f(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        self.c = c2 // 2
        self.cv1, self.cv2 = ConvBNSiLU(c1, 2 * self.c), ConvBNSiLU(3 * self.c, c2)
        self.m = nn.Sequential(ConvBNSiLU(self.c, self.c, 3), ConvBNSiLU(self.c, self.c, 3))

    def forward(self, x):
        y = list(self.cv1(x).chunk(2, 1))
        y.append(y[-1] + self.m(y[-1]))
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.cv1, self.cv2 = ConvBNSiLU(c, c // 2), ConvBNSiLU(c * 2, c)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y += [self.m(y[-1]) for _ in range(3)]
        return self.cv2(torch.cat(y, 1))


class TinyYolo(nn.Module):
    def __init__(self, nc=4, reg_max=16):
        super().__init__()
        self.nc, self.reg_max, self.strides = nc, reg_max, (8.0, 16.0)
        self.stem = nn.Sequential(ConvBNSiLU(3, 8, 3, 2), ConvBNSiLU(8, 16, 3, 2), C2f(16, 16))
        self.p3 = nn.Sequential(ConvBNSiLU(16, 32, 3, 2), C2f(32, 32))
        self.p4 = nn.Sequential(ConvBNSiLU(32, 32, 3, 2), C2f(32, 32), SPPF(32))
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.n3, self.down, self.n4 = C2f(64, 32), ConvBNSiLU(32, 32, 3, 2), C2f(64, 32)
        self.box = nn.ModuleList(
            nn.Sequential(ConvBNSiLU(32, 32, 3), nn.Conv2d(32, 4 * reg_max, 1)) for _ in "ab"
        )
        self.cls = nn.ModuleList(nn.Sequential(ConvBNSiLU(32, 32, 3), nn.Conv2d(32, nc, 1)) for _ in "ab")
        self.dfl = nn.Conv2d(reg_max, 1, 1, bias=False).requires_grad_(False)
        self.dfl.weight.data[:] = torch.arange(reg_max, dtype=torch.float).view(1, reg_max, 1, 1)

    def forward(self, x):
        p3 = self.p3(self.stem(x))
        p4 = self.p4(p3)
        n3 = self.n3(torch.cat((self.up(p4), p3), 1))
        n4 = self.n4(torch.cat((self.down(n3), p4), 1))
        feats = [torch.cat((self.box[i](f), self.cls[i](f)), 1) for i, f in enumerate((n3, n4))]
        anchors, strides = [], []
        for f, stride in zip(feats, self.strides, strict=True):
            _, _, h, w = f.shape
            sy, sx = torch.arange(h, dtype=f.dtype) + 0.5, torch.arange(w, dtype=f.dtype) + 0.5
            yy, xx = torch.meshgrid(sy, sx, indexing="ij")
            anchors.append(torch.stack((xx, yy), -1).view(-1, 2))
            strides.append(torch.full((h * w, 1), stride, dtype=f.dtype))
        anchors = torch.cat(anchors).transpose(0, 1).unsqueeze(0)
        strides = torch.cat(strides).transpose(0, 1).unsqueeze(0)
        b, no = x.shape[0], feats[0].shape[1]
        box, cls = torch.cat([f.view(b, no, -1) for f in feats], 2).split((4 * self.reg_max, self.nc), 1)
        a = box.shape[2]
        dist = self.dfl(box.view(b, 4, self.reg_max, a).transpose(2, 1).softmax(1)).view(b, 4, a)
        lt, rb = dist.chunk(2, 1)
        x1y1, x2y2 = anchors - lt, anchors + rb
        return torch.cat((torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * strides, cls.sigmoid()), 1)


class Coverage(nn.Module):
    """The layer types ResNet and YOLO do not produce: depthwise and grouped convolution, fused
    leaky/clip, reflect padding, ceil-mode average pooling, bilinear resizing, adaptive pooling,
    PReLU, Crop, UnaryOp, Permute, MatMul, Gemm, Reduction, GELU, Mish, ELU, HardSigmoid/Swish."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 8, 3, 1, 1)
        self.dw = nn.Conv2d(8, 8, 3, 2, 1, groups=8)
        self.gconv = nn.Conv2d(8, 8, 3, 1, 2, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(10, 6)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1, generator=g) + 0.5)
        self.prelu = nn.PReLU(8)

    def forward(self, x):
        y = F.hardswish(self.conv(x))
        y = F.leaky_relu(self.dw(y), 0.1)
        y = self.bn(self.gconv(y)).clamp(-1.0, 2.0) * self.scale
        z = F.avg_pool2d(
            F.pad(y, (1, 2, 0, 1), mode="reflect"), 3, 2, 1, ceil_mode=True, count_include_pad=False
        )
        u = F.interpolate(y, scale_factor=2, mode="bilinear", align_corners=False)
        v = F.interpolate(y, size=(13, 11), mode="bilinear", align_corners=True)
        a = F.adaptive_avg_pool2d(u, (3, 5)) + F.adaptive_max_pool2d(v, (3, 5))
        b = self.prelu(y)[:, :, 1:, :-1]
        b = F.hardsigmoid(b) - torch.abs(b).exp() / 4
        c = b.permute(0, 2, 3, 1).softmax(-1)
        d = torch.matmul(c, c.transpose(2, 3))
        e = self.fc(d.flatten(2)[..., :10])
        f = torch.maximum(z.mean((2, 3), keepdim=True), a.sum(3, keepdim=True).mean(2, keepdim=True))
        g = F.gelu(e).sigmoid() + torch.tanh(f.flatten(1)).sum()
        return g, a * torch.sqrt(torch.abs(f) + 1), F.mish(d) - F.elu(d)


def seeded(model: nn.Module, seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    randomise_batchnorm(model, torch.Generator().manual_seed(seed))
    return model.eval()


def torch64(model: nn.Module, x: np.ndarray):
    """The model's outputs in float64, batch axis dropped, on a float64 copy of the model."""
    import copy

    with torch.no_grad():
        outs = copy.deepcopy(model).double()(torch.from_numpy(x).double())
    outs = outs if isinstance(outs, tuple) else (outs,)
    return [o.numpy()[0] for o in outs]


# --- ResNet18


@pytest.fixture(scope="module")
def resnet(tmp_path_factory):
    model = resnet18(seed=0)
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    root = tmp_path_factory.mktemp("resnet18")
    files = {
        via: convert_model(model, torch.from_numpy(x), root / via, via) for via in ("torchscript", "onnx")
    }
    blobs = {via: NcnnInterpreter(*files[via]).run({"in0": x}) for via in files}
    return model, x, files, blobs


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torchscript", "onnx"])
def test_resnet18_interpreter_matches_torch_float64(resnet, via):
    model, x, _, blobs = resnet
    (ref,) = torch64(model, x)
    err = peak_rel(blobs[via]["out0"], ref)
    assert err <= 1e-6, f"interpreter vs torch float64 ({via}): {err:.3g}"


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torchscript", "onnx"])
def test_resnet18_ncnn_fp32_matches_interpreter_per_blob(resnet, via):
    _, x, files, blobs = resnet
    ncnn = ncnn_blobs(*files[via], x)
    assert list(ncnn) == list(blobs[via])  # every blob, in the same (graph) order
    blob, err = worst_blob(ncnn, blobs[via])
    assert err <= 1e-5, f"ncnn fp32 vs interpreter ({via}): worst blob {blob} at {err:.3g}"


@pytest.mark.slow
def test_resnet18_ncnn_fp16_storage_errs_more_than_fp32(resnet):
    _, x, files, blobs = resnet
    ref = blobs["torchscript"]
    _, fp32 = worst_blob(ncnn_blobs(*files["torchscript"], x, "fp32"), ref)
    blob, fp16 = worst_blob(ncnn_blobs(*files["torchscript"], x, "fp16"), ref)
    print(
        f"per-blob max |ncnn - interpreter| / max|interpreter|: fp32 {fp32:.3g}, fp16 {fp16:.3g} (at {blob})"
    )
    assert fp16 > 10 * fp32
    assert fp16 < 1e-2


# --- YOLO-style detectors


@pytest.fixture(scope="module")
def tiny_yolo(tmp_path_factory):
    model = seeded(TinyYolo())
    x = np.random.default_rng(1).standard_normal((1, 3, 64, 64)).astype(np.float32)
    root = tmp_path_factory.mktemp("tinyyolo")
    return (
        model,
        x,
        {via: convert_model(model, torch.from_numpy(x), root / via, via) for via in ("torchscript", "onnx")},
    )


@pytest.mark.slow
@pytest.mark.parametrize("via", ["torchscript", "onnx"])
def test_yolo_style_detector(tiny_yolo, via):
    model, x, files = tiny_yolo
    interp = NcnnInterpreter(*files[via])
    types = {layer.type for layer in interp.graph.layers}
    assert {"Slice", "Concat", "Pooling", "Interp", "Reshape", "Permute", "Softmax", "MemoryData"} <= types
    blobs = interp.run({"in0": x})
    (ref,) = torch64(model, x)
    assert peak_rel(blobs["out0"], ref) <= 1e-6
    blob, err = worst_blob(ncnn_blobs(*files[via], x), blobs)
    assert err <= 1e-5, f"ncnn vs interpreter: worst blob {blob} at {err:.3g}"


@pytest.mark.slow
def test_zoo_yolov8n(tmp_path):
    yolo = pytest.importorskip("deploytool.zoo.yolo", reason="deploytool/zoo/yolo.py has not landed")
    model = yolo.yolov8n(num_classes=80, seed=0).eval()
    x = np.random.default_rng(2).standard_normal((1, 3, 64, 64)).astype(np.float32)
    param, bin_ = convert_model(model, torch.from_numpy(x), tmp_path, "torchscript")
    interp = NcnnInterpreter(param, bin_)
    blobs = interp.run({"in0": x})
    outputs = [b for b in blobs if b.startswith("out")]
    # looser than ResNet18's 1e-6: the .bin holds BN-folded weights rounded to float32, and this
    # deeper net with large box coordinates amplifies that rounding to a few 1e-6
    for name, ref in zip(outputs, torch64(model, x), strict=True):
        assert peak_rel(blobs[name], ref) <= 1e-5, name
    # blob by blob, float32 drift accumulated upstream (class logits reach several hundred) shows up
    # at the sigmoid; so compare each layer on ncnn's own inputs, which isolates the layer's error
    ncnn = ncnn_blobs(param, bin_, x)
    worst = (None, 0.0)
    for layer in interp.graph.layers[1:]:
        for top, out in zip(
            layer.tops, interp.run_layer(layer, [ncnn[b] for b in layer.bottoms]), strict=True
        ):
            err = peak_rel(ncnn[top], out) if np.abs(out).max() > 0 else 0.0
            worst = max(worst, (f"{layer.name} ({layer.type})", err), key=lambda item: item[1])
    assert worst[1] <= 1e-5, f"ncnn vs interpreter, layer by layer: worst {worst[0]} at {worst[1]:.3g}"


@pytest.mark.slow
def test_coverage_model_matches_torch_and_ncnn(tmp_path):
    model = seeded(Coverage())
    x = np.random.default_rng(3).standard_normal((1, 3, 16, 16)).astype(np.float32)
    param, bin_ = convert_model(model, torch.from_numpy(x), tmp_path, "torchscript")
    interp = NcnnInterpreter(param, bin_)
    types = {layer.type for layer in interp.graph.layers}
    expected = {"ConvolutionDepthWise", "Padding", "Crop", "UnaryOp", "MatMul", "Gemm", "Reduction", "PReLU"}
    assert expected <= types
    blobs = interp.run({"in0": x})
    for name, ref in zip(("out0", "out1", "out2"), torch64(model, x), strict=True):
        assert peak_rel(blobs[name], ref) <= 1e-6, name
    blob, err = worst_blob(ncnn_blobs(param, bin_, x), blobs)
    assert err <= 1e-5, f"ncnn vs interpreter: worst blob {blob} ({interp.layer_of(blob).type}) at {err:.3g}"


# --- hand-written graphs: fast, no pnnx


def write_graph(folder: Path, layers: list[str], blobs: int, weights: bytes = b"") -> tuple[Path, Path]:
    param, bin_ = folder / "g.param", folder / "g.bin"
    param.write_text("7767517\n" + f"{len(layers)} {blobs}\n" + "\n".join(layers) + "\n")
    bin_.write_bytes(weights)
    return param, bin_


def raw(values) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def test_fp16_weights_broadcasts_and_permutes_match_ncnn(tmp_path):
    """A float16 weight blob (tag 0x01306B47), BinaryOp broadcasting (1-d per channel, 1-d per
    column, (h, 1) against (h, w)) and all 24 orders of a 4-d Permute."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal(4 * 3 * 3 * 3).astype(np.float16)
    bias = rng.standard_normal(4).astype(np.float32)
    per_c, row, mat = (rng.standard_normal(n).astype(np.float32) for n in (4, 6, 5 * 6))
    cube = rng.standard_normal(2 * 3 * 4 * 5).astype(np.float32)
    weights = (
        struct.pack("<I", 0x01306B47)
        + w.tobytes()
        + raw(bias)
        + raw(per_c)
        + raw(row)
        + raw(mat)
        + raw(mat[:5])
        + raw(cube)
    )
    layers = [
        "Input in0 0 1 in0",
        "Convolution conv 1 1 in0 c 0=4 1=3 4=1 5=1 6=108",
        "MemoryData per_c 0 1 m1 0=4",
        "MemoryData row 0 1 m2 0=6",
        "MemoryData mat 0 1 m3 0=6 1=5",
        "MemoryData mat2 0 1 m3b 0=1 1=5",
        "MemoryData cube 0 1 m4 0=5 1=4 11=3 2=2",
        "Split split 1 3 c c1 c2 c3",
        "BinaryOp add_c 2 1 c1 m1 o1 0=0",
        "BinaryOp mul_w 2 1 c2 m2 o2 0=2",
        "BinaryOp sub_hw 2 1 m3 m3b o3 0=1",
        "Split split2 1 24 m4 " + " ".join(f"s{i}" for i in range(24)),
    ] + [f"Permute perm{i} 1 1 s{i} p{i} 0={i}" for i in range(24)]
    param, bin_ = write_graph(tmp_path, layers, 14 + 48, weights)
    x = rng.standard_normal((1, 3, 5, 6)).astype(np.float32)
    interp = NcnnInterpreter(param, bin_)
    assert interp.weight_record("conv").dtype == "float16"
    ours = interp.run({"in0": x})
    theirs = ncnn_blobs(param, bin_, x)
    for name, value in ours.items():
        assert theirs[name].shape == value.shape, name
        np.testing.assert_allclose(theirs[name], value, rtol=1e-5, atol=1e-5, err_msg=name)


def test_unsupported_layer_names_type_and_layer(tmp_path):
    param, bin_ = write_graph(tmp_path, ["Input in0 0 1 in0", "Frobnicate frob_3 1 1 in0 out0"], 2)
    with pytest.raises(UnsupportedLayerError, match=r"frob_3 has type Frobnicate"):
        NcnnInterpreter(param, bin_)
    assert "Frobnicate" not in supported_types()
    needed = {"Convolution", "ConvolutionDepthWise", "Pooling", "InnerProduct", "Gemm", "BinaryOp", "Eltwise"}
    needed |= {"Split", "Concat", "Slice", "Reshape", "Permute", "Softmax", "Crop", "Interp", "Flatten"}
    needed |= {"Sigmoid", "Swish", "ReLU", "Clip", "Padding", "MemoryData", "UnaryOp"}
    assert needed <= set(supported_types())


def test_unimplemented_setting_is_refused_not_guessed(tmp_path):
    layers = ["Input in0 0 1 in0", "Interp bicubic 1 1 in0 out0 0=3 1=2.0 2=2.0"]
    param, bin_ = write_graph(tmp_path, layers, 2)
    with pytest.raises(UnsupportedLayerError, match="bicubic.*resize_type 3"):
        NcnnInterpreter(param, bin_).run({"in0": np.zeros((1, 2, 4, 4), np.float32)})


@pytest.mark.parametrize("extra", [-4, 4])
def test_bin_of_the_wrong_length_is_refused(tmp_path, extra):
    layers = ["Input in0 0 1 in0", "InnerProduct fc 1 1 in0 out0 0=2 1=1 2=6"]
    weights = struct.pack("<I", 0) + raw(np.ones(6)) + raw([0.5, -0.5])
    param, bin_ = write_graph(tmp_path, layers, 2, weights[:extra] if extra < 0 else weights + b"\0" * extra)
    with pytest.raises(SpecError, match="too short" if extra < 0 else "more than"):
        NcnnInterpreter(param, bin_)
    bin_.write_bytes(weights)
    interp = NcnnInterpreter(param, bin_)
    np.testing.assert_allclose(interp.run({"in0": np.arange(3.0)})["out0"], [3.5, 2.5])
    assert interp.layer_of("out0").name == "fc"
    with pytest.raises(SpecError, match="no layer produces"):
        interp.layer_of("nope")


def test_shape_expressions_follow_ncnn_syntax():
    from deploytool.interpreter.ops_shape import eval_shape_expr

    a = np.zeros((64, 20, 30))  # c, h, w
    b = np.zeros((5, 7))  # h, w
    assert eval_shape_expr("*(0h,0w),64", [a], "t") == [600, 64]
    assert eval_shape_expr("-1,*(0h,2),+(1h,2)", [a, b], "t") == [-1, 40, 7]
    assert eval_shape_expr("//(0w,4),floor(/(0c,3))", [a], "t") == [7, 21]
    with pytest.raises(UnsupportedLayerError, match="sin"):
        eval_shape_expr("sin(0w)", [a], "t")
