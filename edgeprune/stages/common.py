"""Small helpers the stages share: reading and writing the torch model artefact, counting MACs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeprune.artifact_facts import count_macs_params  # noqa: F401 (the stages count MACs through here)
from edgeprune.artifacts import Artifact
from edgeprune.modelio import load_model, save_model
from edgeprune.pipeline import StageContext

MODEL_FILE = "model.pt"


def read_model(context: StageContext, name: str = "model") -> nn.Module:
    """The torch model artefact ``name`` from an earlier stage, rebuilt pickle-free."""
    return load_model(context.inputs[name].path)


def write_model(context: StageContext, model: nn.Module, names: tuple[str, ...] = ("model",), **meta: Any) -> list[Artifact]:
    """Save ``model`` into the stage folder, published under each of ``names``."""
    path = context.workdir / MODEL_FILE
    save_model(model, path, context.config.model, context.dataset.input_shape)
    return [Artifact.from_file(name, "model", path, **meta) for name in names]


def example_input(context: StageContext, batch: int = 1) -> torch.Tensor:
    return torch.from_numpy(context.dataset.x_test[:batch].copy())
