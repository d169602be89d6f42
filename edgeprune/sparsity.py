"""Sparsity masks: which weights unstructured pruning zeroes (L1 magnitude, LAMP) or the 2:4 pattern keeps, and the schedule.

The prune_unstructured stage zeroes weights with these masks (permanently, in the weights
themselves); the finetune stage re-derives the masks from the zeros (``sparsity_masks``),
holds them fixed while it trains and tightens them on the cubic schedule (``schedule_updates``).

- ``sparsity.pattern = "unstructured"``: the ``amount`` smallest-magnitude weights
  are zeroed, ranked across all layers (``scope = "global"``, one threshold) or
  within each layer (``scope = "layer"``, a per-layer quantile threshold), or across all
  layers by LAMP score (``scope = "lamp"``, Lee et al., ICLR 2021): in each layer the weights
  sorted by magnitude get ``w_u^2 / sum_{v >= u} w_v^2``, so every layer's largest weight
  scores 1 and a compact net's small layers are not emptied by the threshold the large
  layers set (one global magnitude threshold put 99 % zeros into MobileNetV2's last
  pointwise layer). One global threshold over the scores then reaches ``amount``.
- ``sparsity.schedule = "cubic"`` (Zhu & Gupta, 2017): sparsity grows over
  ``schedule_steps`` steps as ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` with
  ``s_i = 0`` and ``s_f = amount``. This stage applies step t = 1; the finetune
  stage applies steps 2..n between training steps (see ``pruning_plan``).
- ``sparsity.pattern = "2:4"``: in every group of 4 consecutive weights along the
  input dimension (input channels of a conv at a fixed output channel and kernel
  position, input features of a linear layer) the 2 largest magnitudes are kept.
  That is the pattern NVIDIA's sparse tensor cores run (TensorRT picks it up with
  ``--sparsity=enable``). Eligible layers are ungrouped convolutions and linear
  layers whose input dimension is a multiple of 4; the others stay dense.
  ``amount``, ``scope`` and ``schedule`` do not apply: the pattern fixes 50 %.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from torch import nn

from edgeprune.config import BuildConfig, SparsityConfig
from edgeprune.errors import ConfigError

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
GROUP, KEPT = 4, 2  # the N:M of semi-structured sparsity


def check_sparsity_config(config: BuildConfig) -> None:
    """Reject combinations that cannot do what they say, with one line naming the key."""
    sparsity = config.sparsity
    if sparsity.pattern == "2:4" and sparsity.schedule != "oneshot":
        raise ConfigError("sparsity.schedule = 'cubic' does not apply to sparsity.pattern = '2:4' (the pattern fixes 50 %); use 'oneshot'")
    if sparsity.schedule == "cubic" and config.finetune.epochs == 0:
        raise ConfigError("sparsity.schedule = 'cubic' prunes during finetuning: set finetune.epochs > 0 or sparsity.schedule = 'oneshot'")


def pruning_plan(config: SparsityConfig) -> list[float]:
    """The target sparsity of every pruning step: one for one-shot and 2:4, ``schedule_steps`` for cubic."""
    if config.pattern == "2:4" or config.schedule == "oneshot":
        return [config.amount]
    return [cubic_sparsity(step, config.schedule_steps, config.amount) for step in range(1, config.schedule_steps + 1)]


def cubic_sparsity(step: int, steps: int, final: float, initial: float = 0.0) -> float:
    """Zhu & Gupta's gradual schedule: ``s_t = s_f + (s_i - s_f)(1 - t/n)^3`` for t in 0..n."""
    return final + (initial - final) * (1 - step / steps) ** 3


def prunable_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Layers whose weights are pruned, by module name: convolutions and linear layers (biases and norms stay dense)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, PRUNABLE)}


def compute_masks(model: nn.Module, config: SparsityConfig, amount: float) -> dict[str, torch.Tensor]:
    """0/1 masks (by ``layer.weight`` parameter name) that reach ``amount`` sparsity, or the 2:4 pattern."""
    layers = prunable_weights(model)
    if config.pattern == "2:4":
        return {f"{name}.weight": two_four_mask(module.weight) for name, module in layers.items() if two_four_eligible(module)}
    weights = {f"{name}.weight": module.weight.detach() for name, module in layers.items()}
    if config.scope == "layer":
        return {name: _keep_largest(weight.abs().flatten(), amount).view_as(weight) for name, weight in weights.items()}
    score = lamp_scores if config.scope == "lamp" else torch.abs
    keep = _keep_largest(torch.cat([score(weight.flatten()) for weight in weights.values()]), amount)
    pieces = keep.split([weight.numel() for weight in weights.values()])
    return {name: piece.view_as(weight) for (name, weight), piece in zip(weights.items(), pieces, strict=True)}


def lamp_scores(weights: torch.Tensor) -> torch.Tensor:
    """LAMP score of each weight of one layer: its square over the sum of squares of the weights ranked at or above it."""
    squares = weights.detach().double() ** 2
    order = torch.argsort(squares, stable=True)
    ranked = squares[order]
    at_or_above = ranked.flip(0).cumsum(0).flip(0)
    scores = torch.zeros_like(squares)
    scores[order] = torch.where(at_or_above > 0, ranked / at_or_above.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return scores


def _keep_largest(scores: torch.Tensor, amount: float) -> torch.Tensor:
    """A 0/1 mask zeroing exactly ``round(amount * n)`` of the smallest scores (ties broken by position)."""
    mask = torch.ones_like(scores)
    mask[torch.argsort(scores, stable=True)[: round(amount * scores.numel())]] = 0
    return mask


def two_four_eligible(module: nn.Module) -> bool:
    """An ungrouped conv or a linear layer whose input dimension is a multiple of 4."""
    if isinstance(module, nn.Linear):
        return module.in_features % GROUP == 0
    return isinstance(module, PRUNABLE) and module.groups == 1 and module.in_channels % GROUP == 0


def two_four_mask(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes in each group of 4 consecutive weights along the input dimension (dim 1)."""
    grouped = weight.detach().abs().movedim(1, -1)  # [out, *kernel, in]: groups run along the input
    keep = grouped.reshape(-1, GROUP).topk(KEPT, dim=1).indices
    mask = torch.zeros(grouped.numel() // GROUP, GROUP, dtype=weight.dtype).scatter_(1, keep, 1.0)
    return mask.view(grouped.shape).movedim(-1, 1).contiguous()


def satisfies_two_four(weight: torch.Tensor, input_dim: int = 1) -> bool:
    """Whether every group of 4 consecutive weights along ``input_dim`` has at most 2 non-zeros."""
    grouped = torch.as_tensor(weight).movedim(input_dim, -1)
    if grouped.shape[-1] % GROUP:
        return False
    return bool(((grouped != 0).reshape(-1, GROUP).sum(dim=1) <= KEPT).all())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Multiply each named parameter by its mask, in place."""
    parameters = dict(model.named_parameters())
    for name, mask in masks.items():
        parameters[name].mul_(mask)


def sparsity_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """0/1 masks of the already-zero weights of every prunable layer, by parameter name."""
    return {f"{name}.weight": (module.weight != 0).to(module.weight.dtype) for name, module in prunable_weights(model).items()}


def sparsity_report(model: nn.Module, pattern: str = "unstructured") -> dict[str, Any]:
    """Per-layer and global fraction of zero weights; with ``pattern = "2:4"`` each layer says whether it has it."""
    layers, zeros, total = [], 0, 0
    for name, module in prunable_weights(model).items():
        weight = module.weight.detach()
        layer_zeros = int((weight == 0).sum())
        row = {"layer": name, "weights": weight.numel(), "sparsity": layer_zeros / weight.numel()}
        if pattern == "2:4":
            row["pattern"] = "2:4" if two_four_eligible(module) and satisfies_two_four(weight) else "dense"
        layers.append(row)
        zeros, total = zeros + layer_zeros, total + weight.numel()
    return {"global_sparsity": zeros / max(total, 1), "layers": layers}


def schedule_updates(config: SparsityConfig, total_steps: int) -> dict[int, Callable[[nn.Module], dict[str, torch.Tensor]]]:
    """Training step → mask update for pruning steps 2..n of the schedule (step 1 ran in the prune_unstructured stage).

    Step t (2..n) runs before training step ``round((t - 1) / (n - 1) * last)`` with
    ``last = round(schedule_end * (total_steps - 1))``; one-shot and 2:4 have no later steps.
    """
    targets = pruning_plan(config)[1:]
    last = round(config.schedule_end * (total_steps - 1))
    updates = {}
    for step, target in enumerate(targets, start=1):
        updates[round(step / len(targets) * last)] = partial(compute_masks, config=config, amount=target)
    return updates
