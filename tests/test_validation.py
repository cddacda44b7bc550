"""Bad input is refused before any work starts, with one SpecError line (exit 2) that says what is wrong:
spec values of the wrong type or range, unsafe names, user factories that fail, absurd shapes, truncated
images, a bad --opset, --converter or --onnx2ncnn, a corrupt file for `deploytool convert`. Also: the
spec search path, and a converter's scratch files never land beside the user's file or in --out."""

from __future__ import annotations

import copy
import math
import stat
import sys
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from deploytool import convert as convert_mod
from deploytool.cli import app
from deploytool.convert import check_converter, check_onnx2ncnn, convert, convert_file
from deploytool.errors import BackendUnavailable, ConvertError, SpecError
from deploytool.export import check_opset, export_onnx
from deploytool.inputs import read_image
from deploytool.judge import tolerance_at
from deploytool.model import build_model
from deploytool.progress import PREFIX as PROGRESS_PREFIX
from deploytool.spec import DetectSettings, ModelSpec, available_models, model_dirs
from deploytool.spec_toml import MAX_INPUT_ELEMENTS, load_spec, parse_shape, spec_from_dict

REPO = Path(__file__).resolve().parent.parent
PHOTO = REPO / "images" / "chelsea.jpg"
BASE = {
    "name": "m",
    "factory": "pkg.mod:build",
    "task": "classify",
    "factory_args": {"num_classes": 10},
    "input": {"name": "input", "shape": [1, 3, 32, 32]},
    "output": {"names": ["logits"]},
    "preprocess": {"color": "rgb", "resize": "resize", "scale": 0.5, "mean": [0, 0, 0], "std": [1, 1, 1]},
    "task_args": {"top_k": 5},
    "tolerance": {"default": {"atol": 1e-4, "rtol": 1e-4}},
}
NAN = float("nan")


def _with(path: str, value) -> dict:
    """BASE with the dotted key `path` set to `value`."""
    data = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    table = data
    for key in parents:
        table = table.setdefault(key, {})
    table[last] = value
    return data


def _refused(data: dict, *needles: str) -> str:
    with pytest.raises(SpecError) as info:
        spec_from_dict(data, "m.toml")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    return message


def _one_clear_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if not ln.startswith(PROGRESS_PREFIX)]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# ---------------------------------------------------------------- spec values: types, ranges, keys


def test_the_base_spec_is_valid():
    spec = spec_from_dict(BASE, "m.toml")
    assert spec.task_args == {"top_k": 5} and spec.preprocess.scale == 0.5


@pytest.mark.parametrize(
    "key, value, needles",
    [
        ("preprocess.pad_value", "grey", ["preprocess.pad_value", "'grey'"]),
        ("preprocess.pad_value", 300, ["preprocess.pad_value", "[0, 255]"]),
        ("preprocess.pad_value", True, ["preprocess.pad_value"]),
        ("preprocess.scale", "x", ["preprocess.scale", "'x'"]),
        ("preprocess.scale", 0, ["preprocess.scale", "> 0"]),
        ("preprocess.scale", -1.0, ["preprocess.scale"]),
        ("preprocess.scale", math.inf, ["preprocess.scale"]),
        ("preprocess.mean", [0, NAN, 0], ["preprocess.mean", "finite"]),
        ("preprocess.std", ["a", 1, 1], ["preprocess.std"]),
        ("preprocess", "rgb", ["preprocess must be a TOML table"]),
        ("tolerance", 5, ["tolerance must be a TOML table", "got 5"]),
        ("tolerance.default", 5, ["tolerance.default must be a table"]),
        ("tolerance.default.atol", NAN, ["tolerance.default.atol", "finite", "nan"]),
        ("tolerance.default.atol", -1e-3, ["tolerance.default.atol", ">= 0"]),
        ("tolerance.default.rtol", -1, ["tolerance.default.rtol", ">= 0"]),
        ("tolerance.default.rtol", "1e-3", ["tolerance.default.rtol"]),
        ("tolerance.default.atol", True, ["tolerance.default.atol"]),
        ("tolerance.default.outputs", {"logits": {"atol": 1, "rtol": math.inf}}, ["outputs.logits.rtol"]),
        ("tolerance.default.outputs", {"boxes": {"atol": 1, "rtol": 1}}, ["no output named 'boxes'"]),
        ("tolerance.default.outputs", 3, ["tolerance.default.outputs must be a TOML table"]),
        ("input", [1, 3, 32, 32], ["input must be a TOML table"]),
        ("input.shape", "1,3,32,32", ["input.shape", "positive integers"]),
        ("input.shape", [1, 3, "a", 32], ["input.shape"]),
        ("input.shape", [1, 3, 32.0, 32], ["input.shape"]),
        ("input.shape", [True, 3, 32, 32], ["input.shape"]),
        ("input.shape", [], ["input.shape"]),
        ("input.shape", [1, 3, 100000, 100000], ["input.shape", "limit", "2**28"]),
        ("input.name", "", ["input.name"]),
        ("input.name", 3, ["input.name"]),
        ("input.dynamic_shapes", [1, 3, 64, 64], ["input.dynamic_shapes"]),
        ("input.dynamic_shapes", "[[1, 3, 64, 64]]", ["input.dynamic_shapes must be a list"]),
        ("input.dynamic_shapes", [[1, 3, 0, 64]], ["input.dynamic_shapes"]),
        ("input.dynamic_shapes", [[1, 3, 64]], ["1,3,H,W"]),
        ("output", ["logits"], ["output must be a TOML table"]),
        ("output.names", "logits", ["output.names", "list of non-empty strings"]),
        ("output.names", [], ["output.names"]),
        ("output.names", [1], ["output.names"]),
        ("output.names", ["a", "a"], ["output.names has duplicates"]),
        ("factory_args", 3, ["factory_args must be a TOML table"]),
        ("factory_args", [1, 2], ["factory_args must be a TOML table"]),
        ("pnnx.moduleop", "a.B", ["pnnx.moduleop", "list of non-empty strings"]),
        ("pnnx.moduleop", [1], ["pnnx.moduleop"]),
        ("task_args", 5, ["task_args must be a TOML table"]),
        ("description", 3, ["description must be a string"]),
        ("factory", "pkg.mod.build", ["factory", "package.module:function"]),
        ("factory", "pkg/mod:build", ["factory"]),
    ],
)
def test_a_value_of_the_wrong_type_or_range_names_its_key(key, value, needles):
    _refused(_with(key, value), "m.toml", *needles)


@pytest.mark.parametrize(
    "key, value, needles",
    [
        ("preprocess.scal", 1.0, ["unknown key(s) scal", "did you mean 'scale'"]),
        ("input.shap", [1, 3, 8, 8], ["input", "unknown key(s) shap", "did you mean 'shape'"]),
        ("output.name", ["x"], ["output", "did you mean 'names'"]),
        ("pnnx.moduleops", [], ["pnnx", "did you mean 'moduleop'"]),
        ("tolerance.default.atoll", 1.0, ["tolerance.default", "did you mean 'atol'"]),
        ("tolerance.default.outputs", {"logits": {"atol": 1, "rtol": 1, "x": 2}}, ["outputs.logits", "x"]),
        (
            "tolerance.ncnn-vulcan",
            {"atol": 1, "rtol": 1},
            ["tolerance.ncnn-vulcan", "did you mean 'ncnn-vulkan'"],
        ),
        ("tolerance.ncnn-cpu-fp32", {"atol": 1, "rtol": 1}, ["tolerance.ncnn-cpu-fp32"]),
        ("inptu", {}, ["unknown key(s) inptu", "did you mean 'input'"]),
    ],
)
def test_unknown_keys_at_every_level_are_refused(key, value, needles):
    _refused(_with(key, value), *needles)


def test_known_tolerance_keys_are_accepted():
    data = _with(
        "tolerance", {k: {"atol": 1, "rtol": 1, "peak_rtol": 0.1} for k in ("fp16", "ncnn-cpu-bf16")}
    )
    spec = spec_from_dict(data, "m.toml")
    assert tolerance_at(spec, "ncnn-cpu", "bf16").peak_rtol == 0.1


@pytest.mark.parametrize(
    "name", ["../../x", "a/b", "", ".", "..", ".hidden", "-rf", "a b", "x" * 101, "a\\b"]
)
def test_a_name_that_is_not_a_safe_folder_name_is_refused(name):
    _refused(_with("name", name), "not a safe folder name", "out/NAME")


def test_safe_names_are_accepted():
    for name in ("resnet18", "yolov8n", "my_net-v2.1"):
        assert spec_from_dict(_with("name", name), "m.toml").name == name


@pytest.mark.parametrize(
    "args, needles",
    [
        ({"topk": 5}, ["unknown key(s) topk", "did you mean 'top_k'", "classify"]),
        ({"confidence": 0.3}, ["unknown key(s) confidence"]),
        ({"top_k": "five"}, ["task_args.top_k", "positive integer", "'five'"]),
        ({"top_k": 0}, ["task_args.top_k"]),
        ({"top_k": -1}, ["task_args.top_k"]),
        ({"top_k": 2.5}, ["task_args.top_k"]),
        ({"top_k": True}, ["task_args.top_k"]),
        ({"top_k": 11}, ["top_k = 11 is more than the model's 10 classes"]),
        ({"names": "cat,dog"}, ["task_args.names"]),
        ({"names": ["cat", 3]}, ["task_args.names"]),
    ],
)
def test_classify_task_args_are_checked_at_load(args, needles):
    _refused(_with("task_args", args), *needles)


def test_raw_models_take_no_task_args():
    data = _with("task_args", {"top_k": 5})
    data["task"] = "raw"
    _refused(data, "task 'raw' takes no task_args")


@pytest.mark.parametrize(
    "args, needles",
    [
        ({"confidance": 0.3}, ["unknown task_args", "did you mean 'confidence'"]),
        ({"confidence": 3}, ["task_args.confidence", "[0, 1]"]),
        ({"iou": NAN}, ["task_args.iou"]),
        ({"iou_min": True}, ["task_args.iou_min"]),
        ({"max_det": True}, ["task_args.max_det"]),
        ({"max_det": 0}, ["task_args.max_det"]),
        ({"box_tol_px": NAN}, ["task_args.box_tol_px"]),
        ({"box_tol_px": math.inf}, ["task_args.box_tol_px"]),
        ({"names": ["person", ""]}, ["task_args.names"]),
    ],
)
def test_detect_settings_are_checked_at_load(args, needles):
    with pytest.raises(SpecError) as info:
        DetectSettings.from_task_args(args, "m.toml")
    for needle in needles:
        assert needle in str(info.value)
    data = _with("task_args", args)
    data["task"] = "detect"
    _refused(data, *needles)


def test_image_models_take_one_1x3xHxW_photo():
    _refused(_with("input.shape", [1, 1, 32, 32]), "1,3,H,W", "got 1,1,32,32")
    _refused(_with("input.shape", [4, 3, 32, 32]), "1,3,H,W")
    _refused(_with("input.shape", [3, 32, 32]), "1,3,H,W")
    with pytest.raises(SpecError, match="1,3,H,W"):
        load_spec("resnet18", "1,3,224")  # --input-shape is checked the same way
    raw = _with("input.shape", [2, 7])
    raw.update(task="raw", task_args={})
    assert spec_from_dict(raw, "m.toml").input_shape == (2, 7)


def test_dynamic_shapes_must_have_the_input_rank():
    raw = _with("input", {"shape": [1, 16], "dynamic_shapes": [[1, 8, 8]]})
    raw.update(task="raw", task_args={})
    _refused(raw, "input.dynamic_shapes", "rank 3")


def _write(tmp_path: Path, text: str | bytes, name: str = "m.toml") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_toml_nan_and_negative_tolerances_are_refused(tmp_path):
    body = (REPO / "models" / "resnet18.toml").read_text()
    nan = body.replace("[tolerance.default]\natol = 1e-4", "[tolerance.default]\natol = nan")
    assert nan != body
    with pytest.raises(SpecError, match=r"tolerance.default.atol must be a finite number >= 0, got nan"):
        load_spec(str(_write(tmp_path, nan)))
    negative = body.replace(
        "[tolerance.default]\natol = 1e-4\nrtol = 1e-4", "[tolerance.default]\natol = 1e-4\nrtol = -1e-4"
    )
    with pytest.raises(SpecError, match="tolerance.default.rtol"):
        load_spec(str(_write(tmp_path, negative)))


def test_a_spec_that_is_not_utf8_is_refused(tmp_path):
    path = _write(tmp_path, b'name = "m"\n# caf\xe9\nfactory = "a:b"\n')
    with pytest.raises(SpecError, match=r"not UTF-8 text \(byte 0xe9 on line 2\)"):
        load_spec(str(path))


def test_a_spec_path_that_is_a_folder_is_refused(tmp_path):
    (tmp_path / "x.toml").mkdir()
    with pytest.raises(SpecError, match="is a folder"):
        load_spec(str(tmp_path / "x.toml"))


def test_every_bundled_spec_still_loads_unchanged():
    for name in ("resnet18", "yolov8n", "yolov8s"):
        spec = load_spec(name)
        assert spec.source == str(REPO / "models" / f"{name}.toml")
    assert load_spec("yolov8n").dynamic_shapes == [(1, 3, 320, 320), (1, 3, 384, 640)]


# ---------------------------------------------------------------- shapes


def test_an_absurd_input_shape_is_refused_with_the_limit():
    with pytest.raises(SpecError, match=r"--input-shape 1,3,100000,100000 has 30,000,000,000 elements"):
        parse_shape("1,3,100000,100000")
    with pytest.raises(SpecError, match="2\\*\\*28"):
        load_spec("deploytool.zoo.resnet:resnet18", "1,3,100000,100000")
    with pytest.raises(SpecError, match="limit"):
        load_spec("resnet18", "1,3,20000,20000")
    assert math.prod(parse_shape(f"1,{MAX_INPUT_ELEMENTS}")) == MAX_INPUT_ELEMENTS


@pytest.mark.parametrize("model", ["a.b:c:d", "pkg.mod:1build", "pkg..mod:build", ":build", "pkg mod:build"])
def test_a_malformed_import_spec_is_refused(model):
    with pytest.raises(SpecError, match="not an import spec"):
        load_spec(model, "1,3,8,8")


# ---------------------------------------------------------------- import-spec factories


def _module(tmp_path: Path, monkeypatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def _build(model: str, factory_args: dict | None = None):
    return build_model(ModelSpec(name="x", factory=model, factory_args=factory_args or {}))


FACTORIES = """
import sys
import torch

def raises():
    raise ValueError("no such variant 'tiny'\\nsecond line")

def not_a_module():
    return 42

def needs(depth, width=2):
    return torch.nn.Linear(depth, width)

def exits():
    sys.exit(0)

def ok():
    return torch.nn.Linear(2, 2)
"""


@pytest.mark.parametrize(
    "attr, args, needles",
    [
        (
            "raises",
            None,
            ["factory dtv_factories:raises raised ValueError: no such variant 'tiny'", "dtv_factories.py:"],
        ),
        ("not_a_module", None, ["returned int, not a torch.nn.Module"]),
        ("needs", None, ["cannot be called with no arguments", "depth", "factory_args table"]),
        ("needs", {"depth": 2, "height": 3}, ["cannot be called with depth, height", "height"]),
        ("exits", None, ["called sys.exit(0) instead of returning a model"]),
        ("missing", None, ["has no callable 'missing'"]),
    ],
)
def test_a_factory_that_fails_is_the_users_error(tmp_path, monkeypatch, attr, args, needles):
    _module(tmp_path, monkeypatch, "dtv_factories", FACTORIES)
    with pytest.raises(SpecError) as info:
        _build(f"dtv_factories:{attr}", args)
    message = str(info.value)
    assert "\n" not in message and "second line" not in message
    for needle in needles:
        assert needle in message, message


def test_a_working_factory_still_builds(tmp_path, monkeypatch):
    import torch

    _module(tmp_path, monkeypatch, "dtv_factories", FACTORIES)
    model = _build("dtv_factories:needs", {"depth": 3})
    assert isinstance(model, torch.nn.Linear) and not model.training


@pytest.mark.parametrize(
    "source, needles",
    [
        ("def build(:\n    pass\n", ["SyntaxError", "dtv_broken.py:1"]),
        ("import sys\nsys.exit(3)\n", ["importing 'dtv_broken'", "called sys.exit(3)"]),
        ("raise RuntimeError('boom')\n", ["importing 'dtv_broken'", "raised RuntimeError: boom"]),
        ("import dtv_not_installed_dependency\n", ["importing 'dtv_broken'", "dtv_not_installed_dependency"]),
    ],
)
def test_a_factory_module_that_cannot_be_imported_is_the_users_error(tmp_path, monkeypatch, source, needles):
    _module(tmp_path, monkeypatch, "dtv_broken", source)
    with pytest.raises(SpecError) as info:
        _build("dtv_broken:build")
    for needle in needles:
        assert needle in str(info.value), str(info.value)


def test_a_factory_module_that_does_not_exist(tmp_path):
    with pytest.raises(SpecError, match="no module named 'dtv_nowhere'.*PYTHONPATH"):
        _build("dtv_nowhere.sub:build")


def test_a_factory_calling_sys_exit_does_not_end_the_cli_with_exit_0(tmp_path, monkeypatch):
    _module(tmp_path, monkeypatch, "dtv_factories", FACTORIES)
    result = _invoke(
        "run", "dtv_factories:exits", "--input-shape", "1,2", "--backends", "torch,onnxruntime",
        "--out", tmp_path / "o",
    )  # fmt: skip
    _one_clear_line(result, 2, "called sys.exit(0)")


def test_weights_that_are_not_a_checkpoint(tmp_path):
    import torch

    garbage = _write(tmp_path, bytes(range(256)), "garbage.pt")
    with pytest.raises(SpecError, match="garbage.pt is not a readable PyTorch checkpoint"):
        build_model(ModelSpec(name="x", factory="torch.nn:Identity"), str(garbage))
    torch.save({"net": print}, tmp_path / "unsafe.pt")
    with pytest.raises(SpecError, match="needs unsafe unpickling"):
        build_model(ModelSpec(name="x", factory="torch.nn:Identity"), str(tmp_path / "unsafe.pt"))


# ---------------------------------------------------------------- images


def _photo_bytes() -> bytes:
    return PHOTO.read_bytes()


@pytest.fixture
def no_pillow(monkeypatch):
    """Pillow absent: the structural checks alone must catch truncation."""
    monkeypatch.setitem(sys.modules, "PIL", None)


@pytest.mark.parametrize("pillow", [True, False])
def test_a_truncated_jpeg_is_refused(tmp_path, monkeypatch, pillow):
    if not pillow:
        monkeypatch.setitem(sys.modules, "PIL", None)
    data = _photo_bytes()
    bad = _write(tmp_path, data[: len(data) // 2], "cut.jpg")
    img = cv2.imread(str(bad))
    assert img is not None  # OpenCV alone would accept it (with a libjpeg warning)
    with pytest.raises(SpecError, match="cut.jpg is a truncated or corrupt JPEG"):
        read_image(bad)


def test_a_truncated_progressive_jpeg_is_refused(tmp_path, no_pillow):
    ok, enc = cv2.imencode(".jpg", cv2.imread(str(PHOTO)), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    data = enc.tobytes()
    with pytest.raises(SpecError, match="FF D9"):
        read_image(_write(tmp_path, data[: len(data) * 2 // 3], "prog.jpg"))


def test_a_thumbnail_end_marker_does_not_hide_a_truncated_jpeg(tmp_path, no_pillow):
    data = _photo_bytes()
    thumbnail = b"Exif\x00\x00" + b"\xff\xd8" + b"\x00" * 20 + b"\xff\xd9"
    app1 = b"\xff\xe1" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    with_thumb = data[:2] + app1 + data[2:]
    assert cv2.imdecode(np.frombuffer(with_thumb, np.uint8), cv2.IMREAD_COLOR) is not None
    assert read_image(_write(tmp_path, with_thumb, "whole.jpg")).shape == (300, 451, 3)
    with pytest.raises(SpecError, match="truncated or corrupt JPEG"):
        read_image(_write(tmp_path, with_thumb[: len(with_thumb) - 5000], "cut.jpg"))


def test_a_jpeg_with_corrupt_data_is_refused_with_pillow(tmp_path):
    pytest.importorskip("PIL")
    data = bytearray(_photo_bytes())
    for i in range(5000, 6000, 7):
        data[i] = 0x55
    with pytest.raises(SpecError, match="bad.jpg is a truncated or corrupt JPEG image"):
        read_image(_write(tmp_path, bytes(data), "bad.jpg"))


def test_truncated_png_and_empty_files_are_refused(tmp_path, no_pillow):
    ok, enc = cv2.imencode(".png", cv2.imread(str(PHOTO)))
    data = enc.tobytes()
    with pytest.raises(SpecError, match="cut.png is a truncated PNG"):
        read_image(_write(tmp_path, data[: len(data) // 2], "cut.png"))
    with pytest.raises(SpecError, match="empty.jpg is empty"):
        read_image(_write(tmp_path, b"", "empty.jpg"))


def test_good_images_still_read(tmp_path):
    for photo in sorted((REPO / "images").glob("*.jpg")):
        assert read_image(photo).ndim == 3
    ok, enc = cv2.imencode(".png", cv2.imread(str(PHOTO)))
    assert read_image(_write(tmp_path, enc.tobytes(), "p.png")).shape == (300, 451, 3)
    padded = _write(tmp_path, _photo_bytes() + b"\x00" * 64, "padded.jpg")  # padding after EOI is fine
    assert read_image(padded).shape == (300, 451, 3)


def test_a_truncated_photo_fails_the_run_with_exit_2(tmp_path):
    data = _photo_bytes()
    bad = _write(tmp_path, data[: len(data) // 2], "cut.jpg")
    result = _invoke(
        "run", "resnet18", "--images", bad, "--backends", "torch,onnxruntime", "--out", tmp_path / "o"
    )
    _one_clear_line(result, 2, "cut.jpg", "truncated")


# ---------------------------------------------------------------- export / converter flags


def test_check_opset():
    assert check_opset(17) == 17
    for bad in (99, 6, 0, True):
        with pytest.raises(SpecError, match=f"--opset {bad} is outside"):
            check_opset(bad)


def test_export_onnx_refuses_a_bad_opset_before_writing(tmp_path):
    import torch

    with pytest.raises(SpecError, match="--opset 99"):
        export_onnx(torch.nn.ReLU(), torch.zeros(1, 2), tmp_path / "m.onnx", ["x"], ["y"], opset=99)
    assert not any(tmp_path.iterdir())


def test_check_converter():
    assert check_converter("pnnx-onnx") == "pnnx-onnx"
    with pytest.raises(SpecError, match="unknown converter 'tnn'; choose one of pnnx, pnnx-onnx, onnx2ncnn"):
        check_converter("tnn")
    with pytest.raises(SpecError, match="did you mean 'pnnx-onnx'"):
        check_converter("pnnx_onnx")


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_onnx2ncnn_paths_that_cannot_be_run(tmp_path, monkeypatch):
    with pytest.raises(SpecError, match="is a folder, not an executable"):
        check_onnx2ncnn(str(tmp_path))
    with pytest.raises(SpecError, match="does not exist"):
        check_onnx2ncnn(str(tmp_path / "onnx2ncnn"))
    plain = tmp_path / "plain"
    plain.write_text("#!/bin/sh\n")
    with pytest.raises(SpecError, match="is not an executable file"):
        check_onnx2ncnn(str(plain))
    tool = _executable(tmp_path / "onnx2ncnn", "#!/bin/sh\n")
    assert check_onnx2ncnn(str(tool)) == str(tool)
    monkeypatch.chdir(tmp_path)
    assert check_onnx2ncnn("./onnx2ncnn") == str(tool)  # absolute: the converter runs in a scratch folder
    with pytest.raises(SpecError, match="there is one at"):
        check_onnx2ncnn(str(tmp_path))


def test_no_onnx2ncnn_on_path_is_unavailable(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(BackendUnavailable, match="--converter pnnx-onnx"):
        check_onnx2ncnn(None)


# ---------------------------------------------------------------- deploytool convert FILE


def _onnx_file(path: Path, shape=(1, 3, 8, 8)) -> Path:
    import onnx
    from onnx import TensorProto, helper

    dims = list(shape)  # ints are fixed dimensions, strings symbolic ones
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _torchscript_file(path: Path) -> Path:
    import torch

    torch.jit.trace(torch.nn.Conv2d(3, 4, 1), torch.zeros(1, 3, 8, 8)).save(str(path))
    return path


def _convert_refused(tmp_path: Path, file: Path, *needles: str, **kwargs) -> str:
    kwargs.setdefault("input_shape", "1,3,8,8")
    with pytest.raises(SpecError) as info:
        convert_file(file, out=tmp_path / "o", **kwargs)
    for needle in needles:
        assert needle in str(info.value), str(info.value)
    assert not (tmp_path / "o").exists()  # refused before the converter ran
    return str(info.value)


def test_convert_refuses_unreadable_onnx(tmp_path):
    _convert_refused(tmp_path, _write(tmp_path, "hello world\n", "text.onnx"), "not a readable ONNX model")
    _convert_refused(tmp_path, _write(tmp_path, b"", "empty.onnx"), "empty.onnx is empty")
    good = _onnx_file(tmp_path / "good.onnx").read_bytes()
    cut = _write(tmp_path, good[: len(good) // 2], "cut.onnx")
    _convert_refused(tmp_path, cut, "cut.onnx is not a")
    no_ir = _write(tmp_path, b"\x08\x08", "no_ir.onnx")  # ir_version 8 and nothing else: fails the checker
    _convert_refused(tmp_path, no_ir, "not a valid ONNX model (onnx.checker")


def test_convert_refuses_unreadable_torchscript(tmp_path):
    import torch

    _convert_refused(tmp_path, _write(tmp_path, "not torchscript", "text.pt"), "not a TorchScript file")
    torch.save({"w": torch.zeros(2)}, tmp_path / "state.pt")
    _convert_refused(tmp_path, tmp_path / "state.pt", "torch.save checkpoint, not TorchScript")
    data = bytearray(_torchscript_file(tmp_path / "good.pt").read_bytes())
    with zipfile.ZipFile(tmp_path / "good.pt") as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith("data/0"))
    local = info.header_offset  # the local file header: 30 bytes, the name, then an extra field
    start = local + 30 + int.from_bytes(data[local + 26 : local + 28], "little")
    start += int.from_bytes(data[local + 28 : local + 30], "little")
    data[start + 2] ^= 0xFF  # flip a byte of a weight: its CRC no longer matches
    _convert_refused(tmp_path, _write(tmp_path, bytes(data), "flipped.pt"), "corrupt TorchScript archive")


def test_convert_refuses_other_suffixes_and_mismatched_converters(tmp_path):
    _convert_refused(
        tmp_path, _write(tmp_path, "x", "model.pth"), "TorchScript .pt or an .onnx file, not .pth"
    )
    _convert_refused(tmp_path, _write(tmp_path, "x", "model"), "a file without suffix")
    _convert_refused(tmp_path, tmp_path, "is a folder")
    _convert_refused(tmp_path, tmp_path / "nope.onnx", "does not exist")
    onnx_file = _onnx_file(tmp_path / "m.onnx")
    pt = _torchscript_file(tmp_path / "m.pt")
    _convert_refused(tmp_path, onnx_file, "--converter pnnx converts TorchScript", converter="pnnx")
    _convert_refused(tmp_path, pt, "use --converter pnnx", converter="onnx2ncnn")
    _convert_refused(tmp_path, pt, "unknown converter 'tnn'", converter="tnn")


def test_convert_checks_the_shape_syntax_before_the_file(tmp_path):
    text = _write(tmp_path, "not a model", "m.onnx")
    _convert_refused(tmp_path, text, "malformed --input-shape", input_shape="a,b")
    _convert_refused(tmp_path, text, "malformed --input-shape", input_shape="")
    garbage = _write(tmp_path, "not a model", "m.pt")
    _convert_refused(tmp_path, garbage, "pnnx needs the input shape", input_shape=None)


def test_convert_checks_the_shape_against_the_onnx_graph(tmp_path):
    onnx_file = _onnx_file(tmp_path / "m.onnx")
    _convert_refused(tmp_path, onnx_file, "malformed --input-shape", input_shape="1,3,x")
    _convert_refused(tmp_path, onnx_file, "declared 1,3,8,8 (rank 4, not 3)", input_shape="3,8,8")
    _convert_refused(tmp_path, onnx_file, "dimension 1 is 3, not 1", input_shape="1,1,8,8")
    _convert_refused(tmp_path, onnx_file, "limit", input_shape="1,3,100000,100000")
    _convert_refused(tmp_path, onnx_file, "--input-shape 1,3,8,8 (the shape", input_shape=None)
    dynamic = _onnx_file(tmp_path / "dyn.onnx", (1, 3, "h", "w"))
    _convert_refused(tmp_path, dynamic, "declared 1,3,?,? (dimension 1 is 3, not 4)", input_shape="1,4,16,16")


def test_convert_with_a_binary_that_is_not_onnx2ncnn(tmp_path, monkeypatch):
    onnx_file = _onnx_file(tmp_path / "m.onnx")
    _convert_refused(
        tmp_path, onnx_file, "is a folder, not an executable", converter="onnx2ncnn", onnx2ncnn=str(tmp_path)
    )
    _executable(tmp_path / "true", "#!/bin/sh\nexit 0\n")
    monkeypatch.chdir(tmp_path)  # a relative --onnx2ncnn path works although the tool runs elsewhere
    with pytest.raises(ConvertError) as info:
        convert_file(onnx_file, "onnx2ncnn", out=tmp_path / "o", onnx2ncnn="./true")
    message = str(info.value)
    assert "exited with code 0 but wrote no .param/.bin file, so it is probably not onnx2ncnn" in message
    assert ".tmp" not in message and info.value.exit_code == 3
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["logs"]


# ---------------------------------------------------------------- converter scratch files

FAKE_PNNX = """#!{python}
import sys
from pathlib import Path

source = Path(sys.argv[1])
args = dict(a.split("=", 1) for a in sys.argv[2:])
source.with_name(source.stem + ".foldable_constants.zip").write_bytes(b"")  # as pnnx does, beside its input
Path("debug.bin").write_bytes(b"")  # and anything written to its working folder
for key in ("pnnxparam", "pnnxbin", "pnnxpy", "pnnxonnx", "ncnnpy"):
    Path(args[key]).write_text(key)
if {fail}:
    print("pnnx: unsupported operator")
    sys.exit(1)
Path(args["ncnnparam"]).write_text("7767517\\n1 1\\nInput in0 0 1 in0\\n")
Path(args["ncnnbin"]).write_bytes(b"")
"""


def _fake_pnnx(tmp_path: Path, monkeypatch, fail: bool) -> None:
    tool = _executable(tmp_path / "fake-pnnx", FAKE_PNNX.format(python=sys.executable, fail=fail))
    monkeypatch.setattr(convert_mod, "find_pnnx", lambda: str(tool))


def _source(tmp_path: Path) -> Path:
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.pt").write_bytes(b"model")
    return folder / "model.pt"


def test_pnnx_scratch_files_land_neither_beside_the_source_nor_in_out(tmp_path, monkeypatch):
    _fake_pnnx(tmp_path, monkeypatch, fail=False)
    source, out = _source(tmp_path), tmp_path / "out"
    result = convert(source, out, "pnnx", (1, 3, 8, 8))
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.pt"]
    assert source.read_bytes() == b"model"
    assert sorted(p.name for p in out.iterdir()) == ["logs", "model.ncnn.bin", "model.ncnn.param", "pnnx"]
    assert sorted(p.name for p in (out / "pnnx").iterdir()) == sorted(convert_mod.PNNX_SIDE_FILES.values())
    assert result.input_names == ["in0"]


def test_a_failed_pnnx_leaves_only_its_log(tmp_path, monkeypatch):
    _fake_pnnx(tmp_path, monkeypatch, fail=True)
    source, out = _source(tmp_path), tmp_path / "out"
    with pytest.raises(ConvertError, match=r"convert \(pnnx\): fake-pnnx exited with code 1 .*unsupported"):
        convert(source, out, "pnnx", (1, 3, 8, 8))
    assert sorted(p.name for p in source.parent.iterdir()) == ["model.pt"]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["logs", "logs/pnnx.log"]


def test_an_interrupted_conversion_removes_its_scratch_folder(tmp_path, monkeypatch):
    def interrupted(cmd, log, stage, cwd=None, **kwargs):
        (Path(cwd) / "source" / "model.foldable_constants.zip").write_bytes(b"")  # 0 bytes, as after Ctrl-C
        raise KeyboardInterrupt

    _fake_pnnx(tmp_path, monkeypatch, fail=False)
    monkeypatch.setattr(convert_mod, "run_tool", interrupted)
    source, out = _source(tmp_path), tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        convert(source, out, "pnnx", (1, 3, 8, 8))
    assert list(out.iterdir()) == [] and sorted(p.name for p in source.parent.iterdir()) == ["model.pt"]


def test_a_pnnx_failure_is_still_exit_3_with_its_log(tmp_path, monkeypatch):
    _fake_pnnx(tmp_path, monkeypatch, fail=True)
    pt = _torchscript_file(tmp_path / "m.pt")
    result = _invoke("convert", pt, "--input-shape", "1,3,8,8", "--out", tmp_path / "o")
    _one_clear_line(result, 3, "convert (pnnx)", "pnnx.log", "unsupported operator")


def test_convert_cli_refuses_a_text_onnx_with_exit_2(tmp_path):
    bad = _write(tmp_path, "hello world\n", "m.onnx")
    _one_clear_line(
        _invoke("convert", bad, "--input-shape", "1,3,8,8"), 2, "m.onnx is not a readable ONNX model"
    )


# ---------------------------------------------------------------- where named specs are found


SPEC_TOML = """name = "{name}"
factory = "deploytool.zoo.resnet:resnet18"
task = "raw"
[input]
shape = [1, 3, 8, 8]
"""


def test_a_local_models_folder_does_not_hide_the_bundled_specs(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPLOYTOOL_MODELS", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert "resnet18" in available_models()  # an empty ./models
    assert load_spec("resnet18").source == str(REPO / "models" / "resnet18.toml")
    (tmp_path / "models" / "mine.toml").write_text(SPEC_TOML.format(name="mine"))
    names = available_models()
    assert {"mine", "resnet18", "yolov8n"} <= set(names) and names == sorted(names)
    assert load_spec("mine").input_shape == (1, 3, 8, 8)
    # first wins per name: ./models/resnet18.toml shadows the bundled one
    (tmp_path / "models" / "resnet18.toml").write_text(SPEC_TOML.format(name="resnet18"))
    spec = load_spec("resnet18")
    assert spec.source == str(tmp_path / "models" / "resnet18.toml") and spec.task == "raw"
    assert available_models().count("resnet18") == 1


def test_deploytool_models_comes_first(tmp_path, monkeypatch):
    (tmp_path / "specs").mkdir()
    (tmp_path / "specs" / "resnet18.toml").write_text(SPEC_TOML.format(name="resnet18"))
    monkeypatch.setenv("DEPLOYTOOL_MODELS", str(tmp_path / "specs"))
    assert model_dirs()[0] == tmp_path / "specs"
    assert load_spec("resnet18").task == "raw"
    assert load_spec("yolov8n").task == "detect"  # still found in the bundled folder
    monkeypatch.setenv("DEPLOYTOOL_MODELS", str(tmp_path / "nope"))
    with pytest.raises(SpecError, match="DEPLOYTOOL_MODELS names .*nope, which is not a folder"):
        load_spec("resnet18")


@pytest.mark.parametrize("model", ["../models/resnet18", "models/resnet18", "resnet18/"])
def test_a_name_is_never_a_path(model):
    with pytest.raises(SpecError, match="unknown model"):
        load_spec(model)


def test_nothing_is_written_outside_out_for_a_hostile_name(tmp_path, monkeypatch):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")  # `export` without --out writes out/NAME here
    spec_file = _write(tmp_path, SPEC_TOML.format(name="../../escaped"), "evil.toml")
    result = _invoke("export", spec_file, "--formats", "torchscript")
    _one_clear_line(result, 2, "not a safe folder name")
    assert not (tmp_path / "escaped").exists() and not any((tmp_path / "work").iterdir())
