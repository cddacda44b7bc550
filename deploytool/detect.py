"""Detection post-processing (decode, class-aware NMS) and detection-level parity between backends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import SpecError
from .results import DetectionParity, Geometry
from .spec import DetectSettings

# Two detections of one class overlapping less than this are different objects, not a poor match.
MATCH_IOU_FLOOR = 0.5


@dataclass
class Detections:
    """Boxes (xyxy, original-image pixels), scores and class ids, sorted by score, best first."""

    boxes: np.ndarray  # [n, 4] float32
    scores: np.ndarray  # [n] float32
    class_ids: np.ndarray  # [n] int64

    def __len__(self) -> int:
        return len(self.scores)

    @classmethod
    def empty(cls) -> Detections:
        return cls(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64))

    def above(self, threshold: float) -> Detections:
        """Only the detections scoring at least `threshold`."""
        keep = self.scores >= threshold
        return Detections(self.boxes[keep], self.scores[keep], self.class_ids[keep])

    def to_list(self, names: list[str] | None = None) -> list[dict[str, Any]]:
        """JSON-friendly list of detections."""
        out = []
        for box, score, cls in zip(self.boxes, self.scores, self.class_ids, strict=True):
            item = {
                "class_id": int(cls),
                "score": round(float(score), 6),
                "box": [round(float(v), 2) for v in box],
            }
            if names is not None and 0 <= cls < len(names):
                item["class"] = names[cls]
            out.append(item)
        return out


def postprocess(
    raw: np.ndarray,
    geometry: Geometry | None = None,
    conf: float = 0.25,
    iou: float = 0.45,
    max_det: int = 300,
    margin: float = 0.0,
) -> Detections:
    """Decoded head output [1, 4+nc, N] or [4+nc, N] (cx, cy, w, h, class scores) -> Detections.

    Each cell keeps its best class; candidates scoring at least `conf - margin` go through OpenCV's
    class-aware NMS (cv2.dnn.NMSBoxesBatched) at IoU `iou`; at most `max_det` survive, best first.
    Keeping candidates a `margin` below the threshold lets a parity check see the counterpart of a
    reference detection that sits just above it. Boxes are mapped to original-image pixels with
    `geometry` (left in network-input pixels when it is None); boxes lying wholly in the letterbox
    padding are dropped.
    """
    import cv2

    a = np.asarray(raw, dtype=np.float32)
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.shape[0] < 5:
        raise SpecError(f"detection output must have shape [1, 4+classes, N], got {list(np.shape(raw))}")
    cls_scores = a[4:]
    class_ids = cls_scores.argmax(0)
    scores = cls_scores[class_ids, np.arange(a.shape[1])]
    keep = np.flatnonzero(scores >= conf - margin)
    if keep.size == 0:
        return Detections.empty()
    cx, cy, w, h = a[0, keep], a[1, keep], a[2, keep], a[3, keep]
    xywh = np.stack([cx - w / 2, cy - h / 2, w, h], 1).astype(np.float64)
    picked = np.asarray(
        cv2.dnn.NMSBoxesBatched(
            xywh, scores[keep].astype(np.float32), class_ids[keep].astype(np.int32), conf - margin, iou
        ),
        dtype=np.int64,
    ).reshape(-1)
    picked = picked[np.argsort(-scores[keep][picked], kind="stable")][:max_det]
    idx = keep[picked]
    boxes = xywh[picked].copy()
    boxes[:, 2:] += boxes[:, :2]
    boxes = boxes.astype(np.float32)
    if geometry is not None:
        boxes = geometry.to_original(boxes)
        # A box wholly inside the letterbox padding clips to zero area: it shows nothing of the image.
        inside = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        boxes, idx = boxes[inside], idx[inside]
    return Detections(boxes, scores[idx].astype(np.float32), class_ids[idx].astype(np.int64))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: [n, 4] x [m, 4] -> [n, m]."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def _describe(d: Detections, i: int) -> str:
    box = ", ".join(f"{v:.1f}" for v in d.boxes[i])
    return f"class {int(d.class_ids[i])} score {float(d.scores[i]):.4f} box [{box}]"


def match_detections(
    ref: Detections,
    got: Detections,
    conf: float = 0.25,
    margin: float = 0.05,
    iou_min: float = 0.95,
    score_tol: float = 0.05,
    box_tol_px: float = 1.0,
) -> DetectionParity:
    """Match `got` to `ref` greedily by IoU within each class and judge the agreement.

    Passed when every detection scoring at least conf + margin on either side is matched with
    IoU >= iou_min (or, for boxes so thin that IoU cannot judge them, such as slivers clipped at the
    image border, every coordinate within box_tol_px) and |score difference| <= score_tol.
    Detections within `margin` of conf that find no partner are counted as borderline (they may
    legitimately cross the threshold between backends); detections below conf - margin are ignored.
    Choose score_tol <= 2 * margin, so that a strong detection's counterpart is never cut by
    post-processing's conf - margin floor.
    """
    floor = conf - margin
    ref, got = ref.above(floor), got.above(floor)
    iou = box_iou(ref.boxes, got.boxes)
    iou[ref.class_ids[:, None] != got.class_ids[None, :]] = 0.0
    pairs: list[tuple[int, int, float]] = []
    ref_free = np.ones(len(ref), bool)
    got_free = np.ones(len(got), bool)
    for flat in np.argsort(-iou, axis=None, kind="stable"):
        i, j = np.unravel_index(flat, iou.shape)
        if iou[i, j] < MATCH_IOU_FLOOR:
            break
        if ref_free[i] and got_free[j]:
            ref_free[i] = got_free[j] = False
            pairs.append((int(i), int(j), float(iou[i, j])))

    strong = conf + margin
    failures = []
    ious, diffs, shifts = [], [], []
    for i, j, pair_iou in pairs:
        diff = abs(float(ref.scores[i]) - float(got.scores[j]))
        shift = float(np.abs(ref.boxes[i] - got.boxes[j]).max())
        ious.append(pair_iou)
        diffs.append(diff)
        shifts.append(shift)
        if max(ref.scores[i], got.scores[j]) < strong:
            continue
        if pair_iou < iou_min and shift > box_tol_px:
            failures.append(
                f"IoU {pair_iou:.4f} < {iou_min}: ref {_describe(ref, i)} vs got {_describe(got, j)}"
            )
        if diff > score_tol:
            failures.append(
                f"|Δscore| {diff:.4f} > {score_tol}: ref {_describe(ref, i)} vs got {_describe(got, j)}"
            )
    borderline = 0
    for side, dets, free in (("ref", ref, ref_free), ("got", got, got_free)):
        for i in np.flatnonzero(free):
            if dets.scores[i] >= strong:
                failures.append(f"unmatched {side} detection: {_describe(dets, i)}")
            else:
                borderline += 1
    return DetectionParity(
        passed=not failures,
        conf=conf,
        margin=margin,
        iou_min=iou_min,
        score_tol=score_tol,
        n_ref=int((ref.scores >= conf).sum()),
        n_got=int((got.scores >= conf).sum()),
        matched=len(pairs),
        unmatched_ref=int(ref_free.sum()),
        unmatched_got=int(got_free.sum()),
        min_iou=min(ious) if ious else None,
        max_score_diff=max(diffs) if diffs else None,
        max_box_diff_px=max(shifts) if shifts else None,
        borderline=borderline,
        failures=failures,
    )


def compare_raw(
    ref_raw: np.ndarray, got_raw: np.ndarray, geometry: Geometry | None, settings: DetectSettings
) -> tuple[DetectionParity, Detections, Detections]:
    """Post-process two backends' raw outputs for one image the same way and match them."""
    s = settings
    ref = postprocess(ref_raw, geometry, s.conf, s.iou, s.max_det, s.margin)
    got = postprocess(got_raw, geometry, s.conf, s.iou, s.max_det, s.margin)
    return match_detections(ref, got, s.conf, s.margin, s.iou_min, s.score_tol, s.box_tol_px), ref, got


def _colour(class_id: int) -> tuple[int, int, int]:
    """A stable, well-spread BGR colour per class."""
    hue = (class_id * 47) % 180
    hsv = np.uint8([[[hue, 200, 255]]])
    import cv2

    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def draw(
    img: np.ndarray,
    detections: Detections,
    names: list[str] | tuple[str, ...] = (),
    conf: float | None = None,
) -> np.ndarray:
    """A copy of the BGR image with boxes and 'name score' labels (only scores >= conf when given)."""
    import cv2

    out = img.copy()
    dets = detections if conf is None else detections.above(conf)
    thickness = max(1, round(min(out.shape[:2]) / 300))
    font_scale = 0.4 * thickness
    for box, score, cls in zip(dets.boxes, dets.scores, dets.class_ids, strict=True):
        x1, y1, x2, y2 = (int(round(float(v))) for v in box)
        colour = _colour(int(cls))
        cv2.rectangle(out, (x1, y1), (x2, y2), colour, thickness, cv2.LINE_AA)
        name = names[cls] if 0 <= cls < len(names) else str(int(cls))
        label = f"{name} {float(score):.2f}"
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font_scale, thickness)
        top = y1 - th - base if y1 - th - base >= 0 else y1
        cv2.rectangle(out, (x1, top), (x1 + tw, top + th + base), colour, cv2.FILLED)
        cv2.putText(
            out,
            label,
            (x1, top + th),
            cv2.FONT_HERSHEY_SIMPLEX,
            font_scale,
            (0, 0, 0),
            thickness,
            cv2.LINE_AA,
        )
    return out
