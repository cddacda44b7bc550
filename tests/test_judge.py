import numpy as np
import pytest

from deploytool.judge import compare_tensors, topk_agreement
from deploytool.spec import Tolerance

IDENT = {"backend": "b", "reference": "torch", "input": "x", "output": "y"}


def test_identical_tensors_pass_with_zero_error():
    a = np.linspace(-3, 3, 100, dtype=np.float32)
    c = compare_tensors(a, a.copy(), Tolerance(1e-6, 0), **IDENT)
    assert c.passed and c.max_abs == 0 and c.cosine == pytest.approx(1.0) and c.min_atol == 0


def test_small_error_within_tolerance_and_min_atol_reported():
    a = np.ones(10, dtype=np.float32)
    b = a + np.float32(3e-5)
    c = compare_tensors(a, b, Tolerance(1e-4, 0), **IDENT)
    assert c.passed
    assert c.max_abs == pytest.approx(3e-5, rel=1e-2)
    assert c.min_atol == pytest.approx(3e-5, rel=1e-2)


def test_error_beyond_tolerance_fails_and_names_passing_tolerance():
    a = np.zeros(10, dtype=np.float32)
    b = a.copy()
    b[3] = 0.5
    c = compare_tensors(a, b, Tolerance(1e-4, 1e-4), **IDENT)
    assert not c.passed and c.mismatched == 1
    assert c.min_atol == pytest.approx(0.5) and c.min_rtol == float("inf")


def test_rtol_scales_with_reference_magnitude():
    a = np.full(4, 1000.0, dtype=np.float32)
    b = a * (1 + 1e-5)
    assert compare_tensors(a, b, Tolerance(0, 1e-4), **IDENT).passed
    assert not compare_tensors(a, b, Tolerance(0, 1e-6), **IDENT).passed


def test_batch_axis_dropped_by_ncnn_is_aligned():
    a = np.arange(6, dtype=np.float32).reshape(1, 6)
    assert compare_tensors(a, a.reshape(6), Tolerance(0, 0), **IDENT).passed


def test_shape_mismatch_fails_with_reason():
    c = compare_tensors(np.zeros((1, 6)), np.zeros(5), Tolerance(1, 1), **IDENT)
    assert not c.passed and "shape mismatch" in c.reason


def test_nan_output_fails():
    b = np.zeros(4)
    b[0] = np.nan
    c = compare_tensors(np.zeros(4), b, Tolerance(1, 1), **IDENT)
    assert not c.passed and "NaN" in c.reason


def test_swapped_channels_fail_comparison():
    rng = np.random.default_rng(0)
    img = rng.standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert not compare_tensors(img, img[:, ::-1], Tolerance(1e-3, 1e-3), **IDENT).passed


def test_topk_agreement():
    ref = np.array([0.1, 0.9, 0.5, 0.3, 0.2, 0.0])
    same = topk_agreement(ref, ref, k=5)
    assert same.top1_match and same.topk_overlap == 1.0
    other = topk_agreement(ref, np.array([0.9, 0.1, 0.5, 0.3, 0.2, 0.0]), k=5)
    assert not other.top1_match and other.top1 == 0


def test_error_histogram_counts_per_decade():
    from deploytool.judge import HIST_EDGES_LOG10, error_histogram

    ref = np.zeros(4)
    got = np.array([0.0, 3e-7, 2e-3, 50.0])
    counts = error_histogram(ref, got)
    assert sum(counts) == 4 and len(counts) == len(HIST_EDGES_LOG10) + 1
    assert counts[0] == 1  # exact match
    assert counts[HIST_EDGES_LOG10.index(-7) + 1] == 1
    assert counts[HIST_EDGES_LOG10.index(-3) + 1] == 1
    assert counts[HIST_EDGES_LOG10.index(1) + 1] == 1


# ---------------------------------------------------------------- tolerances, verdicts, budgets


def test_peak_rtol_scales_with_the_tensor_range():
    ref = np.array([100.0, 0.0, 1.0])
    got = ref + np.array([0.0, 0.5, 0.5])
    assert not compare_tensors(ref, got, Tolerance(0, 0), **IDENT).passed
    loose = compare_tensors(ref, got, Tolerance(0, 0, peak_rtol=0.01), **IDENT)
    assert loose.passed and loose.peak_rel == pytest.approx(0.005)


def test_precision_a_backend_is_judged_at():
    from deploytool.registry import get_backend

    assert get_backend("ncnn-cpu").judged_precision("fp16") == "fp16"
    assert get_backend("ncnn-vulkan").judged_precision("bf16") == "bf16"
    assert get_backend("onnxruntime").judged_precision("fp16") == "fp32"  # takes no ncnn precision
    # pnnx fp16=1 weights
    assert get_backend("ncnn-cpu").judged_precision("fp32", fp16_weights=True) == "fp16"
    assert get_backend("ncnn-cpp").judged_precision("fp32", fp16_weights=True) == "fp16"
    assert get_backend("torch").judged_precision("fp32", fp16_weights=True) == "fp32"


def test_judge_backend_uses_the_precision_tolerance_and_the_spec_top_k():
    from dataclasses import replace

    from deploytool.judge import judge_backend, tolerance_at
    from deploytool.results import InputItem
    from deploytool.spec import ClassifySettings
    from deploytool.spec_toml import load_spec

    spec = replace(load_spec("resnet18"), classify=ClassifySettings(top_k=3))
    items = [InputItem("a.jpg", {}), InputItem("b.jpg", {})]
    rng = np.random.default_rng(0)
    ref = [{"logits": rng.standard_normal((1, 10))} for _ in items]
    got = [{"logits": r["logits"] + 0.01} for r in ref]
    fp32 = judge_backend(spec, "ncnn-cpu", "torch", items, ref, got, "fp32")
    fp16 = judge_backend(spec, "ncnn-cpu", "torch", items, ref, got, "fp16")
    assert not fp32.passed and fp16.passed  # 0.01 is outside fp32's 1e-4, inside fp16's tolerance
    assert fp16.precision == "fp16"
    assert fp16.comparisons[0].atol == tolerance_at(spec, "ncnn-cpu", "fp16").atol
    summary = fp16.summary()
    assert (
        summary["top1_agreement"] == 1.0 and "top3_agreement" in summary and "top5_agreement" not in summary
    )
    assert summary["max_abs"] == pytest.approx(0.01) and summary["passed"]
    assert [c.input for c in fp16.comparisons] == ["a.jpg", "b.jpg"]
    assert sum(fp16.histograms["logits"]) == 20


def test_budget_parses_short_and_long_names_and_judges_a_summary():
    from deploytool.judge import parse_budget

    budget = parse_budget("top1=1.0, rel=1e-2")
    assert budget == parse_budget("top1_agreement=1,peak_rel=0.01")
    assert budget.text == "top1_agreement=1,peak_rel=0.01"
    assert budget.failures({"top1_agreement": 1.0, "peak_rel": 0.001}) == []
    why = budget.failures({"top1_agreement": 0.75, "peak_rel": 0.2})
    assert why == ["top1_agreement 0.75 < 1", "peak_rel 0.2 > 0.01"]
    assert parse_budget("det=1").failures({"top1_agreement": 1.0}) == [
        "detection_agreement not measured for this task"
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("top1", "not key=value"),
        ("top2=1", "unknown key 'top2'; did you mean"),
        ("rel=x", "not a number"),
        ("rel=-1", ">= 0"),
        ("top1=2", r"\[0, 1\]"),
        ("rel=1,peak_rel=2", "given twice"),
    ],
)
def test_budget_errors_name_the_bad_part(text, match):
    from deploytool.errors import SpecError
    from deploytool.judge import parse_budget

    with pytest.raises(SpecError, match=match):
        parse_budget(text)
