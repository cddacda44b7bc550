#!/usr/bin/env python3
"""Run an ncnn model described by deploytool's meta.json on images; prints the same JSON as deploytool_runner.

Needs only ncnn, numpy and OpenCV:  pip install ncnn numpy opencv-python-headless

    python3 run_ncnn.py meta.json IMAGE... [--dump-raw DIR] [--threads N] [--repeat N]

An INPUT ending in .npy is an already preprocessed float32 tensor (1,C,H,W) and is fed as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import cv2
import ncnn
import numpy as np


class RunnerError(Exception):
    pass


# ncnn.Option fields that meta.json's "ncnn_options" may set (deploytool bench --tune), with their type:
# the same keys as deploytool_runner and deploytool's OPTION_TYPES. Set after the fp32 defaults.
BOOL_OPTIONS = (
    "lightmode", "use_winograd_convolution", "use_winograd23_convolution", "use_winograd43_convolution",
    "use_winograd63_convolution", "use_sgemm_convolution", "use_packing_layout", "use_fp16_packed",
    "use_fp16_storage", "use_fp16_arithmetic", "use_bf16_packed", "use_bf16_storage",
)  # fmt: skip
INT_OPTIONS = ("openmp_blocktime",)


def read_meta(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError as exc:
        raise RunnerError(f"{path}: cannot open meta.json ({exc.strerror})") from exc
    except json.JSONDecodeError as exc:
        raise RunnerError(f"{path}: not valid JSON ({exc})") from exc
    if meta.get("schema") != 1:
        raise RunnerError(f"{path}: unsupported schema (this runner reads 1)")
    for key in ("task", "param", "bin", "input", "outputs"):
        if key not in meta:
            raise RunnerError(f'{path}: missing key "{key}"')
    if meta["task"] not in ("classify", "detect"):
        raise RunnerError(f'{path}: task must be "classify" or "detect", got "{meta["task"]}"')
    inp = meta["input"]
    inp.setdefault("color", "rgb")
    inp.setdefault("resize", "resize")
    inp.setdefault("pad_value", 114)
    inp.setdefault("mean_vals", [0.0, 0.0, 0.0])
    inp.setdefault("norm_vals", [1.0, 1.0, 1.0])
    if inp["color"] not in ("rgb", "bgr"):
        raise RunnerError(f'{path} input: color must be "rgb" or "bgr"')
    if inp["resize"] not in ("resize", "letterbox"):
        raise RunnerError(f'{path} input: resize must be "resize" or "letterbox"')
    options = meta.setdefault("ncnn_options", {})
    if not isinstance(options, dict):
        raise RunnerError(f'{path}: "ncnn_options" must be an object of ncnn.Option fields')
    for key, value in options.items():
        if key in BOOL_OPTIONS:
            ok, want = type(value) is bool, "true or false"
        elif key in INT_OPTIONS:
            ok, want = type(value) is int and value >= 0, "a whole number of milliseconds, 0 or more"
        else:
            known = ", ".join(INT_OPTIONS + BOOL_OPTIONS)
            raise RunnerError(f'{path}: unknown ncnn option "{key}" in "ncnn_options"; known: {known}')
        if not ok:
            raise RunnerError(f'{path}: "ncnn_options" {key} must be {want}, got {value!r}')
    meta["dir"] = os.path.dirname(os.path.abspath(path))
    return meta


def preprocess(bgr: np.ndarray, inp: dict) -> tuple[ncnn.Mat, dict]:
    """Image -> network input with ncnn's pixel functions, plus the geometry back to the original."""
    h, w = bgr.shape[:2]
    width, height = inp["width"], inp["height"]
    ptype = ncnn.Mat.PixelType.PIXEL_BGR2RGB if inp["color"] == "rgb" else ncnn.Mat.PixelType.PIXEL_BGR
    bgr = np.ascontiguousarray(bgr)
    if inp["resize"] == "letterbox":
        r = min(width / w, height / h)
        new_w, new_h = round(w * r), round(h * r)
        left, top = (width - new_w) // 2, (height - new_h) // 2
        resized = ncnn.Mat.from_pixels_resize(bgr, ptype, w, h, new_w, new_h)
        mat = ncnn.copy_make_border(
            resized,
            top,
            height - new_h - top,
            left,
            width - new_w - left,
            ncnn.BorderType.BORDER_CONSTANT,
            float(inp["pad_value"]),
        )
        geom = {"w": w, "h": h, "sx": new_w / w, "sy": new_h / h, "px": left, "py": top}
    else:
        mat = ncnn.Mat.from_pixels_resize(bgr, ptype, w, h, width, height)
        geom = {"w": w, "h": h, "sx": width / w, "sy": height / h, "px": 0, "py": 0}
    mat.substract_mean_normalize(inp["mean_vals"], inp["norm_vals"])
    return mat, geom


def top_k(scores: np.ndarray, k: int, labels: list[str]) -> list[dict]:
    scores = scores.ravel().astype(np.float32)
    order = np.argsort(-scores, kind="stable")[:k]
    mx = float(scores.max())
    denom = float(np.exp(scores.astype(np.float64) - mx).sum())
    return [
        {
            "index": int(i),
            "score": float(scores[i]),
            "prob": math.exp(float(scores[i]) - mx) / denom,
            "label": labels[i] if i < len(labels) else "",
        }
        for i in order
    ]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def detect(raw: np.ndarray, meta: dict, geom: dict) -> list[dict]:
    """Decode [4+nc, N] (cx, cy, w, h, sigmoid scores), class-aware NMS, boxes in original pixels."""
    d = meta["detect"]
    nc = d["num_classes"]
    if raw.ndim != 2 or raw.shape[0] != 4 + nc:
        raise RunnerError(
            f"detect output should be [4+num_classes, N] = [{4 + nc}, N], got {list(raw.shape)} "
            "(check detect.num_classes in meta.json)"
        )
    raw = raw.astype(np.float32)
    cls = raw[4:].argmax(axis=0)
    score = raw[4:].max(axis=0)
    keep = np.nonzero(score >= np.float32(d.get("confidence", 0.25)))[0]
    keep = keep[np.argsort(-score[keep], kind="stable")]
    cx, cy, w, h = raw[0], raw[1], raw[2], raw[3]
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
    thr = np.float32(d.get("iou", 0.45))  # float32 throughout, like the C++ runner
    kept: list[int] = []
    for i in keep:
        if all(cls[k] != cls[i] or iou(boxes[k], boxes[i]) <= thr for k in kept):
            kept.append(int(i))
        if len(kept) >= d.get("max_det", 300):
            break
    labels = meta.get("labels", [])
    out = []
    for i in kept:
        x1, y1, x2, y2 = boxes[i]
        fx = lambda x: float(np.clip((x - geom["px"]) / geom["sx"], 0, geom["w"]))  # noqa: E731
        fy = lambda y: float(np.clip((y - geom["py"]) / geom["sy"], 0, geom["h"]))  # noqa: E731
        c = int(cls[i])
        item = {"class_id": c}
        if c < len(labels):
            item["class"] = labels[c]
        item.update(score=float(score[i]), box=[fx(x1), fy(y1), fx(x2), fy(y2)])
        out.append(item)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("meta")
    ap.add_argument("inputs", nargs="+")
    ap.add_argument("--dump-raw", metavar="DIR")
    ap.add_argument("--threads", type=int, default=ncnn.get_physical_big_cpu_count())
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args(argv)

    meta = read_meta(args.meta)
    inp = meta["input"]
    net = ncnn.Net()
    net.opt.num_threads = args.threads
    net.opt.use_vulkan_compute = False
    # fp32 everywhere, to match the C++ runner and PyTorch at ~1e-5
    net.opt.use_fp16_storage = False
    net.opt.use_fp16_packed = False
    net.opt.use_fp16_arithmetic = False
    net.opt.use_bf16_storage = False
    if hasattr(net.opt, "use_bf16_packed"):
        net.opt.use_bf16_packed = False
    for key, value in meta["ncnn_options"].items():  # then what bench --tune chose, if anything
        setattr(net.opt, key, value)
    applied = {key: getattr(net.opt, key) for key in meta["ncnn_options"]}
    param = os.path.join(meta["dir"], meta["param"])
    binf = os.path.join(meta["dir"], meta["bin"])
    for f in (param, binf):
        if not os.path.isfile(f):
            raise RunnerError(f"{f}: no such file (see meta.json)")
    if net.load_param(param) != 0:
        raise RunnerError(f"{param}: ncnn could not load this .param")
    if net.load_model(binf) != 0:
        raise RunnerError(f"{binf} does not match {os.path.basename(param)}; convert the model again")
    if args.dump_raw:
        os.makedirs(args.dump_raw, exist_ok=True)

    results = []
    for path in args.inputs:
        if path.endswith(".npy"):
            x = np.load(path).astype(np.float32)
            x = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
            mat = ncnn.Mat(np.ascontiguousarray(x))
            geom = {"w": x.shape[-1], "h": x.shape[-2], "sx": 1.0, "sy": 1.0, "px": 0, "py": 0}
        else:
            bgr = cv2.imread(path, cv2.IMREAD_COLOR)
            if bgr is None:
                raise RunnerError(f"{path}: not a readable image (OpenCV could not decode it)")
            mat, geom = preprocess(bgr, inp)
        outs = {}
        start = time.perf_counter()
        for _ in range(args.repeat):
            with net.create_extractor() as ex:
                ex.input(inp["name"], mat)
                for name in meta["outputs"]:
                    ret, out = ex.extract(name)
                    if ret != 0:
                        raise RunnerError(f'extracting output "{name}" failed (see meta.json "outputs")')
                    outs[name] = np.array(out)
        latency_ms = (time.perf_counter() - start) * 1000 / args.repeat
        if args.dump_raw:
            stem = os.path.splitext(os.path.basename(path))[0]
            np.save(os.path.join(args.dump_raw, f"{stem}.input.npy"), np.array(mat)[None].astype(np.float32))
            for name, arr in outs.items():
                np.save(os.path.join(args.dump_raw, f"{stem}.{name}.npy"), arr[None].astype(np.float32))
        item = {"input": path, "width": geom["w"], "height": geom["h"], "latency_ms": latency_ms}
        first = outs[meta["outputs"][0]]
        if meta["task"] == "classify":
            item["top_k"] = top_k(first, meta.get("top_k", 5), meta.get("labels", []))
        else:
            item["detections"] = detect(first, meta, geom)
        results.append(item)

    doc = {
        "schema": 1,
        "runner": "run_ncnn.py",
        "model": meta.get("model", "?"),
        "task": meta["task"],
        "threads": args.threads,
        "ncnn_options": applied,
        "results": results,
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RunnerError as exc:
        print(f"run_ncnn.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
