"""A TFLite int8 file's tensors ranked against its float sibling: two interpreter runs, every intermediate kept.

The PT2E ranking (``pt2e.py``) sees the quantized torch graph, not what the converter made of it;
a converter that drops a requantize or gives a tensor another tensor's grid damages the file where
that ranking cannot look. Here both ``.tflite`` files run on the same images with every tensor
preserved (no delegate), the int8 tensors are dequantized with their scale and zero-point, and each
is matched to the float file's tensor it stands for: the files' operators are aligned by kind and
output shape once QUANTIZE/DEQUANTIZE ops are set aside (those pass their input's match on). Per
tensor: its SQNR against the float tensor (error accumulated from upstream included) and the noise
its own operator adds — the part of that error its inputs did not bring, assuming an operator passes
its inputs' relative error on unchanged. Tensors whose own noise is far above an int8 grid's come
first, in execution order (the first place the int8 file departs from the float one leads), then
the rest, worst first.

Tensor names (``CONV_2D 7 block1.layers.0.2``) carry the float file's operator index, stable across
the search's candidates, and the module paths litert-torch writes into tensor names, which the
ladder's float rung leaves out of the PT2E annotation.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from edgeprune.parity import dequantize_output, quantize_input
from edgeprune.quant_sensitivity import added_noise_db, channel_sqnr_db, cosine
from edgeprune.quantization.search import TensorError

_PASS_THROUGH = frozenset({"QUANTIZE", "DEQUANTIZE"})  # the int8 file's grid changes: the same float tensor on both sides
DEPARTED_DB = 20.0  # own noise above an int8 grid's (30-50 dB): the file departs from the float one here
# Operators whose int8 output keeps the input's grid: the converter moves a QUANTIZE ahead of them, so the
# layer that reads the rounded tensor in torch (a conv after a max pool) reads it one operator further on
_SAME_GRID = frozenset({"MAX_POOL_2D", "RESHAPE", "PAD", "PADV2", "SLICE", "STRIDED_SLICE", "SQUEEZE", "TRANSPOSE"})
MIN_MATCHED = 0.5  # the share of the float file's operators that must find a twin, else the files are too different to compare
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)  # never called, so never in a tensor's location


@dataclass(frozen=True)
class _Op:
    index: int
    kind: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


@dataclass
class _Run:
    ops: list[_Op]
    values: dict[int, np.ndarray]  # tensor index -> float values over the images (int8 dequantized)
    names: dict[int, str]
    shapes: dict[int, tuple[int, ...]]
    model_input: int
    types: dict[int, str]  # tensor index -> numpy dtype name

    def quantized(self, tensor: int) -> bool:
        return self.types.get(tensor, "float32") in ("int8", "uint8", "int16")


def tflite_tensor_errors(float_path: Path, int8_path: Path, images: np.ndarray, layout: str | None, model: nn.Module) -> list[TensorError]:
    """The int8 file's tensors worst first (see the module docstring); [] when the two files do not align."""
    float_run, int8_run = _run(float_path, images, layout), _run(int8_path, images, layout)
    twins = _twins(float_run, int8_run)
    if sum(1 for op in float_run.ops if op.outputs and op.outputs[0] in twins.values()) < MIN_MATCHED * len(float_run.ops):
        return []
    accumulated = {
        tensor: channel_sqnr_db(*_by_channel(float_run.values[twin], int8_run.values[tensor]))
        for tensor, twin in twins.items()
        if tensor in int8_run.values and twin in float_run.values and float_run.values[twin].shape == int8_run.values[tensor].shape
    }
    producers = {tensor: op for op in float_run.ops for tensor in op.outputs}
    locations = module_locations(model)
    errors = []
    for op in int8_run.ops:
        tensor = op.outputs[0] if op.outputs else -1
        if tensor not in accumulated or not int8_run.quantized(tensor):  # a float op of the int8 file adds no rounding
            continue
        source = producers.get(twins[tensor])
        layers = _layers(op, int8_run, locations) or (_layers(source, float_run, locations) if source else ())
        if not layers:  # nothing the ladder could leave float
            continue
        upstream = min((accumulated[i] for i in op.inputs if i in accumulated), default=200.0)
        own = added_noise_db(accumulated[tensor], [upstream])
        similarity = cosine(float_run.values[twins[tensor]], int8_run.values[tensor])
        errors.append((op.index, TensorError(f"{_label(op, source)} {layers[0]}", own, accumulated[tensor], similarity, layers)))
    return [item for _, item in sorted(errors, key=_worst_first)]


def _worst_first(entry: tuple[int, TensorError]) -> tuple:
    """Departures (own noise under ``DEPARTED_DB``) in execution order, the first one first, then the rest by own noise.

    Past a departure every tensor downstream carries its error, and an operator mixing channels
    turns one collapsed channel's error into every channel's: the noise estimate of those tensors
    is blurred by what they inherit, so the first departure is the surest culprit.
    """
    order, item = entry
    return (0, order, item.tensor) if item.sqnr_db < DEPARTED_DB else (1, item.sqnr_db, item.tensor)


def _label(op: _Op, source: _Op | None) -> str:
    """The float file's operator a tensor stands for (``CONV_2D 7``), ``quantize`` when the int8 file rounds a float tensor."""
    label = f"{source.kind} {source.index}" if source else f"{op.kind} input"
    return f"{label} quantize" if op.kind == "QUANTIZE" else label


def module_locations(model: nn.Module) -> dict[str, str]:
    """Each module's location as litert-torch writes it into tensor names
    (``pkg.Model/pkg.Block_block1/torch.nn.modules.conv.Conv2d_2``) -> its module path (``block1.layers.0.2``)."""
    root = type(model)
    locations = {f"{root.__module__}.{root.__qualname__}": ""}
    modules = dict(model.named_modules())
    for path, module in modules.items():
        if not path or isinstance(module, _CONTAINERS):
            continue
        parts = path.split(".")
        segments = [f"{root.__module__}.{root.__qualname__}"]
        for depth in range(1, len(parts) + 1):
            ancestor = modules.get(".".join(parts[:depth]))
            if ancestor is not None and not isinstance(ancestor, _CONTAINERS):
                segments.append(f"{type(ancestor).__module__}.{type(ancestor).__qualname__}_{parts[depth - 1]}")
        locations["/".join(segments)] = path
    return locations


def _paths_in(name: str, locations: dict[str, str]) -> list[str]:
    """The module paths of the locations a tensor name lists (``loc;;loc;N``), each its longest known prefix."""
    paths = []
    for piece in name.split(";"):
        segments = piece.split("/")
        for end in range(len(segments), 1, -1):
            path = locations.get("/".join(segments[:end]))
            if path:
                paths.append(path)
                break
    return paths


def _layers(op: _Op, run: _Run, locations: dict[str, str]) -> tuple[str, ...]:
    """The modules writing ``op``'s output and reading it (through QUANTIZE/DEQUANTIZE), as in the PT2E ranking."""
    written = [op.outputs[0]]
    if op.kind == "QUANTIZE":  # a float tensor rounded: the module that computed it
        written = [*op.inputs, *written]
    readers, frontier = [], set(written)
    for other in run.ops:  # in execution order: a reader's own readers come after it
        if frontier & set(other.inputs):
            if other.kind not in _PASS_THROUGH:
                readers.append(other)
            if other.kind in _PASS_THROUGH or other.kind in _SAME_GRID:
                frontier.update(other.outputs)
    constants = [tensor for tensor in op.inputs if tensor not in run.values]  # weights and biases carry the op's location too
    named = [*written, *constants, *(reader.outputs[0] for reader in readers if reader.outputs)]
    names = [run.names.get(tensor, "") for tensor in named]
    return tuple(dict.fromkeys(path for name in names for path in _paths_in(name, locations)))


def _twins(float_run: _Run, int8_run: _Run) -> dict[int, int]:
    """Int8 file tensor -> the float file tensor it stands for, from operators aligned by kind and output shape."""
    runs = (float_run, int8_run)
    computing = [[op for op in run.ops if op.kind not in _PASS_THROUGH] for run in runs]
    keys = [
        [(op.kind, run.shapes.get(op.outputs[0]) if op.outputs else None) for op in ops] for ops, run in zip(computing, runs, strict=True)
    ]
    twins = {int8_run.model_input: float_run.model_input}
    for block in difflib.SequenceMatcher(None, keys[0], keys[1], autojunk=False).get_matching_blocks():
        for offset in range(block.size):
            float_op, int8_op = computing[0][block.a + offset], computing[1][block.b + offset]
            twins.update(zip(int8_op.outputs, float_op.outputs, strict=False))
    for op in int8_run.ops:  # in execution order: a pass-through op's input is matched before its output
        if op.kind in _PASS_THROUGH and op.inputs and op.inputs[0] in twins:
            twins[op.outputs[0]] = twins[op.inputs[0]]
    return twins


def _run(path: Path, images: np.ndarray, layout: str | None) -> _Run:
    """Every operator output of ``path`` over ``images`` (NCHW; fed NHWC when ``layout`` says so), int8 dequantized."""
    interpreter = _debug_interpreter(path)
    detail = interpreter.get_input_details()[0]
    samples = images.transpose(0, 2, 3, 1) if layout == "NHWC" else images
    details = {item["index"]: item for item in interpreter.get_tensor_details()}
    ops = [
        _Op(op["index"], op["op_name"], tuple(i for i in op["inputs"] if i >= 0), tuple(op["outputs"]))
        for op in interpreter._get_ops_details()
    ]
    produced = [tensor for op in ops for tensor in op.outputs]
    collected: dict[int, list[np.ndarray]] = {tensor: [] for tensor in [detail["index"], *produced]}
    for sample in samples:
        interpreter.set_tensor(detail["index"], quantize_input(sample[None], detail))
        interpreter.invoke()
        for tensor, values in collected.items():
            values.append(dequantize_output(interpreter.get_tensor(tensor), details[tensor]))
    return _Run(
        ops,
        {tensor: np.concatenate(values) for tensor, values in collected.items()},
        {index: item["name"] for index, item in details.items()},
        {index: tuple(int(d) for d in item["shape"]) for index, item in details.items()},
        detail["index"],
        {index: np.dtype(item["dtype"]).name for index, item in details.items()},
    )


def _debug_interpreter(path: Path):
    """An interpreter that keeps every intermediate tensor: no delegate (XNNPACK would fuse them away), one thread."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType  # loaded here: TensorFlow Lite's runtime (seconds)

    interpreter = Interpreter(
        model_path=str(path),
        num_threads=1,
        experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
        experimental_preserve_all_tensors=True,
    )
    interpreter.allocate_tensors()
    return interpreter


def _by_channel(reference: np.ndarray, value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(channels, values) views of two NHWC (or N…C) tensors: the last axis is the channel."""
    channels = reference.shape[-1] if reference.ndim > 1 else 1
    return reference.reshape(-1, channels).T, value.reshape(-1, channels).T
