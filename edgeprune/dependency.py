"""Dependency analysis that always ends: layer groups from Torch-Pruning's graph, within a time budget.

Torch-Pruning (DepGraph) builds a group by walking the graph from a root layer and mapping the
root's channel indices through every op. Its walk stops only where it meets a node it has already
reached *with an identical index list*. A channel shuffle written with reshapes
(``x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)``, public ShuffleNetV2) defeats
that: Torch-Pruning 1.6.1 sizes the view's two sides by the layers it can see (``c`` before, ``c / 2``
after, through the split slice) and maps it as an unflatten of stride 2 (4 where two shuffles meet):
channel ``k`` becomes ``{2k, 2k + 1}``. Each pass around the split → branch → concat → shuffle
cycles multiplies the index list again (a 96-channel layer reaches 18,432 indices within 20 s),
no list ever repeats, and every new item is compared with all earlier ones: the walk never ends
(ten minutes on a 13-unit CIFAR ShuffleNetV2 without producing one group).

A reshape, permute or shuffle that moves the channel axis of an image tensor is a fixed
permutation of channels that no group can follow: removing channel ``k`` before it would need
the permuted channel removed after it, and the op (which reads its sizes from the tensor)
would then permute differently. Such an op is a *channel-mixing barrier*: its edges are cut
before any group is built, so every walk ends, and each group that reaches a barrier is kept
whole (never pruned), as are groups not yet built when the budget (``prune.analysis_seconds``)
runs out. A functional ``pad`` that puts channels in front of the first one (an option-A ResNet shortcut
padding both sides by a hard-coded count) is a barrier too: Torch-Pruning reads it as elementwise and would
join the 16-, 32- and 64-channel residual streams into one group whose indices shift at every pad. All are
listed, with the reason, as ``KeptWhole``.
Groups elsewhere are unchanged:
a walk that never reaches a barrier is the same walk with or without the cut, which is why the
pruner (built later on the uncut graph) computes those groups exactly as analysed here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from edgeprune.deadline import AnalysisTimeout, Budget
from edgeprune.errors import StageError
from edgeprune.progress import SILENT, Reporter

# Layers that normalize over the channels: removing a channel there is not the same as zeroing it.
CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm)
RESHAPES = {"ViewBackward", "ReshapeAliasBackward", "UnsafeViewBackward"}
PERMUTES = {"PermuteBackward", "TransposeBackward"}
SHUFFLES = {"PixelShuffleBackward", "PixelUnshuffleBackward", "ChannelShuffleBackward", "NativeChannelShuffleBackward"}
PADS = {"ConstantPadNdBackward"}
IMAGE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
NEIGHBOURHOOD = 64  # nodes searched around an op for the conv/BatchNorm that says its dim 1 holds channels


@dataclass(frozen=True)
class LayerGroup:
    """One prunable group: its root layer, the root's current output channels, and its members.

    ``members`` are the layers whose output channels go with the root's; ``normalized``
    says a LayerNorm/GroupNorm normalizes over them.
    """

    name: str
    channels: int
    members: tuple[str, ...]
    normalized: bool


@dataclass(frozen=True)
class KeptWhole:
    """A group the analysis keeps whole (never pruned): its root, the layers it holds, and why."""

    layer: str
    members: tuple[str, ...]
    reason: str


@dataclass(frozen=True)
class DependencyAnalysis:
    """The prunable groups (in the model's layer order), the groups kept whole, and the seconds it took."""

    groups: list[LayerGroup]
    kept_whole: list[KeptWhole] = field(default_factory=list)
    seconds: float = 0.0

    def protected(self, protected: Iterable[str]) -> set[str]:
        """``protected`` plus every layer of a group kept whole: what a pruner must leave alone."""
        return set(protected) | {name for item in self.kept_whole for name in (item.layer, *item.members)}

    def report(self) -> list[dict[str, object]]:
        return [{"layer": item.layer, "members": list(item.members), "reason": item.reason} for item in self.kept_whole]


def dependency_analysis(
    model: nn.Module, example: torch.Tensor, protected: Iterable[str], budget: Budget, reporter: Reporter = SILENT
) -> DependencyAnalysis:
    """The layer groups Torch-Pruning would prune, each group reaching a channel-mixing op kept whole.

    Past ``budget`` the analysis stops: the groups not built yet are kept whole. Raises StageError
    when Torch-Pruning cannot trace the model at all.
    """
    import torch_pruning as tp

    start, names, protected = time.monotonic(), {module: name for name, module in model.named_modules()}, set(protected)
    try:
        with budget.deadline():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    except AnalysisTimeout:
        roots = [name for module, name in names.items() if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in protected]
        return DependencyAnalysis([], [KeptWhole(name, (), _out_of_time(budget, "tracing the model")) for name in roots], budget.seconds)
    except Exception as error:  # Torch-Pruning's own bad case: one line, not its traceback
        raise StageError(
            f"Torch-Pruning cannot trace the model for structured pruning ({type(error).__name__}: {first_line(error)})"
        ) from error
    barriers = _cut_channel_mixing(graph)
    ignored = {module for module, name in names.items() if name in protected} | set(graph.IGNORED_LAYERS_IN_TRACING)
    roots = [module for module in graph.module2node if module in names and _is_root(graph, module, ignored)]
    builder = _GroupBuilder(graph, names, ignored, barriers)
    try:
        with budget.deadline():
            for module in reporter.track(roots, len(roots), "dependency analysis"):
                builder.add(module)
    except AnalysisTimeout:
        builder.give_up(roots, _out_of_time(budget, "building its group"))
    order = {name: index for index, name in enumerate(names.values())}
    groups = sorted(builder.groups, key=lambda group: order[group.name])
    return DependencyAnalysis(groups, builder.kept_whole, time.monotonic() - start)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _out_of_time(budget: Budget, step: str) -> str:
    return f"the dependency analysis ran past prune.analysis_seconds ({budget.seconds:g} s) before {step}"


def _is_root(graph, module: nn.Module, ignored: set[nn.Module]) -> bool:
    import torch_pruning as tp

    if module in ignored or not isinstance(module, (tp.ops.TORCH_CONV, tp.ops.TORCH_LINEAR)):
        return False
    pruner = graph.get_pruner_of_module(module)
    return pruner is not None and pruner.get_out_channels(module) is not None


@dataclass
class _GroupBuilder:
    """Torch-Pruning's ``get_all_groups``, one root at a time, sorting groups into prunable and kept whole."""

    graph: object
    names: dict[nn.Module, str]
    ignored: set[nn.Module]
    barriers: dict[object, list[tuple[object, str]]]  # node next to a channel-mixing op → its cut edges, and that op in words
    groups: list[LayerGroup] = field(default_factory=list)
    kept_whole: list[KeptWhole] = field(default_factory=list)
    visited: set[nn.Module] = field(default_factory=set)

    def add(self, module: nn.Module) -> None:
        if module in self.visited:
            return
        graph, name = self.graph, self.names[module]
        pruner = graph.get_pruner_of_module(module)
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module))))
        except Exception as error:  # a graph Torch-Pruning misreads: this group stays whole, the rest go on
            self.visited.add(module)
            self.kept_whole.append(
                KeptWhole(name, (), f"Torch-Pruning cannot build its group ({type(error).__name__}: {first_line(error)})")
            )
            return
        layers = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        self.visited.update(layers)
        if any(layer in self.ignored for layer in layers):
            return  # holds a protected layer: not prunable, as in Torch-Pruning
        members = tuple(dict.fromkeys(self.names[layer] for layer in layers if layer in self.names))
        mixing = next((op for dep, _ in group for cut, op in self.barriers.get(dep.target, ()) if cut.is_triggered_by(dep.handler)), None)
        if mixing is not None:
            reason = f"its channels pass through a channel-mixing {mixing}, a permutation no group can follow"
            if mixing.startswith("pad"):
                reason = (
                    f"its channels pass through a {mixing} that puts a hard-coded number of channels in front of them "
                    "(an option-A shortcut padding both sides): their indices shift there, which the dependency graph "
                    "reads as elementwise, so no group can follow it"
                )
            self.kept_whole.append(KeptWhole(name, members, reason))
            return
        normalized = any(isinstance(dep.target.module, CHANNEL_NORMS) for dep, _ in group)
        self.groups.append(LayerGroup(name, graph.get_out_channels(module), members, normalized))

    def give_up(self, roots: list[nn.Module], reason: str) -> None:
        """Keep every root not reached yet whole."""
        self.kept_whole += [KeptWhole(self.names[module], (), reason) for module in roots if module not in self.visited]


# --------------------------------------------------------------------------- channel-mixing barriers


def _cut_channel_mixing(graph) -> dict[object, list[tuple[object, str]]]:
    """Remove every edge to and from a channel-mixing op (in place). Returns, per node next to one, the edges cut
    from it towards the op, each with the op in words: a group whose pruning of that node would have followed such
    an edge (``dep.is_triggered_by``) reaches the op."""
    cut: dict[object, list[tuple[object, str]]] = {}
    for node in list(graph.module2node.values()):
        description = channel_mixing(node)
        if description is None:
            continue
        for other in {id(other): other for other in (*node.inputs, *node.outputs)}.values():
            cut.setdefault(other, []).extend((dep, description) for dep in other.dependencies if dep.target is node)
            other.dependencies = [dep for dep in other.dependencies if dep.target is not node]
        node.dependencies = []
    return cut


def channel_mixing(node) -> str | None:
    """``op (in shape → out shape)`` when the graph node is a reshape, permute or shuffle that moves the channel
    axis of an image tensor, or a pad that changes its channel count (next to a conv or BatchNorm); None otherwise."""
    grad_fn = getattr(node, "grad_fn", None)
    if grad_fn is None or isinstance(node.module, nn.Module) and not type(node.module).__module__.startswith("torch_pruning"):
        return None
    op = re.sub(r"\d+$", "", grad_fn.name())
    if op not in RESHAPES | PERMUTES | SHUFFLES | PADS:
        return None
    source, output = _input_shape(grad_fn), _output_shape(grad_fn)
    if source is None or output is None or not _moves_channels(op, grad_fn, source, output) or not _near_image_layers(node):
        return None
    word = "pad" if op in PADS else op.removesuffix("Backward").lower()
    return f"{word} {list(source)} → {list(output)}"


def _moves_channels(op: str, grad_fn, source: tuple[int, ...], output: tuple[int, ...]) -> bool:
    if max(len(source), len(output)) < 4 and op not in SHUFFLES:
        return False  # (N, L, C) token tensors keep their features last: attention reshapes, handled by Torch-Pruning
    if op in SHUFFLES:
        return True
    if op in PADS:
        return _pads_channels_in_front(grad_fn, len(source))
    if op in PERMUTES:
        dims = getattr(grad_fn, "_saved_dims", None)
        if dims is None:
            dims = _transposed(grad_fn, len(source))
        return dims is None or dims[1] != 1
    flatten = len(output) == 2 and output[0] == source[0]  # (N, C, H, W) → (N, C·H·W) into a linear layer
    return source[:2] != output[:2] and not flatten


def _pads_channels_in_front(grad_fn, rank: int) -> bool:
    """A pad that adds (or crops) channels before the first one: every channel index after it shifts. Zeros appended
    after the last channel keep the indices, which Torch-Pruning's elementwise reading gets right (and the guarded
    pruning checks); ``F.pad`` lists (before, after) pairs from the last dimension back, dim 1 is pair ``rank - 2``."""
    pad = getattr(grad_fn, "_saved_pad", None)
    pair = 2 * (rank - 2)
    return pad is None or (len(pad) > pair and pad[pair] != 0)


def _transposed(grad_fn, rank: int) -> list[int] | None:
    first, second = getattr(grad_fn, "_saved_dim0", None), getattr(grad_fn, "_saved_dim1", None)
    if first is None or second is None:
        return None
    dims = list(range(rank))
    dims[first % rank], dims[second % rank] = dims[second % rank], dims[first % rank]
    return dims


def _output_shape(grad_fn) -> tuple[int, ...] | None:
    try:
        return tuple(grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError):
        return None


def _input_shape(grad_fn) -> tuple[int, ...] | None:
    for function, output_index in grad_fn.next_functions:
        if function is not None:
            try:
                return tuple(function._input_metadata[output_index].shape)
            except (AttributeError, IndexError, RuntimeError):
                return None
    return None


def _near_image_layers(node) -> bool:
    """A conv or BatchNorm is reached from ``node`` through parameter-free ops only: its dim 1 holds channels."""
    frontier, seen = [node], {id(node)}
    while frontier and len(seen) < NEIGHBOURHOOD:
        current = frontier.pop()
        for other in (*current.inputs, *current.outputs):
            if id(other) in seen:
                continue
            seen.add(id(other))
            if isinstance(other.module, IMAGE_LAYERS):
                return True
            if not any(True for _ in getattr(other.module, "parameters", lambda: ())()):
                frontier.append(other)
    return False
