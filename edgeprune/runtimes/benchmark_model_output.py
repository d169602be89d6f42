"""Run and read TFLite's official ``benchmark_model`` binary: its command line and the text it prints.

The tool's output changes between TensorFlow/LiteRT releases and is often cut short
(a killed ``adb shell``), so every figure is optional: a missing or garbled line gives
``None``, never an exception. Only a log with no inference latency at all is an error.

benchmark_model prints microseconds; everything returned here is milliseconds or MiB.
"""

from __future__ import annotations

import math
import re
import subprocess

from edgeprune.errors import DeviceError
from edgeprune.runtimes.base import BenchSettings

_NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_TOP_OPS = 10
_RUN_HEADER = "Running benchmark for at least"
_REGULAR_PROFILE_HEADER = "Operator-wise Profiling Info for Regular Benchmark Runs"


def benchmark_model_args(binary: str, model: str, settings: BenchSettings, op_profiling: bool = False) -> list[str]:
    """benchmark_model flags equivalent to the runner's for ``settings`` (with each operator's time when ``op_profiling``)."""
    return [
        binary,
        f"--graph={model}",
        f"--num_threads={settings.threads}",
        f"--warmup_runs={settings.warmup}",
        "--warmup_min_secs=0",
        f"--num_runs={settings.iterations}",
        f"--min_secs={settings.min_seconds:g}",
        f"--max_secs={settings.timeout_s:g}",
        f"--use_xnnpack={str(settings.use_xnnpack).lower()}",
        *(["--enable_op_profiling=true"] if op_profiling else []),
    ]


def op_profiling_run(completed: subprocess.CompletedProcess[str], what: str) -> dict:
    """``run_order`` and ``inference_avg_ms`` of a finished ``--enable_op_profiling=true`` run.

    Raises DeviceError when it printed no latency, or no operator's time (a release without the flag).
    """
    text = completed.stdout + "\n" + completed.stderr
    try:
        parsed = parse_benchmark_model_output(text)
    except DeviceError as error:
        raise DeviceError(f"{what}: exit {completed.returncode}: {error}") from error
    ops = run_order(text)
    if not ops:
        raise DeviceError(f"{what}: benchmark_model printed no operator profile (does this build know --enable_op_profiling?)")
    return {"run_order": ops, "inference_avg_ms": parsed["inference_avg_ms"]}


def _search_float(pattern: str, text: str) -> float | None:
    """First group of the first match of ``pattern`` as a float, or None."""
    match = re.search(pattern, text, flags=re.IGNORECASE)
    if match is None:
        return None
    try:
        return float(match.group(1))
    except ValueError:
        return None


def _count(value: float | None) -> int | None:
    """A count as an int; None when absent or not finite (a garbled "1e999" is not a count)."""
    return int(value) if value is not None and math.isfinite(value) else None


def _us_to_ms(value: float | None) -> float | None:
    return None if value is None else value / 1000.0


def _stat_line(line: str) -> dict[str, float]:
    """``count=50 first=2990275 min=... avg=2.95e+06 std=...`` as a dict of floats."""
    stats: dict[str, float] = {}
    for key, value in re.findall(r"(\w+)=" + _NUMBER, line):
        stats[key] = float(value)
    return stats


def _run_blocks(lines: list[str]) -> list[dict[str, float]]:
    """Stat lines following each ``Running benchmark for at least ...`` header, in order.

    The first block is the warmup, the last one the regular (timed) runs.
    """
    blocks: list[dict[str, float]] = []
    for index, line in enumerate(lines):
        if not line.startswith(_RUN_HEADER):
            continue
        for candidate in lines[index + 1 : index + 4]:
            if candidate.strip().startswith("count="):
                stats = _stat_line(candidate)
                if "count" in stats:
                    blocks.append(stats)
                break
    return blocks


def _timing_summary(text: str) -> dict[str, float | None]:
    """The ``Inference timings in us: Init: ..., First inference: ...`` line, in ms."""
    return {
        "init_ms": _us_to_ms(_search_float(r"Inference timings in us:.*?Init:\s*" + _NUMBER, text)),
        "first_inference_ms": _us_to_ms(_search_float(r"First inference:\s*" + _NUMBER, text)),
        "warmup_avg_ms": _us_to_ms(_search_float(r"Warmup \(avg\):\s*" + _NUMBER, text)),
        "inference_avg_ms": _us_to_ms(_search_float(r"Inference \(avg\):\s*" + _NUMBER, text)),
    }


def _memory(text: str) -> dict[str, float | None]:
    """Memory footprint delta (init/overall) and the peak footprint where reported, in MB."""
    delta = r"Memory footprint delta from the start of the tool \(MB\):"
    return {
        "memory_init_mb": _search_float(delta + r".*?init=" + _NUMBER, text),
        "memory_overall_mb": _search_float(delta + r".*?overall=" + _NUMBER, text),
        "peak_memory_mb": _search_float(r"peak memory footprint \(MB\)[^:\n]*:\s*" + _NUMBER, text),
    }


def _threads(text: str) -> int | None:
    value = _search_float(r"#threads used for CPU inference:\s*\[?" + _NUMBER, text)
    if value is None:
        value = _search_float(r"Num threads:\s*\[?" + _NUMBER, text)
    return _count(value)


def _table_rows(section: str, title: str) -> list[dict[str, str]]:
    """The data rows of the ``===== title =====`` table inside ``section``, each keyed by its column header
    (``[node type]``, ``[avg ms]``, ``[name]`` … lower-cased): releases differ in their columns (a ``[start]``
    column until TensorFlow 2.12, none since), so a cell is found by its header, never by its position."""
    start = section.find(title)
    if start < 0:
        return []
    lines = section[start:].splitlines()[1:]
    header = [cell.strip().lower() for cell in lines[0].strip().split("\t")] if lines else []
    rows: list[dict[str, str]] = []
    for line in lines[1:]:
        cells = [cell.strip() for cell in line.strip().split("\t")]
        if len(cells) < 4 or line.strip().startswith("="):
            break
        rows.append(dict(zip(header, cells, strict=False)) | {"[name]": cells[-1]})
    return rows


def _percent(cell: str) -> float:
    return float(cell.rstrip("%"))


def run_order(text: str) -> list[dict[str, float | str]]:
    """Every node of the regular runs' op profile in the order it ran: ``node_type``, ``name``, ``avg_ms``. TFLite's
    own kernels are named after their output tensor (``[MobilenetV1/Conv2d_0/Relu6]:0``); the ops XNNPACK runs
    (TensorFlow 2.9.1 and later) after XNNPACK's operator (``Delegate/Convolution (NHWC, F32) IGEMM:0``), with no
    trace of the model's layer names. Empty without an op profile; unreadable rows are left out."""
    start = text.find(_REGULAR_PROFILE_HEADER)
    if start < 0:
        return []
    ops: list[dict[str, float | str]] = []
    for row in _table_rows(text[start:], "Run Order"):
        try:
            ops.append({"node_type": row["[node type]"], "name": row["[name]"], "avg_ms": float(row["[avg ms]"])})
        except (KeyError, ValueError):
            continue
    return ops


def _op_profile(text: str) -> dict | None:
    """Top ops by average ms and the per-node-type summary of the regular runs."""
    start = text.find(_REGULAR_PROFILE_HEADER)
    if start < 0:
        return None
    section = text[start:]
    ops = []
    for row in _table_rows(section, "Run Order"):
        try:
            ops.append(
                {"node_type": row["[node type]"], "name": row["[name]"], "avg_ms": float(row["[avg ms]"]), "percent": _percent(row["[%]"])}
            )
        except (KeyError, ValueError):
            continue
    node_types = []
    for row in _table_rows(section, "Summary by node type"):
        try:
            node_types.append(
                {
                    "node_type": row["[node type]"],
                    "count": int(row["[count]"]),
                    "avg_ms": float(row["[avg ms]"]),
                    "percent": _percent(row["[avg %]"]),
                }
            )
        except (KeyError, ValueError):
            continue
    nodes = _search_float(r"Number of nodes executed:\s*" + _NUMBER, section)
    ops.sort(key=lambda op: op["avg_ms"], reverse=True)
    return {
        "nodes_executed": _count(nodes),
        "top_ops": ops[:_TOP_OPS],
        "by_node_type": node_types,
    }


def parse_benchmark_model_output(text: str) -> dict:
    """Extract timings (ms), memory (MB), threads and the op profile from benchmark_model text.

    Keys (``None`` when absent): ``init_ms``, ``first_inference_ms``, ``warmup_avg_ms``,
    ``inference_avg_ms``, ``inference_std_ms``, ``inference_min_ms``, ``inference_max_ms``,
    ``inference_count``, ``memory_init_mb``, ``memory_overall_mb``, ``peak_memory_mb``,
    ``num_threads``, ``op_profile`` (``{"nodes_executed", "top_ops", "by_node_type"}``).

    Raises:
        DeviceError: the text holds no inference latency at all (the tool crashed or
            printed only its usage).
    """
    lines = text.splitlines()
    blocks = _run_blocks(lines)
    regular = blocks[-1] if len(blocks) >= 2 else {}
    warmup = blocks[0] if blocks else {}
    result: dict = _timing_summary(text)
    if result["init_ms"] is None:
        result["init_ms"] = _search_float(r"Initialized session in\s*" + _NUMBER + r"\s*ms", text)
    if result["first_inference_ms"] is None:
        result["first_inference_ms"] = _us_to_ms(warmup.get("first", warmup.get("curr")))
    if result["inference_avg_ms"] is None:
        result["inference_avg_ms"] = _us_to_ms(regular.get("avg"))
    result.update(
        inference_std_ms=_us_to_ms(regular.get("std")),
        inference_min_ms=_us_to_ms(regular.get("min")),
        inference_max_ms=_us_to_ms(regular.get("max")),
        inference_count=_count(regular.get("count")),
        **_memory(text),
        num_threads=_threads(text),
        op_profile=_op_profile(text),
    )
    if result["inference_avg_ms"] is None:
        tail = " | ".join(line.strip() for line in lines[-3:] if line.strip()) or "<empty>"
        raise DeviceError(f"benchmark_model printed no inference latency (last lines: {tail})")
    return result
