"""int8 quantisation for ncnn, written by deploytool itself (ncnn's own tools are not in its wheel):
ncnn2table tables (table), scales (calibrate), the int8 .param/.bin (write); ONNX Runtime's int8 (ort)."""
