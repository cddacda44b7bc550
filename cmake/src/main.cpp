// deploytool_runner: run an ncnn model described by deploytool's meta.json on images, print JSON results.
//
//   deploytool_runner META.json INPUT... [--dump-raw DIR] [--threads N] [--repeat N]
//
// An INPUT ending in .npy is taken as an already preprocessed float32 tensor (1,C,H,W) and fed as is;
// any other INPUT is decoded (OpenCV's cv::imread, or ncnn's simpleocv cv::imread with stb_image when built
// with -DDEPLOYTOOL_IMAGE_DECODER=simpleocv) and preprocessed as meta.json says, with ncnn's pixel functions.

#include <cpu.h>
#include <net.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#if DEPLOYTOOL_SIMPLEOCV
#include <simpleocv.h>
#if !NCNN_SIMPLEOCV
#error "this libncnn was built without NCNN_SIMPLEOCV=ON; rebuild it (ARCH=aarch64 scripts/build_ncnn.sh does) or build the runner with -DDEPLOYTOOL_IMAGE_DECODER=opencv"
#endif
#else
#include <opencv2/core/utils/logger.hpp>
#include <opencv2/imgcodecs.hpp>
#endif

#include "npy.h"
#include "postprocess.h"

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

#if DEPLOYTOOL_SIMPLEOCV
const char* kImageDecoder = "stb_image";  // ncnn's simpleocv cv::imread
const char* kDecoderLabel = "stb_image";
// simpleocv's cv::Mat keeps its rows packed, without OpenCV's step.
int row_bytes(const cv::Mat& m) { return m.cols * m.channels(); }
#else
const char* kImageDecoder = "opencv";
const char* kDecoderLabel = "OpenCV";
int row_bytes(const cv::Mat& m) { return static_cast<int>(m.step[0]); }
#endif

struct Error : std::runtime_error {
    using std::runtime_error::runtime_error;
};

struct Meta {
    fs::path dir;
    std::string model, task, param, bin;
    std::string input_name, color, resize;
    int width = 0, height = 0;
    float pad_value = 114.f;
    std::vector<float> mean_vals, norm_vals;
    std::vector<std::string> outputs, labels;
    int top_k = 5;
    float confidence = 0.25f, iou = 0.45f;
    int num_classes = 0, max_det = 300;
    json ncnn_options = json::object();  // ncnn::Option fields set after the fp32 defaults (bench --tune)
};

// The ncnn::Option fields meta.json's "ncnn_options" may set: the same keys as deploytool's
// OPTION_TYPES (backends/ncnn_runner.py) and run_ncnn.py; "openmp_blocktime" (ms) is the one integer.
const std::vector<std::pair<std::string, bool ncnn::Option::*>> kBoolOptions = {
    {"lightmode", &ncnn::Option::lightmode},
    {"use_winograd_convolution", &ncnn::Option::use_winograd_convolution},
    {"use_winograd23_convolution", &ncnn::Option::use_winograd23_convolution},
    {"use_winograd43_convolution", &ncnn::Option::use_winograd43_convolution},
    {"use_winograd63_convolution", &ncnn::Option::use_winograd63_convolution},
    {"use_sgemm_convolution", &ncnn::Option::use_sgemm_convolution},
    {"use_packing_layout", &ncnn::Option::use_packing_layout},
    {"use_fp16_packed", &ncnn::Option::use_fp16_packed},
    {"use_fp16_storage", &ncnn::Option::use_fp16_storage},
    {"use_fp16_arithmetic", &ncnn::Option::use_fp16_arithmetic},
    {"use_bf16_packed", &ncnn::Option::use_bf16_packed},
    {"use_bf16_storage", &ncnn::Option::use_bf16_storage},
};
const char* kBlocktime = "openmp_blocktime";

bool ncnn::Option::*bool_option(const std::string& key) {
    for (const auto& kv : kBoolOptions)
        if (kv.first == key) return kv.second;
    return nullptr;
}

// Check "ncnn_options" before any work: an object whose keys are known and whose values have their type.
json check_options(const json& options, const std::string& where) {
    if (!options.is_object())
        throw Error(where + ": \"ncnn_options\" must be an object of ncnn::Option fields");
    for (const auto& kv : options.items()) {
        const std::string& key = kv.key();
        if (key == kBlocktime) {
            if (!kv.value().is_number_integer() || kv.value().get<long long>() < 0)
                throw Error(where + ": \"ncnn_options\" openmp_blocktime must be a whole number of "
                                    "milliseconds, 0 or more");
        } else if (bool_option(key) != nullptr) {
            if (!kv.value().is_boolean())
                throw Error(where + ": \"ncnn_options\" " + key + " must be true or false");
        } else {
            std::string known = kBlocktime;
            for (const auto& b : kBoolOptions) known += ", " + b.first;
            throw Error(where + ": unknown ncnn option \"" + key + "\" in \"ncnn_options\"; known: " + known);
        }
    }
    return options;
}

// Set the checked options on `opt`; returns what `opt` holds afterwards for those keys.
json apply_options(ncnn::Option& opt, const json& options) {
    json applied = json::object();
    for (const auto& kv : options.items()) {
        if (kv.key() == kBlocktime) {
            opt.openmp_blocktime = kv.value().get<int>();
            applied[kv.key()] = opt.openmp_blocktime;
        } else {
            bool ncnn::Option::*field = bool_option(kv.key());
            opt.*field = kv.value().get<bool>();
            applied[kv.key()] = opt.*field;
        }
    }
    return applied;
}

template <typename T>
T field(const json& j, const char* key, const std::string& where) {
    if (!j.contains(key)) throw Error(where + ": missing key \"" + key + "\"");
    try {
        return j.at(key).get<T>();
    } catch (const json::exception&) {
        throw Error(where + ": key \"" + key + "\" has the wrong type");
    }
}

template <typename T>
T field_or(const json& j, const char* key, T fallback, const std::string& where) {
    return j.contains(key) ? field<T>(j, key, where) : fallback;
}

Meta read_meta(const fs::path& path) {
    std::ifstream in(path);
    if (!in) throw Error(path.string() + ": cannot open meta.json");
    json j;
    try {
        j = json::parse(in);
    } catch (const json::parse_error& e) {
        throw Error(path.string() + ": not valid JSON (" + e.what() + ")");
    }
    const std::string where = path.string();
    if (field<int>(j, "schema", where) != 1) throw Error(where + ": unsupported schema (this runner reads 1)");
    Meta m;
    m.dir = path.parent_path();
    m.model = field_or<std::string>(j, "model", "?", where);
    m.task = field<std::string>(j, "task", where);
    if (m.task != "classify" && m.task != "detect")
        throw Error(where + ": task must be \"classify\" or \"detect\", got \"" + m.task + "\"");
    m.param = field<std::string>(j, "param", where);
    m.bin = field<std::string>(j, "bin", where);
    const json in_j = field<json>(j, "input", where);
    const std::string iw = where + " input";
    m.input_name = field<std::string>(in_j, "name", iw);
    m.width = field<int>(in_j, "width", iw);
    m.height = field<int>(in_j, "height", iw);
    m.color = field_or<std::string>(in_j, "color", "rgb", iw);
    m.resize = field_or<std::string>(in_j, "resize", "resize", iw);
    m.pad_value = field_or<float>(in_j, "pad_value", 114.f, iw);
    m.mean_vals = field_or<std::vector<float>>(in_j, "mean_vals", {0.f, 0.f, 0.f}, iw);
    m.norm_vals = field_or<std::vector<float>>(in_j, "norm_vals", {1.f, 1.f, 1.f}, iw);
    if (m.color != "rgb" && m.color != "bgr") throw Error(iw + ": color must be \"rgb\" or \"bgr\"");
    if (m.resize != "resize" && m.resize != "letterbox")
        throw Error(iw + ": resize must be \"resize\" or \"letterbox\"");
    if (m.width <= 0 || m.height <= 0) throw Error(iw + ": width and height must be positive");
    if (m.mean_vals.size() != 3 || m.norm_vals.size() != 3)
        throw Error(iw + ": mean_vals and norm_vals need 3 values each");
    m.outputs = field<std::vector<std::string>>(j, "outputs", where);
    if (m.outputs.empty()) throw Error(where + ": \"outputs\" is empty");
    m.labels = field_or<std::vector<std::string>>(j, "labels", {}, where);
    m.top_k = field_or<int>(j, "top_k", 5, where);
    if (m.task == "detect") {
        const json d = field<json>(j, "detect", where);
        const std::string dw = where + " detect";
        m.confidence = field_or<float>(d, "confidence", 0.25f, dw);
        m.iou = field_or<float>(d, "iou", 0.45f, dw);
        m.num_classes = field<int>(d, "num_classes", dw);
        m.max_det = field_or<int>(d, "max_det", 300, dw);
    }
    if (j.contains("ncnn_options")) m.ncnn_options = check_options(j.at("ncnn_options"), where);
    return m;
}

// Shape of an ncnn::Mat as NumPy would see it (ncnn has no batch axis), and its data in C order.
std::vector<int64_t> mat_shape(const ncnn::Mat& m) {
    switch (m.dims) {
    case 1: return {m.w};
    case 2: return {m.h, m.w};
    case 3: return {m.c, m.h, m.w};
    default: return {m.c, m.d, m.h, m.w};
    }
}

std::vector<float> mat_data(const ncnn::Mat& m) {
    if (m.elemsize != 4 || m.elempack != 1) throw Error("output is not unpacked float32");
    const size_t plane = static_cast<size_t>(m.w) * m.h * m.d;
    std::vector<float> out(plane * m.c);
    for (int q = 0; q < m.c; q++) {
        const float* p = m.channel(q);
        std::copy(p, p + plane, out.begin() + q * plane);
    }
    return out;
}

void save_mat(const fs::path& path, const ncnn::Mat& m) {
    std::vector<int64_t> shape = mat_shape(m);
    shape.insert(shape.begin(), 1);  // the batch axis ncnn drops
    const std::vector<float> data = mat_data(m);
    npy::save(path.string(), shape, data.data());
}

// Image -> network input with ncnn's pixel functions; mirrors deploytool's resize/letterbox geometry.
ncnn::Mat preprocess(const cv::Mat& bgr, const Meta& m, post::Geometry& g) {
    const int w = bgr.cols, h = bgr.rows;
    const int type = m.color == "rgb" ? ncnn::Mat::PIXEL_BGR2RGB : ncnn::Mat::PIXEL_BGR;
    g = post::Geometry{w, h, double(m.width) / w, double(m.height) / h, 0.0, 0.0};
    ncnn::Mat in;
    if (m.resize == "letterbox") {
        const double r = std::min(double(m.width) / w, double(m.height) / h);
        // nearbyint rounds half to even, like Python's round() on the deploytool side
        const int new_w = static_cast<int>(std::nearbyint(w * r));
        const int new_h = static_cast<int>(std::nearbyint(h * r));
        const int left = (m.width - new_w) / 2, top = (m.height - new_h) / 2;
        ncnn::Mat resized = ncnn::Mat::from_pixels_resize(bgr.data, type, w, h, row_bytes(bgr), new_w, new_h);
        ncnn::copy_make_border(resized, in, top, m.height - new_h - top, left, m.width - new_w - left,
                               ncnn::BORDER_CONSTANT, m.pad_value);
        g = post::Geometry{w, h, double(new_w) / w, double(new_h) / h, double(left), double(top)};
    } else {
        in = ncnn::Mat::from_pixels_resize(bgr.data, type, w, h, row_bytes(bgr), m.width, m.height);
    }
    if (in.empty()) throw Error("preprocessing produced an empty tensor");
    in.substract_mean_normalize(m.mean_vals.data(), m.norm_vals.data());
    return in;
}

ncnn::Mat load_npy_input(const fs::path& path, post::Geometry& g) {
    npy::Array a = npy::load(path.string());
    std::vector<int64_t> s = a.shape;
    if (s.size() == 4 && s[0] == 1) s.erase(s.begin());
    if (s.size() != 3)
        throw Error(path.string() + ": expected a (1,C,H,W) or (C,H,W) float32 tensor");
    const int c = static_cast<int>(s[0]), h = static_cast<int>(s[1]), w = static_cast<int>(s[2]);
    ncnn::Mat in(w, h, c);
    const size_t plane = static_cast<size_t>(w) * h;
    for (int q = 0; q < c; q++) std::copy_n(a.data.data() + q * plane, plane, static_cast<float*>(in.channel(q)));
    g = post::Geometry{w, h, 1.0, 1.0, 0.0, 0.0};
    return in;
}

std::string label_of(const Meta& m, int index) {
    return index >= 0 && index < static_cast<int>(m.labels.size()) ? m.labels[index] : std::string();
}

json classify(const Meta& m, const ncnn::Mat& out) {
    const std::vector<float> scores = mat_data(out);
    float mx = -INFINITY;
    for (float v : scores) mx = std::max(mx, v);
    double denom = 0.0;
    for (float v : scores) denom += std::exp(double(v) - mx);
    json top = json::array();
    for (const post::Ranked& r : post::top_k(scores, m.top_k)) {
        top.push_back({{"index", r.index},
                       {"score", r.score},
                       {"prob", std::exp(double(r.score) - mx) / denom},
                       {"label", label_of(m, r.index)}});
    }
    return top;
}

json detect(const Meta& m, const ncnn::Mat& out, const post::Geometry& g) {
    if (out.dims != 2 || out.h != 4 + m.num_classes)
        throw Error("detect output \"" + m.outputs[0] + "\" should be [4+num_classes, N] = [" +
                    std::to_string(4 + m.num_classes) + ", N]; got dims=" + std::to_string(out.dims) +
                    " h=" + std::to_string(out.h) + " w=" + std::to_string(out.w) +
                    " (check detect.num_classes in meta.json)");
    const std::vector<float> raw = mat_data(out);
    json dets = json::array();
    for (const post::Box& b :
         post::decode_nms(raw.data(), m.num_classes, out.w, m.confidence, m.iou, m.max_det, g)) {
        json d = {{"class_id", b.cls}};
        if (b.cls < static_cast<int>(m.labels.size())) d["class"] = m.labels[b.cls];
        d["score"] = b.score;
        d["box"] = {b.x1, b.y1, b.x2, b.y2};
        dets.push_back(d);
    }
    return dets;
}

bool ends_with_npy(const std::string& s) {
    return s.size() > 4 && s.compare(s.size() - 4, 4, ".npy") == 0;
}

int parse_int(const std::string& flag, const char* value) {
    try {
        size_t used = 0;
        const int v = std::stoi(value, &used);
        if (used == std::string(value).size() && v > 0) return v;
    } catch (const std::exception&) {
    }
    throw Error(flag + " needs a positive integer, got \"" + value + "\"");
}

const char* kUsage = "usage: deploytool_runner META.json INPUT... [--dump-raw DIR] [--threads N] [--repeat N]";

int run(int argc, char** argv) {
#if !DEPLOYTOOL_SIMPLEOCV
    cv::utils::logging::setLogLevel(cv::utils::logging::LOG_LEVEL_ERROR);  // errors are ours to report
#endif
    std::vector<std::string> positional;
    std::string dump_dir;
    int threads = ncnn::get_physical_big_cpu_count();
    int repeat = 1;
    for (int i = 1; i < argc; i++) {
        const std::string a = argv[i];
        if (a == "-h" || a == "--help") {
            std::cout << kUsage << "\n";
            return 0;
        }
        if (a == "--dump-raw" || a == "--threads" || a == "--repeat") {
            if (i + 1 >= argc) throw Error(a + " needs a value");
            const char* v = argv[++i];
            if (a == "--dump-raw") dump_dir = v;
            else if (a == "--threads") threads = parse_int(a, v);
            else repeat = parse_int(a, v);
        } else if (a.rfind("--", 0) == 0) {
            throw Error("unknown option " + a + "; " + kUsage);
        } else {
            positional.push_back(a);
        }
    }
    if (positional.size() < 2) throw Error(kUsage);

    const Meta m = read_meta(positional[0]);
    std::vector<fs::path> inputs(positional.begin() + 1, positional.end());
    if (!dump_dir.empty()) {
        std::set<std::string> stems;
        for (const fs::path& p : inputs)
            if (!stems.insert(p.stem().string()).second)
                throw Error("two inputs share the name \"" + p.stem().string() +
                            "\"; --dump-raw names files by it, so rename one");
        std::error_code ec;
        fs::create_directories(dump_dir, ec);
        if (ec) throw Error("cannot create --dump-raw folder " + dump_dir + ": " + ec.message());
    }

    ncnn::Net net;
    net.opt.num_threads = threads;
    net.opt.use_vulkan_compute = false;
    // fp32 everywhere, so results match ncnn's Python binding and PyTorch at ~1e-5
    net.opt.use_fp16_storage = false;
    net.opt.use_fp16_packed = false;
    net.opt.use_fp16_arithmetic = false;
    net.opt.use_bf16_storage = false;
    net.opt.use_bf16_packed = false;
    const json applied = apply_options(net.opt, m.ncnn_options);  // then what bench --tune chose, if anything
    const fs::path param = m.dir / m.param, bin = m.dir / m.bin;
    if (!fs::is_regular_file(param)) throw Error(param.string() + ": no such .param file (see meta.json \"param\")");
    if (!fs::is_regular_file(bin)) throw Error(bin.string() + ": no such .bin file (see meta.json \"bin\")");
    if (net.load_param(param.string().c_str()) != 0)
        throw Error(param.string() + ": ncnn could not load this .param (malformed or unknown layer)");
    if (net.load_model(bin.string().c_str()) != 0)
        throw Error(bin.string() + " does not match " + param.filename().string() + "; convert the model again");

    json results = json::array();
    for (const fs::path& path : inputs) {
        post::Geometry g;
        ncnn::Mat in;
        if (!fs::is_regular_file(path)) throw Error(path.string() + ": no such file");
        if (ends_with_npy(path.string())) {
            in = load_npy_input(path, g);
        } else {
            const cv::Mat bgr = cv::imread(path.string(), cv::IMREAD_COLOR);
            if (bgr.empty() || bgr.channels() != 3)
                throw Error(path.string() + ": not a readable image (" + kDecoderLabel + " could not decode it)");
            in = preprocess(bgr, m, g);
        }

        std::map<std::string, ncnn::Mat> outs;
        double total_ms = 0.0;
        for (int r = 0; r < repeat; r++) {
            const auto t0 = std::chrono::steady_clock::now();
            ncnn::Extractor ex = net.create_extractor();
            if (ex.input(m.input_name.c_str(), in) != 0)
                throw Error("the model has no input blob \"" + m.input_name + "\" (see meta.json input.name)");
            for (const std::string& name : m.outputs) {
                ncnn::Mat out;
                if (ex.extract(name.c_str(), out) != 0)
                    throw Error("extracting output \"" + name + "\" failed (see meta.json \"outputs\")");
                outs[name] = out;
            }
            total_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        }

        if (!dump_dir.empty()) {
            const std::string stem = path.stem().string();
            save_mat(fs::path(dump_dir) / (stem + ".input.npy"), in);
            for (const auto& kv : outs) save_mat(fs::path(dump_dir) / (stem + "." + kv.first + ".npy"), kv.second);
        }

        json item = {{"input", path.string()},
                     {"width", g.orig_w},
                     {"height", g.orig_h},
                     {"latency_ms", total_ms / repeat}};
        if (m.task == "classify") item["top_k"] = classify(m, outs.at(m.outputs[0]));
        else item["detections"] = detect(m, outs.at(m.outputs[0]), g);
        results.push_back(item);
    }

    const json doc = {{"schema", 1},
                      {"runner", "deploytool_runner"},
                      {"model", m.model},
                      {"task", m.task},
                      {"threads", threads},
                      {"image_decoder", kImageDecoder},
                      {"ncnn_options", applied},
                      {"results", results}};
    std::cout << doc.dump(2) << std::endl;
    return 0;
}

}  // namespace

int main(int argc, char** argv) {
    try {
        return run(argc, argv);
    } catch (const std::exception& e) {
        std::cerr << "deploytool_runner: error: " << e.what() << std::endl;
        return 2;
    }
}
