"""Benchmark every exported artefact through the target's runtime adapter.

Each measurement runs in its own process (see ``edgeprune.runtimes``). The
dense fp32 export of the unpruned model is measured alongside, so the
speed-up is measured, not estimated from MACs. Where the adapter can time two
artefacts in one process (the local device), each artefact's speed-up comes from
``benchmark.repeats`` such processes timing it and the dense export in alternation
(the median of their ratios): separate processes on a shared machine can differ by
tens of percent for the same file. ``speedup_method`` in the metrics says which.

On a remote device each shipped artefact's parity is also measured there (``edgeprune.device_parity``):
``parity_on_device`` in the metrics. An emulated device's timings (``emulated``) feed no speed-up.
With ``quantize.select = "fastest"`` the primary format's files within the accuracy budget are timed
side by side and the fastest becomes the primary artefact (``edgeprune.primary_selection``): metrics key
``primary_selection``.
"""

from __future__ import annotations

from typing import Any

from edgeprune.config import BuildConfig
from edgeprune.device_parity import parity_on_device
from edgeprune.errors import DeviceError
from edgeprune.primary_selection import candidates, select_fastest
from edgeprune.runtimes import BenchSettings, benchmark, benchmark_pair, device_computes_outputs, paired_speedup
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import read_model
from edgeprune.training import predict_logits

EXPORTED = (
    "onnx_fp32", "onnx_int8", "onnx_fp16", "onnx_fp32_dense", "tflite_fp32", "tflite_int8", "tflite_fp32_dense",
    "pte_fp32", "pte_int8", "pte_fp32_dense",
)  # fmt: skip


class Benchmark:
    name = "benchmark"
    version = "6"  # 6: parity on a remote device, emulated devices' timings feed no speed-up
    sections = ("benchmark", "parity")
    consumes = ("model", *EXPORTED)
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        """With ``quantize.select = "fastest"``: the quantize settings the choice reads."""
        if config.quantize.select != "fastest":
            return {}
        return {"select": config.quantize.select, "max_accuracy_drop": config.quantize.max_accuracy_drop}

    def run(self, context: StageContext) -> StageOutput:
        config = context.config.benchmark
        settings = BenchSettings(
            threads=config.threads,
            warmup=config.warmup,
            iterations=config.iterations,
            repeats=config.repeats,
            use_xnnpack=config.use_xnnpack,
            max_spread_pct=config.max_spread_pct,
            spread_time_limit_s=config.spread_time_limit_s,
            threads_beyond_cores=config.threads_beyond_cores,
        )
        results: dict[str, Any] = {}
        present = [name for name in EXPORTED if name in context.inputs]
        for name in context.reporter.track(present, len(present), f"benchmark on {config.device}"):
            try:
                results[name] = benchmark(context.inputs[name].path, config.device, settings).to_dict()
            except DeviceError as error:
                if config.required:
                    raise
                context.reporter.warn(f"benchmark of {name} on {config.device} skipped: {error}")
                results[name] = {"skipped": str(error)}
        measured = [name for name in present if "skipped" not in results[name]]
        paired = paired_speedups(context, settings, measured)
        metrics = {"device": config.device, "results": results, "speedups": {**speedups(results), **paired}}
        metrics["speedup_method"] = "paired in one process" if paired else "separate processes"
        emulated = next((result["emulated"] for result in results.values() if result.get("emulated")), None)
        if emulated:  # an emulator's speed says nothing about the device's: no speed-up, no budget reads these
            metrics.update(emulated=emulated, speedups={}, speedup_method=f"none: {config.device} is emulated")
        on_device = parity_on_board(context, settings, [name for name in measured if not name.endswith("_dense")])
        if on_device:
            metrics["parity_on_device"] = on_device
        selection = fastest_primary(context, settings, results) if not emulated else None
        if selection:
            metrics["primary_selection"] = selection
        return StageOutput([], metrics)


def fastest_primary(context: StageContext, settings: BenchSettings, results: dict[str, Any]) -> dict[str, Any] | None:
    """``quantize.select = "fastest"``: the primary format's files within the budget timed side by side, the fastest
    chosen (None when not asked for, or when there is nothing to choose between)."""
    config = context.config
    if config.quantize.select != "fastest" or not config.export.formats:
        return None
    found = candidates(config.export.formats[0], context.inputs, config.quantize.max_accuracy_drop)
    if len(found) < 2 or "skipped" in results.get(found[0].name, {}):
        return None
    context.reporter.info(f"benchmark: choosing the fastest of {', '.join(c.name for c in found)} on {config.benchmark.device}")
    try:
        return select_fastest(found, config.benchmark.device, settings, results)
    except DeviceError as error:
        if config.benchmark.required:
            raise
        context.reporter.warn(f"quantize.select = 'fastest' skipped, the primary artefact stays the quantized file: {error}")
        return None


def parity_on_board(context: StageContext, settings: BenchSettings, names: list[str]) -> dict[str, Any]:
    """Each artefact's parity against the PyTorch model, run by the remote device's runtime (empty for this machine)."""
    config = context.config
    if not names or "model" not in context.inputs or not device_computes_outputs(config.benchmark.device):
        return {}
    images = context.dataset.x_test[: config.parity.samples]
    samples = (images, predict_logits(read_model(context), images), context.dataset.y_test[: len(images)])
    reports: dict[str, Any] = {}
    for name in context.reporter.track(names, len(names), f"parity on {config.benchmark.device}"):
        try:
            reports[name] = parity_on_device(name, context.inputs[name].path, config.benchmark.device, samples, config.parity, settings)
        except DeviceError as error:
            if config.benchmark.required:
                raise
            context.reporter.warn(f"parity of {name} on {config.benchmark.device} skipped: {error}")
            reports[name] = {"skipped": str(error)}
    return reports


def paired_speedups(context: StageContext, settings: BenchSettings, present: list[str]) -> dict[str, float]:
    """Each artefact's speed-up over its format's dense export, timed in alternation in one process per repeat
    (empty where the adapter cannot, or a comparison fails and the benchmark is not required)."""
    config = context.config.benchmark
    ratios = {}
    for name in present:
        dense = f"{name.split('_')[0]}_fp32_dense"
        if name.endswith("_dense") or dense not in present:
            continue
        try:
            pairs = benchmark_pair(context.inputs[dense].path, context.inputs[name].path, config.device, settings)
        except DeviceError as error:
            if config.required:
                raise
            context.reporter.warn(f"paired timing of {name} beside {dense} skipped: {error}")
            continue
        if pairs is None:  # the adapter times one artefact per process
            return {}
        ratios[name] = paired_speedup(pairs)
    return ratios


def speedups(results: dict[str, Any]) -> dict[str, float]:
    """p50 of the dense fp32 export over the p50 of each artefact of the same format."""
    ratios = {}
    for fmt in ("onnx", "tflite", "pte"):
        dense = results.get(f"{fmt}_fp32_dense", {}).get("latency_p50_ms")
        if not dense:
            continue
        for name, result in results.items():
            p50 = result.get("latency_p50_ms")
            if name.startswith(fmt) and p50 and not name.endswith("_dense"):
                ratios[name] = dense / p50
    return ratios
