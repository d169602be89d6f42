"""Structured pruning step by step: the model narrowed to a plan's widths at one level after another.

``PruningRun`` holds the model being pruned, the unpruned one (distillation teacher and
latency reference) and the plan (``edgeprune.pruning_plan``). Each step prunes a copy and
accepts it only once ``guarded_prune`` (``edgeprune.pruning``) has proven it correct, then
re-estimates its BatchNorm statistics (``prune.recalibrate_batchnorm``); groups found to break
the model stay unpruned and are reported. ``prune_by_ratio`` steps to ``prune.amount``; the
speed-up search (``edgeprune.speedup_search``) drives the same run towards a measured speed-up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgeprune.config import BuildConfig
from edgeprune.data import Dataset
from edgeprune.progress import Reporter
from edgeprune.pruning import Guard, LayerGroup, UntrackedCoupling, guarded_prune, root_channels, verify_pruned_model
from edgeprune.pruning_plan import GroupPlan, partial_moves
from edgeprune.training import RECALIBRATION_IMAGES, TrainSettings, count_macs_params, evaluate, example_batch, recalibrate_batchnorm, train

TAYLOR_SAMPLES = 256  # training images whose gradients feed first-order Taylor importance


@dataclass
class PruningRun:
    """The model being pruned step by step, with what verification and recovery need.

    ``prune_to`` replaces ``model`` by a pruned copy once ``guarded_prune`` has proven it
    correct (and re-estimates its BatchNorm statistics, ``prune.recalibrate_batchnorm``); groups
    found to break the model join ``untracked`` and stay unpruned.
    """

    model: nn.Module
    dense: nn.Module  # the unpruned model: distillation teacher and latency reference
    config: BuildConfig  # its prune and finetune sections, seed and class count
    dataset: Dataset
    reporter: Reporter
    protected: set[str]
    groups: list[LayerGroup]
    plan: GroupPlan
    untracked: list[UntrackedCoupling] = field(default_factory=list)
    reference_accuracy: float = field(init=False)  # top-1 of the unpruned model
    dense_macs: int = field(init=False)

    def __post_init__(self) -> None:
        dataset = self.dataset
        self.reference_accuracy = evaluate(self.dense, dataset.x_test, dataset.y_test)
        self.dense_macs = count_macs_params(self.dense, example_batch(self.dataset))["macs"]

    def prune_to(self, level: float) -> None:
        """Prune every group to its width at ``level``; a group that breaks the model is left out and reported."""
        self.prune_to_widths(self.plan.targets(level, self.config.prune.round_to))

    def partial_moves(self, level: float) -> list[dict[str, int]]:
        """The widths between this model and ``level``'s, one more group moved at a time: the groups the plan
        weights highest first (then in model order), the last group's move left out (that is ``prune_to(level)``).
        Empty when the step moves at most one group."""
        flagged, round_to = {item.layer for item in self.untracked}, self.config.prune.round_to
        targets = {name: width for name, width in self.plan.targets(level, round_to).items() if name not in flagged}
        return partial_moves({name: root_channels(self.model, name) for name in targets}, targets, self.plan.weights)

    def snapshot(self) -> tuple[nn.Module, list[UntrackedCoupling]]:
        return self.model, list(self.untracked)  # guarded_prune never modifies the model it is given

    def restore(self, state: tuple[nn.Module, list[UntrackedCoupling]]) -> None:
        self.model, self.untracked = state[0], list(state[1])

    def prune_to_widths(self, targets: dict[str, int]) -> None:
        """Prune each group to ``targets[group]`` channels; a group that breaks the model is left out and reported."""
        config, dataset = self.config, self.dataset
        guard = Guard(
            example_batch(self.dataset, batch=4),
            config.model.num_classes,
            torch.from_numpy(dataset.x_train[:TAYLOR_SAMPLES]),
            torch.from_numpy(dataset.y_train[:TAYLOR_SAMPLES]),
        )
        flagged = {item.layer for item in self.untracked}
        widths = {name: width for name, width in targets.items() if name not in flagged}
        pruned = guarded_prune(self.model, config.prune, self.protected | flagged, self.groups, widths, guard)
        self.model, found = pruned.model, pruned.untracked
        for item in found:
            self.reporter.warn(f"prune_structured: not pruning {item.layer}: {item.reason}")
        self.untracked += found
        verify_pruned_model(self.model, guard.sample, config.model.num_classes)
        if config.prune.recalibrate_batchnorm:
            recalibrate_batchnorm(self.model, dataset.x_train[:RECALIBRATION_IMAGES])

    def max_level(self) -> float:
        return self.plan.max_level()

    def macs(self) -> int:
        return count_macs_params(self.model, example_batch(self.dataset))["macs"]

    def recover(self, step: int, epochs: int | None = None) -> None:
        """``epochs`` (default ``prune.recover_epochs``) of finetuning, distilled from the unpruned model when
        ``finetune.distill``."""
        config = self.config
        epochs = config.prune.recover_epochs if epochs is None else epochs
        if epochs == 0:
            return
        finetune = config.finetune
        alpha = finetune.distill_alpha if finetune.distill else 0.0
        settings = TrainSettings(epochs, finetune.lr, finetune.batch_size, config.seed + step, alpha, finetune.temperature)
        dataset = self.dataset
        teacher = self.dense if finetune.distill else None
        train(self.model, dataset.x_train, dataset.y_train, settings, teacher, self.reporter, f"recover step {step}")

    def row(self, step: int, level: float) -> dict[str, Any]:
        """One trajectory row: the level, the fraction of prunable channels removed, MACs and top-1 now."""
        dataset, total = self.dataset, sum(self.plan.widths.values())
        kept = sum(kept_channels(self.model, name) for name in self.plan.widths)
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
        steps, amount = self.config.prune.steps, self.config.prune.amount
        trajectory = []
        for step in range(1, steps + 1):
            self.prune_to(amount * step / steps)
            if step < steps:
                self.recover(step)
            trajectory.append(self.row(step, amount * step / steps))
        return trajectory


def kept_channels(model: nn.Module, name: str) -> int:
    """Output channels of group root ``name``; 0 once depth pruning removed the block holding it."""
    try:
        return root_channels(model, name)
    except AttributeError:
        return 0
