"""onnxruntime QDQ quantization with a per-tensor mix, and the two-run tensor ranking.

A mix (``edgeprune.quantization.search``) gives tensors a rung: ``percentile`` (an int8 range from the
0.01/99.99 percentiles of the float activations, through ``TensorQuantOverrides`` rmin/rmax),
``int16`` (A16W8: ``TensorQuantOverrides`` quant_type QInt16; below opset 21 onnxruntime writes
com.microsoft Q/DQ ops for those) or ``float`` (the layers reading or writing the tensor go to
``nodes_to_exclude``). Calibration runs once per quantizer (onnxruntime's calibration cache);
each candidate only rewrites the graph.

Ranking (``onnxruntime.quantization.qdq_loss_debug``): the float and the QDQ model run once each
on the same images with every activation exposed as an output; each quantized activation's SQNR
before vs after its own quantize/dequantize pair is the noise it adds, worst first.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
from onnxruntime.quantization.qdq_loss_debug import (
    collect_activations,
    create_activation_matching,
    modify_model_output_intermediate_tensors,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from edgeprune.config import QuantizeConfig
from edgeprune.export.onnx import INPUT_NAME
from edgeprune.onnx_compaction import float16_constants, quantize_weights
from edgeprune.quant_sensitivity import (
    TensorNoise,
    added_noise_db,
    channel_sqnr_db,
    cosine,
    onnx_activations,
    onnx_layers_by_tensor,
    onnx_rounded_tensors,
    onnx_rounded_weights,
    onnx_tensor_noise,
)
from edgeprune.quantization.search import Mix, TensorError

RANKING_SAMPLES = 16  # calibration images of the two ranking runs (every activation of each is held in memory)
SENSITIVITY_SAMPLES = 64  # calibration images on which each tensor's effect alone on the logits is measured
PERCENTILES = (0.01, 99.99)  # the percentile rung's range
COSINE_TENSORS = 8  # the worst tensors whose cosine against the float run is measured (the manifest reports the worst 5)
CLEAN_INPUT_DB = 20.0  # a layer's added noise is measured only where its inputs are at least this clean


class CalibrationReader:
    """onnxruntime's one-method calibration interface over preprocessed images."""

    def __init__(self, images: np.ndarray) -> None:
        self._samples = iter(images[i : i + 1] for i in range(len(images)))

    def get_next(self) -> dict[str, np.ndarray] | None:
        sample = next(self._samples, None)
        return None if sample is None else {INPUT_NAME: sample}


class OnnxQuantizer:
    """onnxruntime: the recommended pre-processing once, then static QDQ (with a mix), dynamic or weight-only int8.

    Layers are node names of the pre-processed model (``nodes_to_exclude``).
    """

    def __init__(self, fp32_path: Path, calibration: np.ndarray, config: QuantizeConfig, scratch: Path) -> None:
        self.calibration, self.config, self.scratch = calibration, config, scratch
        self.layout = None
        self.prepared = scratch / "preprocessed.onnx"
        quant_pre_process(str(fp32_path), str(self.prepared))
        self.static = config.scheme == "int8" and config.activation_type != "float"
        self.rungs: tuple[str, ...] = ("percentile", "int16", "float") if self.static else ("float",)
        self.path: Path | None = None
        self._layers: dict[str, tuple[str, ...]] | None = None
        self._ranges: dict[str, tuple[float, float]] = {}

    @property
    def layers(self) -> dict[str, tuple[str, ...]]:
        if self._layers is None:
            self._layers = onnx_layers_by_tensor(onnx.load(str(self.prepared)).graph)
        return self._layers

    def quantize(self, path: Path, mix: Mix) -> None:
        self.path, config = path, self.config
        keep_float = float_layers(mix, self.layers)
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
        self._quantize_static(path, keep_float, tensor_overrides(mix, self._ranges))

    def _quantize_static(self, path: Path, keep_float: tuple[str, ...], overrides: dict[str, list[dict[str, Any]]]) -> None:
        method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy, "percentile": CalibrationMethod.Percentile}
        cache = self.scratch / f"calibration-{self.config.calibration}.json"
        reader = None if cache.is_file() else CalibrationReader(self.calibration)
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print progress to stdout
            quantize_static(
                str(self.prepared),
                str(path),
                reader,
                quant_format=QuantFormat.QDQ,
                per_channel=self.config.per_channel,
                activation_type=QuantType.QInt8 if self.config.activation_type == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method[self.config.calibration],
                nodes_to_exclude=list(keep_float),
                extra_options={"TensorQuantOverrides": overrides} if overrides else {},
                calibration_cache_path=cache,
            )

    def tensor_errors(self) -> list[TensorError]:
        """Two-run ranking of the last ``quantize``; weights (no activation grid: dynamic, weight-only) by their noise alone."""
        if not self.static:
            return [as_error(item) for item in self.tensor_noise()]
        errors, self._ranges = two_run_errors(self.prepared, self.path, self.calibration[:RANKING_SAMPLES], self.scratch, self.layers)
        return errors

    def tensor_noise(self) -> list[TensorNoise]:
        """Each rounded tensor's effect alone on the logits (one run per tensor), worst first."""
        images = self.calibration[:SENSITIVITY_SAMPLES]
        weight_only = self.config.activation_type == "float"
        if not self.static:
            rounded = onnx_rounded_weights(self.prepared, self.config.per_channel, stored_axes=weight_only)
            return onnx_tensor_noise(self.prepared, rounded, images)
        return onnx_tensor_noise(
            self.prepared, onnx_rounded_tensors(self.prepared, self.path, onnx_activations(self.prepared, images)), images
        )

    def refine(self, candidates: list[TensorError]) -> list[TensorError]:
        """``candidates`` re-ranked by their rounding's effect alone on the logits (one run each)."""
        images = self.calibration[:SENSITIVITY_SAMPLES]
        names = {item.tensor for item in candidates}
        rounded = onnx_rounded_tensors(self.prepared, self.path, onnx_activations(self.prepared, images))
        alone = {
            item.tensor: item.sqnr_db for item in onnx_tensor_noise(self.prepared, {k: v for k, v in rounded.items() if k in names}, images)
        }
        return sorted(candidates, key=lambda item: (alone.get(item.tensor, item.sqnr_db), item.tensor))

    def mix_cost(self, mix: Mix) -> dict[str, Any]:
        graph = onnx.load(str(self.prepared)).graph
        macs = node_macs(graph)
        total = max(sum(macs.values()), 1)
        readers = {tensor: tuple(node.name for node in graph.node if tensor in node.input) for tensor in mix}
        keep_float = float_layers(mix, self.layers)
        sixteen = {name for tensor, rung in mix.items() if rung == "int16" for name in readers[tensor]} - set(keep_float)
        return {
            "float_layers": list(keep_float),
            "macs_off_int8": {
                "int16": round(sum(macs.get(name, 0) for name in sixteen) / total, 4),
                "float": round(sum(macs.get(name, 0) for name in keep_float) / total, 4),
            },
        }

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
        for leftover in [*self.scratch.glob("*.onnx.data"), *self.scratch.glob("calibration-*.json"), *self.scratch.glob("ranking-*.onnx")]:
            leftover.unlink()


def float_layers(mix: Mix, layers: Mapping[str, tuple[str, ...]]) -> tuple[str, ...]:
    """The layers the ``float`` rung leaves unquantized, in first-seen order."""
    return tuple(dict.fromkeys(layer for tensor, rung in mix.items() if rung == "float" for layer in layers.get(tensor, ())))


def tensor_overrides(mix: Mix, ranges: Mapping[str, tuple[float, float]]) -> dict[str, list[dict[str, Any]]]:
    """onnxruntime ``TensorQuantOverrides`` for the ``percentile`` and ``int16`` tensors of ``mix``."""
    overrides: dict[str, list[dict[str, Any]]] = {}
    for tensor, rung in mix.items():
        if rung == "int16":
            overrides[tensor] = [{"quant_type": QuantType.QInt16}]
        elif rung == "percentile" and tensor in ranges:
            low, high = ranges[tensor]
            overrides[tensor] = [{"rmin": np.float32(low), "rmax": np.float32(high)}]
    return overrides


def two_run_errors(
    float_path: Path, qdq_path: Path, images: np.ndarray, scratch: Path, layers: Mapping[str, tuple[str, ...]]
) -> tuple[list[TensorError], dict[str, tuple[float, float]]]:
    """Each QDQ activation's noise from one float and one QDQ run, worst first; and the float activations' percentile ranges."""
    producers = _producers(float_path)
    feeds = [{INPUT_NAME: images[i : i + 1]} for i in range(len(images))]
    runs = {}
    for role, path in (("float", float_path), ("qdq", qdq_path)):
        augmented = scratch / f"ranking-{role}.onnx"
        modify_model_output_intermediate_tensors(str(path), str(augmented))
        runs[role] = collect_activations(str(augmented), feeds)
        augmented.unlink()
    matching = create_activation_matching(runs["qdq"], runs["float"])
    # Not compute_activation_error: onnxruntime drops a Relu after a Conv and lets the int8 range clip, so a
    # Relu output's "pre_qdq" is the Conv's, negatives included. Clipped to the grid's range it is the relu'd value.
    channels = _channel_counts(float_path)
    flat = {name: {role: _by_channel(values, channels.get(name, 1)) for role, values in match.items()} for name, match in matching.items()}
    for values in flat.values():
        values["pre_qdq"] = np.clip(values["pre_qdq"], values["post_qdq"].min(), values["post_qdq"].max())
    model_before = {name: channel_sqnr_db(values["float"], values["pre_qdq"]) for name, values in flat.items() if "float" in values}
    model_after = {name: channel_sqnr_db(values["float"], values["post_qdq"]) for name, values in flat.items() if "float" in values}
    ranked = []
    for name, values in flat.items():
        chain, sources = _compute_chain(name, producers, set(matching))
        added = _added_sqnr(model_before.get(name), [model_after.get(source) for source in sources])
        own = channel_sqnr_db(values["pre_qdq"], values["post_qdq"])
        touching = layers.get(name, ()) if own <= added else tuple(dict.fromkeys([*chain, *layers.get(name, ())]))
        cause = "rounding" if own <= added else "compute"
        ranked.append(TensorError(name, min(own, added), model_after.get(name), None, touching, cause))
    ranked.sort(key=lambda item: (item.sqnr_db, item.tensor))
    # The cosine is reported, not ranked on: measured for the worst few only (over every tensor it took half the ranking's time).
    for index, item in enumerate(ranked[:COSINE_TENSORS]):
        if "float" in flat[item.tensor]:
            ranked[index] = replace(item, cosine=cosine(flat[item.tensor]["float"], flat[item.tensor]["post_qdq"]))
    ranges = {name: _percentile_range(values) for name, values in runs["float"].items() if name in matching}
    return ranked, ranges


def _by_channel(values: list[np.ndarray], channels: int) -> np.ndarray:
    """Per-image flattened activations (qdq_loss_debug's collector flattens them) as (channels, values) for NCHW-like tensors."""
    per_image = [np.ravel(v) for v in values]
    if channels > 1 and all(v.size % channels == 0 for v in per_image):
        return np.concatenate([v.reshape(channels, -1) for v in per_image], axis=1)
    return np.concatenate(per_image)[None, :]


def _channel_counts(model_path: Path) -> dict[str, int]:
    """Axis 1 of each rank >= 3 float tensor (a feature map's channels); others count as one channel."""
    graph = onnx.load(str(model_path)).graph
    counts = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        dims = info.type.tensor_type.shape.dim
        if len(dims) >= 3 and dims[1].dim_value > 0:
            counts[info.name] = dims[1].dim_value
    return counts


def _added_sqnr(output_db: float | None, input_dbs: list[float | None]) -> float:
    """SQNR (dB) of the noise one layer adds: its output's error against the float run minus what its inputs brought.

    A layer with int8-broken weights (a channel rounded away) has clean inputs and a ruined output;
    its activations' own rounding may still look harmless.
    """
    known = [value for value in input_dbs if value is not None]
    if output_db is None or not known or min(known) < CLEAN_INPUT_DB:  # noise on noise does not add up: unmeasurable
        return 200.0
    return added_noise_db(output_db, known)


def _producers(model_path: Path) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each tensor's producing node: (node name, its inputs)."""
    return {output: (node.name, tuple(node.input)) for node in onnx.load(str(model_path)).graph.node for output in node.output}


def _compute_chain(tensor: str, producers: Mapping[str, tuple[str, tuple[str, ...]]], quantized: set[str]) -> tuple[list[str], list[str]]:
    """The nodes computing ``tensor`` from the nearest quantized tensors (a Conv fused with its Relu: both), and those tensors.

    The ``float`` rung of a tensor whose damage is added by its computation (int8 weights) leaves these nodes float.
    """
    chain, sources, frontier = [], [], [tensor]
    while frontier:
        current = frontier.pop()
        if current != tensor and current in quantized:
            sources.append(current)
            continue
        if current not in producers or producers[current][0] in chain:
            continue
        node, inputs = producers[current]
        chain.append(node)
        frontier += [item for item in inputs if item in producers or item in quantized]
    return chain, sources


def _percentile_range(values: list[np.ndarray]) -> tuple[float, float]:
    low, high = np.percentile(np.concatenate([np.ravel(v) for v in values]), PERCENTILES)
    return min(float(low), 0.0), max(float(high), 0.0)


def as_error(noise: TensorNoise) -> TensorError:
    return TensorError(noise.tensor, noise.sqnr_db, layers=noise.layers)


def node_macs(graph) -> dict[str, int]:
    """Multiply-accumulates per image of each Conv, Gemm and MatMul node (shapes from shape inference; unknown dims count 1)."""
    shapes = {info.name: [d.dim_value or 1 for d in info.type.tensor_type.shape.dim] for info in [*graph.value_info, *graph.output]}
    weights = {item.name: numpy_helper.to_array(item).shape for item in graph.initializer}
    macs = {}
    for node in graph.node:
        out, weight = shapes.get(node.output[0]), weights.get(node.input[1]) if len(node.input) > 1 else None
        if out is None or weight is None:
            continue
        if node.op_type == "Conv":
            macs[node.name] = int(np.prod(out[1:]) * np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            transposed = any(item.name == "transB" and item.i for item in node.attribute)
            macs[node.name] = int(np.prod(out[1:]) * weight[-1 if transposed else 0])
    return macs


def convert_onnx_fp16(source: Path, target: Path) -> None:
    """fp16 weights and activations with float32 model I/O (onnxruntime's converter)."""
    onnx.save(convert_float_to_float16(onnx.load(str(source)), keep_io_types=True), str(target))
