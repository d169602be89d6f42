"""ExecuTorch in this process: whether the optional extra is installed, its XNNPACK thread pool, a .pte file's logits.

Nothing here imports executorch or torch until a .pte is run: ``require_executorch`` only looks the
module up, so a build without .pte files never pays for the import.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeprune.errors import ConfigError, ParityError

INSTALL_HINT = 'ExecuTorch (.pte) needs the executorch extra: pip install "edgeprune[executorch]"'


def require_executorch() -> None:
    """ConfigError (one line, naming the extra) when executorch is not installed (looked up, not imported: that takes seconds)."""
    try:
        found = importlib.util.find_spec("executorch") is not None
    except ValueError:  # a module entry of None: its import is blocked
        found = False
    if not found:
        raise ConfigError(INSTALL_HINT)


def pte_logits(path: Path, images: np.ndarray, threads: int = 2) -> np.ndarray:
    """Float logits of a .pte file for NCHW float32 ``images``, one image per call (the file's fixed batch)."""
    require_executorch()
    # Imported on use: executorch is an optional extra, and parity (which runs .pte files through here) must not import torch.
    import torch
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(Path(path)).load_method("forward")
    shape = list(method.metadata.input_tensor_meta(0).sizes())
    if len(shape) != images.ndim or shape[1:] != list(images.shape[1:]):
        wanted = list(images.shape[1:])
        raise ParityError(f"{Path(path).name}: input shape {shape} does not take test images of shape {wanted} (check data.*)")
    batch = shape[0]
    outputs = []
    with xnnpack_threads(threads):
        for start in range(0, len(images), batch):
            chunk = images[start : start + batch]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)]) if len(chunk) < batch else chunk
            outputs.append(method.execute([torch.from_numpy(np.ascontiguousarray(padded))])[0].numpy()[: len(chunk)].copy())
    return np.concatenate(outputs).astype(np.float32)


@contextlib.contextmanager
def xnnpack_threads(threads: int) -> Iterator[None]:
    """ExecuTorch's process-wide XNNPACK thread pool at ``threads``, restored to its size afterwards."""
    from executorch.extension.pybindings import portable_lib

    previous = portable_lib._threadpool_get_thread_count()
    portable_lib._unsafe_reset_threadpool(threads)
    try:
        yield
    finally:
        portable_lib._unsafe_reset_threadpool(previous)
