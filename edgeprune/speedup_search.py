"""The speed-up search: prune in steps until the speed-up *measured* on the target's runtime is reached.

A speed-up is never estimated from MACs here. After each pruning step the candidate is
exported to the target's format (the first of ``export.formats``: ONNX for onnxruntime
targets, TFLite for LiteRT ones) and benchmarked through the runtime adapter of
``benchmark.device`` with the profile's benchmark settings. The unpruned model's export
and the candidate are measured as ``benchmark.repeats`` pairs: on the local device each
pair is one process that times both in alternation, iteration by iteration (a shared
machine's slow moments hit both alike); on remote devices a pair is two processes run one
after the other. The speed-up is the median of the per-pair ratios. A step whose speed-up reaches the target is measured
again (as many pairs more) and is accepted only if the median over all its pairs still
reaches it: one lucky round on a noisy machine does not end the loop. A step that
narrowed several groups at once (with ``round_to``, the widths of a uniform plan change
together: resnet_wide went from 4.4x to 6.0x fewer MACs in one step) is then retried with
fewer of them narrowed, the plan's highest-weighted groups first; the first such candidate
that reaches the target too, confirmed the same way, is kept (its row says
``groups_moved``), so the loop stops near the target instead of a whole step past it. Then
the step's recovery finetune runs and the accuracy budget (``budgets.max_accuracy_drop``, points
against the unpruned model) is checked; breaking it stops the build with a StageError.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from torch import nn

from edgeprune.config import BuildConfig, PruneConfig
from edgeprune.data import Dataset
from edgeprune.errors import ConfigError, StageError
from edgeprune.export.onnx import export_onnx
from edgeprune.export.tflite import convert_for_target
from edgeprune.progress import Reporter
from edgeprune.runtimes import BenchSettings, benchmark, benchmark_pair, paired_speedup
from edgeprune.training import example_batch


class ProbeContext(Protocol):
    """What a probe reads: the target's config (name, ``export`` and ``benchmark``), its data (the test
    images exports trace and onnx2tf checks on) and where to report. A stage's ``StageContext`` is one."""

    config: BuildConfig
    dataset: Dataset
    reporter: Reporter


class SteppedPruning(Protocol):
    """What the speed-up loop drives (``edgeprune.structured_pruning.PruningRun``)."""

    model: nn.Module
    dense: nn.Module
    reference_accuracy: float
    dense_macs: int

    def prune_to(self, level: float) -> None: ...

    def max_level(self) -> float: ...

    def macs(self) -> int: ...

    def recover(self, step: int) -> None: ...

    def row(self, step: int, level: float) -> dict[str, Any]: ...

    def partial_moves(self, level: float) -> list[dict[str, int]]: ...

    def snapshot(self) -> Any: ...

    def restore(self, state: Any) -> None: ...

    def prune_to_widths(self, targets: dict[str, int]) -> None: ...


@dataclass(frozen=True)
class LatencyProbe:
    """Exports torch models to the target's format and measures their p50 through a runtime adapter.

    ``settings`` measure one process per call; ``rounds`` is how many dense/candidate pairs a comparison takes.
    """

    fmt: str
    device: str
    settings: BenchSettings
    context: ProbeContext
    rounds: int = 1

    @classmethod
    def for_target(cls, context: ProbeContext) -> LatencyProbe:
        """The target's first export format and its ``[benchmark]`` settings; ConfigError without an export format."""
        config = context.config
        if not config.export.formats:
            raise ConfigError("prune.speedup needs an export format to measure (set export.formats)")
        bench = config.benchmark
        settings = BenchSettings(
            threads=bench.threads, warmup=bench.warmup, iterations=bench.iterations, repeats=1, use_xnnpack=bench.use_xnnpack
        )
        return cls(config.export.formats[0], bench.device, settings, context, rounds=bench.repeats)

    def export(self, model: nn.Module, stem: Path) -> Path:
        """``model`` as ``stem.onnx`` or ``stem.tflite``, converted the way the build's export stage converts it.

        The suffix is appended, never substituted: stems ``candidate-0.25`` and ``candidate-0.5`` stay two files.
        """
        path = stem.with_name(f"{stem.name}.{self.fmt}")
        config, images, reporter = self.context.config.export, self.context.dataset.x_test, self.context.reporter
        if self.fmt == "onnx":
            export_onnx(model, example_batch(self.context.dataset), path, config, reporter=reporter)
        else:
            convert_for_target(model, path, config, images, reporter)
        return path

    def p50_ms(self, path: Path, repeats: int = 1) -> float:
        """Median latency (ms) over ``repeats`` fresh processes (DeviceError on failure; ConfigError on an emulated
        device, whose timings say nothing about the device's: the search stops at its first measurement)."""
        result = benchmark(path, self.device, dataclasses.replace(self.settings, repeats=repeats))
        if result.emulated:
            raise ConfigError(
                f"prune.speedup measures speed on {self.device}, which is emulated ({result.emulated}): emulated timings say "
                "nothing about the real device; set benchmark.device to the real board (or local), or prune.amount instead"
            )
        return result.latency_p50_ms

    def compare(self, dense: Path, candidate: Path) -> list[tuple[float, float]] | None:
        """``rounds`` (dense p50, candidate p50) pairs, each from one process timing both in alternation, where the
        device's adapter can (local); None where it cannot (remote devices: one process per artefact)."""
        return benchmark_pair(dense, candidate, self.device, dataclasses.replace(self.settings, repeats=max(1, self.rounds)))

    def describe(self) -> str:
        return f"{self.device} ({self.fmt}, {self.settings.threads} threads)"


def prune_to_speedup(run: SteppedPruning, probe: LatencyProbe, config: PruneConfig, max_accuracy_drop: float) -> list[dict[str, Any]]:
    """Raise the pruning level by ``config.speedup_step`` until the measured speed-up reaches ``config.speedup``.

    Returns the trajectory: one row per step (step 0 = the model before any channel goes: the unpruned one, or
    the one depth pruning left, measured then, and the loop ends there when it is fast enough) with the level,
    the fraction of channels removed, MACs, p50 of the candidate and of the dense model,
    the speed-up and top-1 after the step's recovery. Raises StageError when the accuracy
    budget is broken or the last level (``run.max_level()``: every group at its cap) does not reach the target.
    """
    levels = [step * config.speedup_step for step in range(1, int(run.max_level() / config.speedup_step + 1e-9) + 1)]
    reporter = probe.context.reporter
    with tempfile.TemporaryDirectory(prefix="edgeprune-latency-") as folder:
        dense_path = probe.export(run.dense, Path(folder) / "dense")
        dense_p50 = probe.p50_ms(dense_path)
        trajectory = [{**run.row(0, 0.0), "latency_p50_ms": dense_p50, "dense_p50_ms": dense_p50, "speedup": 1.0}]
        if run.macs() < run.dense_macs:  # residual blocks are gone already: where does the loop start?
            trajectory[0].update(pairs_summary(measure_candidate(probe, dense_path, run.model, Path(folder) / "step0", config.speedup)))
            if trajectory[0]["speedup"] >= config.speedup:
                return trajectory
        for step, level in enumerate(levels, start=1):
            before = run.snapshot()
            run.prune_to(level)
            if run.macs() == trajectory[-1]["macs"]:  # rounding kept every width: nothing new to measure
                continue
            stem = Path(folder) / f"step{step}"
            pairs, partial = measure_candidate(probe, dense_path, run.model, stem, config.speedup), {}
            if paired_speedup(pairs) >= config.speedup:
                partial, pairs = fewest_moves_reaching(run, probe, dense_path, before, level, stem, config.speedup, pairs)
            run.recover(step)
            row = {**run.row(step, level), **pairs_summary(pairs), **partial}
            trajectory.append(row)
            reporter.info(
                f"[{probe.context.config.name}] prune_structured  step {step}: {row['ratio']:.0%} of channels removed, "
                f"{row['mac_reduction']:.2f}x fewer MACs, measured {row['speedup']:.2f}x, top-1 {row['accuracy']:.2f} %"
            )
            check_budget(row, run.reference_accuracy, max_accuracy_drop, config, probe)
            if row["speedup"] >= config.speedup:
                return trajectory
    last = trajectory[-1]
    raise StageError(
        f"prune.speedup={config.speedup:g} not reached: with {last['ratio']:.0%} of the channels removed the measured speed-up on "
        f"{probe.describe()} is {last['speedup']:.2f}x ({last['mac_reduction']:.2f}x fewer MACs); the runtime's per-layer overhead "
        "bounds what pruning gains on this model: lower prune.speedup"
    )


def measure_candidate(probe: LatencyProbe, dense: Path, model: nn.Module, stem: Path, target: float) -> list[tuple[float, float]]:
    """Export ``model`` and measure it beside the dense export; pairs that reach ``target`` are confirmed by as
    many again (one lucky round on a noisy machine does not end the loop)."""
    candidate = probe.export(model, stem)
    pairs = measure_pairs(probe, dense, candidate)
    if paired_speedup(pairs) >= target:
        pairs += measure_pairs(probe, dense, candidate)
    return pairs


def fewest_moves_reaching(
    run: SteppedPruning,
    probe: LatencyProbe,
    dense: Path,
    before: Any,
    level: float,
    stem: Path,
    target: float,
    full_pairs: list[tuple[float, float]],
) -> tuple[dict[str, Any], list[tuple[float, float]]]:
    """A step to ``level`` that reached the target by moving several groups at once is retried from ``before`` (the
    run's snapshot ahead of the step) with fewer groups moved (``run.partial_moves``), the plan's preferred groups
    first; the first that reaches it too, confirmed, is kept, so the loop does not overshoot by a whole step. Returns
    the row's ``groups_moved`` note (empty when the whole step is kept) and the kept candidate's pairs."""
    full = run.snapshot()
    run.restore(before)
    moves = run.partial_moves(level)
    for index, widths in enumerate(moves, start=1):
        run.restore(before)
        run.prune_to_widths(widths)
        pairs = measure_candidate(probe, dense, run.model, stem.with_name(f"{stem.name}-{index}"), target)
        if paired_speedup(pairs) >= target:
            return {"groups_moved": f"{index} of {len(moves) + 1}"}, pairs
    run.restore(full)
    return {}, full_pairs


def measure_pairs(probe: LatencyProbe, dense: Path, candidate: Path) -> list[tuple[float, float]]:
    """``probe.rounds`` (dense p50, candidate p50) pairs: timed in one process each where the probe can
    (``probe.compare``), else in alternating processes, one per measurement."""
    in_process = getattr(probe, "compare", None)
    pairs = in_process(dense, candidate) if in_process else None
    if pairs is not None:
        return pairs
    return [(probe.p50_ms(dense), probe.p50_ms(candidate)) for _ in range(max(1, probe.rounds))]


def pairs_summary(pairs: list[tuple[float, float]]) -> dict[str, Any]:
    """A trajectory row's latency figures: both medians, the paired speed-up, how many pairs and their spread."""
    ratios = [dense / candidate for dense, candidate in pairs]
    return {
        "latency_p50_ms": statistics.median(candidate for _, candidate in pairs),
        "dense_p50_ms": statistics.median(dense for dense, _ in pairs),
        "speedup": paired_speedup(pairs),
        "pairs": len(pairs),
        "speedup_range": [min(ratios), max(ratios)],
    }


def check_budget(row: dict[str, Any], reference_accuracy: float, max_drop: float, config: PruneConfig, probe: LatencyProbe) -> None:
    """StageError when top-1 after this step's recovery fell more than ``max_drop`` points (0 = no limit)."""
    drop = reference_accuracy - row["accuracy"]
    if max_drop <= 0 or drop <= max_drop:
        return
    raise StageError(
        f"prune.speedup={config.speedup:g} stopped at step {row['step']}: measured {row['speedup']:.2f}x on {probe.describe()}, "
        f"but top-1 fell {drop:.2f} points ({reference_accuracy:.2f} -> {row['accuracy']:.2f} %) after recovery, over "
        f"budgets.max_accuracy_drop={max_drop:g}; lower prune.speedup, allow a larger drop, or recover longer (prune.recover_epochs)"
    )
