"""Structured pruning: whole channels, filters and attention heads physically removed.

Torch-Pruning's dependency graph (DepGraph) finds the layers coupled through residual
adds, concatenations, splits, depthwise convolutions and attention heads, so they are
pruned together (see ``edgeprune.pruning``). Each group's target width comes from
``prune.amount``, scaled per group by a sensitivity analysis (``prune.ratios_from``) or
fixed (``prune.layer_ratios``); ``prune.speedup`` instead prunes until the speed-up
measured on the target's runtime is reached (``edgeprune.latency_target``). Before any channel
goes, ``prune.drop_blocks``/``prune.drop_block_count`` remove whole residual blocks
(``edgeprune.blocks``); metrics key ``depth`` lists them.

Every step prunes a copy and accepts it only once it runs and (where no LayerNorm
intervenes) computes exactly the previous model minus the removed channels; groups whose
coupling the graph gets wrong are bisected out, left unpruned and listed in the metrics
(key ``untracked_coupling``); groups the dependency analysis keeps whole (coupled through a
channel shuffle, or not reached within ``prune.analysis_seconds``) are under key
``dependency_analysis``. The saved model is verified by rebuilding it from its file.
Metrics key ``trajectory`` has one row per step.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import sha256_of
from edgeprune.blocks import check_droppable, drop_blocks, residual_blocks, score_blocks
from edgeprune.config import BuildConfig, PruneConfig
from edgeprune.deadline import Budget
from edgeprune.dependency import DependencyAnalysis
from edgeprune.errors import ConfigError, InputError, StageError
from edgeprune.latency_target import LatencyProbe, prune_to_speedup
from edgeprune.modelio import load_model
from edgeprune.pipeline import StageContext, StageOutput
from edgeprune.pruning import (
    MAX_RATIO,
    Guard,
    LayerGroup,
    UntrackedCoupling,
    guarded_prune,
    layer_groups,
    protected_layers,
    root_channels,
    rounded_width,
    verify_pruned_model,
)
from edgeprune.rounding import kept_whole_by_rounding, rounding_warning
from edgeprune.sensitivity import group_sensitivity
from edgeprune.stages.common import count_macs_params, example_input, read_model, write_model
from edgeprune.training import RECALIBRATION_IMAGES, TrainSettings, evaluate, recalibrate_batchnorm, train

MAX_LEVEL_SPAN = 4.0  # a weighted plan's levels go up to this many times MAX_RATIO
TAYLOR_SAMPLES = 256  # training images whose gradients feed first-order Taylor importance
HELD_OUT_IMAGES = 1000  # the last training images: blocks for drop_block_count are ranked by top-1 on them


class PruneStructured:
    name = "prune_structured"
    version = (
        "10"  # 8: BatchNorm statistics re-estimated after each step; 9: depth pruning; 10: bounded analysis, groups round_to keeps whole
    )
    trains = True  # its cache key includes torch's thread count
    sections = ("prune", "finetune")
    consumes = ("model",)

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        """The sensitivity file's hash; with a speed-up target, the export/benchmark/budget settings it uses."""
        extra: dict[str, Any] = {}
        if config.prune.ratios_from:
            path = Path(config.prune.ratios_from)
            if not path.is_file():
                raise InputError(f"prune.ratios_from: {path} not found (write it with 'edgeprune analyze')")
            extra["ratios_from_sha256"] = sha256_of(path)
        if config.prune.speedup > 0:
            sections = config.to_dict()
            extra["latency"] = {name: sections[name] for name in ("export", "benchmark", "budgets")}
        return extra

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        dense = read_model(context)
        example, sample = example_input(context), example_input(context, batch=4)
        before, widths_before = count_macs_params(dense, example), layer_widths(dense)
        protected = protected_layers(dense, config.prune.ignored_layers, config.model.num_classes)
        model, depth = depth_prune(context, dense, protected)
        analysis = analyse_dependencies(context, model, protected)
        protected, groups = analysis.protected(protected), analysis.groups
        narrow = kept_whole_by_rounding(groups, config.prune.round_to)
        if narrow:
            context.reporter.warn(rounding_warning(narrow, config.prune.round_to))
        movable = [group for group in groups if group.name not in {item.layer for item in narrow}]
        run = PruningRun(model, copy.deepcopy(dense), context, protected, groups, GroupPlan.from_config(movable, config.prune))
        if config.prune.speedup > 0:
            trajectory = prune_to_speedup(run, LatencyProbe.for_target(context), config.prune, config.budgets.max_accuracy_drop)
        else:
            trajectory = run.prune_by_ratio()
        model = run.model
        artifacts = write_model(context, model)
        check_reloads(artifacts[0].path, model, sample)
        after = count_macs_params(model, example)
        metrics = {
            "macs_before": before["macs"],
            "macs_after": after["macs"],
            "params_before": before["params"],
            "params_after": after["params"],
            "mac_reduction": before["macs"] / max(after["macs"], 1),
            "accuracy_before": run.reference_accuracy,
            "accuracy": trajectory[-1]["accuracy"],
            "layers": layer_report(widths_before, layer_widths(model)),
            "group_ratios": {name: round(1 - root_channels(model, name) / width, 4) for name, width in run.plan.widths.items()},
            "untracked_coupling": [{"layer": item.layer, "reason": item.reason} for item in run.untracked],
            "dependency_analysis": {"seconds": round(analysis.seconds, 3), "groups": len(groups), "kept_whole": analysis.report()},
            "kept_whole_by_rounding": [item.to_dict() for item in narrow],
            "depth": depth,
            "trajectory": trajectory,
        }
        return StageOutput(artifacts, metrics)


def analyse_dependencies(context: StageContext, model: nn.Module, protected: set[str]) -> DependencyAnalysis:
    """The layer groups of ``model`` (within ``prune.analysis_seconds``); the groups kept whole are said in the log."""
    reporter, seconds = context.reporter, context.config.prune.analysis_seconds
    reporter.info(f"prune_structured: dependency analysis (at most {seconds:g} s, prune.analysis_seconds)")
    analysis = layer_groups(model, example_input(context), context.config.prune, protected, reporter)
    reporter.info(f"prune_structured: {len(analysis.groups)} layer groups, {len(analysis.kept_whole)} kept whole ({analysis.seconds:.1f}s)")
    if analysis.kept_whole:
        reporter.warn(f"prune_structured: keeping {len(analysis.kept_whole)} layer groups whole (metrics: dependency_analysis)")
    for item in analysis.kept_whole:
        reporter.detail(f"keeping {item.layer} whole: {item.reason}")
    return analysis


def depth_prune(context: StageContext, model: nn.Module, protected: set[str]) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` without the residual blocks ``prune.drop_blocks`` names and the ``prune.drop_block_count`` cheapest
    others (a copy; ``model`` itself when none), and what was removed: the blocks, the MAC reduction and top-1 after.

    Raises ConfigError for a name that is not a removable block, or more blocks asked for than the model has.
    """
    config, dataset = context.config, context.dataset
    named, count = list(config.prune.drop_blocks), config.prune.drop_block_count
    if not named and not count:
        return model, {"blocks": [], "mac_reduction": 1.0}
    example, sample = example_input(context), example_input(context, batch=4)
    budget, seconds = Budget(config.prune.analysis_seconds), config.prune.analysis_seconds
    candidates = residual_blocks(model, sample, protected, budget)
    if budget.expired():
        context.reporter.warn(
            f"prune_structured: block detection ran past prune.analysis_seconds ({seconds:g} s): {len(candidates)} found by then"
        )
    check_droppable(named, candidates)
    others = [name for name in candidates if name not in named]
    if count > len(others) and not budget.expired():
        raise ConfigError(
            f"prune.drop_block_count = {count}, but the model has {len(others)} more removable residual blocks "
            f"({', '.join(others) or 'none'})"
        )
    rows = [{"block": name, "chosen_by": "prune.drop_blocks"} for name in named]
    if count:
        macs_of = lambda candidate: count_macs_params(candidate, example)["macs"]  # noqa: E731
        held_out = (dataset.x_train[-HELD_OUT_IMAGES:], dataset.y_train[-HELD_OUT_IMAGES:])
        recalibration = dataset.x_train[:RECALIBRATION_IMAGES] if config.prune.recalibrate_batchnorm else None
        scores = score_blocks(model, others, macs_of, held_out, recalibration, Budget(seconds))
        if len(scores) < min(count, len(others)):
            context.reporter.warn(f"prune_structured: ranking blocks ran past prune.analysis_seconds ({seconds:g} s): {len(scores)} ranked")
        for score in scores[:count]:
            chosen = {"block": score.block, "chosen_by": "prune.drop_block_count", "held_out_accuracy": score.accuracy}
            rows.append({**chosen, "macs_removed": score.macs_removed})
    order = {name: index for index, name in enumerate(candidates)}
    rows.sort(key=lambda row: order[row["block"]])
    shallower = drop_blocks(model, [row["block"] for row in rows])
    verify_pruned_model(shallower, sample, config.model.num_classes)
    if config.prune.recalibrate_batchnorm:
        recalibrate_batchnorm(shallower, dataset.x_train[:RECALIBRATION_IMAGES])
    for row in rows:
        context.reporter.info(f"prune_structured: removing residual block {row['block']} ({row['chosen_by']})")
    reduction = count_macs_params(model, example)["macs"] / max(count_macs_params(shallower, example)["macs"], 1)
    return shallower, {"blocks": rows, "mac_reduction": reduction, "accuracy": evaluate(shallower, dataset.x_test, dataset.y_test)}


@dataclass(frozen=True)
class GroupPlan:
    """Per-group pruning ratios as a function of one *level* in [0, MAX_RATIO].

    Group ``g`` is pruned to ``min(weights[g] * level, caps[g])`` of its original
    channels (``widths``), or to ``fixed[g]`` when the profile fixes it. Uniform pruning
    is every weight 1 and every cap MAX_RATIO; ``prune.ratios_from`` supplies measured
    weights, and caps each group at the largest ratio its analysis measured (a plan does
    not extrapolate a group's cost past what was measured).
    """

    widths: dict[str, int]
    weights: dict[str, float]
    fixed: dict[str, float]
    caps: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, groups: list[LayerGroup], config: PruneConfig) -> GroupPlan:
        if config.global_pruning and (config.layer_ratios or config.ratios_from):
            raise ConfigError(
                "prune.global_pruning ranks channels across all groups; it cannot be combined with prune.layer_ratios or prune.ratios_from"
            )
        widths = {group.name: group.channels for group in groups}
        weights, caps = dict.fromkeys(widths, 1.0), {}
        if config.ratios_from:
            measured = group_sensitivity(Path(config.ratios_from), list(widths))
            weights.update({name: weight for name, (weight, _) in measured.items()})
            caps = {name: min(cap, MAX_RATIO) for name, (_, cap) in measured.items()}
        return cls(widths, weights, parse_layer_ratios(config.layer_ratios, widths), caps)

    def cap(self, name: str) -> float:
        return self.caps.get(name, MAX_RATIO)

    def ratio(self, name: str, level: float) -> float:
        return self.fixed.get(name, min(self.weights[name] * level, self.cap(name)))

    def max_level(self) -> float:
        """The level at which every group it scales reaches its cap: MAX_RATIO when uniform, higher when
        measured weights hold the sensitive groups back (at most ``MAX_LEVEL_SPAN`` times MAX_RATIO)."""
        scaled = [self.cap(name) / weight for name, weight in self.weights.items() if name not in self.fixed and weight > 0]
        return min(max(scaled), MAX_RATIO * MAX_LEVEL_SPAN) if scaled else MAX_RATIO

    def targets(self, level: float, round_to: int = 1) -> dict[str, int]:
        """Channels each group keeps at ``level``: the nearest multiple of ``round_to``, at least one multiple."""
        return {name: rounded_width(width * (1 - self.ratio(name, level)), width, round_to) for name, width in self.widths.items()}


def partial_moves(current: dict[str, int], targets: dict[str, int], weights: dict[str, float]) -> list[dict[str, int]]:
    """Widths from ``current`` towards ``targets``, one more narrowed group each time, the highest ``weights`` first
    (ties in the given order); the last move, which is ``targets`` itself, is left out."""
    order = sorted((name for name in targets if targets[name] < current[name]), key=lambda name: -weights.get(name, 1.0))
    moves, widths = [], dict(current)
    for name in order[:-1]:
        widths[name] = targets[name]
        moves.append(dict(widths))
    return moves


def parse_layer_ratios(entries: tuple[str, ...], widths: dict[str, int]) -> dict[str, float]:
    """``("layer=0.5", ...)`` → ``{"layer": 0.5}``; ConfigError for a bad entry, an unknown group or a ratio out of range."""
    ratios = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not 0.0 <= ratio <= MAX_RATIO:
            raise ConfigError(f"prune.layer_ratios: {entry!r} must be 'layer.name=RATIO' with RATIO in [0, {MAX_RATIO}]")
        if name.strip() not in widths:
            known = ", ".join(widths) or "none"
            raise ConfigError(f"prune.layer_ratios: '{name.strip()}' is not a prunable layer group (groups: {known})")
        ratios[name.strip()] = ratio
    return ratios


@dataclass
class PruningRun:
    """The model being pruned step by step, with what verification and recovery need.

    ``prune_to`` replaces ``model`` by a pruned copy once ``guarded_prune`` has proven it
    correct (and re-estimates its BatchNorm statistics, ``prune.recalibrate_batchnorm``); groups
    found to break the model join ``untracked`` and stay unpruned.
    """

    model: nn.Module
    dense: nn.Module  # the unpruned model: distillation teacher and latency reference
    context: StageContext
    protected: set[str]
    groups: list[LayerGroup]
    plan: GroupPlan
    untracked: list[UntrackedCoupling] = field(default_factory=list)
    reference_accuracy: float = field(init=False)  # top-1 of the unpruned model
    dense_macs: int = field(init=False)

    def __post_init__(self) -> None:
        dataset = self.context.dataset
        self.reference_accuracy = evaluate(self.dense, dataset.x_test, dataset.y_test)
        self.dense_macs = count_macs_params(self.dense, example_input(self.context))["macs"]

    def prune_to(self, level: float) -> None:
        """Prune every group to its width at ``level``; a group that breaks the model is left out and reported."""
        self.prune_to_widths(self.plan.targets(level, self.context.config.prune.round_to))

    def partial_moves(self, level: float) -> list[dict[str, int]]:
        """The widths between this model and ``level``'s, one more group moved at a time: the groups the plan
        weights highest first (then in model order), the last group's move left out (that is ``prune_to(level)``).
        Empty when the step moves at most one group."""
        flagged, round_to = {item.layer for item in self.untracked}, self.context.config.prune.round_to
        targets = {name: width for name, width in self.plan.targets(level, round_to).items() if name not in flagged}
        return partial_moves({name: root_channels(self.model, name) for name in targets}, targets, self.plan.weights)

    def snapshot(self) -> tuple[nn.Module, list[UntrackedCoupling]]:
        return self.model, list(self.untracked)  # guarded_prune never modifies the model it is given

    def restore(self, state: tuple[nn.Module, list[UntrackedCoupling]]) -> None:
        self.model, self.untracked = state[0], list(state[1])

    def prune_to_widths(self, targets: dict[str, int]) -> None:
        """Prune each group to ``targets[group]`` channels; a group that breaks the model is left out and reported."""
        config, dataset = self.context.config, self.context.dataset
        guard = Guard(
            example_input(self.context, batch=4),
            config.model.num_classes,
            torch.from_numpy(dataset.x_train[:TAYLOR_SAMPLES]),
            torch.from_numpy(dataset.y_train[:TAYLOR_SAMPLES]),
        )
        flagged = {item.layer for item in self.untracked}
        widths = {name: width for name, width in targets.items() if name not in flagged}
        pruned = guarded_prune(self.model, config.prune, self.protected | flagged, self.groups, widths, guard)
        self.model, found = pruned.model, pruned.untracked
        for item in found:
            self.context.reporter.warn(f"prune_structured: not pruning {item.layer}: {item.reason}")
        self.untracked += found
        verify_pruned_model(self.model, guard.sample, config.model.num_classes)
        if config.prune.recalibrate_batchnorm:
            recalibrate_batchnorm(self.model, dataset.x_train[:RECALIBRATION_IMAGES])

    def max_level(self) -> float:
        return self.plan.max_level()

    def macs(self) -> int:
        return count_macs_params(self.model, example_input(self.context))["macs"]

    def recover(self, step: int) -> None:
        """``prune.recover_epochs`` of finetuning, distilled from the unpruned model when ``finetune.distill``."""
        config = self.context.config
        if config.prune.recover_epochs == 0:
            return
        finetune = config.finetune
        alpha = finetune.distill_alpha if finetune.distill else 0.0
        settings = TrainSettings(
            config.prune.recover_epochs, finetune.lr, finetune.batch_size, config.seed + step, alpha, finetune.temperature
        )
        dataset = self.context.dataset
        teacher = self.dense if finetune.distill else None
        train(self.model, dataset.x_train, dataset.y_train, settings, teacher, self.context.reporter, f"recover step {step}")

    def row(self, step: int, level: float) -> dict[str, Any]:
        """One trajectory row: the level, the fraction of prunable channels removed, MACs and top-1 now."""
        dataset, total = self.context.dataset, sum(self.plan.widths.values())
        kept = sum(root_channels(self.model, name) for name in self.plan.widths)
        macs, dense_macs = self.macs(), self.dense_macs
        return {
            "step": step,
            "level": round(level, 4),
            "ratio": round(1 - kept / total, 4) if total else 0.0,
            "macs": macs,
            "mac_reduction": dense_macs / max(macs, 1),
            "accuracy": evaluate(self.model, dataset.x_test, dataset.y_test),
        }

    def prune_by_ratio(self) -> list[dict[str, Any]]:
        """``prune.steps`` steps to ``prune.amount``, recovering between steps (the finetune stage follows the last)."""
        steps, amount = self.context.config.prune.steps, self.context.config.prune.amount
        trajectory = []
        for step in range(1, steps + 1):
            self.prune_to(amount * step / steps)
            if step < steps:
                self.recover(step)
            trajectory.append(self.row(step, amount * step / steps))
        return trajectory


def check_reloads(path: Path, model: nn.Module, sample: torch.Tensor) -> None:
    """The saved file must rebuild (architecture + plan, no pickles) into the same network."""
    with torch.no_grad():
        expected, rebuilt = model.eval()(sample), load_model(path)(sample)
    if tuple(rebuilt.shape) != tuple(expected.shape) or float((rebuilt - expected).abs().max()) > 1e-5:
        raise StageError(f"the pruned model saved to {path.name} does not rebuild into the same network from its plan")


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output channels/features of every conv and linear layer."""
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            widths[name] = module.out_channels
        elif isinstance(module, nn.Linear):
            widths[name] = module.out_features
    return widths


def layer_report(before: dict[str, int], after: dict[str, int]) -> list[dict[str, Any]]:
    return [{"layer": name, "channels_before": before[name], "channels_after": after.get(name, 0)} for name in before]
