"""int8 quantisation for ncnn: ncnn2table tables, weight scales, calibration, the int8 .param/.bin that
ncnn's own runtime loads, and parity of the int8 model against fp32 (and a corrupted scale failing it)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import convert_model

from deploytool.backends.ncnn_runner import NcnnRunner
from deploytool.errors import SpecError
from deploytool.inputs import calibration_feeds, collect_images
from deploytool.ncnn_param import Layer, read_model, read_param, requantized_blobs, round_half_away
from deploytool.quantize.calibrate import (
    KL_EPS,
    METHODS,
    NUM_BINS,
    _uses_6bit,
    calibrate,
    calibration_layers,
    kl_threshold_bin,
    weight_scales,
)
from deploytool.quantize.table import CalibrationTable, read_table, write_table
from deploytool.quantize.write import quantize_model, requantize_targets

REPO = Path(__file__).resolve().parent.parent
IMAGES = REPO / "images"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


# ---------------------------------------------------------------------------------------------
# tables

NCNN2TABLE_TEXT = (
    "conv1_param_0 161.479919 12.000000 \nfc_param_0 738.045471 \nconv1 31.983847 \n#fc 302.814606 \n"
)


def test_table_round_trip_is_byte_exact(tmp_path):
    src = tmp_path / "in.table"
    src.write_text(NCNN2TABLE_TEXT)
    table = read_table(src)
    assert set(table.weight_scales) == {"conv1", "fc"}
    np.testing.assert_allclose(table.weight_scales["conv1"], [161.479919, 12.0], rtol=1e-7)
    np.testing.assert_allclose(table.blob_scales["fc"], [302.814606], rtol=1e-7)
    assert table.fp32_layers == {"fc"}
    write_table(tmp_path / "out.table", table)
    assert (tmp_path / "out.table").read_text() == NCNN2TABLE_TEXT


def test_written_table_uses_ncnn2table_layout(tmp_path):
    table = CalibrationTable(
        weight_scales={"a": np.array([1.5, 2.0]), "b": np.array([3.0])},
        blob_scales={"a": np.array([10.0]), "b": np.array([0.25])},
        fp32_layers={"b"},
    )
    write_table(tmp_path / "t.table", table)
    text = (tmp_path / "t.table").read_text()
    # weight lines first, then bottom-blob lines; "%f " per value; both lines of an fp32 layer commented
    assert text == "a_param_0 1.500000 2.000000 \n#b_param_0 3.000000 \na 10.000000 \n#b 0.250000 \n"
    again = read_table(tmp_path / "t.table")
    assert again.fp32_layers == {"b"} and again.layers() == ["a", "b"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("conv1_param_0\n", "expected `NAME scale"),
        ("conv1 1.0 abc\n", "not a number"),
        ("conv1 1.0\nconv1 2.0\n", "appears twice"),
    ],
)
def test_malformed_table_lines_are_refused(tmp_path, text, message):
    path = tmp_path / "bad.table"
    path.write_text(text)
    with pytest.raises(SpecError, match=message) as info:
        read_table(path)
    assert "bad.table:" in str(info.value)  # names the line


# ---------------------------------------------------------------------------------------------
# a tiny conv net through pnnx


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv3 = torch.nn.Conv2d(3, 16, 3, padding=1)  # 3x3 stride 1: 6-bit weights
        self.dw = torch.nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16)  # depthwise, per group
        self.conv_s2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)  # 3x3 stride 2: 8-bit
        self.fc = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.conv3(x))
        x = torch.relu(self.dw(x))
        x = torch.relu(self.conv_s2(x))
        return self.fc(x.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = Tiny().eval()
    folder = tmp_path_factory.mktemp("tiny")
    param, bin = convert_model(model, torch.randn(1, 3, 32, 32), folder)
    rng = np.random.default_rng(0)
    feeds = [{"in0": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(8)]
    return model, param, bin, feeds


def _by_type(param: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for layer in read_param(param).layers:
        found.setdefault(layer.type, []).append(layer.name)
    return found


def test_weight_scales_match_a_hand_computation(tiny):
    model, param, bin, _ = tiny
    names = _by_type(param)
    conv3, conv_s2 = names["Convolution"]
    (dw,) = names["ConvolutionDepthWise"]
    (fc,) = names["InnerProduct"]
    scales = weight_scales(read_model(param, bin))
    absmax = {
        conv3: model.conv3.weight.abs().amax(dim=(1, 2, 3)),
        dw: model.dw.weight.abs().amax(dim=(1, 2, 3)),  # one per group
        conv_s2: model.conv_s2.weight.abs().amax(dim=(1, 2, 3)),
        fc: model.fc.weight.abs().amax(dim=1),
    }
    levels = {conv3: 31, dw: 127, conv_s2: 127, fc: 127}  # the 6-bit rule: 3x3 stride 1 only
    assert set(scales) == set(absmax)
    for name, a in absmax.items():
        np.testing.assert_allclose(scales[name], levels[name] / a.detach().numpy(), rtol=1e-6)


def test_six_bit_rule_conditions():
    def conv(p):
        return Layer("Convolution", "c", ["a"], ["b"], {0: 4, 6: 36, **p})

    assert _uses_6bit(conv({1: 3}))
    assert _uses_6bit(conv({1: 3, 11: 3, 2: 1, 12: 1, 3: 1, 13: 1}))
    assert not _uses_6bit(conv({1: 3, 3: 2}))  # stride 2
    assert not _uses_6bit(conv({1: 3, 13: 2}))  # stride_h 2
    assert not _uses_6bit(conv({1: 3, 2: 2}))  # dilation 2
    assert not _uses_6bit(conv({1: 1}))  # 1x1
    assert not _uses_6bit(conv({1: 3, 11: 1}))  # 3x1
    assert not _uses_6bit(Layer("ConvolutionDepthWise", "d", ["a"], ["b"], {1: 3, 7: 4}))


def test_table_is_validated_against_the_graph(tiny, tmp_path):
    _, param, bin, _ = tiny
    graph = read_param(param)
    conv = _by_type(param)["Convolution"][0]
    for text, message in [
        ("nosuch_param_0 1.0 \nnosuch 1.0 \n", "'nosuch' is not in the model"),
        (f"{conv}_param_0 1.0 2.0 \n{conv} 1.0 \n", "needs 16"),
        ("gap_0 1.0 \n" if "gap_0" in {x.name for x in graph.layers} else "in0 1.0 \n", "only Convolution"),
        (f"{conv}_param_0 {' '.join(['1.0'] * 16)} \n{conv} -2.0 \n", "finite positive"),
    ]:
        (tmp_path / "t.table").write_text(text)
        with pytest.raises(SpecError, match=message):
            read_table(tmp_path / "t.table", graph)


def _reference_kl_threshold(hist: np.ndarray, target: int) -> int:
    """Slow transcription of the search with an explicit overlap matrix (target bin j covers source
    bins [j*T/target, (j+1)*T/target), fractionally at its edges)."""
    p = hist / hist.sum()
    best, best_kl = target, math.inf
    for t in range(target, len(p)):
        clip = p[:t] + KL_EPS
        clip[-1] += p[t:].sum()
        w = t / target
        overlap = np.zeros((target, t))
        for j in range(target):
            for k in range(t):
                overlap[j, k] = max(0.0, min((j + 1) * w, k + 1) - max(j * w, k))
        q = overlap @ p[:t] / overlap.sum(axis=1)
        expand = q @ overlap + KL_EPS
        kl = float(np.sum(clip * np.log(clip / expand)))
        if kl < best_kl:
            best, best_kl = t, kl
    return best


def test_kl_search_matches_a_direct_transcription():
    rng = np.random.default_rng(1)
    for hist in (
        np.histogram(np.abs(rng.standard_normal(20000)), bins=96, range=(0, 5))[0],
        np.histogram(rng.exponential(size=20000), bins=96, range=(0, 9))[0],
    ):
        assert kl_threshold_bin(hist, target=8) == _reference_kl_threshold(hist.astype(float), 8)
    # a long tail of rare outliers is clipped; a compact distribution is not
    tail = np.histogram(np.abs(rng.standard_normal(100000)), bins=NUM_BINS, range=(0, 40))[0]
    assert kl_threshold_bin(tail) < NUM_BINS // 2


def test_kl_keeps_the_range_of_a_constant_input():
    """A blob whose |x| is one value (all mass in the top bin: YOLO's grid is a convolution over a blob
    of ones) is not clipped: ncnn2table's search, which always clips, scaled it to 1/16 of its value."""
    spike = np.zeros(NUM_BINS)
    spike[-1] = 1600
    assert kl_threshold_bin(spike) == NUM_BINS
    tail = np.histogram(np.abs(np.random.default_rng(2).standard_normal(50000)), bins=NUM_BINS)[0]
    assert kl_threshold_bin(tail) < NUM_BINS  # an ordinary tail is still clipped


def _int8_outputs(param, bin, feeds):
    with NcnnRunner(param, bin, precision="fp32") as runner:
        return [next(iter(runner.infer(f).values())) for f in feeds]


@pytest.mark.parametrize("method", METHODS)
def test_tiny_net_int8_runs_in_ncnn_close_to_fp32(tiny, tmp_path, method):
    _, param, bin, feeds = tiny
    table = calibrate(read_model(param, bin), feeds, method=method)
    write_table(tmp_path / "t.table", table)
    table = read_table(tmp_path / "t.table", read_param(param))  # what ncnn2int8 would read
    done = quantize_model(read_model(param, bin), table, tmp_path / "q.param", tmp_path / "q.bin")
    assert done == [x.name for x in calibration_layers(read_param(param))]
    q_layers = {x.name: x for x in read_param(tmp_path / "q.param").layers}
    # conv3 and dw hand int8 straight to the next convolution (requantised, 8=10x, as ncnn2int8 does)
    terms = [q_layers[name].get(8) for name in done]
    assert terms == [102, 101, 2, 2]
    ref, got = (
        _int8_outputs(param, bin, feeds),
        _int8_outputs(tmp_path / "q.param", tmp_path / "q.bin", feeds),
    )
    for r, g in zip(ref, got, strict=True):
        assert cosine(r, g) > 0.999
        assert r.argmax() == g.argmax()
        assert not np.array_equal(r, g)  # int8 arithmetic really ran


def test_requantisation_changes_no_output_and_its_int8_blobs_read_back_as_floats(tiny, tmp_path):
    """A requantising layer hands the next int8 convolution the same int8 values it would have made
    itself: the outputs are identical, and the blobs ncnn hands out as int8 values (value / scale) are
    the plain model's blobs on the int8 grid."""
    _, param, bin, feeds = tiny
    table = calibrate(read_model(param, bin), feeds, method="minmax")
    quantize_model(read_model(param, bin), table, tmp_path / "f.param", tmp_path / "f.bin")
    quantize_model(read_model(param, bin), table, tmp_path / "p.param", tmp_path / "p.bin", requantize=False)
    assert "8=102" in (tmp_path / "f.param").read_text() and "8=10" not in (tmp_path / "p.param").read_text()
    fused = requantized_blobs(read_model(tmp_path / "f.param", tmp_path / "f.bin"))
    conv3 = next(x for x in read_param(param).layers if x.type == "Convolution")
    assert fused[conv3.tops[0]] == pytest.approx(
        float(
            table.blob_scales[
                requantize_targets(
                    read_param(tmp_path / "p.param"), set(table.blob_scales), table.blob_scales
                )[conv3.name]
            ][0]
        )
    )
    with NcnnRunner(tmp_path / "f.param", tmp_path / "f.bin", precision="int8") as runner:
        f_blobs = runner.extract_all(feeds[0])
    with NcnnRunner(tmp_path / "p.param", tmp_path / "p.bin", precision="int8") as runner:
        p_blobs = runner.extract_all(feeds[0])
    out = read_param(param).output_names[0]
    np.testing.assert_array_equal(f_blobs[out], p_blobs[out])
    for blob, scale in fused.items():
        on_grid = np.clip(round_half_away(p_blobs[blob].astype(np.float64) * np.float32(scale)), -127, 127)
        np.testing.assert_allclose(f_blobs[blob], on_grid / np.float32(scale), rtol=1e-6, atol=1e-6)


def test_kept_fp32_layers_are_copied_unchanged(tiny, tmp_path):
    _, param, bin, feeds = tiny
    table = calibrate(read_model(param, bin), feeds, method="minmax")
    (fc,) = _by_type(param)["InnerProduct"]
    (dw,) = _by_type(param)["ConvolutionDepthWise"]
    table.fp32_layers.add(dw)  # as a `#` line would
    done = quantize_model(
        read_model(param, bin), table, tmp_path / "q.param", tmp_path / "q.bin", keep_fp32=[fc]
    )
    assert fc not in done and dw not in done and len(done) == 2
    old = Path(param).read_text().splitlines()
    new = (tmp_path / "q.param").read_text().splitlines()
    changed = [o.split()[1] for o, n in zip(old, new, strict=True) if o != n]
    assert changed == done
    # the fc's weights and bias are the last bytes of both files, unchanged
    fc_bytes = (10 * 32 + 1) * 4 + 10 * 4
    assert (tmp_path / "q.bin").read_bytes()[-fc_bytes:] == Path(bin).read_bytes()[-fc_bytes:]
    ref = _int8_outputs(param, bin, feeds)
    for r, g in zip(ref, _int8_outputs(tmp_path / "q.param", tmp_path / "q.bin", feeds), strict=True):
        assert cosine(r, g) > 0.999
    with pytest.raises(SpecError, match="'nosuch' is not in"):
        quantize_model(
            read_model(param, bin), table, tmp_path / "x.param", tmp_path / "x.bin", keep_fp32=["nosuch"]
        )


def test_corrupted_scale_in_int8_bin_fails_parity(tiny, tmp_path):
    """The parity check can fail: one bottom-blob scale scaled by 20 in the int8 .bin clips that layer's
    input, and the int8 model no longer matches fp32."""
    _, param, bin, feeds = tiny
    table = calibrate(read_model(param, bin), feeds, method="kl")
    # without requantisation each scale is written once (with it, dw's bottom scale is conv3's top too)
    quantize_model(read_model(param, bin), table, tmp_path / "q.param", tmp_path / "q.bin", requantize=False)
    conv = _by_type(param)["Convolution"][1]
    scale = table.blob_scales[conv].astype(np.float32).tobytes()
    data = (tmp_path / "q.bin").read_bytes()
    assert data.count(scale) == 1
    (tmp_path / "bad.bin").write_bytes(data.replace(scale, (table.blob_scales[conv] * 20).tobytes()))
    good = _int8_outputs(tmp_path / "q.param", tmp_path / "q.bin", feeds)
    bad = _int8_outputs(tmp_path / "q.param", tmp_path / "bad.bin", feeds)
    ref = _int8_outputs(param, bin, feeds)
    assert min(cosine(r, g) for r, g in zip(ref, good, strict=True)) > 0.999
    assert min(cosine(r, b) for r, b in zip(ref, bad, strict=True)) < 0.99


def test_int8_model_cannot_be_quantised_again(tiny, tmp_path):
    _, param, bin, feeds = tiny
    table = calibrate(read_model(param, bin), feeds, method="minmax")
    quantize_model(read_model(param, bin), table, tmp_path / "q.param", tmp_path / "q.bin")
    with pytest.raises(SpecError, match="only Convolution|cannot size|int8"):
        quantize_model(
            read_model(tmp_path / "q.param", tmp_path / "q.bin"),
            table,
            tmp_path / "r.param",
            tmp_path / "r.bin",
        )


# ---------------------------------------------------------------------------------------------
# calibration photos


def test_calibration_and_eval_photos_are_disjoint_and_not_demo_inputs():
    calib = {p.name for p in collect_images([IMAGES / "calib"])}
    evaluation = {p.name for p in collect_images([IMAGES / "eval"])}
    demo = {p.name for p in collect_images([IMAGES])}
    assert len(calib) >= 10 and len(evaluation) >= 8
    assert not calib & evaluation and not calib & demo
    assert demo == {"astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"}  # no recursion
    readme = (IMAGES / "README.md").read_text()
    for folder, names in (("calib", calib), ("eval", evaluation)):
        for name in names:
            assert f"`{folder}/{name}`" in readme  # every photo is attributed


# ---------------------------------------------------------------------------------------------
# ResNet18 end to end


@pytest.mark.slow
def test_resnet18_int8_kl_parity(tmp_path):
    from deploytool.backends.torch_runner import TorchRunner
    from deploytool.model import build_model
    from deploytool.options import RunOptions
    from deploytool.pipeline import run
    from deploytool.spec_toml import load_spec

    spec = load_spec("resnet18")
    run(spec, RunOptions(out=tmp_path, images=(IMAGES,), backends="torch,ncnn-cpu"))
    param, bin = tmp_path / "model.ncnn.param", tmp_path / "model.ncnn.bin"
    table = calibrate(read_model(param, bin), calibration_feeds(spec, [IMAGES / "calib"]), method="kl")
    write_table(tmp_path / "resnet18.table", table)
    done = quantize_model(read_model(param, bin), table, tmp_path / "int8.param", tmp_path / "int8.bin")
    assert len(done) == 21  # 20 convolutions and the classifier
    feeds = list(calibration_feeds(spec, [IMAGES / "eval", IMAGES])())
    model = build_model(spec)
    model = model[0] if isinstance(model, tuple) else model
    with (
        NcnnRunner(param, bin) as fp32,
        NcnnRunner(tmp_path / "int8.param", tmp_path / "int8.bin") as int8,
        TorchRunner(model, [spec.input_name], spec.output_names) as ref,
    ):
        rows = [(ref.infer(f)["logits"], fp32.infer(f)["out0"], int8.infer(f)["out0"]) for f in feeds]
    cos_fp32 = [cosine(a, q) for _, a, q in rows]
    cos_torch = [cosine(t, q) for t, _, q in rows]
    top1_fp32 = np.mean([a.argmax() == q.argmax() for _, a, q in rows])
    top1_torch = np.mean([t.argmax() == q.argmax() for t, _, q in rows])
    print(
        f"resnet18 int8 (kl) on {len(rows)} photos: cosine vs ncnn fp32 min {min(cos_fp32):.5f} "
        f"mean {np.mean(cos_fp32):.5f}, vs torch min {min(cos_torch):.5f}; top-1 agreement vs fp32 "
        f"{top1_fp32:.2f}, vs torch {top1_torch:.2f}"
    )
    assert min(cos_fp32) > 0.99 and min(cos_torch) > 0.99
    assert top1_fp32 >= 0.85 and top1_torch >= 0.85
