"""Small helpers the stages share: reading and writing the torch model artefact, the example input, the dense reference."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import Artifact
from edgeprune.modelio import load_model, save_model
from edgeprune.stages.base import StageContext
from edgeprune.training import example_batch

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
    """The first ``batch`` test images as a torch batch."""
    return example_batch(context.dataset, batch)


def reference_pairs(context: StageContext, name: str) -> list[tuple[str, str]]:
    """(model artefact, output name): the build's model, plus the dense baseline when a
    benchmark needs it as the speed-up reference."""
    pairs = [("model", name)]
    if context.config.prune.mode != "none" and context.config.benchmark.enabled:
        pairs.append(("baseline_model", f"{name}_dense"))
    return pairs
