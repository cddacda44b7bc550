"""Detection post-processing and detection-level parity: fast, no converters, no ncnn."""

import numpy as np
import pytest

from deploytool.detect import (
    Detections,
    box_iou,
    compare_raw,
    draw,
    match_detections,
    postprocess,
)
from deploytool.errors import SpecError
from deploytool.inputs import letterbox
from deploytool.results import DetectionParity, Geometry
from deploytool.spec import DetectSettings

NC = 3


def dets(rows):
    """Detections from (x1, y1, x2, y2, score, class) rows."""
    if not rows:
        return Detections.empty()
    a = np.asarray(rows, np.float64)
    return Detections(a[:, :4].astype(np.float32), a[:, 4].astype(np.float32), a[:, 5].astype(np.int64))


def raw_from(cells):
    """A decoded head output [1, 4+NC, N] from (cx, cy, w, h, class, score) cells; other scores 0.01."""
    raw = np.full((1, 4 + NC, len(cells)), 0.01, np.float32)
    for j, (cx, cy, w, h, cls, score) in enumerate(cells):
        raw[0, :4, j] = (cx, cy, w, h)
        raw[0, 4 + cls, j] = score
    return raw


REF = dets([(10, 10, 110, 110, 0.9, 0), (200, 50, 300, 250, 0.6, 1), (400, 400, 450, 480, 0.4, 2)])


def test_identical_detections_pass():
    p = match_detections(REF, REF, conf=0.25, margin=0.05)
    assert p.passed and p.matched == 3 and p.unmatched_ref == p.unmatched_got == 0
    assert p.min_iou == pytest.approx(1.0) and p.max_score_diff == 0.0
    assert p.n_ref == p.n_got == 3


def test_shifted_boxes_fail():
    got = dets(
        [
            (b[0] + 3, b[1] + 3, b[2] + 3, b[3] + 3, s, c)
            for b, s, c in zip(REF.boxes, REF.scores, REF.class_ids, strict=True)
        ]
    )
    p = match_detections(REF, got, conf=0.25, margin=0.05, iou_min=0.95)
    assert not p.passed
    assert p.matched == 3 and p.min_iou < 0.95
    assert any("IoU" in f for f in p.failures)


def test_score_difference_fails_beyond_tolerance():
    got = dets([(10, 10, 110, 110, 0.8, 0), (200, 50, 300, 250, 0.6, 1), (400, 400, 450, 480, 0.4, 2)])
    assert not match_detections(REF, got, score_tol=0.05).passed
    assert match_detections(REF, got, score_tol=0.15).passed


def test_missing_strong_detection_fails():
    got = dets([(200, 50, 300, 250, 0.6, 1), (400, 400, 450, 480, 0.4, 2)])
    p = match_detections(REF, got, conf=0.25, margin=0.05)
    assert not p.passed and p.unmatched_ref == 1
    assert "unmatched ref" in p.failures[0]


def test_extra_strong_detection_fails():
    got = dets(
        [
            *((*b, s, c) for b, s, c in zip(REF.boxes, REF.scores, REF.class_ids, strict=True)),
            (500, 10, 600, 90, 0.7, 0),
        ]
    )
    p = match_detections(REF, got)
    assert not p.passed and p.unmatched_got == 1


def test_class_must_agree():
    got = dets([(10, 10, 110, 110, 0.9, 1), (200, 50, 300, 250, 0.6, 1), (400, 400, 450, 480, 0.4, 2)])
    p = match_detections(REF, got)
    assert not p.passed and p.unmatched_ref == 1 and p.unmatched_got == 1


def test_borderline_detection_may_flip():
    # Reference just above the threshold, the other backend just below (kept by the margin) or gone.
    ref = dets([(10, 10, 110, 110, 0.9, 0), (300, 300, 360, 380, 0.26, 1)])
    below = dets([(10, 10, 110, 110, 0.9, 0), (300, 300, 360, 380, 0.24, 1)])
    gone = dets([(10, 10, 110, 110, 0.9, 0)])
    p = match_detections(ref, below, conf=0.25, margin=0.05)
    assert p.passed and p.matched == 2 and p.n_ref == 2 and p.n_got == 1
    p = match_detections(ref, gone, conf=0.25, margin=0.05)
    assert p.passed and p.borderline == 1 and p.unmatched_ref == 1
    # The same flip outside the margin is a failure.
    strong = dets([(10, 10, 110, 110, 0.9, 0), (300, 300, 360, 380, 0.31, 1)])
    assert not match_detections(strong, gone, conf=0.25, margin=0.05).passed


def test_detections_below_the_margin_are_ignored():
    ref = dets([(10, 10, 110, 110, 0.9, 0), (300, 300, 360, 380, 0.1, 1)])
    got = dets([(10, 10, 110, 110, 0.9, 0)])
    p = match_detections(ref, got, conf=0.25, margin=0.05)
    assert p.passed and p.unmatched_ref == 0 and p.borderline == 0


def test_greedy_matching_prefers_highest_iou():
    ref = dets([(0, 0, 100, 100, 0.9, 0), (10, 0, 110, 100, 0.8, 0)])
    got = dets([(10, 0, 110, 100, 0.8, 0), (0, 0, 100, 100, 0.9, 0)])
    p = match_detections(ref, got)
    assert p.passed and p.min_iou == pytest.approx(1.0)


def test_empty_sides():
    p = match_detections(Detections.empty(), Detections.empty())
    assert p.passed and p.matched == 0 and p.min_iou is None and p.max_score_diff is None
    assert not match_detections(REF, Detections.empty()).passed


def test_to_dict_is_json_ready():
    import json

    d = match_detections(REF, REF).to_dict()
    assert json.loads(json.dumps(d)) == d
    assert {
        "passed",
        "matched",
        "unmatched_ref",
        "unmatched_got",
        "min_iou",
        "max_score_diff",
        "borderline",
    } <= set(d)
    assert isinstance(match_detections(REF, REF), DetectionParity)


def test_box_iou():
    iou = box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]]))
    np.testing.assert_allclose(iou, [[1.0, 1 / 3, 0.0]])


def test_postprocess_nms_is_class_aware():
    raw = raw_from(
        [
            (50, 50, 40, 40, 0, 0.9),
            (52, 50, 40, 40, 0, 0.8),  # same class, overlapping: suppressed
            (52, 50, 40, 40, 1, 0.7),  # other class, same place: kept
            (200, 200, 30, 30, 2, 0.5),
            (300, 300, 30, 30, 0, 0.1),  # below conf
        ]
    )
    d = postprocess(raw, None, conf=0.25, iou=0.45)
    assert len(d) == 3
    np.testing.assert_array_equal(d.class_ids, [0, 1, 2])
    np.testing.assert_allclose(d.scores, [0.9, 0.7, 0.5], rtol=1e-6)
    np.testing.assert_allclose(d.boxes[0], [30, 30, 70, 70])
    assert postprocess(raw[0], None).boxes.shape == (3, 4)  # [4+nc, N] accepted too


def test_postprocess_keeps_the_margin_and_max_det():
    raw = raw_from([(50, 50, 20, 20, 0, 0.9), (150, 50, 20, 20, 0, 0.22), (250, 50, 20, 20, 0, 0.18)])
    assert len(postprocess(raw, None, conf=0.25)) == 1
    d = postprocess(raw, None, conf=0.25, margin=0.05)
    np.testing.assert_allclose(d.scores, [0.9, 0.22], rtol=1e-6)
    assert len(postprocess(raw, None, conf=0.1, max_det=2)) == 2


def test_postprocess_empty_and_bad_shape():
    assert len(postprocess(raw_from([(50, 50, 20, 20, 0, 0.1)]), None)) == 0
    with pytest.raises(SpecError, match="4\\+classes"):
        postprocess(np.zeros((1, 3, 10), np.float32), None)


def test_postprocess_maps_to_the_original_image():
    img = np.zeros((300, 600, 3), np.uint8)  # letterboxed into 640x640: scale 640/600, pad top
    _, geom = letterbox(img, 640, 640, 114)
    assert geom.pad_x == 0 and geom.pad_y == pytest.approx(160)
    # A box in network pixels covering the image's centre quarter.
    s = geom.scale_x
    cx, cy = 300 * s, 150 * s + geom.pad_y
    raw = raw_from([(cx, cy, 300 * s, 150 * s, 0, 0.9), (30, 180, 100, 100, 1, 0.8)])
    d = postprocess(raw, geom)
    np.testing.assert_allclose(d.boxes[0], [150, 75, 450, 225], atol=1e-3)
    # The second box reaches into the padding: clipped to the image.
    assert d.boxes[1].min() >= 0 and d.boxes[1][3] <= 300
    # A box wholly in the top padding shows nothing of the image: dropped.
    assert len(postprocess(raw_from([(300, 50, 100, 60, 0, 0.9)]), geom)) == 0


def test_geometry_identity():
    g = Geometry(640, 640, 1.0, 1.0, 0.0, 0.0)
    raw = raw_from([(100, 100, 20, 40, 0, 0.9)])
    np.testing.assert_allclose(postprocess(raw, g).boxes, postprocess(raw, None).boxes)


def test_compare_raw_end_to_end():
    raw = raw_from([(100, 100, 50, 50, 0, 0.9), (300, 300, 60, 60, 1, 0.6), (400, 100, 40, 40, 2, 0.26)])
    settings = DetectSettings()
    p, ref, got = compare_raw(raw, raw + np.float32(1e-5), None, settings)
    assert p.passed and p.matched == 3 and len(ref) == len(got) == 3
    shifted = raw.copy()
    shifted[0, 0] += 4  # every box 4 px to the right
    assert not compare_raw(raw, shifted, None, settings)[0].passed


def test_settings_from_task_args():
    s = DetectSettings.from_task_args({"confidence": 0.3, "iou": 0.5, "names": ["a", "b"], "max_det": 10})
    assert s.conf == 0.3 and s.iou == 0.5 and s.names == ("a", "b") and s.max_det == 10
    with pytest.raises(SpecError, match="unknown task_args"):
        DetectSettings.from_task_args({"confidance": 0.3})
    with pytest.raises(SpecError, match="confidence|conf"):
        DetectSettings.from_task_args({"confidence": 3})


def test_draw_marks_the_image():
    img = np.zeros((200, 300, 3), np.uint8)
    d = dets([(20, 30, 120, 150, 0.9, 0), (150, 20, 280, 190, 0.2, 1)])
    out = draw(img, d, ["person", "bicycle"], conf=0.25)
    assert out.shape == img.shape and img.sum() == 0  # input untouched
    assert out[30:150, 20:120].any() and not out[60:150, 160:270].any()


def test_thin_box_at_the_border_passes_within_box_tolerance_but_not_beyond():
    from deploytool.detect import Detections, match_detections

    def one(box, score=0.8):
        return Detections(np.array([box], np.float32), np.array([score], np.float32), np.array([3]))

    ref = one([18.3, 339.1, 59.5, 341.0])  # a 1.9 px sliver clipped at the bottom edge
    got = one([18.3, 339.35, 59.5, 341.0])  # 0.25 px off: IoU ~0.87
    assert match_detections(ref, got, iou_min=0.95, box_tol_px=1.0).passed
    assert not match_detections(ref, got, iou_min=0.95, box_tol_px=0.1).passed
    moved = one([22.3, 339.1, 63.5, 341.0])  # 4 px sideways: a real difference
    result = match_detections(ref, moved, iou_min=0.95, box_tol_px=1.0)
    assert not result.passed and result.max_box_diff_px == pytest.approx(4.0, abs=1e-3)
