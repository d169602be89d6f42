"""Torch-Pruning glue: layer groups, one pruning step, untracked-coupling detection, verification.

A *layer group* is what Torch-Pruning's dependency graph (DepGraph) removes together: a
root conv/linear layer and every layer coupled to its output channels through residual
adds, concatenations, splits, depthwise convolutions and attention heads. A group is
named by its root layer (``blocks.0.conv2.0``); the name stays valid while widths change,
so a plan of per-group widths can be applied step by step, each step with a fresh
dependency graph built on the current model.

Groups are found by ``edgeprune.dependency`` within ``prune.analysis_seconds``; groups coupled
through a channel-mixing reshape (a channel shuffle) are kept whole there. Some models couple
channels in ways the graph cannot see at all (a shortcut that pads or slices channels by a
hard-coded amount). Pruning such a group
gives a network that crashes, or one that runs but no longer computes the original
network minus the removed channels. ``guarded_prune`` therefore prunes a deep copy, checks
it, and on failure bisects over the groups to find and leave out the ones that break it.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.config import PruneConfig
from edgeprune.deadline import AnalysisTimeout, Budget
from edgeprune.dependency import DependencyAnalysis, LayerGroup, dependency_analysis, first_line
from edgeprune.errors import ConfigError, StageError
from edgeprune.progress import SILENT, Reporter

MAX_RATIO = 0.9  # never remove more than this fraction of a group's original channels


@dataclass(frozen=True)
class UntrackedCoupling:
    """A group kept out of pruning because the dependency graph gets its coupling wrong."""

    layer: str
    reason: str


def protected_layers(model: nn.Module, names: Iterable[str], num_classes: int) -> set[str]:
    """The classifier (a Linear with ``num_classes`` outputs) plus every layer named or under a name in ``names``.

    Raises ConfigError for a name that is not in the model.
    """
    modules = dict(model.named_modules())
    protected = {name for name, module in modules.items() if isinstance(module, nn.Linear) and module.out_features == num_classes}
    for wanted in names:
        matches = {name for name in modules if name == wanted or name.startswith(f"{wanted}.")}
        if not matches:
            raise ConfigError(f"prune.ignored_layers: no layer named '{wanted}' in the model")
        protected |= matches
    return protected


def attention_heads(model: nn.Module) -> dict[nn.Module, int]:
    """qkv projections of attention blocks that declare ``num_heads`` (timm's layout), for head-aware pruning."""
    return {
        module.qkv: module.num_heads
        for module in model.modules()
        if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int)
    }


def make_pruner(
    model: nn.Module,
    example: torch.Tensor,
    config: PruneConfig,
    protected: Iterable[str],
    group_ratios: Mapping[str, float] | None = None,
    ratio: float = 0.0,
):
    """A Torch-Pruning MetaPruner for one step: ``group_ratios`` (root name → ratio of its current
    channels), ``ratio`` for every other group (and the global ratio with ``global_pruning``).

    With ``prune_num_heads`` an attention group loses whole heads (at its ratio, rounded up by
    Torch-Pruning) instead of the same dimensions in every head.
    """
    import torch_pruning as tp

    modules = dict(model.named_modules())
    group_ratios = dict(group_ratios or {})
    importance = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "bn_scale": tp.importance.BNScaleImportance,
        "taylor": tp.importance.GroupTaylorImportance,
    }[config.importance]()
    heads = attention_heads(model)
    by_heads = config.prune_num_heads and bool(heads)
    head_ratios = {modules[name]: value for name, value in group_ratios.items() if modules[name] in heads}
    return tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        global_pruning=config.global_pruning,
        pruning_ratio=ratio,
        pruning_ratio_dict={modules[name]: value for name, value in group_ratios.items()},
        ignored_layers=[modules[name] for name in protected if name in modules],
        round_to=config.round_to,
        num_heads=heads,
        prune_num_heads=by_heads,
        prune_head_dims=not by_heads,
        head_pruning_ratio=ratio if by_heads else 0.0,
        head_pruning_ratio_dict=head_ratios if by_heads else None,
    )


def layer_groups(
    model: nn.Module, example: torch.Tensor, config: PruneConfig, protected: Iterable[str], reporter: Reporter = SILENT
) -> DependencyAnalysis:
    """The groups Torch-Pruning would prune (in the model's layer order) and those kept whole, found within
    ``prune.analysis_seconds`` (see ``edgeprune.dependency``). Prune with ``analysis.protected(protected)``."""
    return dependency_analysis(model, example, protected, Budget(config.analysis_seconds), reporter)


def root_channels(model: nn.Module, name: str) -> int:
    """Output channels (conv) or features (linear) of layer ``name``."""
    module = model.get_submodule(name)
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


def rounded_width(channels: float, width: int, round_to: int) -> int:
    """``channels`` to the nearest multiple of ``round_to``, at least one multiple and at most ``width``."""
    if width <= round_to:
        return max(1, min(width, round(channels)))
    return min(width, max(round_to, round(channels / round_to) * round_to))


def prune_to_widths(
    model: nn.Module, example: torch.Tensor, config: PruneConfig, protected: Iterable[str], widths: Mapping[str, int]
) -> dict[str, set[int]]:
    """One pruning step: each group in ``widths`` keeps at most that many channels (rounded down to
    ``round_to``). Returns, per layer name, the output channels removed.

    Other groups keep their width; with ``global_pruning`` (Torch-Pruning ranks channels across
    groups, keeping the total) they must be in ``protected``.
    """
    current = {name: root_channels(model, name) for name in widths}
    if config.global_pruning:
        ratio = 1 - sum(min(widths[name], current[name]) for name in widths) / max(sum(current.values()), 1)
        pruner = make_pruner(model, example, config, protected, ratio=max(ratio, 0.0))
    else:
        # +0.5: Torch-Pruning keeps int(current * (1 - ratio)) channels, and float error must not cost one.
        ratios = {name: 1 - (widths[name] + 0.5) / current[name] for name in widths if widths[name] < current[name]}
        pruner = make_pruner(model, example, config, protected, group_ratios=ratios)
    names = {module: name for name, module in model.named_modules()}
    removed: dict[str, set[int]] = {}
    for group in pruner.step(interactive=True):
        for dep, indices in group:
            if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in names:
                removed.setdefault(names[dep.target.module], set()).update(indices)
        group.prune()
    update_attention_heads(model, pruner)
    return removed


def update_attention_heads(model: nn.Module, pruner) -> None:
    """Keep ``num_heads``/``head_dim`` consistent with the pruned qkv width."""
    for module in model.modules():
        qkv = getattr(module, "qkv", None)
        if isinstance(qkv, nn.Linear) and isinstance(getattr(module, "num_heads", None), int):
            module.num_heads = pruner.num_heads.get(qkv, module.num_heads)
            if hasattr(module, "head_dim"):
                module.head_dim = qkv.out_features // (3 * module.num_heads)


def verify_pruned_model(model: nn.Module, sample: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Run the pruned model; a crash, a wrong output shape or NaN/inf is a StageError, never an artefact."""
    problem = run_problem(model, sample, num_classes)
    if isinstance(problem, str):
        raise StageError(
            f"structured pruning produced a broken model ({problem}); the model couples channels in a way "
            "neither the dependency graph nor the trial prune detected: list those layers in prune.ignored_layers"
        )
    return problem


def run_problem(model: nn.Module, sample: torch.Tensor, num_classes: int) -> torch.Tensor | str:
    """The logits of ``model`` for ``sample``, or a one-line description of why it fails."""
    model.eval()
    try:
        with torch.no_grad():
            logits = model(sample)
    except Exception as error:  # a mis-pruned graph raises RuntimeError, IndexError, ValueError...
        return f"the forward pass fails: {first_line(error)}"
    if not torch.is_tensor(logits) or tuple(logits.shape) != (len(sample), num_classes):
        return f"the output shape is {tuple(getattr(logits, 'shape', ()))}, expected {(len(sample), num_classes)}"
    if not torch.isfinite(logits).all():
        return "the outputs hold NaN/inf"
    return logits


# --------------------------------------------------------------------------- guarded pruning


@dataclass(frozen=True)
class Guard:
    """What a pruning step is checked against: sample inputs, the class count, and batches for Taylor gradients."""

    sample: torch.Tensor
    num_classes: int
    images: torch.Tensor | None = None
    labels: torch.Tensor | None = None


@dataclass(frozen=True)
class Pruned:
    """What ``guarded_prune`` returns: the pruned copy, the groups left out, and the output channels removed per layer."""

    model: nn.Module
    untracked: list[UntrackedCoupling]
    removed: dict[str, set[int]]


def guarded_prune(
    model: nn.Module,
    config: PruneConfig,
    protected: set[str],
    groups: Sequence[LayerGroup],
    widths: Mapping[str, int],
    guard: Guard,
) -> Pruned:
    """Prune a deep copy of ``model`` to ``widths`` and return it once it is proven correct (``model`` is untouched).

    The groups no LayerNorm/GroupNorm normalizes are pruned first, and the result must compute
    exactly the unpruned model with the removed channels zeroed; the normalized groups next, and
    the result must run (output shape, finite values). When a set of groups fails, the shortest
    failing prefix is bisected to the group that breaks it; that group is left unpruned, reported,
    and the rest tried again. Past ``prune.analysis_seconds`` the groups not proven yet are left
    unpruned and reported.
    """
    normalized = {group.name for group in groups if group.normalized}
    found: list[UntrackedCoupling] = []
    removed: dict[str, set[int]] = {}
    budget = Budget(config.analysis_seconds)
    for exact in (True, False):
        names = [name for name in widths if (name in normalized) != exact]
        attempt = _Attempt(model, config, protected, [group.name for group in groups], widths, guard, exact)
        try:
            while names:
                with budget.deadline():
                    candidate, channels, failure = attempt(names)
                    culprit = None if failure is None else _bisect(attempt, names, failure)
                if culprit is None:
                    model = candidate
                    removed.update(channels)
                    break
                found.append(UntrackedCoupling(*culprit))
                names.remove(culprit[0])
        except AnalysisTimeout:
            reason = f"not pruned: proving the pruned model correct ran past prune.analysis_seconds ({budget.seconds:g} s)"
            found += [UntrackedCoupling(name, reason) for name in names]
    return Pruned(model, found, removed)


def _bisect(attempt: _Attempt, names: list[str], failure: str) -> tuple[str, str]:
    """The last group of the shortest failing prefix of ``names`` (all of ``names`` fails with ``failure``)."""
    low, high = 1, len(names)
    while low < high:
        middle = (low + high) // 2
        *_, reason = attempt(names[:middle])
        if reason is None:
            low = middle + 1
        else:
            high, failure = middle, reason
    return names[high - 1], failure


@dataclass
class _Attempt:
    """Prune some groups of a copy of ``model`` to their widths and check the result."""

    model: nn.Module
    config: PruneConfig
    protected: set[str]
    roots: list[str]
    widths: Mapping[str, int]
    guard: Guard
    exact: bool

    def __call__(self, names: list[str]) -> tuple[nn.Module, dict[str, set[int]], str | None]:
        """The pruned copy, the channels removed per layer, and None when it is correct or else a one-line reason."""
        candidate = copy.deepcopy(self.model).eval()
        sample, removed = self.guard.sample, {}
        try:
            if self.config.importance == "taylor":
                accumulate_gradients(candidate, self.guard.images, self.guard.labels)
            widths = {name: self.widths[name] for name in names}
            removed = prune_to_widths(candidate, sample[:1], self.config, self.protected | (set(self.roots) - set(names)), widths)
            candidate.zero_grad(set_to_none=True)
        except Exception as error:  # Torch-Pruning itself can fail on a graph it misreads
            return candidate, removed, f"Torch-Pruning fails on it: {first_line(error)}"
        logits = run_problem(candidate, sample, self.guard.num_classes)
        if isinstance(logits, str):
            return candidate, removed, f"pruning it breaks the model: {logits}"
        if self.exact and removed:
            expected = _with_channels_zeroed(self.model, removed, sample)
            error = float((logits - expected).abs().max())
            if error > 1e-4 * max(1.0, float(expected.abs().max())):
                return (
                    candidate,
                    removed,
                    f"the pruned model no longer computes the original minus the removed channels (max abs error {error:.3g})",
                )
        return candidate, removed, None


def accumulate_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 64) -> None:
    """Backward ``images`` (in eval mode: BatchNorm statistics stay) so first-order Taylor importance has gradients."""
    model.zero_grad(set_to_none=True)
    model.eval()
    for start in range(0, len(images), batch):
        F.cross_entropy(model(images[start : start + batch]), labels[start : start + batch]).backward()


def _with_channels_zeroed(model: nn.Module, removed: dict[str, set[int]], sample: torch.Tensor) -> torch.Tensor:
    """Logits of (a copy of) ``model`` with the ``removed`` output channels of each layer set to zero."""
    reference = copy.deepcopy(model).eval()
    for name, channels in removed.items():
        module = reference.get_submodule(name)
        dim = -1 if isinstance(module, (nn.Linear, nn.LayerNorm)) else 1
        index = torch.tensor(sorted(channels))
        module.register_forward_hook(lambda _module, _inputs, output, dim=dim, index=index: output.index_fill(dim, index, 0.0))
    with torch.no_grad():
        return reference(sample)
