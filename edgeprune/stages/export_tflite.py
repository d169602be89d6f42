"""Export TFLite: the build's model (and the dense reference) as TFLite, checked against PyTorch on real test inputs.

The conversion (litert-torch, or the ONNX → onnx2tf fallback) is ``edgeprune.export.tflite``;
with ``export.tflite_channels_last`` parity feeds the file NHWC.
"""

from __future__ import annotations

from typing import Any

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig
from edgeprune.export import onnx2tf
from edgeprune.export.tflite import convert_for_target
from edgeprune.parity import verify_artifact
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import read_model, reference_pairs
from edgeprune.training import predict_logits


class ExportTflite:
    name = "export_tflite"
    version = "3"  # 3: onnx2tf fallback builds builtin-op Erf/GeLU and refuses Flex ops
    sections = ("export", "parity", "prune", "benchmark")
    consumes = ("model", "baseline_model")
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        if config.export.tflite_converter == "litert-torch":
            return {}
        return {"fallback": onnx2tf.versions()}  # which converter can run depends on them

    def run(self, context: StageContext) -> StageOutput:
        artifacts, metrics = [], {}
        for source, name in reference_pairs(context, "tflite_fp32"):
            model = read_model(context, source)
            path = context.workdir / f"{name}.tflite"
            conversion = convert_for_target(model, path, context.config.export, context.dataset.x_test, context.reporter)
            check = verify_artifact(
                name, path, "fp32", predict_logits(model, context.dataset.x_test),
                context.dataset.x_test, context.dataset.y_test, context.config.parity, layout=conversion["input_layout"],
            )  # fmt: skip
            artifacts.append(
                Artifact.from_file(name, "tflite", path, format="tflite", precision="fp32", parent=source, **conversion, **check)
            )
            metrics[name] = {**conversion, **check}
        return StageOutput(artifacts, metrics)
