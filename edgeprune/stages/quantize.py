"""Quantize: int8 that never silently collapses accuracy (or fp16), verified against fp32 and PyTorch.

ONNX: onnxruntime's recommended pre-processing, then static quantization in QDQ
format (per-channel weights, int8 or uint8 activations, MinMax/Entropy/Percentile
calibration), dynamic quantization, or weight-only int8 (``activation_type = "float"``,
``edgeprune.onnx_weights``); file in → file out. TFLite: litert-torch's
PT2E quantizer — full-integer int8 calibrated on real images (int8 model I/O, or
float I/O through a Quantize and a Dequantize op at the ends), or dynamic range.

The accuracy budget: every int8/dynamic artefact is run on the whole test split
and judged against its fp32 sibling (``edgeprune.accuracy_gate``: the top-1 drop, allowed
over ``quantize.max_accuracy_drop`` only while McNemar's paired test calls it noise; top-1
agreement gated when ``quantize.min_top1_agreement`` > 0). When it misses, ``edgeprune.quant_search``
ranks the tensors from one float and one quantized run and climbs a ladder on the worst ones —
percentile calibration, 16-bit activations (ONNX), float layers — within
``quantize.max_search_seconds``. The chosen per-tensor mix, its size and MAC cost, each round
and the verdict go into the artefact's meta. A missed budget does not stop the build: the best
candidate is written and verified, and the build's budget check exits 10.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.accuracy_gate import GateResult, judge_logits
from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig, QuantizeConfig
from edgeprune.errors import ConfigError
from edgeprune.onnx_weights import minify_names
from edgeprune.parity import artifact_logits, check_parity, parity_report, tflite_interpreter
from edgeprune.pipeline import StageContext, StageOutput
from edgeprune.progress import SILENT, Reporter
from edgeprune.quant_onnx import RANKING_SAMPLES, SENSITIVITY_SAMPLES, CalibrationReader, OnnxQuantizer  # noqa: F401 - re-exported
from edgeprune.quant_search import Mix, MixQuantizer, SearchLimits, SearchOutcome, TensorError, search
from edgeprune.quant_sensitivity import fake_quantize, module_path, pt2e_tensor_errors, pt2e_tensor_noise
from edgeprune.stages.common import example_input, read_model
from edgeprune.stages.export_tflite import convert_tflite
from edgeprune.training import predict_logits, top1_accuracy

CALIBRATION_BATCH = 32  # images per PT2E calibration call


class Quantize:
    name = "quantize"
    version = "3"
    sections = ("quantize", "parity", "export")
    consumes = ("model", "onnx_fp32", "tflite_fp32")

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
            for fp32_name, fmt in (("onnx_fp32", "onnx"), ("tflite_fp32", "tflite"))
            if fp32_name in context.inputs
        ]
        return StageOutput(artifacts, {artifact.name: artifact.meta for artifact in artifacts})


def quantize_artifact(fmt: str, fp32: Artifact, model: nn.Module, parent_logits: np.ndarray, context: StageContext) -> Artifact:
    """``<fmt>_<scheme>`` from the fp32 artefact, the best mix the budget search found, verified."""
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
                name, fp32.name, quantizer, path, fp32_logits, dataset.x_test, dataset.y_test, config.quantize, context.reporter
            )
        finally:
            quantizer.close()
        if fmt == "onnx" and config.quantize.minify_names and minify_names(path, path):
            logits = artifact_logits(path, dataset.x_test)  # the shipped bytes are what parity checks
            extra["names_minified"] = True
    tolerance = "fp16" if precision == "fp16" else "int8"  # dynamic-range int8 is held to the int8 tolerance
    enforce = extra.get("budget", {}).get("passed", True)  # a missed budget is the verdict; parity is reported beside it
    meta = verified(name, fp32.name, tolerance, logits, parent_logits, fp32_logits, dataset.y_test, config, enforce)
    return Artifact.from_file(name, fmt, path, format=fmt, precision=precision, parent=fp32.name, **meta, **extra)


def verified(
    name, fp32_name, tolerance, logits, parent_logits, fp32_logits, labels, config: BuildConfig, enforce: bool = True
) -> dict[str, Any]:
    """Accuracy, and parity against the torch parent and the fp32 sibling (ParityError when broken and ``enforce``)."""
    count = min(config.parity.samples, len(labels))
    parity = parity_report(parent_logits[:count], logits[:count], labels[:count])
    versus_fp32 = parity_report(fp32_logits[:count], logits[:count], labels[:count])
    if enforce or parity["nonfinite"] or versus_fp32["nonfinite"]:
        check_parity(name, tolerance, parity, config.parity)
        check_parity(name, tolerance, versus_fp32, config.parity, against=fp32_name)
    return {"accuracy": top1_accuracy(logits, labels), "parity": parity, "versus_fp32": versus_fp32}


# --------------------------------------------------------------------------- the accuracy budget


def quantize_within_budget(
    name: str,
    fp32_name: str,
    quantizer: MixQuantizer,
    path: Path,
    fp32_logits: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    config: QuantizeConfig,
    reporter: Reporter = SILENT,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Quantize into ``path`` the best per-tensor mix the budget search finds (``edgeprune.quant_search``).

    ``fp32_logits`` are the fp32 sibling's logits for the test split (``images``, ``labels``).
    Returns the artefact's test-split logits and its meta: ``budget`` (the limits, the gate's
    figures, ``passed`` and ``verdict``), ``quant_mix`` ({tensor: rung}), ``float_layers``,
    ``macs_off_int8``, ``float_layers_size_bytes`` (bytes over plain int8) and, when the search
    ran, ``search`` (each round, the ranking's worst tensors, why it stopped, seconds). A missed
    budget is a verdict in the meta, never an exception.
    """

    def judge(candidate: Path) -> tuple[np.ndarray, GateResult]:
        logits = artifact_logits(candidate, images, layout=quantizer.layout)
        return logits, judge_logits(fp32_logits, logits, labels, config.max_accuracy_drop, config.min_top1_agreement, config.significance)

    limits = SearchLimits(config.max_search_seconds, config.max_float_layers, refine_candidates=config.refine_candidates)
    reporter.info(f"  {name}: quantizing against {fp32_name} (budget: drop <= {config.max_accuracy_drop:g} points)")
    outcome = search(
        quantizer,
        path,
        judge,
        limits,
        reporter,
        name,
        lambda: output_ceiling(fp32_name, quantizer.output_grid(), fp32_logits, labels, config),
    )
    best = outcome.best
    verdict = "within budget" if best.gate.passed else f"missed budget ({outcome.stopped}): {best.gate.reason}"
    if not best.gate.passed:
        reporter.warn(f"{name}: {verdict}")
    limits_meta = {
        "max_accuracy_drop": config.max_accuracy_drop,
        "min_top1_agreement": config.min_top1_agreement,
        "significance": config.significance,
    }
    meta: dict[str, Any] = {
        **quantizer.describe(),
        "budget": {**limits_meta, **best.gate.to_dict(), "verdict": verdict},
        "quant_mix": dict(best.mix),
        **quantizer.mix_cost(best.mix),
        "float_layers_size_bytes": best.size_bytes - outcome.plain.size_bytes,
        "plain_int8": {"size_bytes": outcome.plain.size_bytes, **outcome.plain.gate.to_dict()},
    }
    if not outcome.plain.gate.passed:
        meta["search"] = search_record(outcome)
    return best.logits, meta


def search_record(outcome: SearchOutcome) -> dict[str, Any]:
    return {
        "stopped": outcome.stopped,
        "seconds": outcome.elapsed_s,
        "rounds": outcome.rounds,
        "worst_tensors": [item.to_dict() for item in outcome.ranking[:5]],
    }


def output_ceiling(
    fp32_name: str, grid: tuple[float, int] | None, fp32_logits: np.ndarray, labels: np.ndarray, config: QuantizeConfig
) -> str | None:
    """Why no mix can pass when an int8 model output alone (its grid: scale, zero-point) breaks the budget; None otherwise.

    Rounding the fp32 logits to that grid shows what no float layer can win back: the
    logits' margins are finer than one int8 step, so close calls become ties.
    """
    if grid is None:
        return None
    rounded = fake_quantize(fp32_logits, np.float32(grid[0]), np.int8(grid[1]))
    ceiling = judge_logits(fp32_logits, rounded, labels, config.max_accuracy_drop, config.min_top1_agreement, config.significance)
    if ceiling.passed:
        return None
    return (
        f"its int8 output (scale {grid[0]:.4g}) alone agrees with {fp32_name} on {ceiling.top1_agreement:.4f} of the test split "
        f"and loses {ceiling.accuracy_drop:.2f} top-1 points ({ceiling.reason}): no float layer can fix that. "
        "Use quantize.tflite_io = 'float', or loosen the budget"
    )


# --------------------------------------------------------------------------- quantizers


def make_quantizer(fmt: str, model: nn.Module, fp32: Artifact, context: StageContext) -> MixQuantizer:
    """The quantizer for ``fp32``'s format; TFLite keeps the fp32 file's input layout."""
    calibration = context.dataset.calibration_batches(context.config.data.calibration_samples, context.config.seed)
    if fmt == "onnx":
        return OnnxQuantizer(fp32.path, calibration, context.config.quantize, context.workdir)
    channels_last = fp32.meta.get("input_layout") == "NHWC"
    return TfliteQuantizer(model, example_input(context), calibration, context.config.quantize, channels_last)


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
        self.rungs: tuple[str, ...] = ("float",)  # litert-torch 0.10's PT2E quantizer has no int16x8 or per-tensor observer choice
        self._layers: dict[str, tuple[str, ...]] = {}

    def quantize(self, path: Path, mix: Mix) -> None:
        keep_float = tuple(
            dict.fromkeys(layer for tensor, rung in mix.items() if rung == "float" for layer in self._layers.get(tensor, ()))
        )
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

    def tensor_errors(self) -> list[TensorError]:
        """Two runs of the last converted graph (all tensors rounding, none), each rounded tensor matched."""
        rows = pt2e_tensor_errors(self.converted, self.calibration[:RANKING_SAMPLES], self.batch)
        self._layers.update({row[0]: row[4] for row in rows})
        return [TensorError(*row) for row in rows]

    def refine(self, candidates: list[TensorError]) -> list[TensorError]:
        alone = {
            item.tensor: item.sqnr_db for item in pt2e_tensor_noise(self.converted, self.calibration[:SENSITIVITY_SAMPLES], self.batch)
        }
        return sorted(candidates, key=lambda item: (alone.get(item.tensor, item.sqnr_db), item.tensor))

    def mix_cost(self, mix: Mix) -> dict[str, Any]:
        keep_float = [layer for layer in dict.fromkeys(layer for tensor in mix for layer in self._layers.get(tensor, ()))]
        macs = module_macs(self.model, self.example)
        share = sum(macs.get(layer, 0) for layer in keep_float) / max(sum(macs.values()), 1)
        return {"float_layers": keep_float, "macs_off_int8": {"float": round(share, 4)}}

    def output_grid(self) -> tuple[float, int] | None:
        output = tflite_io_quantization(self.path)["output"] if self.path is not None else None
        return (output["scale"], output["zero_point"]) if output and output["dtype"] == "int8" and output["scale"] > 0 else None

    def describe(self) -> dict[str, Any]:
        calibration = {} if self.config.scheme == "dynamic" else {"calibration": "histogram", "calibration_samples": len(self.calibration)}
        return {**calibration, "io": tflite_io_quantization(self.path)}

    def close(self) -> None:
        self.converted = None


def export_for_calibration(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, int]:
    """``torch.export`` with a dynamic batch, so observers see batches of CALIBRATION_BATCH images
    (one image per call costs ~30x more in HistogramObserver); batch 1 when the model cannot export so."""
    try:
        batched = example.expand(2, *example.shape[1:])  # torch.export specialises a batch of 1
        exported = torch.export.export(model, (batched,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        return exported.module(), CALIBRATION_BATCH
    except Exception:  # noqa: BLE001 - any export failure just means "calibrate one image at a time"
        return torch.export.export(model, (example,)).module(), 1


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


def module_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates per image of each Conv2d and Linear module, by module path (one forward pass)."""
    macs: dict[str, int] = {}

    def hook(name: str, module: nn.Module, output: torch.Tensor) -> None:
        per_output = module.weight[0].numel()  # Conv2d: in/groups x kh x kw; Linear: in_features
        macs[name] = macs.get(name, 0) + int(output[0].numel() * per_output)

    handles = [
        module.register_forward_hook(lambda m, _inputs, out, name=name: hook(name, m, out))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    return macs


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
