"""``edgeprune analyze``: what pruning each layer group alone costs in accuracy and buys in measured latency.

``run_analysis`` takes a build's unpruned model (its baseline stage, served from the
cache when it has run before), prunes each layer group alone at a few ratios on copies,
and measures top-1 on the test split (no finetuning; with ``prune.recalibrate_batchnorm``, as the build
prunes, BatchNorm statistics re-estimated on ``RECALIBRATION_IMAGES`` training images first: with the dense
model's stale statistics a group looks ruined that a short finetune restores) and the p50 latency of the export
on the target's runtime adapter beside the unpruned export (``benchmark.repeats`` pairs, each
one process timing both in alternation where the adapter can; the gain is taken from the
median per-pair speed-up). It writes, into
``out``:

- ``sensitivity.json``: every measurement plus a per-group ``weight`` (latency gained per
  point of accuracy lost, normalised to a mean of 1). ``prune.ratios_from`` reads it and
  prunes group ``g`` to ``weight[g] * prune.amount`` (or ``* level`` with ``prune.speedup``),
  at most the largest ratio measured for it; edit a weight by hand to steer a group.
- ``sensitivity.md``: the table; ``sensitivity.png``: accuracy drop and latency gain per ratio.

Each residual block the model can lose whole (``edgeprune.depth_pruning``) is measured removed alone too (JSON key
``blocks``, a second table): what ``prune.drop_blocks`` would cost and buy.
"""

from __future__ import annotations

import contextlib
import functools
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import atomic_path, write_bytes_atomic, write_json_atomic
from edgeprune.cache import Cache
from edgeprune.config import BuildConfig
from edgeprune.data import Dataset, load_dataset
from edgeprune.deadline import Budget
from edgeprune.depth_pruning import drop_blocks, residual_blocks
from edgeprune.errors import ConfigError
from edgeprune.executors import Executor, LocalExecutor, sweep
from edgeprune.modelio import load_model
from edgeprune.pipeline import run_pipeline
from edgeprune.progress import Reporter
from edgeprune.pruning import (
    Guard,
    LayerGroup,
    UntrackedCoupling,
    guarded_prune,
    layer_groups,
    protected_layers,
    root_channels,
    rounded_width,
)
from edgeprune.pruning_plan import SENSITIVITY_FORMAT
from edgeprune.runtimes.device_locks import device_slot
from edgeprune.speedup_search import LatencyProbe, measure_pairs, pairs_summary
from edgeprune.training import RECALIBRATION_IMAGES, count_macs_params, evaluate, example_batch, recalibrate_batchnorm

DEFAULT_RATIOS = (0.25, 0.5, 0.75)
DROP_FLOOR = 0.25  # points: a smaller accuracy drop counts as this much, so a near-free group does not take every cut
MAX_WEIGHT = 3.0


@dataclass(frozen=True)
class SensitivityResult:
    """Where the analysis wrote its files, and what it measured (the JSON's content)."""

    json_path: Path
    table_path: Path
    plot_path: Path
    data: dict[str, Any]


def run_analysis(
    config: BuildConfig,
    *,
    out: Path,
    cache_dir: Path,
    ratios: tuple[float, ...] = DEFAULT_RATIOS,
    reporter: Reporter | None = None,
    executor: Executor | None = None,
    force: bool = False,
) -> SensitivityResult:
    """Measure every prunable group of ``config``'s model at ``ratios``; write JSON, Markdown and PNG into ``out``.

    Uses ``config.prune`` (importance, round_to, ignored_layers), the first of
    ``config.export.formats`` and ``config.benchmark`` (device and settings). Each group
    is one call of ``measure_group`` through ``executor`` (default: this process; a
    ``RayExecutor`` runs the groups as Ray tasks sharing ``cache_dir``). Latency is
    measured under the device's lock in ``cache_dir``, so concurrent tasks never time
    on one device at once.
    Raises ConfigError for ratios outside (0, 0.9] or no export format; DeviceError
    when the benchmark device fails.
    """
    if not ratios or any(not 0.0 < ratio <= 0.9 for ratio in ratios):
        raise ConfigError(f"analyze: ratios must lie in (0, 0.9], got {list(ratios)}")
    if not config.export.formats:
        raise ConfigError("analyze needs an export format to measure latency (set export.formats)")
    reporter = reporter or Reporter()
    dataset = load_dataset(config.data, config.model.num_classes)
    model = baseline_model(config, dataset, Cache(cache_dir), reporter, force=force)
    with _analysis(model, config, dataset, reporter) as analysis:
        groups = [(group.name, group.channels) for group in analysis.groups]
        dense = {**analysis.dense, "latency_p50_ms": analysis.dense_p50(Path(cache_dir))}
        blocks = analysis.measure_blocks(Path(cache_dir))
        runtime = {"format": analysis.probe.fmt, "device": analysis.probe.device, "threads": analysis.probe.settings.threads}
    jobs = [GroupJob(config, Path(cache_dir), name, channels, tuple(sorted(ratios)), reporter.verbosity) for name, channels in groups]
    outcomes = sweep(measure_group, jobs, executor or LocalExecutor(), labels=[f"analyze {job.layer}" for job in jobs])
    measured, untracked = [], []
    for job, outcome in zip(jobs, outcomes, strict=True):
        if isinstance(outcome, UntrackedCoupling):
            untracked.append({"layer": job.layer, "reason": outcome.reason})
        else:
            measured.append({"layer": job.layer, "channels": job.channels, "results": outcome})
    add_weights(measured)
    data = {
        "format": SENSITIVITY_FORMAT,
        "target": config.name,
        "model": config.model.source,
        "weights": config.model.weights,
        "runtime": runtime,
        "dense": dense,
        "ratios": list(jobs[0].ratios if jobs else sorted(ratios)),
        "accuracy_measured": (
            f"after re-estimating BatchNorm statistics on {RECALIBRATION_IMAGES} training images"
            if config.prune.recalibrate_batchnorm
            else "with the unpruned model's BatchNorm statistics"
        ),
        "untracked_coupling": untracked,
        "groups": measured,
        "blocks": blocks,
    }
    return write_analysis(data, Path(out))


def write_analysis(data: dict[str, Any], out: Path) -> SensitivityResult:
    """``sensitivity.json``, ``.md`` and ``.png`` into ``out``, each written whole or not at all."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, table_path, plot_path = out / "sensitivity.json", out / "sensitivity.md", out / "sensitivity.png"
    write_json_atomic(json_path, data)
    write_bytes_atomic(table_path, markdown_table(data).encode("utf-8"))
    with atomic_path(plot_path) as staged:
        write_plot(data, staged)
    return SensitivityResult(json_path, table_path, plot_path, data)


def baseline_model(config: BuildConfig, dataset: Dataset, cache: Cache, reporter: Reporter, force: bool = False) -> nn.Module:
    """The build's unpruned model: the baseline stage alone, through the stage cache (recomputed with ``force``)."""
    baseline_only = replace(
        config,
        prune=replace(config.prune, mode="none"),
        export=replace(config.export, formats=()),
        quantize=replace(config.quantize, scheme="none"),
        benchmark=replace(config.benchmark, enabled=False),
    )
    result = run_pipeline(baseline_only, dataset, cache, reporter, force=force)
    return load_model(result.artifacts["baseline_model"].path)


@dataclass(frozen=True)
class GroupJob:
    """One layer group of an analysis, as shipped to a task: plain, picklable data."""

    config: BuildConfig
    cache_dir: Path
    layer: str
    channels: int
    ratios: tuple[float, ...]
    verbosity: int = 1


def measure_group(job: GroupJob) -> list[dict[str, Any]] | UntrackedCoupling:
    """Prune ``job.layer`` alone at each ratio on copies of the unpruned model (from the cache): one row per ratio,
    or the UntrackedCoupling that keeps the group out of pruning."""
    config, reporter = job.config, Reporter(verbosity=job.verbosity)
    dataset = load_dataset(config.data, config.model.num_classes)
    model = baseline_model(config, dataset, Cache(job.cache_dir), Reporter(verbosity=0))
    reporter.info(f"[{config.name}] analyze {job.layer} ({job.channels} channels)")
    with _analysis(model, config, dataset, reporter) as analysis:
        group = next((group for group in analysis.groups if group.name == job.layer), None)
        if group is None:
            raise ConfigError(f"analyze: layer group {job.layer} is not in the model (was the baseline rebuilt meanwhile?)")
        return analysis.measure(group, job.ratios, job.cache_dir)


@contextlib.contextmanager
def _analysis(model: nn.Module, config: BuildConfig, dataset: Dataset, reporter: Reporter) -> Iterator[_Analysis]:
    """The unpruned model's groups, guard and latency probe, with a scratch folder for exports."""
    with tempfile.TemporaryDirectory(prefix="edgeprune-analyze-") as folder:
        context = AnalysisContext(config, dataset, reporter, Path(folder))
        protected = protected_layers(model, config.prune.ignored_layers, config.model.num_classes)
        analysis = layer_groups(model, example_batch(dataset), config.prune, protected, reporter)
        images, labels = (torch.from_numpy(split[:256]) for split in (dataset.x_train, dataset.y_train))
        yield _Analysis(
            model,
            context,
            analysis.protected(protected),
            analysis.groups,
            Guard(example_batch(dataset, batch=4), config.model.num_classes, images, labels),
            LatencyProbe.for_target(context),
        )


@dataclass(frozen=True)
class AnalysisContext:
    """What measuring needs (a ``speedup_search.ProbeContext``), and a scratch folder for the exports."""

    config: BuildConfig
    dataset: Dataset
    reporter: Reporter
    workdir: Path


@dataclass
class _Analysis:
    """The unpruned model and what pruning and measuring one group needs."""

    model: nn.Module
    context: AnalysisContext
    protected: set[str]
    groups: list[LayerGroup]
    guard: Guard
    probe: LatencyProbe

    @functools.cached_property
    def dense(self) -> dict[str, Any]:
        """The unpruned model's top-1 on the test split and its MACs (measured once per analysis)."""
        dataset = self.context.dataset
        return {
            "accuracy": evaluate(self.model, dataset.x_test, dataset.y_test),
            "macs": count_macs_params(self.model, example_batch(dataset))["macs"],
        }

    def dense_p50(self, cache_dir: Path) -> float:
        with device_slot(self.probe.device, cache_dir):
            return self.probe.p50_ms(self.dense_export, repeats=max(1, self.probe.rounds))

    @functools.cached_property
    def dense_export(self) -> Path:
        """The unpruned model exported for the probe's runtime (once per analysis)."""
        return self.probe.export(self.model, self.context.workdir / "dense")

    def measure(self, group: LayerGroup, ratios: tuple[float, ...], cache_dir: Path) -> list[dict[str, Any]] | UntrackedCoupling:
        """One row per ratio for ``group`` pruned alone, or the UntrackedCoupling that keeps it out of pruning."""
        config, candidates = self.context.config, []
        for ratio in ratios:
            width = rounded_width(group.channels * (1 - ratio), group.channels, config.prune.round_to)
            pruned = guarded_prune(self.model, config.prune, self.protected, self.groups, {group.name: width}, self.guard)
            if pruned.untracked:
                return pruned.untracked[0]
            row = {"ratio": ratio, "channels": root_channels(pruned.model, group.name)}
            candidates.append((row, pruned.model))
        return self.measured_rows(candidates, cache_dir)

    def measure_blocks(self, cache_dir: Path) -> list[dict[str, Any]]:
        """One row per residual block the model can lose whole, removed alone."""
        names = residual_blocks(self.model, self.guard.sample, self.protected, Budget(self.context.config.prune.analysis_seconds))
        return self.measured_rows([({"block": name}, drop_blocks(self.model, [name])) for name in names], cache_dir)

    def measured_rows(self, candidates: list[tuple[dict[str, Any], nn.Module]], cache_dir: Path) -> list[dict[str, Any]]:
        """Each ``(row, model)`` candidate's row completed with its top-1 (after BatchNorm re-estimation when the build
        re-estimates; the stale-statistics top-1 beside it), MAC reduction and paired speed-up against the dense export."""
        config, dataset, dense = self.context.config, self.context.dataset, self.dense
        rows, paths = [], []
        for index, (row, candidate) in enumerate(candidates):
            paths.append(self.probe.export(candidate, self.context.workdir / f"candidate-{index}"))
            stale = evaluate(candidate, dataset.x_test, dataset.y_test)
            recalibrated = config.prune.recalibrate_batchnorm and recalibrate_batchnorm(candidate, dataset.x_train[:RECALIBRATION_IMAGES])
            accuracy = evaluate(candidate, dataset.x_test, dataset.y_test) if recalibrated else stale
            macs = count_macs_params(candidate, example_batch(dataset))["macs"]
            rows.append(
                {
                    **row,
                    "accuracy": accuracy,
                    "accuracy_drop": dense["accuracy"] - accuracy,
                    "accuracy_stale_batchnorm": stale,
                    "mac_reduction": dense["macs"] / max(macs, 1),
                }
            )
        with device_slot(self.probe.device, cache_dir):  # one timing at a time per device, dense and candidate in alternation
            timings = [pairs_summary(measure_pairs(self.probe, self.dense_export, path)) for path in paths]
        for row, timing in zip(rows, timings, strict=True):
            row["latency_p50_ms"], row["dense_p50_ms"] = timing["latency_p50_ms"], timing["dense_p50_ms"]
            row["latency_gain_pct"] = 100.0 * (1 - 1 / timing["speedup"])
        return rows


def add_weights(groups: list[dict[str, Any]]) -> None:
    """Set each group's ``efficiency`` (mean latency gain % per mean point lost) and ``weight`` (normalised to mean 1, capped).

    Only ratios that removed channels count: where ``round_to`` kept the whole width, the "gain" is timing noise
    and the zero drop would make the group look free. A group with no such ratio gets ``efficiency`` None and weight 1.
    """
    for group in groups:
        pruned = [result for result in group["results"] if result["channels"] < group["channels"]]
        if not pruned:
            group["efficiency"] = None
            continue
        gain = statistics.mean(max(result["latency_gain_pct"], 0.0) for result in pruned)
        drop = statistics.mean(max(result["accuracy_drop"], DROP_FLOOR) for result in pruned)
        group["efficiency"] = gain / drop
    measured = [group["efficiency"] for group in groups if group["efficiency"] is not None]
    mean = statistics.mean(measured) if measured else 0.0
    for group in groups:
        efficiency = group["efficiency"]
        group["weight"] = round(min(efficiency / mean, MAX_WEIGHT), 4) if mean > 0 and efficiency is not None else 1.0


def markdown_table(data: dict[str, Any]) -> str:
    """The analysis as Markdown: one row per group and ratio."""
    dense, runtime = data["dense"], data["runtime"]
    lines = [
        f"# Sensitivity: {data['model']} ({data['target']})",
        "",
        f"Unpruned: top-1 {dense['accuracy']:.2f} %, p50 {dense['latency_p50_ms']:.4g} ms on {runtime['device']} "
        f"({runtime['format']}, {runtime['threads']} threads), {dense['macs']:,} MACs. Each group pruned alone, no finetuning.",
        "",
        "| group | channels | ratio | kept | top-1 % | drop (points) | p50 ms | latency gain % | MACs ↓ | weight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for group in data["groups"]:
        for result in group["results"]:
            lines.append(
                f"| {group['layer']} | {group['channels']} | {result['ratio']:.2f} | {result['channels']} | {result['accuracy']:.2f} "
                f"| {result['accuracy_drop']:.2f} | {result['latency_p50_ms']:.4g} | {result['latency_gain_pct']:.1f} "
                f"| {result['mac_reduction']:.2f}x | {group['weight']:.2f} |"
            )
    for item in data["untracked_coupling"]:
        lines.append(f"\nNot analysed: `{item['layer']}`: {item['reason']}")
    if data.get("blocks"):
        lines += [
            "",
            "Residual blocks removed whole, each alone (`prune.drop_blocks`); realized/MAC = speed-up / MAC reduction:",
            "",
            "| block | top-1 % | drop (points) | p50 ms | latency gain % | MACs ↓ | realized/MAC |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in data["blocks"]:
            realized = 1 / (1 - row["latency_gain_pct"] / 100) / row["mac_reduction"]
            lines.append(
                f"| {row['block']} | {row['accuracy']:.2f} | {row['accuracy_drop']:.2f} | {row['latency_p50_ms']:.4g} "
                f"| {row['latency_gain_pct']:.1f} | {row['mac_reduction']:.2f}x | {realized:.2f} |"
            )
    return "\n".join(lines) + "\n"


def write_plot(data: dict[str, Any], path: Path) -> None:
    """Accuracy drop and latency gain against the ratio, one line per group (Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4.5))
    FigureCanvasAgg(figure)
    accuracy_axes, latency_axes = figure.subplots(1, 2)
    for group in data["groups"]:
        ratios = [result["ratio"] for result in group["results"]]
        accuracy_axes.plot(ratios, [result["accuracy_drop"] for result in group["results"]], marker="o", label=group["layer"])
        latency_axes.plot(ratios, [result["latency_gain_pct"] for result in group["results"]], marker="o", label=group["layer"])
    accuracy_axes.set(xlabel="pruning ratio (group alone)", ylabel="top-1 drop (points)", title="accuracy cost")
    latency_axes.set(xlabel="pruning ratio (group alone)", ylabel="p50 latency gain (%)", title=f"measured on {data['runtime']['device']}")
    latency_axes.legend(fontsize="x-small", loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
