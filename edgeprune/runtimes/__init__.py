"""Run artefacts on devices and measure them: ``benchmark(path, "ssh://pi@rpi5")``.

Built like ``edgeprune.models``: the types at the bottom (``base``), the adapter registry
(``registry``), one module per adapter, each registering its URL scheme; this package
imports every built-in adapter, so the registry is full once it is imported.

Importing this package imports neither torch nor any runtime; ``runner.py`` (copied to
the device) and the adapters import onnxruntime / ai-edge-litert only when they run.
"""

# Each import registers an adapter's URL scheme.
from edgeprune.runtimes import adb, gpu, local, ssh  # noqa: F401
from edgeprune.runtimes.base import BenchResult, BenchSettings, RuntimeAdapter
from edgeprune.runtimes.benchmark_model_output import parse_benchmark_model_output
from edgeprune.runtimes.benchmarking import (
    benchmark,
    benchmark_many,
    benchmark_pair,
    device_computes_outputs,
    device_outputs,
    paired_speedup,
    profile_ops,
    profiles_ops,
)
from edgeprune.runtimes.registry import open_adapter

__all__ = [
    "BenchResult",
    "BenchSettings",
    "RuntimeAdapter",
    "benchmark",
    "benchmark_many",
    "benchmark_pair",
    "device_computes_outputs",
    "device_outputs",
    "open_adapter",
    "paired_speedup",
    "parse_benchmark_model_output",
    "profile_ops",
    "profiles_ops",
]
