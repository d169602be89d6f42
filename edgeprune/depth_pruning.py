"""Depth pruning: whole residual blocks removed, for the speed that narrowing channels cannot deliver.

Pruning channels leaves every operator in place, and on a CPU runtime each operator costs time that
does not shrink with its width: onnxruntime with 2 threads spends about 14 µs on a depthwise conv over
a 4×4 map whether it has 384 or 192 channels, so a CIFAR MobileNetV2 cut to half its MACs by channels
alone runs only ~1.6x faster. A residual block ``y = x + f(x)`` can instead be removed whole: the network
computes ``y = x`` there and every operator of ``f`` is gone.

A *residual block* is recognised by what it computes, not by its class: the innermost module that has
parameters, holds no protected layer (stem, classifier, ``prune.ignored_layers``) and is called with one
tensor, whose output equals its input on the model's own activations once all its parameters are zero
(the branch then adds nothing and only the identity path is left: ResNet basic blocks with an identity
shortcut, MobileNetV2 inverted residuals that keep their shape, transformer blocks).

A *bypassable branch* is the other kind: the one child of a shape-keeping unit that holds all of the unit's parameters,
itself shape-keeping and called with one tensor, such that with the child zeroed some input channel still reaches the
unit's output unchanged (a path around the branch) and with the child replaced by an identity the unit computes a
channel permutation of its input (every output channel equal to a distinct input channel), on the model's own
activations. A ShuffleNetV2 unit of stride 1 is one: it splits its channels, transforms
one half in a branch, concatenates and shuffles. Its branch removed, the unit only passes its channels through the
shuffle, as a removed residual block passes its input through. The unit itself (not ``x + f(x)``) and a DenseNet layer
(concat: its channels grow) are never removed.

A removed block is replaced by ``DroppedBlock`` (an identity the model file records by name, so
``modelio.load_model`` rebuilds the network without it).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import PruneConfig
from edgeprune.data import Dataset
from edgeprune.deadline import AnalysisTimeout, Budget
from edgeprune.errors import ConfigError
from edgeprune.progress import Reporter
from edgeprune.pruning import verify_pruned_model
from edgeprune.training import RECALIBRATION_IMAGES, count_macs_params, evaluate, example_batch, recalibrate_batchnorm

HELD_OUT_IMAGES = 1000  # the last training images: blocks for drop_block_count are ranked by top-1 on them

TOLERANCE = 1e-5  # |output - input| of a block with its parameters zeroed, relative to the input's largest value


class DroppedBlock(nn.Identity):
    """Where a residual block was removed by depth pruning: passes its input through."""


@dataclass(frozen=True)
class BlockScore:
    """Top-1 (on held-out training images) of the model with one block removed, and the MACs that removes."""

    block: str
    accuracy: float
    macs_removed: int


def residual_blocks(model: nn.Module, sample: torch.Tensor, protected: Iterable[str] = (), budget: Budget | None = None) -> list[str]:
    """Names of the blocks of ``model`` that can be removed whole, in the model's order (see the module doc): residual
    blocks and bypassable branches.

    Past ``budget`` (``budget.expired()`` then tells) the modules not checked yet are not blocks: never removed.
    """
    protected, passing = set(protected), []
    try:
        with (budget or Budget()).deadline():
            calls = _single_tensor_calls(model, sample)
            for name, module in model.named_modules():
                if not _may_be_block(name, module, calls.inputs, protected):
                    continue
                if all(_is_identity_when_zeroed(module, x) for x in calls.inputs[name]):
                    passing.append(name)
                branch = _bypassable_branch(name, module, calls, protected)
                if branch is not None and branch not in passing:
                    passing.append(branch)
    except AnalysisTimeout:
        pass
    order = {name: index for index, (name, _) in enumerate(model.named_modules())}
    passing.sort(key=order.__getitem__)
    return [name for name in passing if not any(other.startswith(f"{name}.") for other in passing)]


def _may_be_block(name: str, module: nn.Module, calls: dict[str, list[torch.Tensor]], protected: set[str]) -> bool:
    return bool(
        name
        and name in calls
        and not isinstance(module, DroppedBlock)
        and any(True for _ in module.parameters())
        and not any(layer == name or layer.startswith(f"{name}.") for layer in protected)
    )


@dataclass(frozen=True)
class ModuleCalls:
    """One forward pass seen module by module: each module's inputs (modules called with one tensor only) and the
    modules whose every call returned a tensor of its input's shape."""

    inputs: dict[str, list[torch.Tensor]]
    shape_kept: frozenset[str]


def _single_tensor_calls(model: nn.Module, sample: torch.Tensor) -> ModuleCalls:
    """Per module: the input of each of its calls in one forward pass of ``sample``; modules called with anything
    but one tensor (several arguments, keyword arguments) are left out."""
    inputs: dict[str, list[torch.Tensor]] = {}
    excluded, reshaped = set(), set()

    def record(name: str):
        def hook(_module, args, kwargs):
            if len(args) == 1 and not kwargs and torch.is_tensor(args[0]):
                inputs.setdefault(name, []).append(args[0].detach().clone())
            else:
                excluded.add(name)

        return hook

    def compare(name: str):
        def hook(_module, args, output):
            if not (args and torch.is_tensor(args[0]) and torch.is_tensor(output) and output.shape == args[0].shape):
                reshaped.add(name)

        return hook

    modules = [(name, module) for name, module in model.named_modules() if name]
    handles = [module.register_forward_pre_hook(record(name), with_kwargs=True) for name, module in modules]
    handles += [module.register_forward_hook(compare(name)) for name, module in modules]
    try:
        with torch.no_grad():
            model.eval()(sample)
    finally:
        for handle in handles:
            handle.remove()
    kept = {name: calls for name, calls in inputs.items() if name not in excluded}
    return ModuleCalls(kept, frozenset(kept.keys() - reshaped))


def _zeroed_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` in eval mode with every parameter zero (``module`` is untouched)."""
    zeroed = copy.deepcopy(module).eval()
    with torch.no_grad():
        for parameter in zeroed.parameters():
            parameter.zero_()
    return zeroed


def _is_identity_when_zeroed(module: nn.Module, inputs: torch.Tensor) -> bool:
    with torch.no_grad():
        output = _run(_zeroed_copy(module), inputs)
    if not torch.is_tensor(output) or output.shape != inputs.shape:
        return False
    scale = float(inputs.abs().max())  # relative: an all-zero input proves nothing, tiny activations must not pass
    return scale > 0 and float((output - inputs).abs().max()) <= TOLERANCE * scale


def _bypassable_branch(name: str, unit: nn.Module, calls: ModuleCalls, protected: set[str]) -> str | None:
    """The child of ``unit`` (called ``name``) that is a bypassable branch (see the module doc), or None. The branch
    holds every parameter of the unit; with it zeroed, some of the unit's input reaches its output unchanged (a path
    around it), and with it replaced by an identity the unit is a channel permutation of its input, on every recorded
    call. The child is swapped in place for the test and put back."""
    holders = [(child_name, child) for child_name, child in unit.named_children() if any(True for _ in child.parameters())]
    if len(holders) != 1 or name not in calls.shape_kept:
        return None
    (child_name, child), full = holders[0], f"{name}.{holders[0][0]}"
    if full not in calls.shape_kept or not _may_be_block(full, child, calls.inputs, protected):
        return None
    try:
        unit._modules[child_name] = _zeroed_copy(child)
        with torch.no_grad():
            passes = all(_passes_some_channels(_run(unit, x), x) for x in calls.inputs[name])
        unit._modules[child_name] = DroppedBlock()
        with torch.no_grad():
            permutes = passes and all(_is_channel_permutation(_run(unit, x), x) for x in calls.inputs[name])
    finally:
        unit._modules[child_name] = child
    return full if permutes else None


def _run(module: nn.Module, inputs: torch.Tensor) -> object:
    try:
        return module(inputs)
    except Exception:  # a module that cannot run on this input alone (or a unit without its branch): not removable
        return None


def _channel_distances(output: object, inputs: torch.Tensor) -> torch.Tensor | None:
    """Largest difference between each channel of ``output`` and each of ``inputs`` (N, C, ...), relative to the input's
    largest value: a (C, C) matrix; None when the shapes differ or the input is all zero."""
    if not torch.is_tensor(output) or output.shape != inputs.shape or inputs.dim() < 3:
        return None
    scale = float(inputs.abs().max())
    if scale == 0:
        return None
    channels = inputs.shape[1]
    source = inputs.transpose(0, 1).reshape(channels, -1)
    return torch.cdist(output.transpose(0, 1).reshape(channels, -1), source, p=float("inf")) / scale


def _passes_some_channels(output: object, inputs: torch.Tensor) -> bool:
    """Some channel of ``output`` equals a channel of ``inputs`` that is not all zero."""
    distance = _channel_distances(output, inputs)
    if distance is None:
        return False
    live = inputs.transpose(0, 1).reshape(inputs.shape[1], -1).abs().amax(dim=1) > TOLERANCE * float(inputs.abs().max())
    return bool((distance[:, live] <= TOLERANCE).any())


def _is_channel_permutation(output: object, inputs: torch.Tensor) -> bool:
    """Every channel of ``output`` equals a distinct channel of ``inputs`` (N, C, ...), within TOLERANCE."""
    distance = _channel_distances(output, inputs)
    if distance is None:
        return False
    unused = set(range(inputs.shape[1]))
    for row in distance:
        match = next((int(index) for index in torch.nonzero(row <= TOLERANCE).flatten() if int(index) in unused), None)
        if match is None:
            return False
        unused.discard(match)
    return True


def drop_blocks(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` with each block in ``names`` replaced by a ``DroppedBlock`` (``model`` is untouched)."""
    dropped = copy.deepcopy(model)
    for name in names:
        replace_with_dropped(dropped, name)
    return dropped


def replace_with_dropped(model: nn.Module, name: str) -> None:
    """Put a ``DroppedBlock`` where submodule ``name`` is (in place); ValueError when there is none."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
    except AttributeError:
        parent = None
    if parent is None or child not in parent._modules:
        raise ValueError(f"no module named '{name}' in the model")
    parent._modules[child] = DroppedBlock()


def dropped_blocks(model: nn.Module) -> list[str]:
    """Names of the blocks removed from ``model``, in its order."""
    return [name for name, module in model.named_modules() if isinstance(module, DroppedBlock)]


def check_droppable(names: Iterable[str], candidates: Sequence[str]) -> None:
    """ConfigError naming the first of ``names`` that is not a removable residual block, and the blocks that are."""
    for name in names:
        if name not in candidates:
            known = ", ".join(candidates) or "none"
            raise ConfigError(f"prune.drop_blocks: '{name}' is not a residual block that can be removed (removable: {known})")


def score_blocks(
    model: nn.Module,
    candidates: Sequence[str],
    macs_of: Callable[[nn.Module], int],
    held_out: tuple[np.ndarray, np.ndarray],
    recalibration: np.ndarray | None,
    budget: Budget | None = None,
) -> list[BlockScore]:
    """Each candidate removed alone: top-1 on ``held_out`` images (after re-estimating BatchNorm statistics on
    ``recalibration`` when given) and the MACs removed (``macs_of``); best first (highest top-1, then most MACs removed).
    Past ``budget`` the candidates not scored yet are left out."""
    scores: list[BlockScore] = []
    try:
        with (budget or Budget()).deadline():
            dense_macs = macs_of(model)
            for name in candidates:
                candidate = drop_blocks(model, [name])
                if recalibration is not None:
                    recalibrate_batchnorm(candidate, recalibration)
                score = BlockScore(name, evaluate(candidate, *held_out), dense_macs - macs_of(candidate))
                scores.append(score)
    except AnalysisTimeout:
        pass
    return sorted(scores, key=lambda score: (-score.accuracy, -score.macs_removed))


def depth_prune(
    model: nn.Module, config: PruneConfig, dataset: Dataset, protected: set[str], num_classes: int, reporter: Reporter
) -> tuple[nn.Module, dict[str, Any]]:
    """``model`` without the residual blocks ``config.drop_blocks`` names and the ``config.drop_block_count`` cheapest
    others (a copy; ``model`` itself when none), and what was removed: the blocks, the MAC reduction and top-1 after.

    Blocks are ranked by top-1 on the last ``HELD_OUT_IMAGES`` training images; with ``config.recalibrate_batchnorm``
    BatchNorm statistics are re-estimated first. Raises ConfigError for a name that is not a removable block, or
    more blocks asked for than the model has.
    """
    named, count = list(config.drop_blocks), config.drop_block_count
    if not named and not count:
        return model, {"blocks": [], "mac_reduction": 1.0}
    example, sample = example_batch(dataset), example_batch(dataset, batch=4)
    budget, seconds = Budget(config.analysis_seconds), config.analysis_seconds
    candidates = residual_blocks(model, sample, protected, budget)
    if budget.expired():
        reporter.warn(f"prune_structured: block detection ran past prune.analysis_seconds ({seconds:g} s): {len(candidates)} found by then")
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
        recalibration = dataset.x_train[:RECALIBRATION_IMAGES] if config.recalibrate_batchnorm else None
        scores = score_blocks(model, others, macs_of, held_out, recalibration, Budget(seconds))
        if len(scores) < min(count, len(others)):
            reporter.warn(f"prune_structured: ranking blocks ran past prune.analysis_seconds ({seconds:g} s): {len(scores)} ranked")
        for score in scores[:count]:
            chosen = {"block": score.block, "chosen_by": "prune.drop_block_count", "held_out_accuracy": score.accuracy}
            rows.append({**chosen, "macs_removed": score.macs_removed})
    order = {name: index for index, name in enumerate(candidates)}
    rows.sort(key=lambda row: order[row["block"]])
    shallower = drop_blocks(model, [row["block"] for row in rows])
    verify_pruned_model(shallower, sample, num_classes)
    if config.recalibrate_batchnorm:
        recalibrate_batchnorm(shallower, dataset.x_train[:RECALIBRATION_IMAGES])
    for row in rows:
        reporter.info(f"prune_structured: removing residual block {row['block']} ({row['chosen_by']})")
    reduction = count_macs_params(model, example)["macs"] / max(count_macs_params(shallower, example)["macs"], 1)
    return shallower, {"blocks": rows, "mac_reduction": reduction, "accuracy": evaluate(shallower, dataset.x_test, dataset.y_test)}
