"""Benchmark artefacts through the adapters: one artefact, a pair timed in alternation, or many devices at once.

A device measures one artefact at a time in this process (``device_lock``); the
inter-process and cross-node locks of a shared cache folder are in ``device_locks``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edgeprune.errors import DeviceError
from edgeprune.runtimes.base import BenchResult, BenchSettings
from edgeprune.runtimes.device_locks import device_lock
from edgeprune.runtimes.registry import open_adapter


def benchmark(artifact: Path, device: str = "local", settings: BenchSettings = BenchSettings()) -> BenchResult:
    """Benchmark ``artifact`` (.onnx/.tflite) on ``device``; cleans up the device afterwards.

    Raises:
        DeviceError: the device is unknown, unreachable after ``settings.retries``, lacks
            a runtime, or the runner failed on the artefact.
    """
    adapter = open_adapter(device, settings)
    with device_lock(device):
        try:
            adapter.prepare(Path(artifact))
            return adapter.run(Path(artifact), settings)
        finally:
            adapter.cleanup()


def benchmark_pair(
    baseline: Path, artifact: Path, device: str = "local", settings: BenchSettings = BenchSettings()
) -> list[tuple[float, float]] | None:
    """(baseline p50, artifact p50) from each of ``settings.repeats`` processes that time both in alternation,
    or None where the device's adapter cannot time two artefacts in one process (only ``local`` can).

    Raises DeviceError like ``benchmark``.
    """
    adapter = open_adapter(device, settings)
    if not hasattr(adapter, "compare"):
        return None
    with device_lock(device):
        try:
            return adapter.compare(Path(baseline), Path(artifact), settings)
        finally:
            adapter.cleanup()


def paired_speedup(pairs: Sequence[tuple[float, float]]) -> float:
    """The median of the per-pair speed-ups (baseline / artifact)."""
    return statistics.median(baseline / p50 for baseline, p50 in pairs)


def benchmark_many(
    artifact_device_pairs: Iterable[tuple[Path, str]],
    settings: BenchSettings = BenchSettings(),
    max_parallel: int = 4,
) -> list[BenchResult | DeviceError]:
    """Benchmark several (artefact, device) pairs; results come back in input order.

    Different devices run in parallel (at most ``max_parallel`` at once); runs on the
    same device wait for each other. A device that fails yields its DeviceError in
    place of a result and does not stop the others.
    """
    pairs = [(Path(artifact), device.strip()) for artifact, device in artifact_device_pairs]
    results: list[BenchResult | DeviceError | None] = [None] * len(pairs)
    queues: dict[str, list[int]] = {}
    for index, (_, device) in enumerate(pairs):
        queues.setdefault(device, []).append(index)

    def drain(indices: list[int]) -> None:
        # One worker per device runs its pairs in turn, so a busy device never holds
        # a pool slot that another device could use.
        for index in indices:
            artifact, device = pairs[index]
            try:
                results[index] = benchmark(artifact, device, settings)
            except DeviceError as error:
                results[index] = error

    with ThreadPoolExecutor(max_workers=max(1, max_parallel)) as pool:
        for future in [pool.submit(drain, indices) for indices in queues.values()]:
            future.result()  # re-raises bugs (non-DeviceError) in the caller
    return [result for result in results if result is not None]
