"""``quantize.select = "fastest"``: the primary artefact chosen by measurement, not by the profile's precision.

int8 is not faster than fp32 everywhere (an x86 CPU without fast int8 kernels runs a QDQ model's
quantize/dequantize pairs on top of float work), so a profile may ask for the fastest artefact within the
accuracy budget. The candidates are the primary format's files of every precision the build wrote
(``onnx_fp32``, ``onnx_int8`` / ``onnx_dynamic`` / ``onnx_fp16``; ``tflite_*``; ``pte_*``). A quantized
candidate is within the budget when its quantization budget passed (``quantize.max_accuracy_drop``,
judged by ``edgeprune.quantization.gate``); one without such a verdict (fp16) when it loses at most
``quantize.max_accuracy_drop`` top-1 points against its fp32 sibling; the fp32 file always is.

Each candidate within the budget is timed beside the fp32 file through the benchmark device's adapter:
in alternation in one process per repeat where the adapter can (``benchmark_pair``), the median of the
per-pair ratios deciding; elsewhere from the p50s of the benchmark's separate processes. The fastest wins;
the record says every candidate's p50, its speed-up over fp32, which won and by how much over the next.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig
from edgeprune.errors import ConfigError, DeviceError
from edgeprune.runtimes import BenchSettings, benchmark_pair, paired_speedup

PRECISIONS = ("fp32", "int8", "dynamic", "fp16")  # the order candidates are listed in


@dataclass(frozen=True)
class Candidate:
    """One file of the primary format: its name (``onnx_int8``), path, test top-1 and whether it keeps the budget."""

    name: str
    path: Path
    accuracy: float | None
    within_budget: bool
    reason: str = ""  # why it is out of the budget


def check_selectable(config: BuildConfig) -> None:
    """ConfigError when ``quantize.select = "fastest"`` cannot measure: the benchmark stage is off."""
    if config.quantize.select == "fastest" and config.quantize.scheme != "none" and config.export.formats and not config.benchmark.enabled:
        raise ConfigError(
            "quantize.select = 'fastest' chooses the primary artefact by measuring it on benchmark.device: "
            "set benchmark.enabled = true, or quantize.select = 'quantized'"
        )


def candidates(fmt: str, artifacts: dict[str, Artifact], max_accuracy_drop: float) -> list[Candidate]:
    """The files of format ``fmt`` among ``artifacts`` (fp32 first), each judged against the accuracy budget."""
    fp32 = artifacts.get(f"{fmt}_fp32")
    if fp32 is None:
        return []
    reference = fp32.meta.get("accuracy")
    found = [Candidate(fp32.name, fp32.path, reference, True)]
    for precision in PRECISIONS[1:]:
        artifact = artifacts.get(f"{fmt}_{precision}")
        if artifact is not None:
            found.append(judged(artifact, reference, max_accuracy_drop))
    return found


def judged(artifact: Artifact, reference: float | None, max_accuracy_drop: float) -> Candidate:
    """A quantized file as a candidate: its quantization budget's verdict, else its top-1 drop against ``reference``."""
    accuracy, budget = artifact.meta.get("accuracy"), artifact.meta.get("budget")
    if budget is not None:
        passed = bool(budget.get("passed", False))
        return Candidate(artifact.name, artifact.path, accuracy, passed, "" if passed else str(budget.get("verdict", "missed its budget")))
    if accuracy is None or reference is None:
        return Candidate(artifact.name, artifact.path, accuracy, False, "its top-1 was not measured")
    drop = reference - accuracy
    if drop > max_accuracy_drop:
        return Candidate(artifact.name, artifact.path, accuracy, False, f"loses {drop:.2f} top-1 points (> {max_accuracy_drop:g})")
    return Candidate(artifact.name, artifact.path, accuracy, True)


def select_fastest(
    found: list[Candidate], device: str, settings: BenchSettings, results: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """Time the candidates within the budget against the first (fp32) and pick the fastest.

    ``results`` are the benchmark's separate-process results by name, used where the adapter cannot time two
    files in one process. Returns the record the manifest keeps: ``candidates`` (per name: ``latency_p50_ms``,
    ``speedup_vs_fp32``, ``accuracy``, ``within_budget``, ``reason``), ``selected``, ``method``,
    ``margin`` (the winner's speed-up over the next fastest) and ``runner_up``.

    Raises DeviceError like ``benchmark_pair``, and when a candidate within the budget (or the fp32 file) has no
    timing: a choice is never made on what was not measured.
    """
    reference, rows, method = found[0], {}, "paired in one process"
    reference_p50s: list[float] = []
    for candidate in found[1:]:
        if not candidate.within_budget:
            rows[candidate.name] = row(candidate, None, None)
            continue
        pairs = benchmark_pair(reference.path, candidate.path, device, settings)
        if pairs is None:  # the adapter times one file per process: the benchmark's own figures decide
            method = "separate processes"
            p50, fp32_p50 = _p50(results, candidate.name), _p50(results, reference.name)
            rows[candidate.name] = row(candidate, p50, fp32_p50 / p50 if p50 and fp32_p50 else None)
            continue
        reference_p50s += [fp32 for fp32, _ in pairs]
        rows[candidate.name] = row(candidate, statistics.median(p50 for _, p50 in pairs), paired_speedup(pairs))
    fp32_p50 = statistics.median(reference_p50s) if reference_p50s else _p50(results, reference.name)
    untimed = [name for name, values in rows.items() if values["within_budget"] and values["speedup_vs_fp32"] is None]
    if untimed or fp32_p50 is None:
        raise DeviceError(f"quantize.select = 'fastest': {', '.join(untimed or [reference.name])} not timed on {device}")
    rows = {reference.name: row(reference, fp32_p50, 1.0), **rows}
    return {**ranking(rows), "method": method, "device": device}


def ranking(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The fastest timed candidate (the first, fp32, on a tie: the sort is stable) and its margin over the next."""
    timed = [(values["speedup_vs_fp32"], name) for name, values in rows.items() if values["speedup_vs_fp32"] is not None]
    timed.sort(key=lambda item: item[0], reverse=True)
    (best, selected), (second, runner_up) = timed[0], timed[1] if len(timed) > 1 else (None, None)
    return {"candidates": rows, "selected": selected, "runner_up": runner_up, "margin": best / second if second else None}


def row(candidate: Candidate, p50: float | None, speedup: float | None) -> dict[str, Any]:
    return {
        "latency_p50_ms": p50,
        "speedup_vs_fp32": speedup,
        "accuracy": candidate.accuracy,
        "within_budget": candidate.within_budget,
        "reason": candidate.reason,
    }


def _p50(results: dict[str, dict[str, Any]] | None, name: str) -> float | None:
    return (results or {}).get(name, {}).get("latency_p50_ms")
