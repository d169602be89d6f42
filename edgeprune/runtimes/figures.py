"""One benchmark result as the words a person reads: latency, memory, and what to distrust.

Shared by ``edgeprune bench`` and the build's summary line, so both say the same things.
Nothing here imports a runtime.
"""

from __future__ import annotations

from typing import Any


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} MB"


def memory_text(bench: dict[str, Any]) -> str:
    """``peak 58.1 MB (model 3.2 MB, runtime 0.1 MB)``: the measuring process's own peak, the model's share of it,
    and the runtime's own figure where it gave one."""
    shares = [f"model {_mb(bench.get('model_memory_mb'))}"]
    if bench.get("runtime_memory_mb") is not None:
        shares.append(f"runtime {_mb(bench['runtime_memory_mb'])}")
    return f"peak {_mb(bench.get('peak_rss_mb'))} ({', '.join(shares)})"


def caveats(bench: dict[str, Any]) -> list[str]:
    """What a reader should know before trusting the figures: an emulated device, fewer threads than asked, a spread
    that stayed high."""
    notes = []
    if bench.get("emulated"):
        notes.append(f"EMULATED ({bench['emulated']}): these timings say nothing about the real device's speed")
    if bench.get("threads_requested"):
        ran = bench.get("threads")
        notes.append(f"ran {ran} threads, not the {bench['threads_requested']} asked: the host has {ran} cores")
    if bench.get("noisy"):
        notes.append(
            f"NOISY: p50 spread {bench.get('p50_spread_pct', 0):.0f} % over {bench.get('repeats_taken')} repeats "
            f"(limit {bench.get('max_spread_pct', 0):g} %)"
        )
    return notes


def latency_text(bench: dict[str, Any]) -> str:
    """``p50 1.234 ms, p90 1.301 ms, p99 1.420 ms`` (percentiles the runtime did not give are left out)."""
    names = ("p50", "p90", "p99")
    values = [(name, bench.get(f"latency_{name}_ms")) for name in names]
    return ", ".join(f"{name} {value:.3f} ms" for name, value in values if value is not None)


def device_text(bench: dict[str, Any]) -> str:
    """``aarch64, Cortex-A76, Python 3.11.2, ai-edge-litert 2.3.0``: what ran the artefact, as the device reported it."""
    parts = [bench.get("machine"), bench.get("cpu_model"), bench.get("python_version") and f"Python {bench['python_version']}"]
    parts.append(f"{bench.get('runtime')} {bench.get('runtime_version')}")
    return ", ".join(str(part) for part in parts if part)


def bench_line(bench: dict[str, Any]) -> str:
    """Latency, memory and caveats of one result on one line."""
    return "; ".join([f"{latency_text(bench)}, {memory_text(bench)}", *caveats(bench)])
