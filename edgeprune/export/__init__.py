"""Converters, file in → file out, with explicit arguments: ONNX (``onnx``), TFLite (``tflite``), and the
ONNX → onnx2tf TFLite fallback (``onnx2tf``). The export stages, the speed-up search, the sensitivity
analysis and the scripts all convert through them."""
