"""Datasets: the bundled Fashion-MNIST subset, a user's ``.npz``, or ``module:function``.

Preprocessing is declared in ``DataConfig`` and applied here, once, identically
for training, calibration, evaluation and parity checks:
``input = (pixel * scale - mean[c]) / std[c]`` in NCHW float32.
"""

from __future__ import annotations

import hashlib
import importlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.config import DataConfig
from edgeprune.errors import InputError

EXAMPLE_DATA = Path(__file__).resolve().parent / "fashion_mnist_subset.npz"
SPLITS = ("x_train", "y_train", "x_test", "y_test")


@dataclass(frozen=True)
class Dataset:
    """Preprocessed NCHW float32 images and int64 labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    fingerprint: str

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_test.shape[1:])

    def calibration_batches(self, samples: int, seed: int) -> np.ndarray:
        """A deterministic random draw of training images for quantization."""
        rng = np.random.default_rng(seed)
        count = min(samples, len(self.x_train))
        return self.x_train[np.sort(rng.choice(len(self.x_train), count, replace=False))]


def load_dataset(config: DataConfig, num_classes: int) -> Dataset:
    """Load, validate and preprocess the data named by ``config.source``."""
    raw = _load_raw(config.source)
    _check_splits(raw, config.source, num_classes)
    x_train = _to_nchw(raw["x_train"], config.layout, config.source)
    x_test = _to_nchw(raw["x_test"], config.layout, config.source)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise InputError(f"{config.source}: train images are {x_train.shape[1:]} but test images {x_test.shape[1:]} (C,H,W)")
    y_train, y_test = raw["y_train"].astype(np.int64), raw["y_test"].astype(np.int64)
    if config.train_samples:
        x_train, y_train = x_train[: config.train_samples], y_train[: config.train_samples]
    if config.eval_samples:
        x_test, y_test = x_test[: config.eval_samples], y_test[: config.eval_samples]
    x_train = preprocess(x_train, config)
    x_test = preprocess(x_test, config)
    return Dataset(x_train, y_train, x_test, y_test, _fingerprint(x_train, y_train, x_test, y_test))


def preprocess(images: np.ndarray, config: DataConfig) -> np.ndarray:
    """Apply the declared scale and per-channel mean/std to NCHW images."""
    channels = images.shape[1]
    mean, std = _per_channel(config.mean, channels, "mean"), _per_channel(config.std, channels, "std")
    if np.any(std == 0):
        raise InputError("data.std must not contain 0")
    out = images.astype(np.float32) * np.float32(config.scale)
    out = (out - mean[None, :, None, None]) / std[None, :, None, None]
    return np.ascontiguousarray(out, dtype=np.float32)


def _per_channel(values: tuple[float, ...], channels: int, what: str) -> np.ndarray:
    if len(values) == 1:
        return np.full(channels, values[0], dtype=np.float32)
    if len(values) != channels:
        raise InputError(f"data.{what} has {len(values)} values but the images have {channels} channels")
    return np.asarray(values, dtype=np.float32)


def _load_raw(source: str) -> dict[str, np.ndarray]:
    if source == "example":
        return _read_npz(EXAMPLE_DATA)
    if source.endswith(".npz"):
        return _read_npz(Path(source))
    if ":" in source:
        return _from_loaders(source)
    raise InputError(f"data.source {source!r}: expected 'example', a .npz file or module:function")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"data file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise InputError(f"{path}: not a readable .npz file (not a zip archive: truncated, or another format)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in SPLITS if name not in archive.files]
            if missing:
                raise InputError(f"{path}: missing arrays {missing} (need {list(SPLITS)})")
            return {name: archive[name] for name in SPLITS}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise InputError(f"{path}: not a readable .npz file ({error})") from None


def _from_loaders(source: str) -> dict[str, np.ndarray]:
    """Call ``module:function`` returning (train_loader, test_loader) of (images, labels)."""
    module_name, _, function_name = source.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise InputError(f"data.source {source!r}: cannot import ({error})") from None
    try:  # the user's code: one line here, its traceback with --debug
        train_loader, test_loader = function()
        raw: dict[str, np.ndarray] = {}
        for split, loader in (("train", train_loader), ("test", test_loader)):
            batches = [(_as_numpy(x), _as_numpy(y)) for x, y in loader] if loader else []
            if not batches:
                raise InputError(f"data.source {source!r}: the {split} loader yielded no batches")
            raw[f"x_{split}"] = np.concatenate([x for x, _ in batches])
            raw[f"y_{split}"] = np.concatenate([y for _, y in batches])
    except InputError:
        raise
    except Exception as error:
        detail = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
        raise InputError(f"data.source {source!r}: expected (train_loader, test_loader) of (images, labels) batches ({detail})") from error
    return raw


def _as_numpy(value: Any) -> np.ndarray:
    return value.numpy() if hasattr(value, "numpy") else np.asarray(value)


def _check_splits(raw: dict[str, np.ndarray], source: str, num_classes: int) -> None:
    for split in ("train", "test"):
        images, labels = raw[f"x_{split}"], raw[f"y_{split}"]
        if images.ndim not in (3, 4):
            raise InputError(f"{source}: x_{split} must be (N,H,W), (N,C,H,W) or (N,H,W,C), got {images.shape}")
        if len(images) == 0:
            raise InputError(f"{source}: x_{split} is empty")
        if images.dtype == np.bool_ or not (np.issubdtype(images.dtype, np.integer) or np.issubdtype(images.dtype, np.floating)):
            raise InputError(f"{source}: x_{split} must hold pixel values (uint8 or float), got dtype {images.dtype}")
        if labels.ndim != 1:
            raise InputError(f"{source}: y_{split} must be 1-D class indices, got shape {labels.shape} (one-hot? store argmax)")
        if len(images) != len(labels):
            raise InputError(f"{source}: x_{split} has {len(images)} images but y_{split} has {len(labels)} labels")
        if labels.dtype == np.bool_ or not np.issubdtype(labels.dtype, np.integer):
            raise InputError(f"{source}: y_{split} must hold integer class labels, got {labels.dtype}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise InputError(f"{source}: y_{split} labels span [{labels.min()}, {labels.max()}] but model.num_classes = {num_classes}")
        if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
            raise InputError(f"{source}: x_{split} contains NaN or infinite values")


def _to_nchw(images: np.ndarray, layout: str, source: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None, :, :]
    if layout == "auto":
        layout = "NHWC" if images.shape[-1] in (1, 3, 4) and images.shape[1] not in (1, 3, 4) else "NCHW"
    return np.transpose(images, (0, 3, 1, 2)) if layout == "NHWC" else images


def _fingerprint(*arrays: np.ndarray) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(str(array.shape).encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
