"""int8 quantization within an accuracy budget, per format: ONNX QDQ (``onnx``), TFLite (``tflite``) and
ExecuTorch (``pte``) quantizers behind one search (``search``: two-run tensor ranking, a ladder of fixes
cheapest first, a time limit), judged by a paired test (``gate``); ``budget`` ties them together for the
quantize stage, the inspection and the scripts."""
