"""Budgets: compare a finished build with the profile's limits.

Exit codes (documented in the README): 10 accuracy, 11 latency, 12 size,
13 speed-up; 14 when several kinds are violated. ``edgeprune diff`` uses the
same codes for regressions of the same kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from edgeprune.config import BudgetConfig

EXIT_CODES = {"accuracy": 10, "latency": 11, "size": 12, "speedup": 13}
TIMED_KINDS = ("latency", "speedup")  # budgets on timings, which an emulated device's say nothing about
SEVERAL_KINDS = 14
# Command-line sugar for ``--set budgets.KEY=VALUE``: (flag, budget key, help).
BUDGET_FLAGS = (
    ("--max-accuracy-drop", "max_accuracy_drop", "fail (exit 10) when top-1 drops by more than this many points"),
    ("--max-latency-p50-ms", "max_latency_p50_ms", "fail (exit 11) when the primary artefact's p50 latency exceeds this"),
    ("--max-latency-p90-ms", "max_latency_p90_ms", "fail (exit 11) when the primary artefact's p90 latency exceeds this"),
    ("--max-size-kb", "max_size_kb", "fail (exit 12) when the primary artefact is larger than this many KiB"),
    ("--min-speedup", "min_speedup", "fail (exit 13) when the measured speed-up over the dense fp32 export is below this"),
)


@dataclass(frozen=True)
class Violation:
    """One broken budget: its kind (accuracy/latency/size/speedup), the budget key, limit and value."""

    kind: str
    message: str
    budget: str = ""
    limit: float | None = None
    value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "budget": self.budget, "limit": self.limit, "value": self.value}


def budget_overrides(values: dict[str, float | None]) -> tuple[str, ...]:
    """``--set`` strings for the budget flags given on the command line (None = not given)."""
    return tuple(f"budgets.{key}={float(value)!r}" for key, value in values.items() if value is not None)


def check_budgets(budgets: BudgetConfig, manifest: dict[str, Any]) -> list[Violation]:
    """Every budget the manifest's primary artefact breaks (an unmeasured figure breaks its budget); timing budgets
    are left unchecked when the benchmark device was emulated (``unchecked_budgets`` says so)."""
    primary = manifest["primary_artifact"]
    artifact = manifest["artifacts"].get(primary, {})
    measured = artifact.get("benchmark", {})
    checks = [
        ("accuracy", "max_accuracy_drop", manifest["accuracy"].get("drop"), "accuracy drop", "points", max),
        ("latency", "max_latency_p50_ms", measured.get("latency_p50_ms"), "latency p50", "ms", max),
        ("latency", "max_latency_p90_ms", measured.get("latency_p90_ms"), "latency p90", "ms", max),
        ("size", "max_size_kb", artifact.get("size_bytes", 0) / 1024, "artefact size", "KiB", max),
        ("speedup", "min_speedup", manifest["speedups"].get(primary), "measured speed-up", "x", min),
    ]
    violations = []
    for kind, key, value, what, unit, bound in checks:
        limit = getattr(budgets, key)
        if not limit or (manifest.get("benchmark_emulated") and kind in TIMED_KINDS):
            continue
        if value is None:
            violations.append(Violation(kind, f"{what} of {primary} was not measured (budget {limit} {unit})", key, limit))
        elif (bound is max and value > limit) or (bound is min and value < limit):
            relation = "exceeds" if bound is max else "is below"
            message = f"{what} of {primary} = {value:.3f} {unit} {relation} the budget {limit} {unit}"
            violations.append(Violation(kind, message, key, limit, value))
    return violations + search_violations(manifest) + quantization_violations(manifest)


def search_violations(manifest: dict[str, Any]) -> list[Violation]:
    """A speed-up search that did not reach ``prune.speedup`` within the accuracy budget (it still wrote its fastest
    model within the budget): a speed-up violation carrying the search's verdict, unless the benchmark stage measured
    the shipped artefact at the target or above (``shipped_speedup_meets``)."""
    found = []
    for stage in manifest.get("stages", []):
        search = stage.get("metrics", {}).get("speed_search")
        if search and not search.get("reached", True) and not shipped_speedup_meets(manifest, search["target"]):
            found.append(Violation("speedup", search["verdict"], "prune.speedup", search["target"], search["measured_speedup"]))
    return found


def shipped_speedup_meets(manifest: dict[str, Any], target: float) -> bool:
    """Whether the benchmark stage's paired speed-up of the shipped artefact over the dense fp32 export reaches
    ``target``: the measurement of the file the build ships (after finetuning, with the profile's repeats), which a
    search that stopped a step short by its own measurement can still have reached."""
    measured = manifest.get("speedups", {}).get(manifest.get("primary_artifact"))
    return measured is not None and measured >= target


def quantization_violations(manifest: dict[str, Any]) -> list[Violation]:
    """An accuracy violation per quantized artefact whose quantization budget was missed (its verdict says why), but
    for one that ``quantize.select = "fastest"`` left out of the choice for that reason (the primary kept the budget)."""
    violations = []
    left_out = set(manifest.get("primary_selection", {}).get("candidates", {})) - {manifest["primary_artifact"]}
    for name, artifact in manifest["artifacts"].items():
        budget = artifact.get("budget")
        if budget and not budget.get("passed", True) and name not in left_out:
            message = f"{name}: quantization {budget.get('verdict', 'missed its budget')}"
            limit, value = budget["max_accuracy_drop"], budget["accuracy_drop"]
            violations.append(Violation("accuracy", message, "quantize.max_accuracy_drop", limit, value))
    return violations


def unchecked_budgets(budgets: BudgetConfig, manifest: dict[str, Any]) -> list[str]:
    """One line per timing budget set but left unchecked because the benchmark device was emulated."""
    emulated = manifest.get("benchmark_emulated")
    if not emulated:
        return []
    device = manifest.get("benchmark_device")
    timed = [key for key in ("max_latency_p50_ms", "max_latency_p90_ms", "min_speedup") if getattr(budgets, key)]
    return [f"budgets.{key} not checked: {device} is emulated ({emulated}), its timings say nothing about the device" for key in timed]


def exit_code(violations: Iterable[Violation | str]) -> int:
    """0 with no violation, the kind's code for one kind (10-13), 14 for several kinds."""
    kinds = {item if isinstance(item, str) else item.kind for item in violations}
    if not kinds:
        return 0
    return EXIT_CODES[kinds.pop()] if len(kinds) == 1 else SEVERAL_KINDS
