"""Run artefacts on devices and measure them: ``benchmark(path, "ssh://pi@rpi5")``.

Importing this package imports neither torch nor any runtime; ``runner.py`` (copied to
the device) and the adapters import onnxruntime / ai-edge-litert only when they run.
"""

from edgeprune.runtimes.base import (
    BenchResult,
    BenchSettings,
    RuntimeAdapter,
    benchmark,
    benchmark_many,
    benchmark_pair,
    open_adapter,
    paired_speedup,
)
from edgeprune.runtimes.benchmark_model_output import parse_benchmark_model_output

__all__ = [
    "BenchResult",
    "BenchSettings",
    "RuntimeAdapter",
    "benchmark",
    "benchmark_many",
    "benchmark_pair",
    "open_adapter",
    "paired_speedup",
    "parse_benchmark_model_output",
]
