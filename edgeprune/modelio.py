"""Models in and out: user factories, checkpoints people actually save, pickle-free model files.

A model file written by ``save_model`` holds only plain data and tensors, so it
loads with ``torch.load(weights_only=True)``: the architecture (how to call the
factory), the *plan* (the residual blocks depth pruning removed, every module's
integer attributes and every tensor's shape: all that structured pruning changes)
and the state_dict. ``load_model`` rebuilds the network from the factory, applies
the plan, then loads the weights.
"""

from __future__ import annotations

import importlib
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune import models
from edgeprune.artifacts import write_bytes_atomic
from edgeprune.checkpoints import Checkpoint, first_line, fit_to_model, read_checkpoint
from edgeprune.config import ModelConfig
from edgeprune.depth_pruning import dropped_blocks, replace_with_dropped
from edgeprune.errors import InputError

MODEL_FORMAT = "edgeprune-model/1"


def create_model(config: ModelConfig, input_shape: tuple[int, ...]) -> nn.Module:
    """Instantiate the architecture named by ``config.source`` (random weights)."""
    source = config.source
    if source.startswith("example:"):
        channels, height = input_shape[0], input_shape[-1]
        return models.create_model(source.removeprefix("example:"), num_classes=config.num_classes, in_channels=channels, image_size=height)
    module_name, sep, factory_name = source.partition(":")
    if not sep or not module_name or not factory_name:
        raise InputError(f"model.source {source!r}: expected package.module:factory or example:NAME")
    try:
        factory = getattr(importlib.import_module(module_name), factory_name)
    except (ImportError, AttributeError) as error:
        raise InputError(f"model.source {source!r}: cannot import ({error})") from None
    try:
        model = factory()
    except Exception as error:  # the user's code: one line here, its traceback with --debug
        raise InputError(f"model.source {source!r}: the factory raised {type(error).__name__}: {first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise InputError(f"model.source {source!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path, trust_checkpoint: bool = False) -> Checkpoint:
    """Load a checkpoint into ``model`` as people save them (see ``edgeprune.checkpoints``).

    Returns the checkpoint's format and what was adapted to load it. Raises InputError for a missing,
    corrupt, untrusted or mismatching file and for non-finite weights; ``model`` is then untouched.
    """
    checkpoint = fit_to_model(read_checkpoint(path, trust_checkpoint), model, Path(path))
    model.load_state_dict(checkpoint.state_dict)
    return checkpoint


# --------------------------------------------------------------------------- model files


def save_model(model: nn.Module, path: Path, config: ModelConfig, input_shape: tuple[int, ...]) -> None:
    """Write a pickle-free model file: architecture + plan + weights, atomically.

    Serialised in memory first: ``torch.save`` to a file turns a full disk into an
    opaque "unexpected pos" RuntimeError, ``write_bytes_atomic`` into one line.
    """
    payload = {
        "format": MODEL_FORMAT,
        "architecture": {"source": config.source, "num_classes": config.num_classes, "input_shape": list(input_shape)},
        "plan": capture_plan(model),
        "state_dict": {key: value.detach().clone() for key, value in model.state_dict().items()},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def load_model(path: Path) -> nn.Module:
    """Rebuild a model written by ``save_model`` (loaded with weights_only=True).

    The file names the factory that rebuilds the network (``model.source``), which
    is imported and called: load model files you (or your build cache) wrote.
    """
    payload = read_model_file(path)
    try:
        arch = payload["architecture"]
        config = ModelConfig(source=arch["source"], num_classes=arch["num_classes"])
        model = create_model(config, tuple(arch["input_shape"]))
        apply_plan(model, payload["plan"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{path}: damaged edgeprune model file ({type(error).__name__}: {first_line(error)})") from None
    return model.eval()


def read_model_file(path: Path) -> dict[str, Any]:
    """The payload of a model file written by ``save_model``: format, architecture, plan, state_dict (weights_only)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a loadable edgeprune model file ({first_line(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not an edgeprune model file")
    return payload


def capture_plan(model: nn.Module) -> dict[str, Any]:
    """The blocks removed, every module's integer-valued attributes and every tensor's shape."""
    modules = {}
    for name, module in model.named_modules():
        attributes = {key: value for key, value in vars(module).items() if not key.startswith("_") and _is_int_like(value)}
        if attributes:
            modules[name] = attributes
    shapes = {key: list(value.shape) for key, value in model.state_dict().items()}
    return {"dropped": dropped_blocks(model), "modules": modules, "shapes": shapes}


def apply_plan(model: nn.Module, plan: dict[str, Any]) -> None:
    """Remove the blocks ``plan`` lists and resize a freshly built model to the shapes it records."""
    for name in plan.get("dropped", []):
        replace_with_dropped(model, name)
    modules = dict(model.named_modules())
    for name, attributes in plan["modules"].items():
        if name in modules:
            for key, value in attributes.items():
                setattr(modules[name], key, tuple(value) if isinstance(value, list) else value)
    for key, shape in plan["shapes"].items():
        owner_name, _, tensor_name = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        current = getattr(owner, tensor_name, None)
        if current is None or list(current.shape) == shape:
            continue
        resized = torch.empty(shape, dtype=current.dtype)
        if isinstance(current, nn.Parameter):
            setattr(owner, tensor_name, nn.Parameter(resized, requires_grad=current.requires_grad))
        else:
            owner.register_buffer(tensor_name, resized)


def _is_int_like(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, (tuple, list)) and bool(value) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
