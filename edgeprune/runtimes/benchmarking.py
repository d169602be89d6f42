"""Benchmark artefacts through the adapters: one artefact, a pair timed in alternation, or many devices at once.

A device measures one artefact at a time in this process (``device_lock``); the
inter-process and cross-node locks of a shared cache folder are in ``device_locks``.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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
    return _on_device(device, settings, "compare", Path(baseline), Path(artifact), settings)


def _on_device(device: str, settings: BenchSettings, method: str, *args: object) -> Any:
    """The adapter's ``method(*args)`` under the device's lock, the device cleaned up after; None where the adapter
    has no such method."""
    adapter = open_adapter(device, settings)
    if not hasattr(adapter, method):
        return None
    with device_lock(device):
        try:
            return getattr(adapter, method)(*args)
        finally:
            adapter.cleanup()


def device_computes_outputs(device: str) -> bool:
    """Whether ``device``'s adapter runs artefacts on samples and returns their outputs (a remote device does;
    this machine's parity runs in process). Raises DeviceError for an unknown or malformed device."""
    return hasattr(open_adapter(device), "outputs")


def device_outputs(artifact: Path, samples: Path, device: str, local_dir: Path, settings: BenchSettings = BenchSettings()) -> dict | None:
    """The artefact's first outputs on each of ``samples`` (.npy) computed on ``device``: the runner's JSON with
    ``outputs_path``, a ``.npy`` in ``local_dir``; None where the device is this machine (parity already ran here)
    or its adapter cannot return outputs. The device's temporary files are removed whatever happens.

    Raises DeviceError like ``benchmark``.
    """
    return _on_device(device, settings, "outputs", Path(artifact), Path(samples), Path(local_dir), settings)


def profile_ops(artifact: Path, device: str, settings: BenchSettings = BenchSettings()) -> dict | None:
    """Each operator's time for ``artifact`` on ``device`` from one op-profiled run of TFLite's ``benchmark_model``
    (``run_order``: ``node_type``, ``name``, ``avg_ms``; ``inference_avg_ms``); None where the adapter has no
    op profiler. Raises DeviceError like ``benchmark``, or when the device has no ``benchmark_model`` for it."""
    return _on_device(device, settings, "profile_ops", Path(artifact), settings)


def profiles_ops(device: str, suffix: str) -> bool:
    """Whether ``device`` can profile a ``suffix`` file's operators: a ``.tflite`` on a device whose URL names TFLite's
    ``benchmark_model`` (adb, ssh). Raises DeviceError for an unknown or malformed device."""
    return suffix.lower().lstrip(".") == "tflite" and getattr(open_adapter(device), "benchmark_model", None) is not None


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
