"""Where the C++ runner executes: local, qemu-aarch64, ssh."""
