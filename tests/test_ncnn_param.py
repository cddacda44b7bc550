import struct

import numpy as np
import pytest

from deploytool.errors import SpecError
from deploytool.ncnn_param import TAG_FP16, TAG_FP32, TAG_INT8, parse_param_text, read_model

PARAM = """7767517
5 6
Input            in0      0 1 in0
Convolution      conv_0   1 1 in0 1 0=8 1=3 4=1 5=1 6=216 9=1
Split            splitncnn_0 1 2 1 2 3
BinaryOp         add_0    2 1 2 3 4 0=0
Reshape          reshape_0 1 1 4 out0 0=-1 -23301=3,1,2,3 2=1.5e-3 6="*(0h,0w),64"
"""


def test_parses_layers_blobs_and_array_params():
    g = parse_param_text(PARAM)
    assert [layer.type for layer in g.layers] == ["Input", "Convolution", "Split", "BinaryOp", "Reshape"]
    assert g.input_names == ["in0"] and g.output_names == ["out0"]
    conv = g.layers[1]
    assert conv.params[0] == 8 and conv.params[6] == 216 and conv.bottoms == ["in0"] and conv.tops == ["1"]
    reshape = g.layers[4]
    assert reshape.params[0] == -1 and reshape.params[1] == [1, 2, 3]
    assert reshape.params[2] == pytest.approx(1.5e-3)
    assert reshape.params[6] == "*(0h,0w),64"  # pnnx's expression for a dynamic shape
    assert g.producer("4").name == "add_0"


@pytest.mark.parametrize(
    "text, message",
    [
        ("nope\n1 1\n", "not an ncnn .param"),
        ("7767517\nx\n", "layer and blob counts"),
        ("7767517\n2 1\nInput in0 0 1 in0\n", "declares 2 layers"),
        ("7767517\n1 1\nInput in0 0 2 in0\n", "fewer blobs"),
        ("7767517\n1 1\nInput in0 0 1 in0 0=abc\n", "malformed parameter"),
    ],
)
def test_malformed_param_names_the_problem(text, message):
    with pytest.raises(SpecError, match=message):
        parse_param_text(text)


# --- checks before ncnn sees the files (ncnn crashes or misreads on some of these)


def tag(value: int = TAG_FP32) -> bytes:
    return struct.pack("<I", value)


def floats(n: int) -> bytes:
    return np.zeros(n, dtype="<f4").tobytes()


def write(tmp_path, layers: list[str], weights: bytes, blobs: int | None = None):
    tops = sum(int(line.split()[3]) for line in layers)
    param, bin_ = tmp_path / "m.param", tmp_path / "m.bin"
    param.write_text(f"7767517\n{len(layers)} {blobs or tops}\n" + "\n".join(layers) + "\n")
    bin_.write_bytes(weights)
    return param, bin_


FC = ["Input in0 0 1 in0 0=16", "InnerProduct fc 1 1 in0 out0 0=10 1=1 2=160"]
IN = "Input in0 0 1 in0"
LN = ["Input in0 0 1 in0 0=16", "LayerNorm ln 1 1 in0 n 0=16 2=1"]
CONV = ["Input in0 0 1 in0 0=8 1=8 2=3", "Convolution conv 1 1 in0 c 0=4 1=3 5=1 6=108", "ReLU r 1 1 c out0"]


@pytest.mark.parametrize(
    "layers, weights",
    [
        (FC, tag() + floats(160) + floats(10)),
        (FC, tag(TAG_FP16) + bytes(2 * 160) + floats(10)),  # fp16 weights: 2 bytes each
        (FC, tag(TAG_INT8) + bytes(160) + floats(10)),
        (CONV, tag() + floats(108) + floats(4)),
        (
            ["Input in0 0 1 in0", "BatchNorm bn 1 1 in0 b 0=3", "Scale s 1 1 b out0 0=3 1=1"],
            floats(4 * 3 + 2 * 3),
        ),
        (["Input in0 0 1 in0", "ReLU r 1 1 in0 out0"], b""),
        (
            ["Input in0 0 1 in0", "Gemm g 1 1 in0 out0 5=1 6=1 7=2 8=3 9=4 10=4"],
            tag() + floats(12) + tag() + floats(3),
        ),
    ],
)
def test_files_that_match_pass(tmp_path, layers, weights):
    param, bin_ = write(tmp_path, layers, weights)
    assert read_model(param, bin_).graph.layers[-1].tops[-1] == "out0"


@pytest.mark.parametrize(
    "layers, weights, message",
    [
        (  # the weight count overreads the .bin: 1600 declared, 160 stored
            ["Input in0 0 1 in0 0=16", "InnerProduct fc 1 1 in0 out0 0=10 1=1 2=1600"],
            tag() + floats(160) + floats(10),
            r"does not match its \.param \(too short\): layer fc \(InnerProduct\) reads weights from byte 0 "
            r"up to byte 6444 "
            r"but the file has 684 bytes",
        ),
        (FC, tag() + floats(160), r"fc \(InnerProduct\) .* up to byte 684 but the file has 644"),  # no bias
        (FC, tag(TAG_FP16) + bytes(2 * 100) + floats(10), r"layer fc \(InnerProduct\)"),  # short fp16 weights
        (CONV, tag() + floats(100) + floats(4), r"layer conv \(Convolution\) reads weights from byte 0 "),
        (  # the second layer overreads: named, not the first
            CONV[:2] + ["ConvolutionDepthWise dw 1 1 c out0 0=4 1=3 5=0 6=72 7=4"],
            tag() + floats(108) + floats(4) + tag() + floats(30),
            r"layer dw \(ConvolutionDepthWise\) reads weights from byte 452 up to byte 744",
        ),
        (  # every layer's loads are known exactly and bytes are left over: the files do not belong together
            FC, tag() + floats(160) + floats(10) + floats(1000), r"its \.param: it has 4000 bytes more than",
        ),
        (  # after a layer whose loads are unknown only minimums count, and 1600 weights cannot fit in 684
            [*LN, "InnerProduct fc 1 1 n out0 0=10 2=1600"],
            tag() + floats(160) + floats(10),
            r"layer fc \(InnerProduct\) reads weights from byte \d+ at least up to byte",
        ),
    ],
)  # fmt: skip
def test_a_bin_that_does_not_fit_names_the_first_layer(tmp_path, layers, weights, message):
    param, bin_ = write(tmp_path, layers, weights)
    with pytest.raises(SpecError, match=message):
        read_model(param, bin_)


def test_unknown_layers_are_never_refused_on_a_guess(tmp_path):
    """LayerNorm's weights are not modelled: after it, a .bin with bytes to spare is not refused."""
    layers = [*LN, "InnerProduct fc 1 1 n out0 0=10 2=160"]
    param, bin_ = write(tmp_path, layers, floats(32) + tag(TAG_FP16) + bytes(320) + floats(500))
    read_model(param, bin_)


@pytest.mark.parametrize(
    "layers, blobs, message",
    [
        ([IN, "ReLU r 1 1 nowhere out0"], None, r"layer r \(ReLU\) reads blob 'nowhere', which no earlier"),
        ([IN, "ReLU r 1 1 b out0", "ReLU s 1 1 in0 b"], None, "which no earlier layer produces"),  # later
        ([IN, "ReLU r 1 1 in0 in0"], None, r"layer r \(ReLU\) produces blob 'in0', which layer in0 already"),
        ([IN, "ReLU r 1 1 in0 out0"], 1, "header declares 1 blobs but the layers produce 2"),
    ],
)  # fmt: skip
def test_malformed_structure_names_the_layer(tmp_path, layers, blobs, message):
    param, bin_ = write(tmp_path, layers, b"", blobs)
    with pytest.raises(SpecError, match=message):
        read_model(param, bin_)
