# Cross-compiling for 64-bit ARM Linux boards (Raspberry Pi 4/5, Jetson, RK3588, ...) from x86_64.
# Documented, not tested in CI. See ../README.md ("Cross-compiling").
#
# Host packages (Debian/Ubuntu):  apt-get install g++-aarch64-linux-gnu
# The target's libraries (ncnn built with this same file, OpenCV for arm64, nlohmann-json headers)
# live in a sysroot: a copy of the board's / (rsync) or a Debian arm64 chroot (debootstrap --arch=arm64).
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
