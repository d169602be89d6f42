"""Quantize: int8 that never silently collapses accuracy (or fp16), verified against fp32 and PyTorch.

ONNX: onnxruntime's recommended pre-processing, then static quantization in QDQ
format (per-channel weights, int8 or uint8 activations, MinMax/Entropy/Percentile
calibration), dynamic quantization, or weight-only int8 (``activation_type = "float"``,
``edgeprune.onnx_compaction``); file in → file out. TFLite: litert-torch's
PT2E quantizer — full-integer int8 calibrated on real images (int8 model I/O, or
float I/O through a Quantize and a Dequantize op at the ends), or dynamic range.

The accuracy budget: every int8/dynamic artefact is run on the whole test split
and compared with its fp32 sibling. When it loses more than
``quantize.max_accuracy_drop`` top-1 points or agrees on fewer than
``quantize.min_top1_agreement`` of the predictions, the layers around the tensor
whose rounding alone hurts the logits most (``edgeprune.quant_sensitivity``) are
kept in float and the model is quantized again, until the budget holds; the layers kept
float and their cost in bytes are recorded in the artefact's meta (their latency
cost is what the benchmark stage measures). No more than ``max_float_layers``: past
that the stage fails (StageError, exit 3).
"""

from __future__ import annotations

import contextlib
import functools
import io
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig, QuantizeConfig
from edgeprune.errors import ConfigError, StageError
from edgeprune.export.executorch import PteQuantizer
from edgeprune.export.onnx import INPUT_NAME
from edgeprune.export.tflite import convert_tflite
from edgeprune.onnx_compaction import float16_constants, minify_names, quantize_weights
from edgeprune.parity import artifact_logits, check_parity, parity_report, tflite_interpreter
from edgeprune.quant_sensitivity import (
    TensorNoise,
    export_for_calibration,
    fake_quantize,
    module_path,
    onnx_activations,
    onnx_rounded_tensors,
    onnx_rounded_weights,
    onnx_tensor_noise,
    pt2e_tensor_noise,
)
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model
from edgeprune.training import predict_logits, top1_accuracy

SENSITIVITY_SAMPLES = 64  # calibration images on which each tensor's effect on the logits is measured


class Quantize:
    name = "quantize"
    version = "3"
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
        model = read_model(context)
        parent_logits = predict_logits(model, context.dataset.x_test)
        artifacts = [
            quantize_artifact(fmt, context.inputs[fp32_name], model, parent_logits, context)
            for fp32_name, fmt in (("onnx_fp32", "onnx"), ("tflite_fp32", "tflite"), ("pte_fp32", "pte"))
            if fp32_name in context.inputs
        ]
        return StageOutput(artifacts, {artifact.name: artifact.meta for artifact in artifacts})


def quantize_artifact(fmt: str, fp32: Artifact, model: nn.Module, parent_logits: np.ndarray, context: StageContext) -> Artifact:
    """``<fmt>_<scheme>`` from the fp32 artefact, within the accuracy budget and verified."""
    config, dataset, precision = context.config, context.dataset, context.config.quantize.scheme
    name = f"{fmt}_{precision}"
    path = context.workdir / f"{name}.{fmt}"
    fp32_logits = artifact_logits(fp32.path, dataset.x_test, layout=fp32.meta.get("input_layout"))
    if precision == "fp16":
        convert_onnx_fp16(fp32.path, path)
        logits, extra = artifact_logits(path, dataset.x_test), {}
    else:
        quantizer = make_quantizer(fmt, model, fp32, context)
        try:
            logits, extra = quantize_within_budget(
                name, fp32.name, quantizer, path, fp32_logits, dataset.x_test, dataset.y_test, config.quantize
            )
        finally:
            quantizer.close()
        if fmt == "onnx" and config.quantize.minify_names and minify_names(path, path):
            logits = artifact_logits(path, dataset.x_test)  # the shipped bytes are what parity checks
            extra["names_minified"] = True
    tolerance = "fp16" if precision == "fp16" else "int8"  # dynamic-range int8 is held to the int8 tolerance
    meta = verified(name, fp32.name, tolerance, logits, parent_logits, fp32_logits, dataset.y_test, config)
    return Artifact.from_file(name, fmt, path, format=fmt, precision=precision, parent=fp32.name, **meta, **extra)


def verified(name, fp32_name, tolerance, logits, parent_logits, fp32_logits, labels, config: BuildConfig) -> dict[str, Any]:
    """Accuracy, and parity against the torch parent and the fp32 sibling (ParityError when broken)."""
    count = min(config.parity.samples, len(labels))
    parity = parity_report(parent_logits[:count], logits[:count], labels[:count])
    check_parity(name, tolerance, parity, config.parity)
    versus_fp32 = parity_report(fp32_logits[:count], logits[:count], labels[:count])
    check_parity(name, tolerance, versus_fp32, config.parity, against=fp32_name)
    return {"accuracy": top1_accuracy(logits, labels), "parity": parity, "versus_fp32": versus_fp32}


# --------------------------------------------------------------------------- the accuracy budget


class LayerQuantizer(Protocol):
    """Quantizes one artefact with some layers kept float, and says which tensors are noisy."""

    layout: str | None  # the artefact's input layout for ``artifact_logits`` (None: detect)

    def quantize(self, path: Path, keep_float: tuple[str, ...]) -> None: ...

    def tensor_noise(self) -> list[TensorNoise]:
        """Rounding noise of the last ``quantize`` call's tensors, worst first."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def output_grid(self) -> tuple[float, int] | None:
        """(scale, zero-point) of an int8 model output of the last ``quantize`` call; None for a float output."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class BudgetCheck:
    accuracy_drop: float  # top-1 points lost against the fp32 artefact (negative: gained)
    top1_agreement: float  # fraction of test images where both predict the same class
    passed: bool


def check_budget(fp32_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, config: QuantizeConfig) -> BudgetCheck:
    drop = top1_accuracy(fp32_logits, labels) - top1_accuracy(logits, labels)
    agreement = float((fp32_logits.argmax(1) == logits.argmax(1)).mean())
    return BudgetCheck(round(drop, 4), agreement, drop <= config.max_accuracy_drop + 1e-9 and agreement >= config.min_top1_agreement)


def quantize_within_budget(
    name: str,
    fp32_name: str,
    quantizer: LayerQuantizer,
    path: Path,
    fp32_logits: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    config: QuantizeConfig,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Quantize into ``path``, keeping the noisiest layers float until the budget holds.

    ``fp32_logits`` are the fp32 sibling's logits for the test split (``images``, ``labels``).
    Returns the artefact's test-split logits and its meta: ``budget``, ``float_layers``,
    ``float_layers_size_bytes`` and, when the fallback kicked in, ``fallback`` (the first
    attempt, each round, the noisiest tensors). Raises StageError when even
    ``config.max_float_layers`` float layers do not meet the budget.
    """
    keep_float: tuple[str, ...] = ()
    quantizer.quantize(path, keep_float)
    logits = artifact_logits(path, images, layout=quantizer.layout)
    check = check_budget(fp32_logits, logits, labels, config)
    first, first_size, rounds, noisiest = check, path.stat().st_size, [], []
    if not check.passed:
        check_output_ceiling(name, fp32_name, quantizer.output_grid(), fp32_logits, labels, config)
    while not check.passed:
        noise = quantizer.tensor_noise()
        noisiest = noisiest or [item.to_dict() for item in noise[:5]]
        layers = next_float_layers(noise, keep_float)[: max(0, config.max_float_layers - len(keep_float))]
        if not layers:
            raise StageError(budget_message(name, fp32_name, check, keep_float, noise, config))
        keep_float = (*keep_float, *layers)
        quantizer.quantize(path, keep_float)
        logits = artifact_logits(path, images, layout=quantizer.layout)
        check = check_budget(fp32_logits, logits, labels, config)
        rounds.append({"kept_float": list(layers), **asdict(check)})
    meta: dict[str, Any] = {
        **quantizer.describe(),
        "budget": {"max_accuracy_drop": config.max_accuracy_drop, "min_top1_agreement": config.min_top1_agreement, **asdict(check)},
        "float_layers": list(keep_float),
        "float_layers_size_bytes": path.stat().st_size - first_size,
    }
    if rounds:
        meta["fallback"] = {"first_attempt": asdict(first), "rounds": rounds, "noisiest_tensors": noisiest}
    return logits, meta


def check_output_ceiling(
    name: str, fp32_name: str, grid: tuple[float, int] | None, fp32_logits: np.ndarray, labels: np.ndarray, config: QuantizeConfig
) -> None:
    """StageError when an int8 model output alone (its ``grid``: scale, zero-point) breaks the budget.

    Rounding the fp32 logits to that grid shows what no float layer can win back: the
    logits' margins are finer than one int8 step, so close calls become ties.
    """
    if grid is None:
        return
    rounded = fake_quantize(fp32_logits, np.float32(grid[0]), np.int8(grid[1]))
    ceiling = check_budget(fp32_logits, rounded, labels, config)
    if not ceiling.passed:
        raise StageError(
            f"{name}: its int8 output (scale {grid[0]:.4g}) alone agrees with {fp32_name} on {ceiling.top1_agreement:.4f} of the test "
            f"split and loses {ceiling.accuracy_drop:.2f} top-1 points, below quantize.min_top1_agreement = {config.min_top1_agreement} / "
            f"quantize.max_accuracy_drop = {config.max_accuracy_drop}: no float layer can fix that. Use quantize.tflite_io = 'float', "
            "or loosen the budget"
        )


def next_float_layers(noise: list[TensorNoise], keep_float: tuple[str, ...]) -> tuple[str, ...]:
    """The not-yet-float layers around the noisiest tensor that has any."""
    for item in noise:
        layers = tuple(layer for layer in item.layers if layer not in keep_float)
        if layers:
            return layers
    return ()


def budget_message(name, fp32_name, check: BudgetCheck, keep_float, noise: list[TensorNoise], config: QuantizeConfig) -> str:
    if config.max_float_layers == 0:
        tried = "and the float fallback is off (quantize.max_float_layers = 0)"
    else:
        tried = f"even with {len(keep_float)} layer(s) kept float ({', '.join(keep_float) or 'none left to keep'})"
    worst = ", ".join(f"{item.tensor} {item.sqnr_db:.1f} dB" for item in noise[:3]) or "unknown"
    return (
        f"{name}: quantization loses {check.accuracy_drop:.2f} top-1 points (agreement {check.top1_agreement:.4f}) against "
        f"{fp32_name} on the test split, over quantize.max_accuracy_drop = {config.max_accuracy_drop} / "
        f"quantize.min_top1_agreement = {config.min_top1_agreement}, {tried}; noisiest tensors: {worst}. "
        "Raise quantize.max_float_layers, try quantize.calibration = 'percentile' or 'entropy', or loosen the budget"
    )


# --------------------------------------------------------------------------- quantizers


def make_quantizer(fmt: str, model: nn.Module, fp32: Artifact, context: StageContext) -> LayerQuantizer:
    """The quantizer for ``fp32``'s format; TFLite keeps the fp32 file's input layout."""
    calibration = context.dataset.calibration_batches(context.config.data.calibration_samples, context.config.seed)
    if fmt == "onnx":
        return OnnxQuantizer(fp32.path, calibration, context.config.quantize, context.workdir)
    if fmt == "pte":  # ExecuTorch: PT2E with the XNNPACK quantizer, the same budget and float fallback
        return PteQuantizer(model, example_input(context), calibration, context.config.quantize)
    channels_last = fp32.meta.get("input_layout") == "NHWC"
    return TfliteQuantizer(model, example_input(context), calibration, context.config.quantize, channels_last)


class CalibrationReader:
    """onnxruntime's one-method calibration interface over preprocessed images."""

    def __init__(self, images: np.ndarray) -> None:
        self._samples = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self._samples, None)
        return None if sample is None else {INPUT_NAME: sample}


class OnnxQuantizer:
    """onnxruntime: the recommended pre-processing once, then static QDQ or dynamic quantization.

    Layers are node names of the pre-processed model (``nodes_to_exclude``).
    """

    def __init__(self, fp32_path: Path, calibration: np.ndarray, config: QuantizeConfig, scratch: Path) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.calibration, self.config, self.scratch = calibration, config, scratch
        self.layout = None
        self.prepared = scratch / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(self.prepared))
        self.path: Path | None = None
        self._activations: dict[str, np.ndarray] | None = None

    def quantize(self, path: Path, keep_float: tuple[str, ...]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

        self.path, config = path, self.config
        if config.activation_type == "float":
            quantize_weights(self.prepared, path, config.per_channel, keep_float)
            if config.float_constants == "float16":
                float16_constants(path, path)
            return
        if config.scheme == "dynamic":
            quantize_dynamic(
                str(self.prepared),
                str(path),
                per_channel=config.per_channel,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=list(keep_float),
            )
            return
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        activation = QuantType.QInt8 if config.activation_type == "int8" else QuantType.QUInt8
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress to stdout
            quantize_static(
                str(self.prepared),
                str(path),
                CalibrationReader(self.calibration),
                quant_format=QuantFormat.QDQ,
                per_channel=config.per_channel,
                activation_type=activation,
                weight_type=QuantType.QInt8,
                calibrate_method=method[config.calibration],
                nodes_to_exclude=list(keep_float),
            )

    def tensor_noise(self) -> list[TensorNoise]:
        images = self.calibration[:SENSITIVITY_SAMPLES]
        weight_only = self.config.activation_type == "float"
        if self.config.scheme == "dynamic" or weight_only:  # no activation grid here: rank the weights
            rounded = onnx_rounded_weights(self.prepared, self.config.per_channel, stored_axes=weight_only)
            return onnx_tensor_noise(self.prepared, rounded, images)
        if self._activations is None:
            self._activations = onnx_activations(self.prepared, images)
        return onnx_tensor_noise(self.prepared, onnx_rounded_tensors(self.prepared, self.path, self._activations), images)

    def output_grid(self) -> tuple[float, int] | None:
        return None  # QDQ models keep float32 I/O

    def describe(self) -> dict[str, Any]:
        if self.config.activation_type == "float":
            weights = "int8 per-channel" if self.config.per_channel else "int8 per-tensor"
            return {"activations": "float", "weights": weights, "float_constants": self.config.float_constants}
        if self.config.scheme == "dynamic":
            return {}
        return {"calibration": self.config.calibration, "calibration_samples": len(self.calibration)}

    def close(self) -> None:
        self.prepared.unlink(missing_ok=True)
        for leftover in self.scratch.glob("*.onnx.data"):
            leftover.unlink()


class TfliteQuantizer:
    """litert-torch's PT2E quantizer: static full-integer int8 or dynamic range. Layers are module paths."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, calibration: np.ndarray, config: QuantizeConfig, channels_last: bool = False
    ) -> None:
        self.model, self.example, self.calibration, self.config = model.eval(), example, calibration, config
        self.channels_last, self.layout = channels_last, "NHWC" if channels_last else "NCHW"
        self.converted: torch.fx.GraphModule | None = None
        self.batch = 1
        self.path: Path | None = None

    def quantize(self, path: Path, keep_float: tuple[str, ...]) -> None:
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

        dynamic = self.config.scheme == "dynamic"
        scheme = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=self.config.per_channel, is_dynamic=dynamic)
        quantizer = keep_float_quantizer(scheme, keep_float)
        graph, self.batch = export_for_calibration(self.model, self.example)
        prepared = quantize_pt2e.prepare_pt2e(graph, quantizer)
        with torch.no_grad():
            for start in range(0, self.batch if dynamic else len(self.calibration), self.batch):  # dynamic: weights only
                prepared(torch.from_numpy(self.calibration[start : start + self.batch]))
        self.converted = move_exported_model_to_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
        for module in self.converted.modules():  # move_exported_model_to_eval switches the ops, not the flag litert-torch reads
            module.training = False
        convert_tflite(self.converted, self.example, path, QuantConfig(pt2e_quantizer=quantizer), channels_last=self.channels_last)
        if not dynamic:  # dynamic-range kernels take float activations: its I/O stays float
            path.write_bytes(retype_tflite_io(path.read_bytes(), self.config.tflite_io, self._io_qparams))
        self.path = path

    def _io_qparams(self, is_input: bool) -> QParams:
        """int8 parameters for an input or output the fallback left float: the calibration images' or logits' range."""
        if is_input:
            return int8_qparams(self.calibration)
        with torch.no_grad():
            batches = [torch.from_numpy(self.calibration[i : i + self.batch]) for i in range(0, len(self.calibration), self.batch)]
            return int8_qparams(torch.cat([self.converted(batch) for batch in batches]).numpy())

    def tensor_noise(self) -> list[TensorNoise]:
        return pt2e_tensor_noise(self.converted, self.calibration[:SENSITIVITY_SAMPLES], self.batch)

    def output_grid(self) -> tuple[float, int] | None:
        output = tflite_io_quantization(self.path)["output"] if self.path is not None else None
        return (output["scale"], output["zero_point"]) if output and output["dtype"] == "int8" and output["scale"] > 0 else None

    def describe(self) -> dict[str, Any]:
        calibration = {} if self.config.scheme == "dynamic" else {"calibration": "histogram", "calibration_samples": len(self.calibration)}
        return {**calibration, "io": tflite_io_quantization(self.path)}

    def close(self) -> None:
        self.converted = None


def keep_float_quantizer(scheme: Any, keep_float: tuple[str, ...]) -> Any:
    """A PT2EQuantizer with ``scheme`` everywhere except the ops of the ``keep_float`` modules."""
    return _keep_float_quantizer_class()(scheme, keep_float)


@functools.cache
def _keep_float_quantizer_class() -> type:
    from litert_torch.quantize import pt2e_quantizer

    class KeepFloatQuantizer(pt2e_quantizer.PT2EQuantizer):
        # Not set_module_name(name, None): litert-torch 0.10 asserts on None, and its module-name
        # filter strips "L__self___" while torch 2.13 writes "L__self__features.0", so it never
        # matches. The filter here reads the module path torch.export records on every node.
        def __init__(self, scheme: Any, keep_float: tuple[str, ...]) -> None:
            super().__init__()
            self.set_global(scheme)
            self.keep_float = frozenset(keep_float)

        def _quantizes(self, node: torch.fx.Node) -> bool:
            return module_path(node) not in self.keep_float

        def _annotate_for_static_quantization_config(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return self._annotate_all_static_patterns(model, self.global_config, self._quantizes)

        def _annotate_for_dynamic_quantization_config(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return self._annotate_all_dynamic_patterns(model, self.global_config, self._quantizes)

    return KeepFloatQuantizer


def convert_onnx_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations with float32 model I/O (onnxruntime's converter)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))


QParams = tuple[float, int]  # (scale, zero-point) of an int8 tensor


def retype_tflite_io(model_bytes: bytes, io: str, qparams: Callable[[bool], QParams]) -> bytes:
    """The same .tflite with ``io`` ("float" or "int8") model input and output; the quantized ops are untouched.

    A boundary tensor of the other type gets a twin of the wanted type and a QUANTIZE
    (float → int8) or DEQUANTIZE (int8 → float) op between them: float I/O is what
    TensorFlow's converter gives full-integer models unless told otherwise, and int8 I/O
    survives the fallback keeping the first or last layer float. litert-torch 0.10 has
    no option for either, so the flatbuffer is edited. ``qparams(is_input)`` gives a new
    int8 tensor its (scale, zero-point).
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph, renamed = model.subgraphs[0], {}
    for ends, is_input in ((graph.inputs, True), (graph.outputs, False)):
        for position, index in enumerate(ends):
            is_float = graph.tensors[index].type == schema.TensorType.FLOAT32
            if is_float == (io == "float") or graph.tensors[index].type not in _IO_TYPES:
                continue
            twin = _io_twin(model, graph, index, qparams(is_input) if is_float else None)  # the wanted type: int8 for a float end
            source_is_float = is_float != is_input  # the op converts twin → tensor at the input, tensor → twin at the output
            boundary = schema.OperatorT()
            operator = schema.BuiltinOperator.QUANTIZE if source_is_float else schema.BuiltinOperator.DEQUANTIZE
            boundary.opcodeIndex = _opcode_index(model, operator)
            boundary.inputs, boundary.outputs = ([twin], [index]) if is_input else ([index], [twin])
            graph.operators.insert(0 if is_input else len(graph.operators), boundary)
            ends[position], renamed[index] = twin, twin
    for signature in model.signatureDefs or []:
        for entry in (signature.inputs or []) + (signature.outputs or []):
            entry.tensorIndex = renamed.get(entry.tensorIndex, entry.tensorIndex)
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


_IO_TYPES = (0, 9)  # schema.TensorType.FLOAT32, INT8


def _io_twin(model: Any, graph: Any, index: int, qparams: QParams | None) -> int:
    """A new tensor shaped like ``graph.tensors[index]``: int8 with ``qparams``, or float32 when None."""
    from ai_edge_litert import schema_py_generated as schema

    original = graph.tensors[index]
    twin = schema.TensorT()
    twin.shape, twin.shapeSignature, twin.name = original.shape, original.shapeSignature, (original.name or b"") + b"_io"
    twin.type = schema.TensorType.FLOAT32 if qparams is None else schema.TensorType.INT8
    if qparams is not None:
        twin.quantization = schema.QuantizationParametersT()
        twin.quantization.scale, twin.quantization.zeroPoint = [float(qparams[0])], [int(qparams[1])]
    model.buffers.append(schema.BufferT())
    twin.buffer = len(model.buffers) - 1
    graph.tensors.append(twin)
    return len(graph.tensors) - 1


def int8_qparams(values: np.ndarray) -> QParams:
    """Asymmetric int8 (scale, zero-point) covering ``values`` and 0."""
    low, high = min(float(values.min()), 0.0), max(float(values.max()), 0.0)
    scale = max(high - low, 1e-8) / 255
    return scale, int(np.clip(round(-128 - low / scale), -128, 127))


def _opcode_index(model: Any, builtin: int) -> int:
    from ai_edge_litert import schema_py_generated as schema

    for index, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return index
    code = schema.OperatorCodeT()
    code.builtinCode = code.deprecatedBuiltinCode = builtin
    code.version = 2  # QUANTIZE v2: float -> int8; DEQUANTIZE v2: int8 -> float
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def tflite_io_quantization(path: Path) -> dict[str, Any]:
    """Dtype, scale and zero-point of the model's input and output, for the device app."""
    interpreter = tflite_interpreter(path, threads=1)

    def describe(detail: dict[str, Any]) -> dict[str, Any]:
        scale, zero_point = detail["quantization"]
        shape = [int(d) for d in detail["shape"]]
        return {"dtype": np.dtype(detail["dtype"]).name, "shape": shape, "scale": float(scale), "zero_point": int(zero_point)}

    return {"input": describe(interpreter.get_input_details()[0]), "output": describe(interpreter.get_output_details()[0])}
