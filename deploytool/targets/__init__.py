"""Where the C++ runner executes: the local machine, an emulated aarch64 CPU (qemu-aarch64), or a board
over SSH. A backend name may carry a target after '@': `ncnn-cpp`, `ncnn-cpp@aarch64`,
`ncnn-cpp@aarch64:max`, `ncnn-cpp@ssh:pi@board.local:2222:deploytool`."""
