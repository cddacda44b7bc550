import pytest

from deploytool.errors import SpecError
from deploytool.ncnn_param import parse_param_text

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
