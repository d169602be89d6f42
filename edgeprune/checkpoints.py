"""Checkpoints as people actually have them: read, unwrapped and fitted to a model, saying what was adapted.

Every file is read with ``torch.load(weights_only=True)`` (or ``safetensors``) unless the user trusts it:
a whole pickled ``nn.Module`` or a TorchScript archive runs code from the file and is refused without
``--trust-checkpoint``. What is accepted without asking:

- formats: torch's zip archive, the legacy (pre-1.6) pickle, safetensors;
- tensors saved on a CUDA (or MPS) device, mapped to the CPU;
- wrappers: ``{"state_dict": ..., "optimizer": ..., "epoch": ...}`` and the other common keys, EMA copies;
- key prefixes added by ``DataParallel`` (``module.``), ``torch.compile`` (``_orig_mod.``) or a training
  wrapper (``model.``), stripped only where that makes the keys fit the model;
- BatchNorm ``num_batches_tracked`` buffers missing from old checkpoints (unused at inference), filled.

Anything else that does not fit is one line naming the first missing and unexpected keys and the
closest key, and the model is left untouched (never half-loaded).
"""

from __future__ import annotations

import difflib
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.errors import InputError

# Wrapper keys, most specific first; the model's own weights are preferred to an EMA copy.
WEIGHT_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params", "weights", "module")
EMA_KEYS = ("model_ema", "state_dict_ema", "ema", "ema_state_dict", "params_ema")
SAFETENSORS_HEADER_LIMIT = 100_000_000


@dataclass
class Checkpoint:
    """A checkpoint's tensors by key, the file's format and every adaptation made to read it."""

    state_dict: dict[str, torch.Tensor]
    format: str
    adaptations: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"format": self.format, "adapted": list(self.adaptations)}


def read_checkpoint(path: Path, trust_checkpoint: bool = False) -> Checkpoint:
    """Read ``path`` into a flat state_dict on the CPU. Raises InputError for what cannot be read safely."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint not found: {path}")
    if _is_safetensors(path):
        return _read_safetensors(path)
    if _is_torchscript(path):
        return _read_torchscript(path, trust_checkpoint)
    devices: set[str] = set()
    loaded = _torch_load(path, trust_checkpoint, devices)
    file_format = "torch zip archive" if zipfile.is_zipfile(path) else "legacy torch pickle (pre-1.6)"
    adaptations = [f"tensors saved on {', '.join(sorted(devices))} mapped to cpu"] if devices - {"cpu"} else []
    state, unwrap_note = _unwrap(path, loaded)
    if unwrap_note:
        adaptations.append(unwrap_note)
    if isinstance(state, nn.Module):
        state, file_format = state.state_dict(), f"{file_format} holding a pickled {type(state).__name__} (trusted)"
    return Checkpoint(_flat_tensors(path, state), file_format, adaptations)


def fit_to_model(checkpoint: Checkpoint, model: nn.Module, path: Path) -> Checkpoint:
    """Adapt the checkpoint's keys to ``model`` (prefixes, missing BatchNorm counters) or raise InputError."""
    expected = model.state_dict()
    state = dict(checkpoint.state_dict)
    adaptations = list(checkpoint.adaptations)
    state = _strip_prefixes(state, expected, adaptations)
    counters = [key for key in expected if key not in state and key.endswith("num_batches_tracked")]
    for key in counters:
        state[key] = expected[key].clone()
    if counters:
        adaptations.append(f"filled {len(counters)} missing BatchNorm num_batches_tracked buffers (unused at inference)")
    _check_keys(path, state, expected)
    _check_shapes(path, state, expected)
    _check_finite(path, state)
    cast = sorted({str(state[key].dtype).removeprefix("torch.") for key in expected if state[key].dtype != expected[key].dtype})
    if cast:
        adaptations.append(f"{'/'.join(cast)} tensors cast to the model's dtype")
    return Checkpoint(state, checkpoint.format, adaptations)


# --------------------------------------------------------------------------- formats


def _torch_load(path: Path, trust_checkpoint: bool, devices: set[str]) -> Any:
    def to_cpu(storage: Any, location: str) -> Any:
        devices.add(str(location))
        return storage

    try:
        return torch.load(path, map_location=to_cpu, weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        raise InputError(_unpickling_message(path, error, trust_checkpoint)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, ModuleNotFoundError, AttributeError) as error:
        if trust_checkpoint and isinstance(error, (ModuleNotFoundError, AttributeError)):
            raise InputError(f"{path}: the pickled model needs code that is not importable here ({first_line(error)})") from None
        raise InputError(f"{path}: corrupt or truncated checkpoint ({first_line(error)})") from None


def _is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        return False
    return 2 <= int.from_bytes(head[:8], "little") <= SAFETENSORS_HEADER_LIMIT and head[8:9] == b"{"


def _read_safetensors(path: Path) -> Checkpoint:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:  # pragma: no cover - safetensors is a dependency
        raise InputError(f"{path}: a safetensors file, but the safetensors package is not installed (pip install safetensors)") from None
    try:
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise InputError(f"{path}: corrupt or truncated safetensors file ({first_line(error)})") from None
    return Checkpoint(dict(state), "safetensors")


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") or "/code/__torch__" in name for name in archive.namelist())


def _read_torchscript(path: Path, trust_checkpoint: bool) -> Checkpoint:
    if not trust_checkpoint:
        raise InputError(
            f"{path}: a TorchScript archive (it carries code); pass --trust-checkpoint only if you trust its source, "
            "or save model.state_dict() instead"
        )
    try:
        scripted = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, ValueError) as error:
        raise InputError(f"{path}: cannot load TorchScript archive ({first_line(error)})") from None
    return Checkpoint(dict(scripted.state_dict()), "TorchScript archive (trusted)")


# --------------------------------------------------------------------------- layouts


def _unwrap(path: Path, loaded: Any) -> tuple[Any, str]:
    """The weights inside a training checkpoint's dict, and a note naming the wrapper and what sat beside it."""
    if isinstance(loaded, dict) and loaded.get("format") == "edgeprune-model/1":
        return loaded["state_dict"], "weights of an edgeprune model file"
    if not isinstance(loaded, dict) or _is_state_dict(loaded):
        return loaded, ""
    for key in WEIGHT_KEYS + EMA_KEYS:
        inner = loaded.get(key)
        if isinstance(inner, nn.Module) or (isinstance(inner, dict) and inner):
            inner, nested = _unwrap(path, inner)
            beside = sorted(str(other) for other in loaded if other != key)
            note = f"weights taken from {key!r}" + (f" (beside {', '.join(beside[:6])})" if beside else "")
            ema = [other for other in EMA_KEYS if other != key and other in loaded]
            if ema and key in WEIGHT_KEYS:
                note += f"; the EMA copy {ema[0]!r} is not used"
            return inner, "; ".join(filter(None, [note, nested]))
    keys = list(loaded)[:5]
    raise InputError(f"{path}: not a state_dict (found dict with keys {keys}; expected tensors or one of {list(WEIGHT_KEYS[:4])})")


def _is_state_dict(value: dict) -> bool:
    return bool(value) and all(torch.is_tensor(item) for item in value.values())


def _flat_tensors(path: Path, state: Any) -> dict[str, torch.Tensor]:
    if not isinstance(state, dict) or not state:
        raise InputError(f"{path}: not a state_dict (found {type(state).__name__})")
    not_tensors = [key for key, value in state.items() if not torch.is_tensor(value)]
    if not_tensors:
        raise InputError(f"{path}: not a state_dict ({not_tensors[0]!r} holds a {type(state[not_tensors[0]]).__name__}, not a tensor)")
    return {str(key): value for key, value in state.items()}


def _strip_prefixes(state: dict[str, torch.Tensor], expected: dict[str, Any], adaptations: list[str]) -> dict[str, torch.Tensor]:
    """Strip a leading component every key shares (``module.``, ``_orig_mod.``, ``model.``) and no model key starts with."""
    model_roots = {key.split(".", 1)[0] for key in expected}
    while state and all("." in key for key in state):
        first = {key.split(".", 1)[0] for key in state}
        if len(first) != 1 or next(iter(first)) in model_roots:
            return state
        prefix = f"{first.pop()}."
        adaptations.append(f"key prefix {prefix!r} stripped")
        state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


def _check_keys(path: Path, state: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        closest = difflib.get_close_matches(missing[0], unexpected, n=1, cutoff=0.6)
        hint = f" (closest in the checkpoint: {closest[0]!r})" if closest else ""
        parts.append(f"{len(missing)} missing, first {missing[0]!r}{hint}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, first {unexpected[0]!r}")
    raise InputError(f"{path}: checkpoint does not fit the model ({'; '.join(parts)}); is it for another architecture?")


def _check_shapes(path: Path, state: dict[str, torch.Tensor], expected: dict[str, Any]) -> None:
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            head = " (a classifier of another size: is model.num_classes right?)" if _is_last_layer(key, expected) else ""
            raise InputError(
                f"{path}: shape mismatch at {key}: checkpoint {tuple(state[key].shape)} vs model {tuple(tensor.shape)}{head}; "
                "is it for another architecture?"
            )


def _is_last_layer(key: str, expected: dict[str, Any]) -> bool:
    owner = key.rpartition(".")[0]
    owners = [name.rpartition(".")[0] for name in expected]
    return bool(owners) and owner == owners[-1]


def _check_finite(path: Path, state: dict[str, torch.Tensor]) -> None:
    bad = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise InputError(f"{path}: checkpoint has NaN/inf weights in {bad[0]}" + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))


def _unpickling_message(path: Path, error: Exception, trust_checkpoint: bool) -> str:
    legacy_or_zip = zipfile.is_zipfile(path) or _starts_like_legacy_pickle(path)
    if not legacy_or_zip:
        return f"{path}: corrupt or truncated checkpoint (not a torch.save archive)"
    found = re.search(r"(?:unsupported global|GLOBAL)[:\s]+(?:GLOBAL\s+)?([\w.]+)", str(error), flags=re.IGNORECASE)
    detail = f"it names {found.group(1)}" if found else first_line(error)
    if trust_checkpoint:
        return f"{path}: cannot load checkpoint: {detail}"
    return (
        f"{path}: the checkpoint holds pickled objects ({detail}); pass --trust-checkpoint only if you trust its source, "
        "or save model.state_dict() instead"
    )


def _starts_like_legacy_pickle(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(1) == b"\x80"  # the pickle protocol opcode legacy torch.save starts with


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
