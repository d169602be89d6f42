"""Finetuning on several processes with ``torch.distributed`` (DistributedDataParallel, gloo on CPU).

``ddp_train`` trains like ``edgeprune.training.train`` (same batches, loss, optimizer and
schedule) with every global batch split across N processes: rank ``r`` takes items
``r, r + N, ...`` of each batch, and DDP averages the gradients. Each rank's loss is weighted
by its share of the batch, so the averaged gradient is the full batch's gradient; only
BatchNorm differs (each rank normalises its own slice), so results match single-process
training within about a point of top-1, not bit for bit.

Two ways to run it:

- plain ``ddp_train(..., processes=N)``: spawns N local processes that meet over TCP on
  127.0.0.1 (a free port), trains, and loads rank 0's weights into the caller's model;
- under ``torchrun`` (``RANK``/``WORLD_SIZE`` in the environment): every launched process
  calls ``ddp_train`` and trains its share in place; ``processes`` is ignored, the world is
  torchrun's. A process group the caller already opened is used as is.

A script calling it must guard its entry point with ``if __name__ == "__main__":``
(spawned processes re-import the main module).
"""

from __future__ import annotations

import copy
import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from edgeprune.errors import ConfigError, StageError
from edgeprune.training import TrainSettings, _batches, _loss, train, training_steps

BACKEND = "gloo"  # CPU tensors; NCCL would need every rank on its own GPU


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` (or any env:// launcher) job."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def ddp_train(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    settings: TrainSettings,
    processes: int,
    teacher: nn.Module | None = None,
) -> nn.Module:
    """Train ``model`` with DDP on ``processes`` local processes (or torchrun's); returns it in eval mode.

    ``images`` NCHW float32, ``labels`` int64 class indices; ``settings`` as for
    ``training.train`` (``batch_size`` is the global batch). With a ``teacher`` and
    ``settings.distill_alpha > 0`` the loss is distilled, as in ``training.train``.
    ``processes=1`` (outside torchrun) is ``training.train`` itself.

    Raises:
        ConfigError: ``processes`` < 1.
        StageError: a process failed or died (the message names the rank).
    """
    if launched_by_torchrun():
        return _train_in_launched_process(model, images, labels, settings, teacher)
    if processes < 1:
        raise ConfigError(f"distributed finetune: processes must be >= 1, got {processes}")
    if processes == 1:
        return train(model, images, labels, settings, teacher)
    job = _Job(model, teacher, torch.from_numpy(images), torch.from_numpy(labels), settings)
    with tempfile.TemporaryDirectory(prefix="edgeprune-ddp-") as folder:
        state_path = Path(folder) / "rank0.pt"
        try:
            mp.spawn(_spawned_rank, args=(processes, free_port(), job, state_path), nprocs=processes, join=True)
        except mp.ProcessRaisedException as error:
            last = str(error).strip().splitlines()[-1]
            raise StageError(f"distributed finetune: rank {error.error_index} of {processes} failed: {last}") from error
        except mp.ProcessExitedException as error:
            raise StageError(
                f"distributed finetune: rank {error.error_index} of {processes} died (exit code {error.exit_code}); "
                "out of memory? try fewer processes"
            ) from error
        model.load_state_dict(torch.load(state_path, weights_only=True))
    return model.eval()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the ranks to meet on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class _Job:
    """What each spawned rank receives; tensors travel through shared memory, read-only."""

    model: nn.Module
    teacher: nn.Module | None
    images: torch.Tensor
    labels: torch.Tensor
    settings: TrainSettings


def _spawned_rank(rank: int, world_size: int, port: int, job: _Job, state_path: Path) -> None:
    # A fresh process: its thread count and process group end with it.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    dist.init_process_group(BACKEND, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        # The model's tensors arrived in shared memory: train a private copy, not the parent's.
        model = _train_rank(copy.deepcopy(job.model), job.images, job.labels, job.settings, job.teacher)
        if rank == 0:
            torch.save(model.state_dict(), state_path)
    finally:
        dist.destroy_process_group()


def _train_in_launched_process(model, images, labels, settings, teacher) -> nn.Module:
    opened = not dist.is_initialized()
    if opened:
        dist.init_process_group(BACKEND, init_method="env://")
    try:
        return _train_rank(model, torch.from_numpy(images), torch.from_numpy(labels), settings, teacher)
    finally:
        if opened:
            dist.destroy_process_group()


def _train_rank(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, settings: TrainSettings, teacher) -> nn.Module:
    """This rank's share of ``training.train``: same batch order, same optimizer and schedule."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ddp = DistributedDataParallel(model)
    # As in training.train: AdamW, weight decay 1e-4, one-cycle with a 15 % warm-up.
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=settings.lr, weight_decay=1e-4)
    total = training_steps(len(images), settings)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=settings.lr, total_steps=total, pct_start=0.15)
    if teacher is not None:
        teacher.eval()
    ddp.train()
    generator = torch.Generator().manual_seed(settings.seed)
    for inputs, targets in _batches(images, labels, settings, generator):
        mine = torch.arange(rank, len(inputs), world)
        share = len(mine) * world / len(inputs)  # DDP averages over ranks; this makes it the batch mean
        if len(mine) == 0:  # a last batch smaller than the world: run one item, count it zero times
            mine, share = torch.arange(1), 0.0
        loss = _loss(ddp(inputs[mine]), targets[mine], inputs[mine], teacher, settings) * share
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    for tensor in model.state_dict().values():  # rank 0's BatchNorm statistics on every rank
        dist.broadcast(tensor, src=0)
    return model.eval()
