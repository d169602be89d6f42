"""Structured pruning: whole channels, filters and attention heads physically removed.

Torch-Pruning's dependency graph (DepGraph) finds the layers coupled through residual
adds, concatenations, splits, depthwise convolutions and attention heads, so they are
pruned together (see ``edgeprune.pruning``). Each group's target width comes from
``prune.amount``, scaled per group by a sensitivity analysis (``prune.ratios_from``) or
fixed (``prune.layer_ratios``); ``prune.speedup`` instead searches blocks to remove and groups
to narrow until the speed-up measured on the target's runtime is reached (``edgeprune.speed_search``;
``prune.speedup_moves = "uniform"``: the level loop of ``edgeprune.speedup_search``); metrics key
``speed_search`` has its verdict. Before any channel
goes, ``prune.drop_blocks``/``prune.drop_block_count`` remove whole residual blocks
(``edgeprune.depth_pruning``); metrics key ``depth`` lists them.

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
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import sha256_of
from edgeprune.config import BuildConfig
from edgeprune.dependency import DependencyAnalysis
from edgeprune.depth_pruning import depth_prune, residual_blocks
from edgeprune.errors import InputError, StageError
from edgeprune.modelio import load_model
from edgeprune.pruning import layer_groups, protected_layers
from edgeprune.pruning_plan import GroupPlan
from edgeprune.rounding import first_names, kept_whole_by_rounding, rounding_warning
from edgeprune.speed_search import latency_table_identity, search_speedup
from edgeprune.speedup_search import LatencyProbe, prune_to_speedup
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model, write_model
from edgeprune.structured_pruning import PruningRun, kept_channels
from edgeprune.training import count_macs_params


class PruneStructured:
    name = "prune_structured"
    version = "12"  # 8: BatchNorm re-estimated after each step; 9: depth pruning; 10: bounded analysis, round_to; 11: the speed-up
    # search; 12: split units' branches removable
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

    def shared_inputs(self, config: BuildConfig, cache_root: Path | None) -> dict[str, Any]:
        """The latency table the speed-up search reads (device, runtime, threads, format, lineage): another table,
        or the same kept for another CPU, runtime or thread count, runs the search again."""
        return latency_table_identity(config, cache_root)

    def run(self, context: StageContext) -> StageOutput:
        config = context.config
        dense = read_model(context)
        example, sample = example_input(context), example_input(context, batch=4)
        before, widths_before = count_macs_params(dense, example), layer_widths(dense)
        user_protected = protected_layers(dense, config.prune.ignored_layers, config.model.num_classes)
        model, depth = depth_prune(dense, config.prune, context.dataset, user_protected, config.model.num_classes, context.reporter)
        analysis = analyse_dependencies(context, model, user_protected)
        protected, groups = analysis.protected(user_protected), analysis.groups
        narrow = kept_whole_by_rounding(groups, config.prune.round_to)
        if narrow:
            context.reporter.warn(rounding_warning(narrow, config.prune.round_to))
        movable = [group for group in groups if group.name not in {item.layer for item in narrow}]
        plan = GroupPlan.from_config(movable, config.prune)
        run = PruningRun(model, copy.deepcopy(dense), config, context.dataset, context.reporter, protected, groups, plan)
        trajectory, search = prune_run(context, run, [*narrow, *analysis.kept_whole])
        model = run.model
        after = count_macs_params(model, example)
        if not search and not depth["blocks"] and config.prune.amount > 0 and after["macs"] >= before["macs"]:
            removable = residual_blocks(model, sample, user_protected)
            context.reporter.warn(nothing_narrowed(len(groups) + len(analysis.kept_whole), removable))
        artifacts = write_model(context, model)
        check_reloads(artifacts[0].path, model, sample)
        metrics = {
            "macs_before": before["macs"],
            "macs_after": after["macs"],
            "params_before": before["params"],
            "params_after": after["params"],
            "mac_reduction": before["macs"] / max(after["macs"], 1),
            "accuracy_before": run.reference_accuracy,
            "accuracy": search.get("accuracy_after_recovery", trajectory[-1]["accuracy"]),
            "layers": layer_report(widths_before, layer_widths(model)),
            "group_ratios": {name: round(1 - kept_channels(model, name) / width, 4) for name, width in run.plan.widths.items()},
            "untracked_coupling": [{"layer": item.layer, "reason": item.reason} for item in run.untracked],
            "dependency_analysis": {"seconds": round(analysis.seconds, 3), "groups": len(groups), "kept_whole": analysis.report()},
            "kept_whole_by_rounding": [item.to_dict() for item in narrow],
            "depth": depth,
            "trajectory": trajectory,
            **({"speed_search": search} if search else {}),
        }
        return StageOutput(artifacts, metrics)


def prune_run(context: StageContext, run: PruningRun, kept_whole: list[Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Prune ``run`` as the profile asks: the speed-up search, the uniform speed-up loop, or ``prune.amount`` in steps.
    Returns the trajectory and the search's summary (empty without a search)."""
    config = context.config
    if config.prune.speedup <= 0:
        return run.prune_by_ratio(), {}
    probe, max_drop = LatencyProbe.for_target(context), config.budgets.max_accuracy_drop
    if config.prune.speedup_moves == "uniform":
        return prune_to_speedup(run, probe, config.prune, max_drop), {}
    not_tried = tuple(f"narrowing {item.layer} ({item.reason})" for item in kept_whole)
    outcome = search_speedup(run, probe, config.prune, max_drop, context.cache_root, not_tried)
    (context.reporter.info if outcome.summary["reached"] else context.reporter.warn)(f"prune_structured: {outcome.summary['verdict']}")
    return outcome.trajectory, outcome.summary


def nothing_narrowed(kept: int, removable: list[str]) -> str:
    """One line for a ``prune.amount`` that moved no channel: why, and the blocks that could go instead."""
    blocks = f"{len(removable)} removable blocks ({first_names(removable)})"
    remedy = f"it has {blocks}: set prune.drop_block_count or prune.speedup to remove them"
    return (
        f"prune_structured: prune.amount removed no channel: none of its {kept} layer groups could be narrowed "
        f"(the report's 'left unpruned' says why for each); " + (remedy if removable else "the model has no removable block either")
    )


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
