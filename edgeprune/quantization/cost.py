"""What a searched mix costs: file size and a paired p50 latency beside plain int8 and fp32.

The budget search may leave tensors at 16 bits or layers in float; the user pays for that in bytes
and time. Each file is opened in this process with the benchmark runner's own loaders
(``edgeprune.runtimes.runner``: onnxruntime, LiteRT, ExecuTorch), on one thread and one image, and
the files are timed in turns, round after round, so that all of them see the same moments of a
busy machine: their ratios hold where separate runs minutes apart would not. It is a cheap
in-build measurement (about ``seconds`` in all); the benchmark stage's figures on the target
device are the ones to ship by.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from edgeprune.pte_runtime import xnnpack_threads
from edgeprune.runtimes import runner

COST_SECONDS = 3.0  # the paired latency measurement's time, all files together
ROUNDS = 5  # turns in which every file is timed
WARMUP = 3  # untimed runs of a file at the start of its turn (caches warm again after the other files ran)


def mix_cost_figures(files: Mapping[str, Path], threads: int = 1, seconds: float = COST_SECONDS) -> dict[str, Any]:
    """``size_bytes`` and ``latency_p50_ms`` of each named file ({"fp32": …, "plain_int8": …, "mix": …}).

    The latency is None for every file when a file cannot be run in this process (a runtime not
    installed, a model it rejects): a size is always there, a latency only where measured.
    """
    sizes = {key: path.stat().st_size for key, path in files.items()}
    try:
        latencies: dict[str, float | None] = dict(paired_p50_ms(files, threads, seconds))
    except Exception as error:  # a runtime's own failure (onnxruntime's pybind errors, LiteRT's, ExecuTorch's): no figure, one line
        return {"size_bytes": sizes, "latency_p50_ms": None, "latency_error": runner.one_line(str(error), 200)}
    return {"size_bytes": sizes, "latency_p50_ms": latencies, "threads": threads, "images_per_run": 1, "rounds": ROUNDS}


def paired_p50_ms(files: Mapping[str, Path], threads: int = 1, seconds: float = COST_SECONDS) -> dict[str, float]:
    """The median latency (ms) of each file, timed in turns for about ``seconds`` in all."""
    loops = {key: open_run_once(path, threads) for key, path in files.items()}
    # ExecuTorch's thread pool is process-wide: sized for the .pte files, then restored.
    with xnnpack_threads(threads) if any(path.suffix == ".pte" for path in files.values()) else contextlib.nullcontext():
        p50s = p50_in_turns(loops, _iterations(loops, seconds), ROUNDS, WARMUP)
    return {key: round(p50, 4) for key, p50 in p50s.items()}


def p50_in_turns(loops: Mapping[str, Callable[[], None]], iterations: Mapping[str, int], rounds: int, warmup: int) -> dict[str, float]:
    """The median latency (ms) of each loop, timed in turns: ``rounds`` times, each loop ``warmup`` untimed runs (its
    caches warm again after the others ran) then ``iterations[key]`` timed ones."""
    latencies: dict[str, list[int]] = {key: [] for key in loops}
    for _ in range(rounds):
        for key, run_once in loops.items():
            for _ in range(warmup):
                run_once()
            latencies[key] += runner.timed_loop(run_once, iterations[key], 0.0)
    return {key: runner.latency_stats(values)["latency_p50_ms"] for key, values in latencies.items()}


def open_run_once(path: Path, threads: int) -> Callable[[], None]:
    """One inference of ``path`` on the runner's fixed random input, as ``runner.py --model path`` would run it."""
    import_runtime, open_runtime = runner.runtime_for(str(path))
    options = argparse.Namespace(
        model=str(path), threads=threads, input=None, shape=[], providers="", provider_option=[], no_xnnpack=False, baseline=None
    )
    opened = open_runtime(options, import_runtime()[0])
    runner.first_run(opened)
    return opened.run_once


def _iterations(loops: Mapping[str, Callable[[], None]], seconds: float) -> dict[str, int]:
    """Timed runs per turn for each file: an equal share of ``seconds`` each, from one timed run; 3 to 200."""
    share = seconds / max(len(loops), 1) / ROUNDS
    counts = {}
    for key, run_once in loops.items():
        start = time.perf_counter()
        run_once()
        counts[key] = min(200, max(3, int(share / max(time.perf_counter() - start, 1e-6))))
    return counts
