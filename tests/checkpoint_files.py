"""Checkpoint files as other people's tools write them: legacy pickles, CUDA-tagged tensors, wrappers, prefixes.

Used by the checkpoint tests and by the zoo, which saves each architecture in one of these layouts.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from torch import nn


def save_cuda_tagged(payload: object, path: Path, legacy: bool = False) -> None:
    """``torch.save`` as on a GPU machine: every storage is tagged 'cuda:0' (what torch.load sees), with no GPU here."""
    with mock.patch("torch.serialization.location_tag", lambda storage: "cuda:0"):
        torch.save(payload, path, _use_new_zipfile_serialization=not legacy)


def storage_locations(path: Path) -> bytes:
    """The raw pickle bytes where torch records storage locations (to check a file really says cuda:0)."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return archive.read(next(name for name in archive.namelist() if name.endswith("data.pkl")))
    return Path(path).read_bytes()


def without_batch_counters(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if not key.endswith("num_batches_tracked")}


def prefixed(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{key}": value for key, value in state.items()}


def training_checkpoint(state: dict[str, torch.Tensor], key: str = "state_dict") -> dict[str, object]:
    """What a training script saves: the weights beside optimizer state and scalars."""
    return {key: state, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "momentum": 0.9}]}, "epoch": 163, "best_prec1": 93.39}


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in state.items()}, str(path))


# name -> writer(model, path): the wild layouts, each a different combination of the quirks above.
WRITERS: dict[str, Callable[[nn.Module, Path], None]] = {
    "legacy-cuda-dataparallel": lambda model, path: save_cuda_tagged(
        training_checkpoint(without_batch_counters(prefixed(model.state_dict(), "module."))), path, legacy=True
    ),
    "zip-cuda-compiled": lambda model, path: save_cuda_tagged({"model": prefixed(model.state_dict(), "_orig_mod.")}, path),
    "ema-wrapper": lambda model, path: torch.save(
        {"model_ema": prefixed(model.state_dict(), "module."), "epoch": 3, "optimizer": {"lr": 0.01}}, path
    ),
    "model-state-dict": lambda model, path: torch.save(training_checkpoint(model.state_dict(), "model_state_dict"), path),
    "net-legacy": lambda model, path: torch.save({"net": model.state_dict(), "acc": 91.2}, path, _use_new_zipfile_serialization=False),
    "safetensors": lambda model, path: save_safetensors(model.state_dict(), path),
    "bare": lambda model, path: torch.save(model.state_dict(), path),
}
