"""Locks that make a benchmark device measure one artefact at a time.

``device_lock``: within this process (threads). ``device_slot``: across processes and
Ray nodes, a flock in the shared cache folder, named after the *physical* device
(``physical_device``), so concurrent builds and analysis tasks take turns on one device
while different devices measure in parallel. ``DeviceSerializedCache`` is the stage cache
whose benchmark entries hold that slot.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

from edgeprune.cache import Cache

THIS_MACHINE_DEVICES = ("local", "gpu")  # device names that mean "this machine's own CPU/GPU"
BENCHMARK_STAGE = "benchmark"

_DEVICE_LOCKS: dict[str, threading.Lock] = {}
_DEVICE_LOCKS_GUARD = threading.Lock()


def device_lock(device: str) -> threading.Lock:
    """The process-wide lock of one device: a device benchmarks one artefact at a time."""
    with _DEVICE_LOCKS_GUARD:
        return _DEVICE_LOCKS.setdefault(device.strip(), threading.Lock())


def physical_device(device: str) -> str:
    """A name for the physical device a benchmark URL measures on.

    ``local`` and ``gpu`` are this machine's own CPU and GPU, so they are qualified by
    the host name (two nodes' ``local`` are two devices); ``ssh://``/``adb://`` URLs name
    the same device from every node.
    """
    text = device.strip()
    return f"{text}@{socket.gethostname()}" if text in THIS_MACHINE_DEVICES else text


def device_slot(device: str, cache_dir: Path) -> contextlib.AbstractContextManager[bool]:
    """The inter-process lock (flock, in the shared cache folder) of one physical benchmark device."""
    return Cache(cache_dir).lock(f"device:{physical_device(device)}")


class DeviceSerializedCache(Cache):
    """The stage cache, where the benchmark stage's entry lock also holds its device's lock.

    Every other stage of concurrent builds runs in parallel (one computes a shared entry,
    the others wait for it and reuse it); benchmarks on one device take turns.
    """

    def __init__(self, root: Path, device: str) -> None:
        super().__init__(root)
        self.device = device

    @contextlib.contextmanager
    def entry_lock(self, stage: str, key: str) -> Iterator[bool]:
        with contextlib.ExitStack() as held:
            if stage == BENCHMARK_STAGE:
                held.enter_context(device_slot(self.device, self.root))
            yield held.enter_context(super().entry_lock(stage, key))
