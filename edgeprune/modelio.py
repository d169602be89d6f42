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
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune import models
from edgeprune.artifacts import write_bytes_atomic
from edgeprune.config import ModelConfig
from edgeprune.depth_pruning import dropped_blocks, replace_with_dropped
from edgeprune.errors import InputError

MODEL_FORMAT = "edgeprune-model/1"
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")


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
        raise InputError(f"model.source {source!r}: the factory raised {type(error).__name__}: {_first_line(error)}") from error
    if not isinstance(model, nn.Module):
        raise InputError(f"model.source {source!r}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def load_weights(model: nn.Module, path: Path, trust_checkpoint: bool = False) -> None:
    """Load a checkpoint into ``model``, accepting the common layouts people save.

    Bare state_dicts, ``{"state_dict": ...}``/``{"model": ...}`` wrappers, whole
    pickled modules (only with ``trust_checkpoint``) and DataParallel's
    ``module.`` prefix are accepted. Raises InputError for a missing, corrupt or
    mismatching file and for non-finite weights.
    """
    state = _read_checkpoint(path, trust_checkpoint)
    state = {_strip_prefix(str(key)): value for key, value in state.items()}
    not_tensors = [key for key, value in state.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise InputError(f"{path}: not a state_dict ({not_tensors[0]!r} holds a {type(state[not_tensors[0]]).__name__}, not a tensor)")
    bad = [key for key, value in state.items() if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise InputError(f"{path}: checkpoint has NaN/inf weights in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    expected = model.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise InputError(f"{path}: checkpoint does not fit the model ({detail}); is it for another architecture?")
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(
                f"{path}: shape mismatch at {key}: checkpoint {tuple(state[key].shape)} vs model {tuple(tensor.shape)}; "
                "is it for another architecture?"
            )
    model.load_state_dict(state)


def _read_checkpoint(path: Path, trust_checkpoint: bool) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise InputError(f"checkpoint not found: {path}")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        raise InputError(_unpickling_message(Path(path), error, trust_checkpoint)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({_first_line(error)})") from None
    if isinstance(loaded, nn.Module):
        return loaded.state_dict()
    if isinstance(loaded, dict) and loaded.get("format") == MODEL_FORMAT:
        return loaded["state_dict"]
    for key in WRAPPER_KEYS:
        if isinstance(loaded, dict) and isinstance(loaded.get(key), (dict, nn.Module)):
            inner = loaded[key]
            return inner.state_dict() if isinstance(inner, nn.Module) else inner
    if isinstance(loaded, dict) and loaded and all(torch.is_tensor(value) for value in loaded.values()):
        return loaded
    keys = list(loaded)[:5] if isinstance(loaded, dict) else "-"
    raise InputError(f"{path}: not a state_dict (found {type(loaded).__name__} with keys {keys})")


def _unpickling_message(path: Path, error: Exception, trust_checkpoint: bool) -> str:
    if not zipfile.is_zipfile(path):
        return f"{path}: corrupt or truncated checkpoint (not a torch.save archive)"
    found = re.search(r"(?:unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(error), flags=re.IGNORECASE)
    detail = f"it names {found.group(1)}" if found else _first_line(error)
    if trust_checkpoint:
        return f"{path}: cannot load checkpoint: {detail}"
    return f"{path}: the checkpoint holds pickled objects ({detail}); pass --trust-checkpoint only if you trust its source"


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


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
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a loadable edgeprune model file ({_first_line(error)})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise InputError(f"{path}: not an edgeprune model file")
    try:
        arch = payload["architecture"]
        config = ModelConfig(source=arch["source"], num_classes=arch["num_classes"])
        model = create_model(config, tuple(arch["input_shape"]))
        apply_plan(model, payload["plan"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise InputError(f"{path}: damaged edgeprune model file ({type(error).__name__}: {_first_line(error)})") from None
    return model.eval()


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
