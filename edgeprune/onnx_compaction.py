"""ONNX files made small: int8 weights with float compute, and short internal names.

``quantize_weights`` stores every Conv/Gemm/MatMul weight as symmetric int8 (per output
channel or per tensor) behind a ``DequantizeLinear`` node, so the file is int8-sized while
activations and arithmetic stay float: no activation rounding, no Quantize/Dequantize pair
per tensor (which costs bytes and accuracy). A pruned weight stays exactly 0, so sparsity
survives for the compressor. ``minify_names`` replaces internal tensor and node names by
short ids (the graph's input and output names are kept): the same graph, fewer bytes.
``float16_constants`` stores what stays float (biases, the int8 weights' scales, norm
parameters, a ViT's position embedding) as float16 behind a ``Cast``: half the bytes of
float32 random mantissas, computed in float32 (the runtime folds the Cast at load).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

WEIGHT_OPS = ("Conv", "Gemm", "MatMul")
# Tables a graph adds or looks up (a ViT's position embedding, a token embedding): weights too, by the last axis.
EMBEDDING_OPS = {"Add": (0, 1), "Gather": (0,)}  # op → which inputs may hold the table
MIN_EMBEDDING_ELEMENTS = 1024  # smaller added constants are biases, which stay float
MIN_OPSET_PER_CHANNEL = 13  # DequantizeLinear's axis attribute


def quantize_weights(source: Path, target: Path, per_channel: bool, keep_float: tuple[str, ...] = ()) -> int:
    """Write ``source`` to ``target`` with int8 weights; nodes named in ``keep_float`` keep float weights.

    Weights are the 2-D+ weights of Conv/Gemm/MatMul and embedding tables (2-D+ constants of at
    least ``MIN_EMBEDDING_ELEMENTS`` values that an Add adds or a Gather looks up, scaled per
    entry of their last axis).

    Returns how many weight tensors were quantized. A weight shared by several nodes is
    quantized once, and kept float if any of its nodes is in ``keep_float``.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    axes = weight_axes(graph, set(keep_float))
    if per_channel and _opset(model) < MIN_OPSET_PER_CHANNEL:
        raise ValueError(f"per-channel int8 weights need opset >= {MIN_OPSET_PER_CHANNEL} (the model has {_opset(model)})")
    kept, added, dequantize = [], [], []
    for tensor in graph.initializer:
        if tensor.name not in axes:
            kept.append(tensor)
            continue
        values, scale = int8_weight(numpy_helper.to_array(tensor), axes[tensor.name] if per_channel else None)
        names = (f"{tensor.name}_int8", f"{tensor.name}_scale", f"{tensor.name}_zero")
        added += [
            numpy_helper.from_array(values, names[0]),
            numpy_helper.from_array(scale, names[1]),
            numpy_helper.from_array(np.zeros(scale.shape, np.int8), names[2]),
        ]
        attributes = {"axis": axes[tensor.name]} if per_channel else {}
        dequantize.append(helper.make_node("DequantizeLinear", list(names), [tensor.name], name=f"{tensor.name}_dequantize", **attributes))
    replace_initializers(graph, kept + added, dequantize)
    onnx.save(model, str(target))
    return len(dequantize)


def replace_initializers(graph, initializers: list, producers: list) -> None:
    """Give ``graph`` these ``initializers`` and put the ``producers`` (nodes computing the replaced tensors) first,
    so each replaced tensor is produced before any node reads it."""
    del graph.initializer[:]
    graph.initializer.extend(initializers)
    nodes = producers + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def weight_axes(graph, keep_float: set[str]) -> dict[str, int]:
    """Initializer name → its output-channel axis, for the weights (see ``quantize_weights``) not kept float."""
    from onnx import TensorProto

    floats = {tensor.name: tensor for tensor in graph.initializer if tensor.data_type == TensorProto.FLOAT}
    axes: dict[str, int] = {}
    shared_with_float = set()
    for node in graph.node:
        name = weight_input(node, floats)
        if name is None:
            continue
        if node.name in keep_float:
            shared_with_float.add(name)
        axes[name] = output_axis(node, len(floats[name].dims))
    return {name: axis for name, axis in axes.items() if name not in shared_with_float}


def weight_input(node, floats: dict) -> str | None:
    """The name of ``node``'s weight initializer, or None: input 1 of Conv/Gemm/MatMul, an embedding table."""
    if node.op_type in WEIGHT_OPS:
        name = node.input[1] if len(node.input) > 1 else ""
        return name if name in floats and len(floats[name].dims) >= 2 else None
    positions = EMBEDDING_OPS.get(node.op_type, ())
    tables = [node.input[index] for index in positions if index < len(node.input) and is_table(floats.get(node.input[index]))]
    return tables[0] if tables else None


def is_table(tensor) -> bool:
    """A float initializer of rank 2+ with at least ``MIN_EMBEDDING_ELEMENTS`` values."""
    return tensor is not None and len(tensor.dims) >= 2 and int(np.prod(tensor.dims)) >= MIN_EMBEDDING_ELEMENTS


def output_axis(node, rank: int) -> int:
    """The axis of a weight that indexes output channels: Conv 0, Gemm by ``transB``, MatMul and tables the last."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if any(attribute.name == "transB" and attribute.i for attribute in node.attribute) else 1
    return rank - 1


def int8_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 values and float32 scales (one per slice along ``axis``, or one); a zero slice gets scale 1."""
    if axis is None:
        peak = np.abs(weight).max(keepdims=True).reshape(())
        shaped = scale = np.float32(peak / 127 if peak > 0 else 1.0)
    else:
        reduce = tuple(index for index in range(weight.ndim) if index != axis)
        peak = np.abs(weight).max(axis=reduce)
        scale = np.where(peak > 0, peak / 127, 1.0).astype(np.float32)
        shaped = scale.reshape([-1 if index == axis else 1 for index in range(weight.ndim)])
    values = np.clip(np.round(weight / shaped), -127, 127).astype(np.int8)
    return values, np.asarray(scale, dtype=np.float32)


def int8_roundtrip(weight: np.ndarray, axis: int | None) -> np.ndarray:
    """``weight`` rounded to ``int8_weight``'s grid and back: what its DequantizeLinear computes."""
    values, scale = int8_weight(weight, axis)
    shaped = scale.reshape([-1 if index == axis else 1 for index in range(weight.ndim)])
    return (values * shaped).astype(weight.dtype)


def minify_names(source: Path, target: Path) -> bool:
    """Write ``source`` to ``target`` with short internal tensor names, no node names, no value_info or doc strings.

    Returns False, and writes the file unchanged, for a graph with subgraphs (If/Loop/Scan bodies read
    outer names, which a flat renaming would break).
    """
    import onnx
    from onnx import AttributeProto

    model = onnx.load(str(source))
    graph = model.graph
    if any(attribute.type in (AttributeProto.GRAPH, AttributeProto.GRAPHS) for node in graph.node for attribute in node.attribute):
        onnx.save(model, str(target))
        return False
    public = {value.name for value in (*graph.input, *graph.output)}
    short: dict[str, str] = {}

    def rename(name: str) -> str:
        if not name or name in public:
            return name
        return short.setdefault(name, format(len(short), "x"))

    for tensor in graph.initializer:
        tensor.name = rename(tensor.name)
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [rename(name) for name in node.input]
        node.output[:] = [rename(name) for name in node.output]
    del graph.value_info[:]
    graph.doc_string = ""
    onnx.save(model, str(target))
    return True


MIN_FLOAT16_ELEMENTS = 16  # below this a Cast node costs more bytes than float16 saves
FLOAT16_RELATIVE_ERROR = 2.0**-10  # float16's rounding for normal numbers: a tensor with values outside stays float32


def float16_constants(source: Path, target: Path) -> int:
    """Write ``source`` to ``target`` with its float32 initializers stored float16 and cast back to float32.

    A tensor is converted only when every value survives float16 within its normal-number rounding
    (no overflow past 65504, no tiny values falling into subnormals); tensors the graph outputs or
    declares as inputs, and tensors under ``MIN_FLOAT16_ELEMENTS`` values, stay as they are.
    Returns how many tensors were converted.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    public = {value.name for value in (*graph.input, *graph.output)}
    kept, added, casts = [], [], []
    for tensor in graph.initializer:
        values = numpy_helper.to_array(tensor) if tensor.data_type == TensorProto.FLOAT else None
        if values is None or tensor.name in public or values.size < MIN_FLOAT16_ELEMENTS or not survives_float16(values):
            kept.append(tensor)
            continue
        added.append(numpy_helper.from_array(values.astype(np.float16), f"{tensor.name}_f16"))
        casts.append(helper.make_node("Cast", [f"{tensor.name}_f16"], [tensor.name], name=f"{tensor.name}_cast", to=TensorProto.FLOAT))
    replace_initializers(graph, kept + added, casts)
    onnx.save(model, str(target))
    return len(casts)


def survives_float16(values: np.ndarray) -> bool:
    """Whether every value of ``values`` rounds to float16 within ``FLOAT16_RELATIVE_ERROR`` (zeros exactly)."""
    with np.errstate(over="ignore"):
        rounded = values.astype(np.float16).astype(np.float32)
    if not np.isfinite(rounded).all():
        return False
    return bool((np.abs(rounded - values) <= FLOAT16_RELATIVE_ERROR * np.abs(values)).all())


def _opset(model) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)
