#!/usr/bin/env python3
"""Is a benchmark repeatable? Benchmark one artefact several times and compare the p50s.

Each of the ``--runs`` runs is a separate ``edgeprune.runtimes.benchmark()`` call (itself
``--repeats`` isolated processes whose median p50 is the run's p50). The script prints
every run's p50 and the largest relative deviation of a run's p50 from the median of
all runs, ``max |p50_i - median| / median * 100``, and exits 1 when that exceeds
``--max-deviation-pct`` (default 5 %).

``--paired`` checks the paired timing that measured speed-ups rest on instead: each run
times the artefact against itself in alternation (``benchmark_pair``, one process per
repeat), so every process's ratio should be 1; the script prints the ratios and the
largest ``|ratio - 1| * 100``, bounded the same way.

Usage (from the repository root)::

    python scripts/bench_repeatability.py                       # builds a small CNN as ONNX
    python scripts/bench_repeatability.py --artifact model.tflite --threads 4
    python scripts/bench_repeatability.py --device ssh://pi@rpi5 --iterations 200
    python scripts/bench_repeatability.py --paired --runs 2 --repeats 3   # one file against itself

Building the default artefact needs torch; ``--artifact`` needs only the runtime.
Exit codes: 0 repeatable, 1 deviation above the bound, 2+ an edgeprune error.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

try:
    import edgeprune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune.errors import DeviceError, EdgepruneError
from edgeprune.runtimes import BenchSettings, benchmark, benchmark_pair


def build_small_cnn_onnx(folder: Path) -> Path:
    """Export a 5-conv CNN (3x128x128 input, about 0.23 GMAC: milliseconds, not microseconds,
    so timer and scheduler noise stay small against the signal) to ONNX."""
    import torch

    torch.manual_seed(0)
    layers = []
    for channels_in, channels_out, stride in [(3, 32, 2), (32, 64, 1), (64, 64, 2), (64, 128, 1), (128, 128, 2)]:
        layers += [torch.nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1), torch.nn.ReLU()]
    head = [torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(128, 10)]
    model = torch.nn.Sequential(*layers, *head).eval()
    path = folder / "small_cnn.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 128, 128),), str(path), dynamo=False, input_names=["input"])
    return path


def max_relative_deviation_pct(p50s: list[float]) -> float:
    """``max |p50_i - median| / median * 100`` over the runs."""
    median = statistics.median(p50s)
    return max(abs(p50 - median) for p50 in p50s) / median * 100.0


def _load_average() -> str:
    """1-minute load average: other work on the machine is the usual cause of spread."""
    return f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "n/a"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help=".onnx/.tflite to benchmark (default: build a small CNN)")
    parser.add_argument("--device", default="local", help="device URL (default: local)")
    parser.add_argument("--runs", type=int, default=3, help="separate benchmark() calls")
    parser.add_argument("--repeats", type=int, default=3, help="isolated processes per run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--max-deviation-pct", type=float, default=5.0)
    parser.add_argument("--paired", action="store_true", help="time the artefact against itself in one process per repeat")
    return parser.parse_args(argv)


def self_pair_ratios(artifact: Path, device: str, settings: BenchSettings, runs: int) -> list[float]:
    """Each process's ratio of the artefact's p50 timed beside itself (1 when pairing is fair)."""
    ratios = []
    for _ in range(runs):
        pairs = benchmark_pair(artifact, artifact, device, settings)
        if pairs is None:
            raise DeviceError(f"{device} cannot time two artefacts in one process (only local can)")
        ratios += [first / second for first, second in pairs]
    return ratios


def report_pairs(artifact: Path, args: argparse.Namespace, ratios: list[float]) -> int:
    print(f"{os.cpu_count()} CPUs, load average after: {_load_average()}, {args.threads} threads")
    print("self-pair ratios: " + ", ".join(f"{ratio:.3f}" for ratio in ratios))
    deviation = max(abs(ratio - 1.0) for ratio in ratios) * 100.0
    verdict = "OK" if deviation <= args.max_deviation_pct else "BIASED"
    bound = f"(bound {args.max_deviation_pct:g} %)"
    print(f"{artifact.name} beside itself on {args.device}: max |ratio - 1| {deviation:.2f} % {bound}: {verdict}")
    return 0 if deviation <= args.max_deviation_pct else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = BenchSettings(
        threads=args.threads, warmup=args.warmup, iterations=args.iterations, min_seconds=args.min_seconds, repeats=args.repeats
    )
    with tempfile.TemporaryDirectory() as folder:
        artifact = args.artifact or build_small_cnn_onnx(Path(folder))
        load_before = _load_average()
        try:
            if args.paired:
                return report_pairs(artifact, args, self_pair_ratios(artifact, args.device, settings, args.runs))
            results = [benchmark(artifact, args.device, settings) for _ in range(args.runs)]
        except EdgepruneError as error:
            print(f"error: {error}", file=sys.stderr)
            return error.exit_code
    p50s = [result.latency_p50_ms for result in results]
    print(f"{os.cpu_count()} CPUs, load average before/after: {load_before} / {_load_average()}")
    for run, result in enumerate(results, start=1):
        print(
            f"run {run}: p50 {result.latency_p50_ms:.4f} ms (spread over {args.repeats} repeats "
            f"{result.p50_spread_pct:.2f} %, p90 {result.latency_p90_ms or float('nan'):.4f} ms)"
        )
    deviation = max_relative_deviation_pct(p50s)
    verdict = "OK" if deviation <= args.max_deviation_pct else "NOT REPEATABLE"
    print(
        f"{artifact.name} on {args.device}: max relative deviation of p50 {deviation:.2f} % (bound {args.max_deviation_pct:g} %): {verdict}"
    )
    return 0 if deviation <= args.max_deviation_pct else 1


if __name__ == "__main__":
    sys.exit(main())
