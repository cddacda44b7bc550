"""report.json schema, JUnit XML and task-level agreement, on synthetic results (no ncnn needed)."""

import json
import xml.etree.ElementTree as ET

import numpy as np
from rich.console import Console

from deploytool.judge import classify_agreement, compare_tensors
from deploytool.report import console_summary, write_json, write_junit
from deploytool.results import BackendResult, InputItem, RunReport
from deploytool.spec import Tolerance
from deploytool.spec_toml import load_spec


def _report(passed_second=True) -> RunReport:
    ref = np.linspace(-5, 5, 1000)
    got = ref.copy() if passed_second else ref + np.where(np.arange(1000) == 7, 0.3, 0.0)
    ident = {"reference": "torch", "input": "images/a.jpg", "output": "logits"}
    rows = [
        compare_tensors(ref, ref + 1e-7, Tolerance(1e-4, 1e-4), backend="ncnn-cpu", **ident),
        compare_tensors(ref, got, Tolerance(1e-4, 1e-4), backend="ncnn-vulkan", **ident),
    ]
    return RunReport(
        model="m",
        spec="m.toml",
        reference="torch",
        versions={"deploytool": "0"},
        artifacts={},
        input={},
        backends={
            "torch": BackendResult("torch", device="cpu", latency_ms_median=1.0, latency_method="test"),
            "ncnn-vulkan": BackendResult("ncnn-vulkan", available=False, reason="no device"),
        },
        stages={"export": {"seconds": 1.0}},
        comparisons=rows,
    )


def test_report_json_has_stable_schema_keys(tmp_path):
    path = write_json(_report(), tmp_path / "r.json")
    data = json.loads(path.read_text())
    assert {
        "schema",
        "model",
        "passed",
        "versions",
        "artifacts",
        "backends",
        "stages",
        "comparisons",
        "task",
    } <= set(data)
    row = data["comparisons"][0]
    assert {
        "backend",
        "reference",
        "input",
        "output",
        "max_abs",
        "max_rel",
        "mean_abs",
        "cosine",
        "atol",
        "rtol",
        "passed",
        "min_atol",
    } <= set(row)


def test_infinite_min_tolerance_is_valid_json(tmp_path):
    rep = _report()
    rep.comparisons.append(
        compare_tensors(
            np.zeros(3), np.ones(3), Tolerance(0, 0), backend="b", reference="torch", input="x", output="y"
        )
    )
    data = json.loads(write_json(rep, tmp_path / "r.json").read_text())
    assert data["comparisons"][-1]["min_rtol"] == "inf"


def test_junit_has_one_case_per_check_and_names_the_passing_tolerance(tmp_path):
    path = write_junit(_report(passed_second=False), tmp_path / "j.xml")
    suite = ET.parse(path).getroot()
    assert suite.get("tests") == "2" and suite.get("failures") == "1"
    failure = suite.find("testcase/failure")
    assert "smallest passing atol 0.3" in failure.get("message")


def test_console_summary_marks_failures_and_skips():
    console = Console(record=True, width=140)
    console_summary(_report(passed_second=False), console)
    text = console.export_text()
    assert "FAIL" in text and "FAILED" in text and "skipped ncnn-vulkan: no device" in text


def test_top1_disagreement_fails_the_task_check():
    spec = load_spec("resnet18")
    ref = [{"logits": np.array([[0.1, 0.9, 0.2, 0.0, 0.3, 0.4]])}]
    items = [InputItem("cat.jpg", {"input": np.zeros((1, 3, 2, 2), np.float32)})]
    same = classify_agreement(spec, items, ref, ref)
    assert same.passed and same.top1_agreement == 1.0
    swapped = [{"logits": np.array([[0.9, 0.1, 0.2, 0.0, 0.3, 0.4]])}]
    other = classify_agreement(spec, items, ref, swapped)
    assert not other.passed and other.top1_agreement == 0.0
    assert other.to_dict()["top1_agreement"] == 0.0 and "top5_agreement" in other.to_dict()
    row = other.per_input[0]
    assert row.input == "cat.jpg" and row.top1_margin_ref == np.float64(0.9) - np.float64(0.4)


def test_classify_agreement_names_the_classes_and_the_console_shows_a_swap():
    spec = load_spec("efficientnet_lite0")
    items = [InputItem("cat.jpg", {"input": np.zeros((1, 3, 2, 2), np.float32)})]
    ref = np.zeros((1, 1000), np.float32)
    ref[0, 281], ref[0, 282] = 5.0, 4.5  # tabby, tiger cat
    got = ref.copy()
    got[0, 282] = 6.0
    task = classify_agreement(spec, items, [{"logits": ref}], [{"logits": got}])
    row = task.per_input[0]
    assert row.names == ("tabby", "tiger cat")
    report = _report()
    report.task = {"ncnn-cpu": task}
    console = Console(record=True, width=140)
    console_summary(report, console)
    text = console.export_text()
    assert "cat.jpg: reference 'tabby' (margin 0.5), ncnn-cpu 'tiger cat'" in text
    assert "torch top-1: cat.jpg 'tabby'" in text


def test_a_near_tie_in_the_reference_is_reported_but_not_judged():
    spec = load_spec("resnet18")  # near_tie_margin 0.05: seeded weights give near-flat logits
    items = [InputItem(f"{n}.jpg", {"input": np.zeros((1, 3, 2, 2), np.float32)}) for n in ("a", "b")]
    ref = [{"logits": np.array([[1.0, 0.98, 0.0]])}, {"logits": np.array([[1.0, 0.5, 0.0]])}]
    tie_swapped = [{"logits": np.array([[0.98, 1.0, 0.0]])}, ref[1]]
    task = classify_agreement(spec, items, ref, tie_swapped)
    assert task.passed and task.top1_agreement == 1.0 and task.per_input[0].near_tie
    clear_swapped = [ref[0], {"logits": np.array([[0.5, 1.0, 0.0]])}]  # margin 0.5: judged, fails
    task = classify_agreement(spec, items, ref, clear_swapped)
    assert not task.passed and task.top1_agreement == 0.0
    report = _report()
    report.task = {"ncnn-cpu": classify_agreement(spec, items, ref, tie_swapped)}
    console = Console(record=True, width=160)
    console_summary(report, console)
    text = console.export_text()
    assert "(1 near-tie in the reference not judged)" in text and "(near-tie: not judged)" in text


def test_a_report_reads_back_from_its_json(tmp_path):
    """report.json -> RunReport.from_dict -> the same JSON, with task rows, layer rows and extras typed."""
    from deploytool.detect import Detections, match_detections
    from deploytool.results import DetectRow, LayerRow, TaskAgreement

    spec = load_spec("efficientnet_lite0")
    items = [InputItem("cat.jpg", {"input": np.zeros((1, 3, 2, 2), np.float32)})]
    logits = np.zeros((1, 1000), np.float32)
    logits[0, 281] = 5.0
    report = _report(passed_second=False)
    report.task = {"ncnn-cpu": classify_agreement(spec, items, [{"logits": logits}], [{"logits": logits}])}
    dets = Detections(np.array([[0, 0, 10, 10]], np.float32), np.array([0.9], np.float32), np.array([1]))
    parity = match_detections(dets, dets)
    report.task["ncnn-vulkan"] = TaskAgreement(
        "detect", True, [DetectRow("a.jpg", 1, parity)], detection_agreement=1.0
    )
    report.backends["ncnn-cpu"] = BackendResult(
        "ncnn-cpu", error="crashed", extra={"image_path": {"passed": False}}
    )
    report.layers = [LayerRow("ncnn-cpu vs interpreter", 0, "b", "conv", "Convolution", float("inf"), False)]
    report.first_failure = {"ncnn-cpu vs interpreter": report.layers[0]}
    data = json.loads(write_json(report, tmp_path / "r.json").read_text())
    again = RunReport.from_dict(data)
    assert again.to_dict() == data and not again.passed
    assert again.failed_image_paths == ["ncnn-cpu"] and again.verdicts["ncnn-vulkan"].tensors.failed == 1
