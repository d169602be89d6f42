"""Read the text that ExecuTorch's ``executor_runner`` example binary (or a build of it) prints.

Its lines come from ``ET_LOG`` through the default (POSIX) platform layer::

    I 00:00:00.000812 executorch:executor_runner.cpp:118] Resetting threadpool with num threads = 4
    I 00:00:00.021874 executorch:executor_runner.cpp:292] Model loaded in 3.514000 ms.
    I 00:00:00.022411 executorch:executor_runner.cpp:387] Iteration 1 of 50: 0.611000 ms
    I 00:00:00.061263 executorch:executor_runner.cpp:402] Model executed successfully 50 time(s) in 30.118000 ms.
    E 00:00:00.002101 executorch:executor_runner.cpp:95] Loading of method forward failed with status 0x12

Releases differ: recent ones print one ``Iteration i of n`` line per execution (then the
percentiles are real), 1.x releases only the total (then p50 is None and the mean is the
total over the count), older ones no load time. A missing line gives ``None``; only a log
without the "executed successfully" line is an error (its first ``E`` line, if any, says why).
A binary built with the Android platform layer logs to logcat instead: nothing to read here.
"""

from __future__ import annotations

import re

from edgeprune.errors import DeviceError

_NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_PREFIX = re.compile(r"^([DIEFW])(?: \d+:\d+:\d+\.\d+)? executorch:[^\]]*\] ?(.*)$")
_ITERATION = re.compile(rf"^Iteration (\d+) of (\d+): {_NUMBER} ms")
_EXECUTED = re.compile(rf"Model executed successfully (\d+) time\(s\) in {_NUMBER} ms")
_LOADED = re.compile(rf"Model loaded in {_NUMBER} ms")
_THREADS = re.compile(r"Resetting threadpool with num threads = (-?\d+)")


def log_messages(text: str) -> list[tuple[str, str]]:
    """(level letter, message) of every ET_LOG line in ``text``; other lines (printed outputs) are skipped."""
    messages = []
    for line in text.splitlines():
        match = _PREFIX.match(line.strip())
        if match:
            messages.append((match.group(1), match.group(2).strip()))
    return messages


def parse_executor_runner_output(text: str) -> dict:
    """Latencies (ms), execution count, load time and thread count from executor_runner's log.

    Returns ``iteration_ms`` (per-execution times, empty where the release does not print them),
    ``executions``, ``total_ms``, ``mean_ms``, ``load_ms`` and ``threads`` (None when absent).
    Raises DeviceError when no successful execution is reported.
    """
    messages = log_messages(text)
    iterations: list[float] = []
    executed = load_ms = threads = None
    for _, message in messages:
        if match := _ITERATION.match(message):
            iterations.append(float(match.group(3)))
        elif match := _EXECUTED.search(message):
            executed = (int(match.group(1)), float(match.group(2)))
        elif match := _LOADED.search(message):
            load_ms = float(match.group(1))
        elif match := _THREADS.search(message):
            threads = int(match.group(1))
    if executed is None:
        errors = [message for level, message in messages if level in "EF"]
        reason = errors[0] if errors else (text.strip().splitlines() or ["no output"])[-1][:200]
        raise DeviceError(f"executor_runner reported no successful execution: {reason}")
    count, total_ms = executed
    return {
        "iteration_ms": iterations,
        "executions": count,
        "total_ms": total_ms,
        "mean_ms": total_ms / count if count else None,
        "load_ms": load_ms,
        "threads": threads,
    }


def executor_runner_args(binary: str, model: str, executions: int, threads: int) -> list[str]:
    """executor_runner flags: every execution timed, on ``threads`` CPU threads (``--cpu_threads``, its XNNPACK pool)."""
    return [binary, f"--model_path={model}", f"--num_executions={executions}", f"--cpu_threads={threads}"]


def runner_json_from_executor_runner(parsed: dict, warmup: int, threads: int, facts: dict) -> dict:
    """A runner-shaped dict: percentiles over the executions after the first ``warmup`` where each one was
    printed; otherwise p50/p90/p99 are None and the mean is the tool's total over its count (warmup included)."""
    import numpy as np

    timed = parsed["iteration_ms"][warmup:]
    stats: dict = {"latency_p50_ms": None, "latency_p90_ms": None, "latency_p99_ms": None, "latency_std_ms": None}
    stats.update(latency_mean_ms=parsed["mean_ms"], latency_min_ms=None, iterations=parsed["executions"])
    if timed:
        ms = np.asarray(timed, dtype=np.float64)
        p50, p90, p99 = np.percentile(ms, [50, 90, 99])
        stats = {
            "latency_p50_ms": float(p50), "latency_p90_ms": float(p90), "latency_p99_ms": float(p99),
            "latency_mean_ms": float(ms.mean()), "latency_std_ms": float(ms.std()), "latency_min_ms": float(ms.min()),
            "iterations": int(ms.size),
        }  # fmt: skip
    return {
        "init_ms": parsed["load_ms"],
        "first_run_ms": parsed["iteration_ms"][0] if parsed["iteration_ms"] else None,
        **stats,
        "threads": parsed["threads"] or threads,
        "peak_rss_mb": None,  # the tool reports no memory
        "rss_before_load_mb": None,
        "runtime": "executorch executor_runner",
        "runtime_version": "unknown",
        "providers": ["executor_runner"],
        **facts,
    }
