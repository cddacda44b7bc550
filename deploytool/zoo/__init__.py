"""PyTorch model definitions that deploytool's specs point at."""
