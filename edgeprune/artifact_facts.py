"""Figures derived from a shipped file alone: what the manifest states about an artefact.

Every figure here is read back from the bytes of the final file, never carried over
from a stage, so ``edgeprune verify`` can derive it again from an output folder and
compare. Two groups:

- ``file_facts``: sha256, raw / gzip -9 / zip (deflate -9) sizes, compression ratio.
- ``format_facts``: one small function per format, registered in ``FORMAT_FACTS``
  (``@facts_for("onnx")``), that reads the file's graph: I/O names, shapes, dtypes and
  quantization parameters, the stored tensor mix by dtype, and weight sparsity (global
  and per layer) counted in the weights of the convolution / linear / matmul ops, int8
  weights behind a dequantize op included (a weight is zero when its integer equals its
  zero-point). The PyTorch model file adds parameters, MACs, channel widths and the
  residual blocks removed (the plan written in the file).

A new format (e.g. ``.pte``) adds one ``@facts_for(kind)`` function.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.artifacts import gzip_size, sha256_of
from edgeprune.errors import InputError

Facts = dict[str, Any]
FORMAT_FACTS: dict[str, Callable[[Path], Facts]] = {}  # artefact kind -> figures read from such a file
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # a fixed timestamp: the same file gives the same zip


def facts_for(kind: str) -> Callable[[Callable[[Path], Facts]], Callable[[Path], Facts]]:
    """Register the function that reads the figures of one artefact kind."""

    def register(function: Callable[[Path], Facts]) -> Callable[[Path], Facts]:
        FORMAT_FACTS[kind] = function
        return function

    return register


def artifact_facts(path: Path, kind: str) -> Facts:
    """Every figure derivable from the file at ``path`` of ``kind`` ("model", "onnx", "tflite", ...).

    Raises:
        InputError: the file cannot be read as ``kind`` (one line naming it).
    """
    return {**file_facts(path), **format_facts(path, kind)}


def format_facts(path: Path, kind: str) -> Facts:
    """The figures the reader registered for ``kind`` finds in the file (none for a kind without a reader).

    Raises:
        InputError: the file cannot be read as ``kind`` (one line naming it).
    """
    reader = FORMAT_FACTS.get(kind)
    if reader is None:
        return {}
    try:
        return reader(Path(path))
    except InputError:
        raise
    except Exception as error:  # a parser's failure on a damaged file: one line, not its traceback
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{Path(path).name}: cannot read it as {kind} ({first})") from None


def file_facts(path: Path) -> Facts:
    """sha256 and sizes in bytes: raw, gzip -9 and a zip archive (deflate -9) holding the file; raw/gzip ratio."""
    data = Path(path).read_bytes()
    gzip_bytes = gzip_size(path)
    return {
        "sha256": sha256_of(path),
        "size_bytes": len(data),
        "size_gzip_bytes": gzip_bytes,
        "size_zip_bytes": zip_size(Path(path).name, data),
        "compression_ratio_gzip": round(len(data) / max(gzip_bytes, 1), 6),
    }


def zip_size(name: str, data: bytes) -> int:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr(zipfile.ZipInfo(name, date_time=_ZIP_DATE), data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return len(buffer.getvalue())


def sparsity_summary(rows: list[dict[str, Any]]) -> Facts:
    """Global sparsity (zeros over all counted weights) and the per-layer rows."""
    weights = sum(row["weights"] for row in rows)
    zeros = sum(row["zeros"] for row in rows)
    return {"global_sparsity": round(zeros / max(weights, 1), 6), "weights_counted": weights, "zeros_counted": zeros, "sparsity": rows}


def sparsity_row(layer: str, values: np.ndarray, zero: np.ndarray | float = 0) -> dict[str, Any]:
    """One layer: its weight count, zero count and their ratio (``zero``: the value that means 0, e.g. a zero-point)."""
    zeros = int(np.count_nonzero(values == zero))
    return {"layer": layer, "weights": int(values.size), "zeros": zeros, "sparsity": round(zeros / max(values.size, 1), 6)}


def per_axis(values: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray | float:
    """A per-channel zero-point shaped to broadcast against ``values`` along ``axis`` (a scalar passes through)."""
    zero_point = np.asarray(zero_point).reshape(-1)
    if zero_point.size == 0 or not zero_point.any():
        return 0
    if zero_point.size == 1 or (zero_point == zero_point[0]).all():  # one zero-point, or one repeated per channel
        return zero_point[0]
    shape = [1] * values.ndim
    shape[axis % values.ndim] = zero_point.size
    return zero_point.reshape(shape)


def tensor_mix(dtypes: list[tuple[str, int]]) -> dict[str, dict[str, int]]:
    """Stored constant tensors by dtype: how many, and how many elements (the int8/float mix of a file)."""
    tensors, elements = Counter(), Counter()
    for dtype, size in dtypes:
        tensors[dtype] += 1
        elements[dtype] += size
    return {dtype: {"tensors": tensors[dtype], "elements": elements[dtype]} for dtype in sorted(tensors)}


# --------------------------------------------------------------------------- ONNX

# op -> (weight input, its zero-point input or None, the zero-point's axis): float ops and ONNX's integer ops (QOperator format)
ONNX_WEIGHT_INPUTS = {
    "Conv": (1, None, 0),
    "ConvTranspose": (1, None, 0),
    "Gemm": (1, None, 0),
    "MatMul": (1, None, 0),
    "QLinearConv": (3, 5, 0),
    "QLinearMatMul": (3, 5, -1),
    "ConvInteger": (1, 3, 0),
    "MatMulInteger": (1, 3, -1),
}
_ONNX_PASS_THROUGH = ("Cast", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


@facts_for("onnx")
def onnx_facts(path: Path) -> Facts:
    """I/O, opset, stored tensor mix and weight sparsity of an ONNX file."""
    import onnx

    graph = (proto := onnx.load(str(path))).graph
    constants = _onnx_constants(graph)
    producers = {output: node for node in graph.node for output in node.output}
    consumers = {name: node for node in graph.node for name in node.input if node.op_type == "QuantizeLinear"}
    rows = []
    for index, node in enumerate(graph.node):
        weight = _onnx_node_weight(node, constants, producers)
        if weight is not None:
            rows.append(sparsity_row(node.name or f"{node.op_type}_{index}", *weight))
    return {
        "opset": max((entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")), default=None),
        "io": {
            "inputs": [_onnx_value(value, constants, consumers) for value in graph.input if value.name not in constants],
            "outputs": [_onnx_value(value, constants, {}) for value in graph.output],
        },
        "tensor_mix": tensor_mix([(array.dtype.name, int(array.size)) for array in constants.values()]),
        "weights": sparsity_summary(rows),
    }


def _onnx_constants(graph) -> dict[str, np.ndarray]:
    """Initializers and Constant nodes' tensors by name."""
    from onnx import numpy_helper

    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    constants[node.output[0]] = numpy_helper.to_array(attribute.t)
    return constants


def _onnx_node_weight(node, constants: dict[str, np.ndarray], producers: dict) -> tuple[np.ndarray, Any] | None:
    """(stored values, the value meaning zero) of a node's constant weight; None for another op or a computed weight."""
    if node.op_type not in ONNX_WEIGHT_INPUTS:
        return None
    weight, zero_point, axis = ONNX_WEIGHT_INPUTS[node.op_type]
    if len(node.input) <= weight:
        return None
    if zero_point is None:
        return _onnx_weight(node.input[weight], constants, producers)
    if node.input[weight] not in constants:
        return None
    values = constants[node.input[weight]]
    zero = constants.get(node.input[zero_point], 0) if len(node.input) > zero_point and node.input[zero_point] else 0
    return values, per_axis(values, zero, axis)


def _onnx_weight(name: str, constants: dict[str, np.ndarray], producers: dict) -> tuple[np.ndarray, Any] | None:
    """(stored values, the value meaning zero) of a weight input, followed back through casts and DequantizeLinear."""
    for _ in range(16):  # a weight is a short chain from a constant; an activation never reaches one
        if name in constants:
            return constants[name], 0
        node = producers.get(name)
        if node is None:
            return None
        if node.op_type == "DequantizeLinear" and node.input[0] in constants:
            values = constants[node.input[0]]
            zero_point = constants.get(node.input[2], 0) if len(node.input) > 2 and node.input[2] else 0
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
            return values, per_axis(values, zero_point, axis)
        if node.op_type not in _ONNX_PASS_THROUGH:
            return None
        name = node.input[0]
    return None


def _onnx_value(value, constants: dict[str, np.ndarray], quantizers: dict) -> Facts:
    """Name, dtype, shape (a symbolic dimension by its name) and, for an input quantized on entry, its scale/zero-point."""
    from onnx import helper

    tensor = value.type.tensor_type
    shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None) for dim in tensor.shape.dim]
    entry: Facts = {"name": value.name, "dtype": np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name, "shape": shape}
    quantizer = quantizers.get(value.name)
    if quantizer is not None and quantizer.input[1] in constants:
        zero_point = constants.get(quantizer.input[2]) if len(quantizer.input) > 2 else None
        entry["quantization"] = {
            "scale": np.asarray(constants[quantizer.input[1]], dtype=np.float64).reshape(-1).tolist(),
            "zero_point": [] if zero_point is None else np.asarray(zero_point).reshape(-1).astype(int).tolist(),
            "dtype": "uint8" if zero_point is None else np.asarray(zero_point).dtype.name,
        }
    return entry


# --------------------------------------------------------------------------- TFLite

TFLITE_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "CONV_3D", "FULLY_CONNECTED", "TRANSPOSE_CONV", "BATCH_MATMUL")
_TFLITE_NUMERIC = ("FLOAT16", "FLOAT32", "FLOAT64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")


@facts_for("tflite")
def tflite_facts(path: Path) -> Facts:
    """I/O, stored tensor mix and weight sparsity of a .tflite file, read with LiteRT's flatbuffer schema."""
    from ai_edge_litert import schema_py_generated as schema

    data = Path(path).read_bytes()
    if data[4:8] != b"TFL3":
        raise InputError(f"{Path(path).name}: not a TFLite flatbuffer (no TFL3 identifier)")
    model = schema.ModelT.InitFromPackedBuf(bytearray(data), 0)
    graph = model.subgraphs[0]
    type_names = {value: name for name, value in vars(schema.TensorType).items() if name.isupper()}
    op_names = {value: name for name, value in vars(schema.BuiltinOperator).items() if name.isupper()}
    ops = [op_names.get(max(code.builtinCode, code.deprecatedBuiltinCode), "CUSTOM") for code in model.operatorCodes]
    constants = {index: _tflite_array(model, data, tensor, type_names) for index, tensor in enumerate(graph.tensors)}
    constants = {index: array for index, array in constants.items() if array is not None}
    producers = {output: operator for operator in graph.operators or [] for output in operator.outputs}
    rows = []
    for position, operator in enumerate(graph.operators or []):
        if ops[operator.opcodeIndex] in TFLITE_WEIGHT_OPS and len(operator.inputs) > 1:
            weight = _tflite_weight(operator.inputs[1], graph, constants, producers, ops)
            if weight is not None:
                rows.append(sparsity_row(f"{ops[operator.opcodeIndex]}_{position}", *weight))
    describe = lambda index: _tflite_value(graph.tensors[index], type_names)  # noqa: E731
    return {
        "io": {"inputs": [describe(index) for index in graph.inputs], "outputs": [describe(index) for index in graph.outputs]},
        "tensor_mix": tensor_mix([(array.dtype.name, int(array.size)) for array in constants.values()]),
        "weights": sparsity_summary(rows),
    }


def _tflite_array(model, data: bytes, tensor, type_names: dict[int, str]) -> np.ndarray | None:
    """A constant tensor's values (None for an activation, or a type numpy does not hold)."""
    buffer = model.buffers[tensor.buffer] if 0 < tensor.buffer < len(model.buffers) else None
    type_name = type_names.get(tensor.type, "")
    if buffer is None or type_name not in _TFLITE_NUMERIC:
        return None
    if buffer.offset and buffer.offset > 1:  # a file past 2 GB stores buffers after the flatbuffer
        raw = data[buffer.offset : buffer.offset + buffer.size]
    elif buffer.data is not None and len(buffer.data):
        raw = bytes(np.asarray(buffer.data, dtype=np.uint8))
    else:
        return None
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else []
    return np.frombuffer(raw, dtype=type_name.lower()).reshape(shape)


def _tflite_weight(index: int, graph, constants: dict, producers: dict, ops: list[str]) -> tuple[np.ndarray, Any] | None:
    """(stored values, the value meaning zero) of a weight tensor, followed back through a DEQUANTIZE op (fp16 weights)."""
    for _ in range(4):
        if index in constants:
            quantization = graph.tensors[index].quantization
            zero_point = quantization.zeroPoint if quantization is not None and quantization.zeroPoint is not None else 0
            axis = quantization.quantizedDimension if quantization is not None else 0
            return constants[index], per_axis(constants[index], np.asarray(zero_point), axis)
        operator = producers.get(index)
        if operator is None or ops[operator.opcodeIndex] != "DEQUANTIZE":
            return None
        index = operator.inputs[0]
    return None


def _tflite_value(tensor, type_names: dict[int, str]) -> Facts:
    name = tensor.name.decode() if isinstance(tensor.name, bytes) else str(tensor.name)
    shape = [int(d) for d in tensor.shape] if tensor.shape is not None else []
    entry: Facts = {"name": name, "dtype": type_names.get(tensor.type, "?").lower(), "shape": shape}
    quantization = tensor.quantization
    if quantization is not None and quantization.scale is not None and len(quantization.scale):
        entry["quantization"] = {
            "scale": [float(value) for value in quantization.scale],
            "zero_point": [int(value) for value in quantization.zeroPoint],
        }
    return entry


# --------------------------------------------------------------------------- PyTorch model file


@facts_for("model")
def torch_model_facts(path: Path) -> Facts:
    """Parameters, MACs (one input of the recorded shape), widths, removed blocks and weight sparsity of a model file."""
    # Imported on use: the manifest's writer imports this module, and importing edgeprune (the CLI's start-up) must not import torch.
    import torch
    from torch import nn

    from edgeprune.modelio import load_model, read_model_file
    from edgeprune.training import count_macs_params

    payload = read_model_file(Path(path))
    model = load_model(Path(path))
    widths, rows = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            widths[name] = int(getattr(module, "out_channels", getattr(module, "out_features", 0)))
            rows.append(sparsity_row(name, module.weight.detach().numpy()))
    example = torch.zeros(1, *payload["architecture"]["input_shape"])
    blocks_removed = list(payload["plan"].get("dropped", []))
    return {**count_macs_params(model, example), "widths": widths, "blocks_removed": blocks_removed, "weights": sparsity_summary(rows)}
