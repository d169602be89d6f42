"""Which layers make a quantized model wrong: each rounded tensor's effect on the logits, worst first.

For every tensor a quantizer rounds (activations and weights), the float model is run
with *only that tensor* rounded — with the scale and zero-point the quantizer chose —
and its logits are compared with the float logits: SQNR in dB,
``20 log10(|logits| / |logits - logits_rounded|)``, lower is worse. That is the
tensor's sensitivity in isolation (no error accumulated from other roundings), and it
weighs a tensor by what reaches the output: quantizing the logits themselves flips
near-tied predictions, a collapsed activation range wipes them out, a noisy but
well-averaged feature map barely matters. Each tensor comes with the layers that read
or write it, which the quantize stage keeps in float.

- ONNX (QDQ): the float model's activations are rounded with the QDQ model's scales and
  fed back in place of the tensor (the tensor becomes a graph input); weights are
  swapped for their dequantized copies (onnxruntime's ``qdq_loss_debug`` weight
  matching). Layers are ONNX node names (``nodes_to_exclude`` takes them).
- ONNX dynamic range (no QDQ graph): only weights, rounded as the quantizer would.
- PT2E (TFLite, ExecuTorch): the converted torch graph runs with every quantize/dequantize pair
  but one turned into the identity. Layers are torch module paths (``features.3``);
  ops called in a model's own ``forward`` belong to :data:`TOP_LEVEL`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.fx
from torch import nn

from edgeprune.onnx_compaction import WEIGHT_OPS, int8_roundtrip, weight_axes, weight_input

TOP_LEVEL = "<top-level>"  # the layer name of ops a model calls in its own forward()
CALIBRATION_BATCH = 32  # images per PT2E calibration call
_GRAPH_OUTPUT_SUFFIX = "_QuantizeLinear_Input"  # onnxruntime renames a quantized graph output's producer


@dataclass(frozen=True)
class TensorNoise:
    """One rounded tensor: the logits' SQNR (dB) with only it rounded, and the layers that read or write it."""

    tensor: str
    sqnr_db: float
    layers: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"tensor": self.tensor, "sqnr_db": round(self.sqnr_db, 2), "layers": list(self.layers)}


def sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """Signal-to-noise ratio of ``value`` against ``reference`` in dB (capped at 200 dB for exact copies)."""
    reference, value = np.asarray(reference, np.float64), np.asarray(value, np.float64)
    noise = float(np.sum((reference - value) ** 2))
    return 200.0 if noise <= 0 else min(200.0, 10 * math.log10(max(float(np.sum(reference**2)), 1e-30) / noise))


def channel_sqnr_db(reference: np.ndarray, value: np.ndarray) -> float:
    """The mean over channels (axis 0 of a (channels, values) array) of each channel's SQNR in dB, each held to [-20, 60].

    One SQNR over the whole tensor is ruled by its loudest channel: a 1000x outlier channel
    kept exact hides every other channel rounded to zero. Per channel, those count.
    """
    signal = np.sum(np.square(reference, dtype=np.float64), axis=1)
    noise = np.sum(np.square(reference.astype(np.float64) - value), axis=1)
    per_channel = 10 * np.log10(np.maximum(signal, 1e-30) / np.maximum(noise, 1e-30))
    return float(np.mean(np.clip(np.where(noise > 0, per_channel, 60.0), -20.0, 60.0)))


def fake_quantize(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """Round ``values`` to the per-tensor integer grid of (scale, zero-point) and back."""
    info = np.iinfo(zero_point.dtype)
    scale, zero_point = float(np.ravel(scale)[0]), float(np.ravel(zero_point)[0])
    return ((np.clip(np.round(values / scale) + zero_point, info.min, info.max) - zero_point) * scale).astype(values.dtype)


def ranked(noises) -> list[TensorNoise]:
    """Worst (lowest SQNR) first; ties broken by name so the order is deterministic."""
    return sorted(noises, key=lambda item: (item.sqnr_db, item.tensor))


# --------------------------------------------------------------------------- ONNX


def onnx_activations(model_path: Path, images: np.ndarray) -> dict[str, np.ndarray]:
    """Every float tensor of ``model_path`` (shape-inferred, as pre-processing leaves it) for ``images``.

    Each comes back stacked along axis 0 with its shape (qdq_loss_debug's collector flattens them).
    """
    import onnx

    model = onnx.load(str(model_path))
    exposed = {item.name for item in model.graph.output}
    produced = {name for node in model.graph.node for name in node.output}  # value_info may keep stale names
    for info in model.graph.value_info:
        if info.type.tensor_type.elem_type == onnx.TensorProto.FLOAT and info.name in produced and info.name not in exposed:
            model.graph.output.append(info)
    return {model.graph.input[0].name: images, **_run_onnx(model, images)}


def _run_onnx(model, images: np.ndarray, replaced: tuple[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """All outputs of ``model`` for ``images``, one image per run (an exported graph may have batch 1)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    input_name, names = model.graph.input[0].name, [item.name for item in session.get_outputs()]
    runs = []
    for i in range(len(images)):
        feed = {input_name: images[i : i + 1]}
        if replaced is not None:
            feed[replaced[0]] = replaced[1][i : i + 1]
        runs.append(session.run(names, feed))
    return {name: np.concatenate([run[index] for run in runs]) for index, name in enumerate(names)}


def onnx_rounded_tensors(float_path: Path, qdq_path: Path, activations: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each tensor the QDQ model rounds, as it rounds it: activations (from the float model's
    ``activations``) through their QuantizeLinear parameters, weights dequantized."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization.qdq_loss_debug import create_weight_matching

    qdq = onnx.load(str(qdq_path)).graph
    constants = {item.name: numpy_helper.to_array(item) for item in qdq.initializer}
    rounded = {}
    for node in qdq.node:
        name = node.input[0].removesuffix(_GRAPH_OUTPUT_SUFFIX)
        if node.op_type == "QuantizeLinear" and name in activations and len(node.input) == 3 and node.input[1] in constants:
            rounded[name] = fake_quantize(activations[name], constants[node.input[1]], constants[node.input[2]])
    for name, match in create_weight_matching(str(float_path), str(qdq_path)).items():
        rounded[name] = match["dequantized"].reshape(match["float"].shape).astype(match["float"].dtype)
    return rounded


def onnx_rounded_weights(float_path: Path, per_channel: bool, stored_axes: bool = False) -> dict[str, np.ndarray]:
    """Weights rounded to symmetric int8, per output channel or per tensor.

    With ``stored_axes`` the weights and axes are those weight-only int8 stores (``onnx_compaction.weight_axes``:
    Gemm/MatMul per output column, embedding tables included); otherwise Conv/Gemm/MatMul weights per row
    (axis 0), as onnxruntime's dynamic quantizer rounds them.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(float_path)).graph
    constants = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    if stored_axes:
        axes = weight_axes(graph, set())
    else:
        floats = {item.name: item for item in graph.initializer if item.data_type == onnx.TensorProto.FLOAT}
        layer_weights = (weight_input(node, floats) for node in graph.node if node.op_type in WEIGHT_OPS)
        axes = {name: 0 for name in layer_weights if name is not None}
    return {name: int8_roundtrip(constants[name], axis if per_channel else None) for name, axis in axes.items()}


def onnx_tensor_noise(float_path: Path, rounded: dict[str, np.ndarray], images: np.ndarray) -> list[TensorNoise]:
    """For each ``rounded`` tensor: the float model's logits SQNR with only that tensor rounded, worst first."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(float_path))
    graph, layers = model.graph, onnx_layers_by_tensor(model.graph)
    output = graph.output[0].name
    reference = _run_onnx(model, images)[output]
    weights = {item.name for item in graph.initializer}
    noises = []
    for name, value in rounded.items():
        if name == output:
            logits = value
        elif name in weights:
            variant = _copy(model)
            variant.graph.initializer.remove(next(item for item in variant.graph.initializer if item.name == name))
            variant.graph.initializer.append(numpy_helper.from_array(value, name))
            logits = _run_onnx(variant, images)[output]
        elif name == graph.input[0].name:
            logits = _run_onnx(model, value)[output]
        else:
            try:
                logits = _run_onnx(_fed_from_outside(model, name), images, (name, value))[output]
            except Exception:  # noqa: BLE001 - onnxruntime refuses the cut graph (a multi-output op): not measurable alone
                continue
        noises.append(TensorNoise(name, sqnr_db(reference, logits), layers.get(name, ())))
    return ranked(noises)


def _copy(model):
    import onnx

    variant = onnx.ModelProto()
    variant.CopyFrom(model)
    return variant


def _fed_from_outside(model, tensor: str):
    """A copy of ``model`` where ``tensor`` is a graph input; its producer's output goes nowhere."""
    variant = _copy(model)
    graph = variant.graph
    info = next(item for item in graph.value_info if item.name == tensor)
    for node in graph.node:
        for index, name in enumerate(node.output):
            if name == tensor:
                node.output[index] = f"{tensor}__unused"
    graph.input.append(info)
    return variant


def onnx_layers_by_tensor(graph) -> dict[str, tuple[str, ...]]:
    touching: dict[str, list[str]] = defaultdict(list)
    for node in graph.node:
        for tensor in [*node.output, *node.input]:
            if tensor and node.name not in touching[tensor]:
                touching[tensor].append(node.name)
    return {tensor: tuple(names) for tensor, names in touching.items()}


# --------------------------------------------------------------------------- PT2E


def module_path(node: torch.fx.Node) -> str | None:
    """The innermost module an exported torch node was called from (``TOP_LEVEL`` for the root)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0] or TOP_LEVEL


def export_for_calibration(model: nn.Module, example: torch.Tensor) -> tuple[torch.fx.GraphModule, int]:
    """``torch.export`` with a dynamic batch, so observers see batches of CALIBRATION_BATCH images
    (one image per call costs ~30x more in HistogramObserver); batch 1 when the model cannot export so."""
    try:
        batched = example.expand(2, *example.shape[1:])  # torch.export specialises a batch of 1
        exported = torch.export.export(model, (batched,), dynamic_shapes=({0: torch.export.Dim.DYNAMIC},))
        return exported.module(), CALIBRATION_BATCH
    except Exception:  # noqa: BLE001 - any export failure just means "calibrate one image at a time"
        return torch.export.export(model, (example,)).module(), 1


def pt2e_tensor_noise(converted: torch.fx.GraphModule, images: np.ndarray, batch: int = 1) -> list[TensorNoise]:
    """For each tensor a converted PT2E graph rounds: the logits SQNR with only it rounded, worst first.

    ``batch``: images per call (1 for a graph exported with a fixed batch of one).
    """
    tensors: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in converted.graph.nodes:
        if _is_quantize(node):
            tensors[_tensor_name(node.args[0])].append(node)
    reference = _run_rounding(converted, images, batch, frozenset())
    return ranked(
        TensorNoise(name, sqnr_db(reference, _run_rounding(converted, images, batch, frozenset(nodes))), _pt2e_layers(nodes))
        for name, nodes in tensors.items()
    )


def _run_rounding(converted: torch.fx.GraphModule, images: np.ndarray, batch: int, rounding: frozenset) -> np.ndarray:
    interpreter = _OnlyTheseRound(converted, rounding)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(images), batch):
            result = interpreter.run(torch.from_numpy(images[start : start + batch]))
            outputs.append((result[0] if isinstance(result, (tuple, list)) else result).numpy())
    return np.concatenate(outputs)


class _OnlyTheseRound(torch.fx.Interpreter):
    """Runs a converted graph with every quantize op outside ``rounding`` (and its dequantize ops) as the identity."""

    def __init__(self, module: torch.fx.GraphModule, rounding: frozenset, keep_values: bool = False) -> None:
        super().__init__(module, garbage_collect_values=not keep_values)
        self.rounding = rounding

    def run_node(self, node: torch.fx.Node):
        if _is_quantize(node) and node not in self.rounding:
            return self.env[node.args[0]]
        if _is_dequantize(node) and _is_quantize(node.args[0]) and node.args[0] not in self.rounding:
            return self.env[node.args[0]]
        return super().run_node(node)


def _op_name(node: torch.fx.Node) -> str:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return schema.name if schema is not None else ""


def _is_quantize(node) -> bool:
    return isinstance(node, torch.fx.Node) and _op_name(node).startswith("quantized_decomposed::quantize_per_")


def _is_dequantize(node: torch.fx.Node) -> bool:
    return _op_name(node).startswith("quantized_decomposed::dequantize_per_")


def _tensor_name(producer: torch.fx.Node) -> str:
    if producer.op == "get_attr":
        return str(producer.target)
    if producer.op == "placeholder":
        return "input"
    return f"{module_path(producer) or TOP_LEVEL}:{producer.name}"


def _pt2e_layers(quantize_nodes: list[torch.fx.Node]) -> tuple[str, ...]:
    """The modules writing the quantized tensor and reading its dequantized copies."""
    producer = quantize_nodes[0].args[0]
    readers = [reader for node in quantize_nodes for dequantize in node.users for reader in dequantize.users]
    paths = [module_path(node) for node in [producer, *readers] if node.op == "call_function"]
    return tuple(dict.fromkeys(path for path in paths if path))


def pt2e_tensor_errors(
    converted: torch.fx.GraphModule, images: np.ndarray, batch: int = 1
) -> list[tuple[str, float, float, float, tuple[str, ...]]]:
    """Two runs of a converted PT2E graph — every tensor rounding, then none — each rounded tensor matched across them.

    Returns (tensor, local SQNR dB: before vs after its own rounding in the quantized run, model SQNR dB
    and cosine: the quantized run's rounded tensor vs the float run's, layers), worst local SQNR first.
    """
    tensors: dict[str, list[torch.fx.Node]] = defaultdict(list)
    for node in converted.graph.nodes:
        if _is_quantize(node):
            tensors[_tensor_name(node.args[0])].append(node)
    firsts = {name: nodes[0] for name, nodes in tensors.items()}
    rounding = frozenset(node for nodes in tensors.values() for node in nodes)
    quantized = _capture(converted, images, batch, rounding, firsts)
    floating = _capture(converted, images, batch, frozenset(), firsts)
    rows = []
    for name, nodes in tensors.items():
        (before, after), reference = quantized[name], floating[name][0]
        rows.append(
            (name, channel_sqnr_db(before, after), channel_sqnr_db(reference, after), cosine(reference, after), _pt2e_layers(nodes))
        )
    return sorted(rows, key=lambda row: (row[1], row[0]))


def _capture(converted, images, batch, rounding: frozenset, firsts: dict[str, torch.fx.Node]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each named quantize node: the tensor it reads and its dequantized copy over ``images``, as (channels, values).

    Channels are a weight's output channels (axis 0) and a feature map's channels (axis 1 of a rank >= 3
    activation); any other tensor is one channel. A per-tensor grid set by one loud channel rounds the
    others away, which only a per-channel SQNR sees.
    """
    interpreter = _OnlyTheseRound(converted, rounding, keep_values=True)
    seen: dict[str, list[tuple[np.ndarray, np.ndarray]]] = defaultdict(list)
    with torch.no_grad():
        for start in range(0, len(images), batch):
            interpreter.run(torch.from_numpy(images[start : start + batch]))
            for name, node in firsts.items():
                dequantized = next(iter(node.users), None)
                after = interpreter.env.get(dequantized, interpreter.env[node]) if dequantized is not None else interpreter.env[node]
                axis = 0 if node.args[0].op == "get_attr" else 1
                seen[name].append((_by_channel(interpreter.env[node.args[0]], axis), _by_channel(after, axis)))
    return {name: (np.concatenate([a for a, _ in pairs], 1), np.concatenate([b for _, b in pairs], 1)) for name, pairs in seen.items()}


def _by_channel(value, axis: int) -> np.ndarray:
    """``value`` as a (channels, values) array: ``axis`` first for weights and feature maps, else one row."""
    array = _numpy(value)
    if array.ndim >= (2 if axis == 0 else 3):
        return np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    return array.reshape(1, -1)


def _numpy(value) -> np.ndarray:
    return value.detach().float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value, np.float32)


def added_noise_db(output_db: float, input_dbs: list[float]) -> float:
    """SQNR (dB) of the noise an operator adds itself: its output's noise power less what its inputs' relative noise
    accounts for (200 dB when the inputs account for all of it)."""
    added = 10 ** (-output_db / 10) - sum(10 ** (-value / 10) for value in input_dbs)
    return 200.0 if added <= 0 else min(200.0, -10 * math.log10(added))


def cosine(reference: np.ndarray, value: np.ndarray) -> float:
    """Cosine similarity of two tensors, flattened (1.0 when either is all zeros)."""
    a, b = np.asarray(reference, np.float64).ravel(), np.asarray(value, np.float64).ravel()
    norm = float(np.linalg.norm(a) * np.linalg.norm(b))
    return 1.0 if norm == 0 else float(a @ b / norm)
