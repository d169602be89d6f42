"""Corpus checkpoints: each architecture trained briefly on a Fashion-MNIST subset and saved in its wild layout."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from edgeprune.config import DataConfig
from edgeprune.data import EXAMPLE_DATA, load_dataset
from edgeprune.training import TrainSettings, train
from tests.checkpoint_files import WRITERS
from tests.zoo import ZooEntry

CHECKPOINT_SUFFIX = {"safetensors": ".safetensors"}


def write_subset(path: Path, train_images: int = 2000, test_images: int = 500, source: Path = EXAMPLE_DATA) -> Path:
    """The first images of ``source`` (an ``.npz`` of x_train, y_train, x_test, y_test; by default the bundled
    Fashion-MNIST subset, whose slices are class-balanced) as a user's ``.npz``."""
    with np.load(source) as data:
        arrays = {
            "x_train": data["x_train"][:train_images],
            "y_train": data["y_train"][:train_images],
            "x_test": data["x_test"][:test_images],
            "y_test": data["y_test"][:test_images],
        }
    np.savez_compressed(path, **arrays)
    return path


def train_and_save(entry: ZooEntry, data_path: Path, folder: Path, epochs: int = 2) -> Path:
    """Train ``entry`` for ``epochs`` on ``data_path`` (as edgeprune preprocesses it) and save it as its layout says."""
    torch.manual_seed(0)
    dataset = load_dataset(DataConfig(source=str(data_path)), num_classes=10)
    model = entry.factory()
    train(model, dataset.x_train, dataset.y_train, TrainSettings(epochs=epochs, lr=1e-2, batch_size=64, seed=0))
    path = folder / f"{entry.name}{CHECKPOINT_SUFFIX.get(entry.checkpoint, '.pth')}"
    WRITERS[entry.checkpoint](model.eval(), path)
    return path
