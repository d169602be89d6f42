"""Training loops shared by the baseline and finetune stages, and torch-side measurement (top-1, MACs).

Training is deterministic for a given seed: it uses its own torch.Generator
and restores the global torch thread/determinism state it touches.

Sparse training: ``frozen_masks`` keep pruned weights at zero after every
optimizer step, and ``mask_updates`` (training step → a function of the model
returning new masks) lets a gradual pruning schedule tighten them mid-training.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.data import Dataset
from edgeprune.progress import SILENT, Reporter

EVAL_BATCH = 512
RECALIBRATION_IMAGES = 2048  # training images a pruned model's BatchNorm statistics are re-estimated on
Masks = dict[str, torch.Tensor]  # parameter name -> 0/1 tensor of its shape


@dataclass(frozen=True)
class TrainSettings:
    epochs: int
    lr: float
    batch_size: int
    seed: int
    distill_alpha: float = 0.0  # weight of the distillation loss; 0 = plain cross-entropy
    temperature: float = 4.0


def train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    teacher: nn.Module | None = None,
    reporter: Reporter = SILENT,
    description: str = "train",
    frozen_masks: Masks | None = None,
    mask_updates: dict[int, Callable[[nn.Module], Masks]] | None = None,
) -> nn.Module:
    """Train ``model`` in place with AdamW + one-cycle schedule; returns it in eval mode.

    With a ``teacher`` and ``distill_alpha > 0`` the loss mixes cross-entropy with
    KL divergence to the teacher's softened logits (Hinton et al.). ``frozen_masks``
    (parameter name → 0/1 mask) keeps pruned weights at zero during training;
    ``mask_updates[i]`` replaces them (and is applied) before training step ``i``
    (0-based, ``epochs * ceil(len(images) / batch_size)`` steps in all).
    """
    generator = torch.Generator().manual_seed(settings.seed)
    x_all, y_all = torch.from_numpy(images), torch.from_numpy(labels)
    total = training_steps(len(x_all), settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    parameters = dict(model.named_parameters())
    if teacher is not None:
        teacher.eval()
    model.train()
    batches = _batches(x_all, y_all, settings, generator)
    for step, (inputs, targets) in enumerate(reporter.track(batches, total, description)):
        if mask_updates and step in mask_updates:
            frozen_masks = mask_updates[step](model)
            _apply_masks(parameters, frozen_masks)
        loss = _loss(model(inputs), targets, inputs, teacher, settings)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        _apply_masks(parameters, frozen_masks)
    return model.eval()


def training_steps(samples: int, settings: TrainSettings) -> int:
    """Optimizer steps ``train`` takes for ``samples`` images: ``epochs * ceil(samples / batch_size)``."""
    return settings.epochs * max(1, -(-samples // settings.batch_size))


@torch.no_grad()
def _apply_masks(parameters: dict[str, nn.Parameter], masks: Masks | None) -> None:
    for name, mask in (masks or {}).items():
        parameters[name].mul_(mask)


def _batches(x_all: torch.Tensor, y_all: torch.Tensor, settings: TrainSettings, generator: torch.Generator):
    for _ in range(settings.epochs):
        order = torch.randperm(len(x_all), generator=generator)
        for start in range(0, len(order), settings.batch_size):
            index = order[start : start + settings.batch_size]
            yield x_all[index], y_all[index]


def _loss(logits, targets, inputs, teacher, settings: TrainSettings) -> torch.Tensor:
    loss = F.cross_entropy(logits, targets)
    if teacher is None or settings.distill_alpha <= 0:
        return loss
    with torch.no_grad():
        teacher_logits = teacher(inputs)
    t = settings.temperature
    soft = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean")
    return (1 - settings.distill_alpha) * loss + settings.distill_alpha * soft * t * t


@torch.no_grad()
def predict_logits(model: nn.Module, images: np.ndarray) -> np.ndarray:
    """Logits of ``model`` (eval mode) for NCHW float32 images."""
    model.eval()
    outputs = [model(torch.from_numpy(images[i : i + EVAL_BATCH])) for i in range(0, len(images), EVAL_BATCH)]
    return torch.cat(outputs).numpy()


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, batch: int = EVAL_BATCH) -> int:
    """Re-estimate every BatchNorm's running mean and variance on ``images`` (NCHW float32) and return how many
    layers that was; the model is left in eval mode and its weights untouched.

    Pruning channels changes what the next layers see, so the statistics a BatchNorm learnt on the dense model are
    stale: a pruned model evaluated with them can look ruined when a short finetune would recover it. With
    re-estimated statistics ("adaptive BatchNorm", Li et al. 2020, EagleEye) the accuracy of pruned candidates
    correlates with their accuracy after finetuning, which it does not with stale ones.
    Only the BatchNorm layers run in training mode (dropout stays off); the running averages are cumulative, so
    each batch counts alike.
    """
    norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats]
    model.eval()
    if not norms or len(images) < 2:
        return 0
    momenta = [norm.momentum for norm in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
        norm.train()
    usable = len(images) - (len(images) % batch == 1)  # a last batch of one image has no batch statistics
    for start in range(0, usable, batch):
        model(torch.from_numpy(images[start : min(start + batch, usable)]))
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum
    model.eval()
    return len(norms)


def top1_accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy in percent."""
    return float((logits.argmax(axis=1) == labels).mean() * 100.0)


def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy (percent) of a torch model on a split."""
    return top1_accuracy(predict_logits(model, images), labels)


def count_macs_params(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-accumulates and parameters for one input (Torch-Pruning's counter)."""
    import torch_pruning as tp

    model.eval()
    macs, params = tp.utils.count_ops_and_params(model, example)
    return {"macs": int(macs), "params": int(params)}


def example_batch(dataset: Dataset, batch: int = 1) -> torch.Tensor:
    """The first ``batch`` test images of ``dataset`` as a torch batch: the example input exports and MAC counts use."""
    return torch.from_numpy(dataset.x_test[:batch].copy())
