// Task post-processing on raw outputs: classification top-k, detection decode + class-aware NMS.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace post {

// How the original image maps into the network input: x_in = x_orig * scale + pad.
struct Geometry {
    int orig_w = 0, orig_h = 0;
    double scale_x = 1.0, scale_y = 1.0;
    double pad_x = 0.0, pad_y = 0.0;
};

struct Ranked {
    int index;
    float score;
};

// The k largest values (ties: lower index first).
inline std::vector<Ranked> top_k(const std::vector<float>& scores, int k) {
    std::vector<int> order(scores.size());
    std::iota(order.begin(), order.end(), 0);
    k = std::max(0, std::min<int>(k, static_cast<int>(scores.size())));
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int a, int b) {
        return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
    });
    std::vector<Ranked> out;
    for (int i = 0; i < k; i++) out.push_back({order[i], scores[order[i]]});
    return out;
}

struct Box {
    float x1, y1, x2, y2;
    float score;
    int cls;
};

inline float iou(const Box& a, const Box& b) {
    const float iw = std::max(0.f, std::min(a.x2, b.x2) - std::max(a.x1, b.x1));
    const float ih = std::max(0.f, std::min(a.y2, b.y2) - std::max(a.y1, b.y1));
    const float inter = iw * ih;
    const float uni = (a.x2 - a.x1) * (a.y2 - a.y1) + (b.x2 - b.x1) * (b.y2 - b.y1) - inter;
    return uni > 0.f ? inter / uni : 0.f;
}

// `raw` is [4 + num_classes, n] row-major: rows 0..3 cx, cy, w, h in input pixels, then class scores
// (already sigmoid-ed). Keeps the best class per anchor when its score >= confidence, then greedy NMS
// per class; boxes are returned in original-image pixels, clipped, highest score first.
inline std::vector<Box> decode_nms(const float* raw, int num_classes, int n, float confidence, float iou_thr,
                                   int max_det, const Geometry& g) {
    std::vector<Box> cand;
    for (int i = 0; i < n; i++) {
        int best = 0;
        float best_score = raw[4 * n + i];
        for (int c = 1; c < num_classes; c++) {
            const float s = raw[(4 + c) * n + i];
            if (s > best_score) best_score = s, best = c;
        }
        if (!(best_score >= confidence)) continue;
        const float cx = raw[i], cy = raw[n + i], w = raw[2 * n + i], h = raw[3 * n + i];
        cand.push_back({cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, best_score, best});
    }
    std::stable_sort(cand.begin(), cand.end(), [](const Box& a, const Box& b) { return a.score > b.score; });

    std::vector<Box> kept;
    for (const Box& b : cand) {
        bool keep = true;
        for (const Box& k : kept) {
            if (k.cls == b.cls && iou(k, b) > iou_thr) {
                keep = false;
                break;
            }
        }
        if (keep) kept.push_back(b);
        if (static_cast<int>(kept.size()) >= max_det) break;
    }
    for (Box& b : kept) {
        auto fx = [&](float x) {
            return static_cast<float>(std::clamp((x - g.pad_x) / g.scale_x, 0.0, double(g.orig_w)));
        };
        auto fy = [&](float y) {
            return static_cast<float>(std::clamp((y - g.pad_y) / g.scale_y, 0.0, double(g.orig_h)));
        };
        b.x1 = fx(b.x1), b.x2 = fx(b.x2), b.y1 = fy(b.y1), b.y2 = fy(b.y2);
    }
    return kept;
}

}  // namespace post
