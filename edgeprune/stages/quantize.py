"""Quantize: int8 that never silently collapses accuracy (or fp16), verified against fp32 and PyTorch.

ONNX: onnxruntime's recommended pre-processing, then static quantization in QDQ format (per-channel
weights, int8 or uint8 activations, MinMax/Entropy/Percentile calibration), dynamic quantization, or
weight-only int8 (``activation_type = "float"``, ``edgeprune.onnx_compaction``). TFLite: litert-torch's
PT2E quantizer, full-integer int8 or dynamic range. ExecuTorch: PT2E with the XNNPACK quantizer.
Each within the accuracy budget and its search (``edgeprune.quantization.budget``); this stage reads
the model, the data and the fp32 artefacts and hands them over.
"""

from __future__ import annotations

from typing import Any

from edgeprune.config import BuildConfig
from edgeprune.errors import ConfigError
from edgeprune.quantization.budget import QuantizeInputs, quantize_artifact
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model
from edgeprune.training import predict_logits


class Quantize:
    name = "quantize"
    version = "4"  # 4: screened search, mix_cost in the meta
    sections = ("quantize", "parity", "export")
    consumes = ("model", "onnx_fp32", "tflite_fp32", "pte_fp32")
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        if config.quantize.scheme == "fp16" and "tflite" in config.export.formats:
            raise ConfigError("quantize.scheme = 'fp16' applies to ONNX only; use 'int8' or 'dynamic' for TFLite targets")
        weight_only = config.quantize.activation_type == "float"
        if weight_only and config.quantize.scheme == "dynamic":
            raise ConfigError(
                "quantize.activation_type = 'float' is weight-only int8; with scheme = 'dynamic' activations are "
                "quantized at run time: pick one"
            )
        if config.quantize.float_constants == "float16" and not (weight_only and config.quantize.scheme == "int8"):
            raise ConfigError(
                "quantize.float_constants = 'float16' applies to weight-only int8 ONNX "
                "(scheme = 'int8' with activation_type = 'float'); for a float16 model use scheme = 'fp16'"
            )
        if weight_only and config.quantize.scheme == "int8" and "tflite" in config.export.formats:
            raise ConfigError(
                "quantize.activation_type = 'float' (weight-only int8) applies to ONNX only; use scheme = 'dynamic' for TFLite"
            )
        return {}

    def run(self, context: StageContext) -> StageOutput:
        model, dataset, config = read_model(context), context.dataset, context.config
        inputs = QuantizeInputs(
            model,
            example_input(context),
            dataset.calibration_batches(config.data.calibration_samples, config.seed),
            dataset.x_test,
            dataset.y_test,
            predict_logits(model, dataset.x_test),
        )
        artifacts = [
            quantize_artifact(fmt, context.inputs[fp32_name], inputs, config, context.workdir, context.reporter)
            for fp32_name, fmt in (("onnx_fp32", "onnx"), ("tflite_fp32", "tflite"), ("pte_fp32", "pte"))
            if fp32_name in context.inputs
        ]
        return StageOutput(artifacts, {artifact.name: artifact.meta for artifact in artifacts})
