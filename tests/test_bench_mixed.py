"""bench --keep-fp32: an ncnn-cpu/int8-mixed row, the int8 model with the named layers kept fp32 (the list
`quantize --auto-mixed` prints), timed and judged at int8 beside the all-int8 row."""

from __future__ import annotations

import pytest
from conftest import IMAGES
from test_ort_int8 import tiny_spec  # noqa: F401 - the fixture: a tiny classifier the workers can import

from deploytool.bench import BenchOptions, bench_model
from deploytool.errors import SpecError
from deploytool.ncnn_param import read_param


def _bench(spec, out, keep):
    images = tuple(sorted(IMAGES.glob("*.jpg")))
    opts = BenchOptions(
        out=out, runs=2, warmup=1, threads=(1,), backends="torch,ncnn-cpu", images=images, keep_fp32=keep
    )
    return bench_model(spec, opts)


def test_the_mixed_row_keeps_the_named_layers_fp32_and_is_judged_at_int8(tiny_spec, tmp_path):  # noqa: F811
    probe = _bench(tiny_spec, tmp_path / "probe", ())
    int8_param = read_param(tmp_path / "probe" / "int8" / "model.int8.param")
    first = int8_param.int8_layers[0]
    report = _bench(tiny_spec, tmp_path / "b", (first,))
    names = [r.name for r in report.rows]
    assert names.index("ncnn-cpu/int8-mixed") == names.index("ncnn-cpu/int8") + 1
    mixed = report.row("ncnn-cpu/int8-mixed", 1)
    assert mixed.parity["tolerance"]["precision"] == "int8" and mixed.parity["passed"], mixed.parity
    kept = read_param(tmp_path / "b" / "int8-mixed" / "model.int8.param")
    assert first not in kept.int8_layers and set(kept.int8_layers) == set(int8_param.int8_layers) - {first}
    assert "ncnn-cpu/int8-mixed" not in [r.name for r in probe.rows]  # only with --keep-fp32


def test_keep_fp32_naming_no_layer_of_the_model_is_refused(tiny_spec, tmp_path):  # noqa: F811
    with pytest.raises(SpecError, match="--keep-fp32: layer 'nope' is not in"):
        _bench(tiny_spec, tmp_path, ("nope",))
    with pytest.raises(SpecError, match="add ncnn-cpu to --backends"):
        bench_model(
            tiny_spec, BenchOptions(out=tmp_path / "x", backends="torch,onnxruntime", keep_fp32=("a",))
        )
