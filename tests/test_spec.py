import pytest

from deploytool.errors import SpecError
from deploytool.judge import tolerance_at
from deploytool.spec import available_models
from deploytool.spec_toml import load_spec, parse_shape, spec_from_dict


def test_parse_shape_accepts_common_spellings():
    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape("[1, 3, 224, 224]") == (1, 3, 224, 224)
    assert parse_shape("1x3x32x32") == (1, 3, 32, 32)


@pytest.mark.parametrize("bad", ["", "1,3,a,4", "1,3,0,4", "1,-3,4,4", "abc"])
def test_parse_shape_rejects_malformed(bad):
    with pytest.raises(SpecError, match="--input-shape"):
        parse_shape(bad)


def test_unknown_model_suggests_close_name():
    with pytest.raises(SpecError, match="did you mean 'resnet18'"):
        load_spec("resnet81")


def test_import_spec_needs_input_shape():
    with pytest.raises(SpecError, match="--input-shape"):
        load_spec("deploytool.zoo.resnet:resnet18")
    spec = load_spec("deploytool.zoo.resnet:resnet18", "1,3,64,64")
    assert spec.input_shape == (1, 3, 64, 64) and spec.task == "raw"


def test_resnet18_spec_fields():
    spec = load_spec("resnet18")
    assert spec.input_shape == (1, 3, 224, 224)
    assert spec.preprocess.color == "rgb" and spec.task == "classify"
    assert tolerance_at(spec, "ncnn-cpu").atol == 1e-4
    assert tolerance_at(spec, "ncnn-vulkan").atol > tolerance_at(spec, "ncnn-cpu").atol
    assert tolerance_at(spec, "ncnn-cpu", "fp16").atol > tolerance_at(spec, "ncnn-cpu").atol


def test_every_spec_loads():
    names = available_models()
    assert "resnet18" in names
    for name in names:
        assert load_spec(name).name == name


@pytest.mark.parametrize(
    "data, message",
    [
        ({"factory": "a:b"}, "missing string key 'name'"),
        ({"name": "x", "factory": "a:b", "bogus": 1}, "unknown key"),
        ({"name": "x", "factory": "a:b", "task": "segment"}, "task"),
        ({"name": "x", "factory": "a:b", "input": {"shape": [1, 3, 0]}}, "input.shape"),
        ({"name": "x", "factory": "a:b", "preprocess": {"color": "rbg"}}, "preprocess.color"),
        ({"name": "x", "factory": "a:b", "preprocess": {"std": [1, 0, 1]}}, "std"),
        ({"name": "x", "factory": "a:b", "tolerance": {"default": {"atol": 1}}}, "atol and rtol"),
    ],
)
def test_spec_validation_names_the_key(data, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data, "test.toml")


def test_toml_syntax_error_is_a_spec_error(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(SpecError, match="invalid TOML"):
        load_spec(str(bad))


def test_per_output_and_per_precision_tolerances():
    spec = spec_from_dict(
        {
            "name": "x",
            "factory": "a:b",
            "output": {"names": ["boxes", "scores"]},
            "tolerance": {
                "default": {"atol": 1e-4, "rtol": 1e-4},
                "ncnn-vulkan": {
                    "atol": 1e-2,
                    "rtol": 1e-2,
                    "outputs": {"boxes": {"atol": 0.5, "rtol": 1e-2}},
                },
                "ncnn-vulkan-fp16": {"atol": 5e-2, "rtol": 5e-2},
            },
        },
        "t.toml",
    )
    assert tolerance_at(spec, "ncnn-vulkan", output="boxes").atol == 0.5
    assert tolerance_at(spec, "ncnn-vulkan", output="scores").atol == 1e-2
    assert tolerance_at(spec, "ncnn-vulkan", "fp16", output="scores").atol == 5e-2
    assert tolerance_at(spec, "onnxruntime", output="boxes").atol == 1e-4
