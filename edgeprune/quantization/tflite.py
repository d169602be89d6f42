"""TFLite int8 through litert-torch's PT2E quantizer, with a per-tensor mix (``edgeprune.quantization.pt2e``).

Static full-integer int8 calibrated on real images (int8 model I/O, or float I/O through a
Quantize and a Dequantize op at the ends: ``quantize.tflite_io``), or dynamic range. Layers at
the ``float`` rung are left out of the annotation. litert-torch 0.10 has no option for the
model's I/O type, so ``retype_tflite_io`` edits the flatbuffer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from edgeprune.config import QuantizeConfig
from edgeprune.export.tflite import convert_tflite
from edgeprune.parity import tflite_interpreter
from edgeprune.quant_sensitivity import module_path
from edgeprune.quantization.pt2e import RANKING_SAMPLES, Pt2eMixQuantizer
from edgeprune.quantization.search import Mix, TensorError
from edgeprune.quantization.tflite_ranking import tflite_tensor_errors


class TfliteQuantizer(Pt2eMixQuantizer):
    """litert-torch's PT2E quantizer: static full-integer int8 or dynamic range. Layers are module paths."""

    def __init__(
        self,
        model: nn.Module,
        example: torch.Tensor,
        calibration: np.ndarray,
        config: QuantizeConfig,
        channels_last: bool = False,
        float_path: Path | None = None,
    ) -> None:
        super().__init__(model, example, calibration, config)
        self.channels_last, self.layout = channels_last, "NHWC" if channels_last else "NCHW"
        self.float_path = float_path  # the fp32 .tflite: the ranking compares the converted files (else the PT2E graph)

    def tensor_errors(self) -> list[TensorError]:
        """The last file's tensors against the fp32 file's, from one interpreter run each; the PT2E graph's where they do not align."""
        if self.float_path is None or self.path is None or self.config.scheme == "dynamic":
            return super().tensor_errors()
        errors = tflite_tensor_errors(self.float_path, self.path, self.calibration[:RANKING_SAMPLES], self.layout, self.model)
        if not errors:
            return super().tensor_errors()
        self._layers.update({item.tensor: item.layers for item in errors})
        return errors

    def quantize(self, path: Path, mix: Mix) -> None:
        # litert-torch is imported here, not at the top: its import loads TensorFlow Lite's converter (seconds)
        from litert_torch.quantize import pt2e_quantizer
        from litert_torch.quantize.quant_config import QuantConfig

        dynamic = self.config.scheme == "dynamic"
        scheme = pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=self.config.per_channel, is_dynamic=dynamic)
        quantizer = keep_float_quantizer(scheme, self.keep_float(mix))
        prepared = self.calibrated(quantizer, samples=1 if dynamic else None)  # dynamic: weights only
        self.converted = self.converted_graph(prepared)
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

    def output_grid(self) -> tuple[float, int] | None:
        output = tflite_io_quantization(self.path)["output"] if self.path is not None else None
        return (output["scale"], output["zero_point"]) if output and output["dtype"] == "int8" and output["scale"] > 0 else None

    def describe(self) -> dict[str, Any]:
        calibration = {} if self.config.scheme == "dynamic" else {"calibration": "histogram", "calibration_samples": len(self.calibration)}
        return {**calibration, "io": tflite_io_quantization(self.path)}


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

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return restore_source_functions(super().transform_for_annotation(model))

        def _annotate_for_static_quantization_config(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            self._annotate_all_static_patterns(model, self.global_config, self._quantizes)
            return annotate_grid_keeping_ops(model, self.global_config, self._quantizes)

        def _annotate_for_dynamic_quantization_config(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return self._annotate_all_dynamic_patterns(model, self.global_config, self._quantizes)

    return KeepFloatQuantizer


# The torch function each aten op of litert-torch's source-matched annotators (cat, add, mul, pools) comes from.
_SOURCE_FUNCTIONS = {
    torch.ops.aten.cat.default: torch.cat,
    torch.ops.aten.add.Tensor: torch.add,
    torch.ops.aten.add_.Tensor: torch.add,
    torch.ops.aten.mul.Tensor: torch.mul,
    torch.ops.aten.mul_.Tensor: torch.mul,
    torch.ops.aten.max_pool2d.default: F.max_pool2d,
    torch.ops.aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
}


def restore_source_functions(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """``model`` with the ``source_fn_stack`` that litert-torch's annotators match ops by, where export left none.

    A non-strict ``torch.export`` (torch 2.13) records no ``source_fn_stack`` for function calls, so
    litert-torch 0.10 annotates no ``torch.cat``, ``+``, ``*`` or functional pool: each stays an
    unannotated op between quantized tensors, and the TFLite converter, which needs one scale on
    every input and the output of an int8 CONCATENATION, gives the whole concat the parameters of one
    input, clipping the others (a pre-activation DenseNet's signed conv outputs onto a ReLU range:
    top-1 agreement 0.14). Each such node gets its own entry (named after the node: the names export
    writes in ``torch_fn`` collide between calls), so the concat shares one observer over all its inputs.
    """
    for node in model.graph.nodes:
        source = _SOURCE_FUNCTIONS.get(node.target) if node.op == "call_function" else None
        if source is not None and not node.meta.get("source_fn_stack"):
            node.meta["source_fn_stack"] = [(node.name, source)]
    return model


# Ops the TFLite converter computes in int8 on their input's grid whether annotated or not: litert-torch 0.10 annotates none.
_GRID_KEEPING = frozenset(
    {torch.ops.aten.avg_pool2d.default, torch.ops.aten.pad.default, torch.ops.aten.constant_pad_nd.default, torch.ops.aten.slice.Tensor}
)


def annotate_grid_keeping_ops(model: torch.fx.GraphModule, config: Any, quantizes: Callable[[torch.fx.Node], bool]) -> torch.fx.GraphModule:
    """Average pools and pads annotated to keep one grid from input to output, as litert-torch annotates adaptive pools.

    Left unannotated between quantized tensors, the converter makes each int8 on its input's grid
    and drops the requantize PT2E put after it: "same scale constraint" violated, no file (a
    DenseNet transition feeding a concat, a channel-padded ResNet shortcut feeding its add). The
    input shares its producer's grid where that is quantized, else gets its own observer.
    """
    from litert_torch.quantize.pt2e_quantizer_utils import get_input_act_qspec
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation, SharedQuantizationSpec  # loaded with litert-torch

    for node in model.graph.nodes:
        if node.op != "call_function" or node.target not in _GRID_KEEPING or not quantizes(node):
            continue
        source, annotation = node.args[0], node.meta.get("quantization_annotation")
        if not isinstance(source, torch.fx.Node) or (annotation is not None and annotation._annotated):
            continue
        produced = source.meta.get("quantization_annotation")
        quantized = produced is not None and produced.output_qspec is not None
        incoming = SharedQuantizationSpec(source) if quantized else get_input_act_qspec(config)
        outgoing = SharedQuantizationSpec((source, node))
        node.meta["quantization_annotation"] = QuantizationAnnotation({source: incoming}, outgoing, _annotated=True)
    return model


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
