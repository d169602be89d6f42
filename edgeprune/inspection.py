"""``edgeprune inspect``: a one-shot look at a user's model before choosing a profile.

It loads the model as a build would (the checkpoint's format and every adaptation are reported), counts
layers, MACs and parameters, lists the layer groups structured pruning can narrow with the widths the
target's ``round_to`` allows, the groups kept whole and why (rounding, or couplings the dependency graph
misreads, found by a trial prune that is checked like a build's), the residual blocks depth pruning can
remove, and what does not convert: the model is exported to ONNX, quantized to int8 QDQ and converted to
TFLite in a child process bounded by ``timeout_s``, never guessed from op names.
"""

from __future__ import annotations

import json
import multiprocessing
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import BuildConfig, config_from_dict
from edgeprune.data import Dataset
from edgeprune.depth_pruning import residual_blocks
from edgeprune.export.onnx import export_onnx
from edgeprune.export.tflite import litert_failure, try_litert
from edgeprune.modelio import create_model, load_model, load_weights, save_model
from edgeprune.progress import Reporter
from edgeprune.pruning import Guard, guarded_prune, layer_groups, protected_layers, rounded_width
from edgeprune.quantization.onnx import OnnxQuantizer
from edgeprune.rounding import allowed_widths, kept_whole_by_rounding

CONVERSION_TIMEOUT_S = 300.0
TRIAL_RATIO = 0.5  # the trial prune narrows every movable group to about half its width
CALIBRATION_IMAGES = 32
CONVERSION_STEPS = ("onnx", "int8", "tflite")


def inspect_model(config: BuildConfig, dataset: Dataset, reporter: Reporter, timeout_s: float = CONVERSION_TIMEOUT_S) -> dict[str, Any]:
    """Everything ``edgeprune inspect`` prints, as plain data. Raises InputError for a model or checkpoint that does not load."""
    torch.manual_seed(config.seed)
    model = create_model(config.model, dataset.input_shape).eval()
    checkpoint = load_weights(model, Path(config.model.weights), config.model.trust_checkpoint) if config.model.weights else None
    example, sample = torch.from_numpy(dataset.x_test[:1].copy()), torch.from_numpy(dataset.x_test[:4].copy())
    reporter.info("inspect: counting layers and MACs")
    summary = {
        "source": config.model.source,
        "input_shape": list(dataset.input_shape),
        "checkpoint": checkpoint.summary() if checkpoint else None,
        "layers": dict(Counter(type(module).__name__ for module in model.modules() if not list(module.children()))),
        **_macs_params(model, example),
    }
    protected = protected_layers(model, config.prune.ignored_layers, config.model.num_classes)
    reporter.info("inspect: layer groups and a trial prune")
    summary.update(_groups(model, config, protected, sample))
    reporter.info("inspect: removable blocks")
    summary["residual_blocks"] = residual_blocks(model, sample, protected)
    reporter.info(f"inspect: exporting to ONNX, int8 and TFLite (at most {timeout_s:.0f} s)")
    summary["conversion"] = probe_conversion(model, config, dataset, timeout_s)
    return summary


def _macs_params(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}


def _groups(model: nn.Module, config: BuildConfig, protected: set[str], sample: torch.Tensor) -> dict[str, Any]:
    round_to = config.prune.round_to
    analysis = layer_groups(model, sample[:1], config.prune, protected)
    groups, protected = analysis.groups, analysis.protected(protected)
    rounding = kept_whole_by_rounding(groups, round_to)
    narrow = {item.layer for item in rounding}
    widths = {group.name: rounded_width(group.channels * (1 - TRIAL_RATIO), group.channels, round_to) for group in groups}
    widths = {name: width for name, width in widths.items() if name not in narrow}
    guard = Guard(sample, config.model.num_classes)
    untracked = guarded_prune(model, config.prune, protected, groups, widths, guard).untracked if widths else []
    kept = [*analysis.report(), *(item.to_dict() for item in rounding)]
    kept += [{"layer": item.layer, "reason": item.reason} for item in untracked]
    rows = [
        {"layer": group.name, "channels": group.channels, "members": len(group.members), "widths": allowed_widths(group.channels, round_to)}
        for group in groups
    ]
    return {"round_to": round_to, "groups": rows, "kept_whole": kept}


# --------------------------------------------------------------------------- conversion, in a bounded child process


def probe_conversion(model: nn.Module, config: BuildConfig, dataset: Dataset, timeout_s: float) -> dict[str, Any]:
    """Export ``model`` to ONNX, int8 QDQ ONNX and TFLite in a child process; each entry says ok or the first error."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-inspect-") as scratch:
        folder = Path(scratch)
        save_model(model, folder / "model.pt", config.model, dataset.input_shape)
        np.save(folder / "calibration.npy", dataset.x_train[:CALIBRATION_IMAGES])
        child = multiprocessing.get_context("spawn").Process(target=_convert_in_child, args=(str(folder), config.to_dict()), daemon=True)
        child.start()
        child.join(timeout_s)
        if child.is_alive():
            child.kill()
            child.join()
        result = folder / "conversion.json"
        done = json.loads(result.read_text()) if result.is_file() else {}
        timed_out = child.exitcode is not None and child.exitcode < 0
        reason = f"did not finish within {timeout_s:g} s" if timed_out else f"the converter crashed (exit code {child.exitcode})"
        return {step: done.get(step, {"ok": False, "error": reason}) for step in CONVERSION_STEPS}


def _convert_in_child(folder_name: str, sections: dict[str, Any]) -> None:
    folder = Path(folder_name)
    config = config_from_dict(sections, "inspect")
    model = load_model(folder / "model.pt")
    calibration = np.load(folder / "calibration.npy")
    example = torch.from_numpy(calibration[:1].copy())
    results: dict[str, Any] = {}
    for step, convert in (("onnx", _onnx), ("int8", _int8), ("tflite", _tflite)):
        try:
            results[step] = {"ok": True, **convert(model, example, calibration, config, folder)}
        except Exception as error:  # every converter failure is a finding, not a crash of inspect
            results[step] = {"ok": False, "error": str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}
        (folder / "conversion.json").write_text(json.dumps(results))


def _onnx(model: nn.Module, example: torch.Tensor, _calibration: np.ndarray, config: BuildConfig, folder: Path) -> dict[str, Any]:
    import onnx

    export_onnx(model, example, folder / "model.onnx", config.export)
    return {"ops": sorted({node.op_type for node in onnx.load(str(folder / "model.onnx")).graph.node})}


def _int8(_model: nn.Module, _example: torch.Tensor, calibration: np.ndarray, config: BuildConfig, folder: Path) -> dict[str, Any]:
    import onnx
    import onnxruntime as ort

    quantizer = OnnxQuantizer(folder / "model.onnx", calibration, config.quantize, folder)
    quantizer.quantize(folder / "model.int8.onnx", {})
    ort.InferenceSession(str(folder / "model.int8.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": calibration[:1]})
    graph = onnx.load(str(folder / "model.int8.onnx")).graph
    dequantized = {output for node in graph.node if node.op_type == "DequantizeLinear" for output in node.output}
    quantizable = {"Conv", "Gemm", "MatMul", "Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "MaxPool", "Relu", "Sigmoid"}
    float_ops = sorted(
        {node.op_type for node in graph.node if node.op_type in quantizable and not any(name in dequantized for name in node.input)}
    )
    return {"float_ops": float_ops}


def _tflite(model: nn.Module, example: torch.Tensor, _calibration: np.ndarray, _config: BuildConfig, folder: Path) -> dict[str, Any]:
    failure = try_litert(model, example, folder / "model.tflite")
    if failure:
        raise RuntimeError(litert_failure(failure))
    return {"size_bytes": (folder / "model.tflite").stat().st_size}


def format_inspection(summary: dict[str, Any]) -> str:
    """The inspection as lines for a terminal."""
    lines = [f"model {summary['source']}: input {tuple(summary['input_shape'])}, {summary['macs']:,} MACs, {summary['params']:,} params"]
    checkpoint = summary["checkpoint"]
    if checkpoint:
        lines.append(f"checkpoint: {checkpoint['format']}" + "".join(f"\n  adapted: {item}" for item in checkpoint["adapted"]))
    lines.append("layers: " + ", ".join(f"{count} {kind}" for kind, count in sorted(summary["layers"].items(), key=lambda item: -item[1])))
    kept = {row["layer"]: row["reason"] for row in summary["kept_whole"]}
    lines.append(f"prunable layer groups (round_to {summary['round_to']}):")
    for row in summary["groups"]:
        widths = row["widths"]
        allowed = ", ".join(map(str, widths)) if len(widths) <= 6 else f"{widths[0]}, {widths[1]} ... {widths[-1]}"
        note = f"  KEPT WHOLE: {kept[row['layer']]}" if row["layer"] in kept else ""
        lines.append(f"  {row['layer']}: {row['channels']} channels, {row['members']} layers, widths {allowed}{note}")
    blocks = summary["residual_blocks"]
    lines.append(f"removable blocks, residual or bypassable branches ({len(blocks)}): {', '.join(blocks) or 'none'}")
    for step, result in summary["conversion"].items():
        detail = {key: value for key, value in result.items() if key != "ok"}
        lines.append(f"{step}: {'converts' if result['ok'] else 'FAILS'}" + (f" {json.dumps(detail)}" if detail else ""))
    return "\n".join(lines)
