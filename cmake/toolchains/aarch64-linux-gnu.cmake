# Cross-compiling for 64-bit ARM Linux boards (Raspberry Pi 4/5, Jetson, RK3588, ...) from x86_64.
# See ../README.md ("Cross-compiling"). Host packages (Debian/Ubuntu): apt-get install g++-aarch64-linux-gnu
#
# Without a sysroot (what deploytool builds and tests under qemu-aarch64): libncnn cross-built with
# this file and -DNCNN_SIMPLEOCV=ON (`ARCH=aarch64 scripts/build_ncnn.sh`), the host's header-only
# nlohmann-json, and one static executable that needs nothing on the board:
#
#   cmake -S cmake -B build/aarch64 -DCMAKE_BUILD_TYPE=Release \
#         -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DDEPLOYTOOL_IMAGE_DECODER=simpleocv -DDEPLOYTOOL_STATIC=ON \
#         -Dncnn_DIR=$HOME/.cache/deploytool/ncnn-<version>-aarch64/lib/cmake/ncnn
#
# With a sysroot (a copy of the board's / or a Debian arm64 chroot with OpenCV and nlohmann-json):
#
#   cmake -S cmake -B build/aarch64 \
#         -DCMAKE_TOOLCHAIN_FILE=cmake/toolchains/aarch64-linux-gnu.cmake \
#         -DCMAKE_SYSROOT=/srv/sysroot-arm64 \
#         -Dncnn_DIR=/srv/ncnn-aarch64/lib/cmake/ncnn
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(CROSS_PREFIX "aarch64-linux-gnu-" CACHE STRING "Prefix of the cross compiler binaries")
set(CMAKE_C_COMPILER "${CROSS_PREFIX}gcc")
set(CMAKE_CXX_COMPILER "${CROSS_PREFIX}g++")

# Search programs on the host, libraries and headers only in the sysroot / target prefixes.
if(CMAKE_SYSROOT)
    set(CMAKE_FIND_ROOT_PATH "${CMAKE_SYSROOT}")
endif()
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
# ncnn_DIR usually points outside the sysroot (a cross-built install); let find_package accept it.
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE BOTH)
