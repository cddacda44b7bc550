// Reading and writing float32 .npy files (NumPy format 1.0), enough for tensors exchanged with Python.
#pragma once

#include <cstdint>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace npy {

struct Array {
    std::vector<int64_t> shape;
    std::vector<float> data;  // C order
};

inline void save(const std::string& path, const std::vector<int64_t>& shape, const float* data) {
    std::ostringstream dict;
    dict << "{'descr': '<f4', 'fortran_order': False, 'shape': (";
    size_t count = 1;
    for (size_t i = 0; i < shape.size(); i++) {
        dict << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
        if (i + 1 < shape.size()) dict << " ";
        count *= static_cast<size_t>(shape[i]);
    }
    dict << "), }";
    std::string header = dict.str();
    // magic (6) + version (2) + header length (2) + header + '\n', padded to a multiple of 64
    size_t total = 10 + header.size() + 1;
    header.append((64 - total % 64) % 64, ' ');
    header.push_back('\n');

    std::ofstream out(path, std::ios::binary);
    if (!out) throw std::runtime_error("cannot write " + path);
    const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
    out.write(magic, 8);
    const uint16_t len = static_cast<uint16_t>(header.size());
    const char len_le[2] = {static_cast<char>(len & 0xff), static_cast<char>(len >> 8)};
    out.write(len_le, 2);
    out.write(header.data(), static_cast<std::streamsize>(header.size()));
    out.write(reinterpret_cast<const char*>(data), static_cast<std::streamsize>(count * sizeof(float)));
    if (!out) throw std::runtime_error("failed writing " + path);
}

inline Array load(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    char magic[8];
    in.read(magic, 8);
    if (!in || std::string(magic, 6) != "\x93NUMPY") throw std::runtime_error(path + " is not a .npy file");
    uint32_t header_len = 0;
    if (magic[6] == 1) {
        unsigned char b[2];
        in.read(reinterpret_cast<char*>(b), 2);
        header_len = b[0] | (b[1] << 8);
    } else {
        unsigned char b[4];
        in.read(reinterpret_cast<char*>(b), 4);
        header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    }
    std::string header(header_len, '\0');
    in.read(&header[0], header_len);
    if (!in) throw std::runtime_error(path + ": truncated .npy header");
    if (header.find("'descr': '<f4'") == std::string::npos)
        throw std::runtime_error(path + ": only little-endian float32 .npy is supported (numpy dtype '<f4')");
    if (header.find("'fortran_order': False") == std::string::npos)
        throw std::runtime_error(path + ": Fortran-ordered arrays are not supported (use np.ascontiguousarray)");
    size_t open = header.find('(', header.find("'shape'"));
    size_t close = header.find(')', open);
    if (open == std::string::npos || close == std::string::npos)
        throw std::runtime_error(path + ": no shape in .npy header");
    Array a;
    std::stringstream dims(header.substr(open + 1, close - open - 1));
    std::string item;
    size_t count = 1;
    while (std::getline(dims, item, ',')) {
        if (item.find_first_not_of(" ") == std::string::npos) continue;
        a.shape.push_back(std::stoll(item));
        count *= static_cast<size_t>(a.shape.back());
    }
    a.data.resize(count);
    in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(count * sizeof(float)));
    if (!in) throw std::runtime_error(path + ": data shorter than its shape says");
    return a;
}

}  // namespace npy
