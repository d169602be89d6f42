"""Read the text that ExecuTorch's ``executor_runner`` example binary (or a build of it) prints.

Its lines come from ``ET_LOG`` through the default (POSIX) platform layer; the summary of each output
is printed to stdout. From executorch 1.5.1's runner (tests/fixtures/executor_runner holds whole logs)::

    I 00:00:00.000434 executorch:executor_runner.cpp:422] Resetting threadpool with num threads = 2
    I 00:00:00.033437 executorch:threadpool.cpp:66] Resetting threadpool to 2 threads.
    I 00:00:00.042263 executorch:executor_runner.cpp:670] Model loaded in 8.748109 ms.
    I 00:00:00.042565 executorch:executor_runner.cpp:822] Iteration 1 of 20: 0.253430 ms
    I 00:00:00.044474 executorch:executor_runner.cpp:832] Model executed successfully 20 time(s) in 2.124574 ms.
    OutputX 0: tensor(sizes=[1, 10], [0.00674035, 0.0692412, ...])
    E 00:00:00.000498 executorch:program.cpp:114] File size is too small. Expected file size ...

Releases differ: recent ones print one ``Iteration i of n`` line per execution (then the
percentiles are real), older ones only the total (then p50 is None and the mean is the
total over the count) and no load time. A missing line gives ``None``; only a log
without the "executed successfully" line is an error (its first ``E`` line, else its ``F``
line, says why). The runner asks the CPU for its performant cores when ``--cpu_threads`` is
left at -1; where it cannot tell (x86) it logs "num threads = 0" and leaves the pool as it was,
so the pool's own "Resetting threadpool to N threads." line is the count that ran.
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
_POOL_THREADS = re.compile(r"Resetting threadpool to (\d+) threads")
_OUTPUT = re.compile(r"^OutputX (\d+): tensor\(sizes=\[([\d, ]*)\]")


def log_messages(text: str) -> list[tuple[str, str]]:
    """(level letter, message) of every ET_LOG line in ``text``; other lines (printed outputs) are skipped."""
    messages = []
    for line in text.splitlines():
        match = _PREFIX.match(line.strip())
        if match:
            messages.append((match.group(1), match.group(2).strip()))
    return messages


def parse_executor_runner_output(text: str) -> dict:
    """Latencies (ms), execution count, load time, thread count and output shapes from executor_runner's log.

    Returns ``iteration_ms`` (per-execution times, empty where the release does not print them),
    ``executions``, ``total_ms``, ``mean_ms``, ``load_ms``, ``threads`` (None when absent or unknown) and
    ``output_sizes`` (the shape of each printed tensor output, in order).
    Raises DeviceError when no successful execution is reported.
    """
    messages = log_messages(text)
    iterations: list[float] = []
    executed = load_ms = None
    threads: dict[str, int] = {}
    for _, message in messages:
        if match := _ITERATION.match(message):
            iterations.append(float(match.group(3)))
        elif match := _EXECUTED.search(message):
            executed = (int(match.group(1)), float(match.group(2)))
        elif match := _LOADED.search(message):
            load_ms = float(match.group(1))
        elif match := _THREADS.search(message):
            threads["asked"] = int(match.group(1))
        elif match := _POOL_THREADS.search(message):
            threads["pool"] = int(match.group(1))
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
        "threads": threads.get("pool") or (threads.get("asked") or None),  # 0 asked: the pool was left as it was
        "output_sizes": output_sizes(text),
    }


def output_sizes(text: str) -> list[list[int]]:
    """The shape of each tensor output the runner printed (``OutputX i: tensor(sizes=[...], ...)``), in order."""
    sizes = []
    for line in text.splitlines():
        if match := _OUTPUT.match(line.strip()):
            sizes.append([int(size) for size in match.group(2).split(",") if size.strip()])
    return sizes


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
