"""deploytool: PyTorch to ncnn with parity checks on every backend."""

__version__ = "0.1.0"
