"""A corpus of third-party-style architectures, written here from the papers (clean-room, not copied).

Each is the shape people publish for CIFAR-style inputs, with the quirks that trip structured pruners
(functional pad shortcuts with hard-coded channel counts, squeeze-and-excitation, swish, drop-connect,
channel split / shuffle, grouped convolutions, inception concats, aggregation trees, dense concats,
hard-coded flattens), kept narrow so the whole corpus builds end to end in minutes.

``@zoo_model`` registers a no-argument factory with the checkpoint layout the corpus saves it in (one of
``tests.checkpoint_files.WRITERS``); the zoo tests and ``scripts/bench_zoo.py`` loop over ``ZOO``, so a
newly registered architecture is tested without a new test.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

ZOO_MODULES = ("tests.zoo.resnets", "tests.zoo.mobile", "tests.zoo.multibranch")


@dataclass(frozen=True)
class ZooEntry:
    """One corpus architecture: its factory (``module:function`` for ``--model``), paper and checkpoint layout."""

    name: str
    source: str
    paper: str
    checkpoint: str
    factory: Callable[[], nn.Module]


ZOO: dict[str, ZooEntry] = {}


def zoo_model(paper: str, checkpoint: str) -> Callable[[Callable[[], nn.Module]], Callable[[], nn.Module]]:
    """Register a factory ``() -> nn.Module`` (10 classes, 1x28x28 inputs) under its function name."""

    def register(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        name = factory.__name__
        if name in ZOO:
            raise ValueError(f"zoo model {name!r} registered twice")
        ZOO[name] = ZooEntry(name, f"{factory.__module__}:{name}", paper, checkpoint, factory)
        return factory

    return register


def load_zoo() -> dict[str, ZooEntry]:
    """Import every zoo module (which registers its architectures) and return the registry."""
    for module in ZOO_MODULES:
        importlib.import_module(module)
    return ZOO
