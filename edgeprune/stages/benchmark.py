"""Benchmark every exported artefact through the target's runtime adapter.

Each measurement runs in its own process (see ``edgeprune.runtimes``). The
dense fp32 export of the unpruned model is measured alongside, so the
speed-up is measured, not estimated from MACs. Where the adapter can time two
artefacts in one process (the local device), each artefact's speed-up comes from
``benchmark.repeats`` such processes timing it and the dense export in alternation
(the median of their ratios): separate processes on a shared machine can differ by
tens of percent for the same file. ``speedup_method`` in the metrics says which.
"""

from __future__ import annotations

from typing import Any

from edgeprune.config import BuildConfig
from edgeprune.errors import DeviceError
from edgeprune.runtimes import BenchSettings, benchmark, benchmark_pair, paired_speedup
from edgeprune.stages.base import StageContext, StageOutput

EXPORTED = (
    "onnx_fp32", "onnx_int8", "onnx_fp16", "onnx_fp32_dense", "tflite_fp32", "tflite_int8", "tflite_fp32_dense",
    "pte_fp32", "pte_int8", "pte_fp32_dense",
)  # fmt: skip


class Benchmark:
    name = "benchmark"
    version = "5"  # 5: the measuring process's own peak memory, threads within the host's cores, repeats until steady
    sections = ("benchmark",)
    consumes = EXPORTED
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        return {}

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
        paired = paired_speedups(context, settings, [name for name in present if "skipped" not in results[name]])
        metrics = {"device": config.device, "results": results, "speedups": {**speedups(results), **paired}}
        metrics["speedup_method"] = "paired in one process" if paired else "separate processes"
        return StageOutput([], metrics)


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
