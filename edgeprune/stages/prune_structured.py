"""Structured pruning: whole channels, filters and attention heads physically removed.

Torch-Pruning's dependency graph (DepGraph) finds the layers coupled through residual
adds, concatenations, splits, depthwise convolutions and attention heads, so they are
pruned together (see ``edgeprune.pruning``). Each group's target width comes from
``prune.amount``, scaled per group by a sensitivity analysis (``prune.ratios_from``) or
fixed (``prune.layer_ratios``); ``prune.speedup`` instead prunes until the speed-up
measured on the target's runtime is reached (``edgeprune.speedup_search``). Before any channel
goes, ``prune.drop_blocks``/``prune.drop_block_count`` remove whole residual blocks
(``edgeprune.depth_pruning``); metrics key ``depth`` lists them.

Every step prunes a copy and accepts it only once it runs and (where no LayerNorm
intervenes) computes exactly the previous model minus the removed channels; groups whose
coupling the graph gets wrong are bisected out, left unpruned and listed in the metrics
(key ``untracked_coupling``). The saved model is verified by rebuilding it from its file.
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
from edgeprune.config import BuildConfig
from edgeprune.depth_pruning import check_droppable, drop_blocks, residual_blocks, score_blocks
from edgeprune.errors import ConfigError, InputError, StageError
from edgeprune.modelio import load_model
from edgeprune.pruning import (
    Guard,
    LayerGroup,
    UntrackedCoupling,
    guarded_prune,
    layer_groups,
    protected_layers,
    root_channels,
    verify_pruned_model,
)
from edgeprune.pruning_plan import GroupPlan, partial_moves
from edgeprune.speedup_search import LatencyProbe, prune_to_speedup
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model, write_model
from edgeprune.training import RECALIBRATION_IMAGES, TrainSettings, count_macs_params, evaluate, recalibrate_batchnorm, train

TAYLOR_SAMPLES = 256  # training images whose gradients feed first-order Taylor importance
HELD_OUT_IMAGES = 1000  # the last training images: blocks for drop_block_count are ranked by top-1 on them


class PruneStructured:
    name = "prune_structured"
    version = "9"  # 8: BatchNorm statistics re-estimated after each step; 9: depth pruning
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
        groups = layer_groups(model, example, config.prune, protected)
        run = PruningRun(model, copy.deepcopy(dense), context, protected, groups, GroupPlan.from_config(groups, config.prune))
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
            "depth": depth,
            "trajectory": trajectory,
        }
        return StageOutput(artifacts, metrics)


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
    candidates = residual_blocks(model, sample, protected)
    check_droppable(named, candidates)
    others = [name for name in candidates if name not in named]
    if count > len(others):
        raise ConfigError(
            f"prune.drop_block_count = {count}, but the model has {len(others)} more removable residual blocks "
            f"({', '.join(others) or 'none'})"
        )
    rows = [{"block": name, "chosen_by": "prune.drop_blocks"} for name in named]
    if count:
        macs_of = lambda candidate: count_macs_params(candidate, example)["macs"]  # noqa: E731
        held_out = (dataset.x_train[-HELD_OUT_IMAGES:], dataset.y_train[-HELD_OUT_IMAGES:])
        recalibration = dataset.x_train[:RECALIBRATION_IMAGES] if config.prune.recalibrate_batchnorm else None
        for score in score_blocks(model, others, macs_of, held_out, recalibration)[:count]:
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
