"""The model registry: a decorator fills a dict of frozen ``ModelSpec`` records.

A family module decorates a factory ``(num_classes, in_channels, image_size,
**kwargs) -> nn.Module``; its name becomes the model name and the first line of
its docstring the description. ``create_model`` is the one way to build a
bundled architecture by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from edgeprune.errors import InputError

DEFAULT_INPUT_SHAPE = (1, 28, 28)


class ModelFactory(Protocol):
    def __call__(self, num_classes: int, in_channels: int, image_size: int, **kwargs: Any) -> nn.Module: ...


@dataclass(frozen=True)
class ModelSpec:
    """Static facts about one bundled architecture.

    ``default_input_shape`` is (C, H, W) without the batch dimension.
    ``untracked_coupling`` marks a network whose channels are coupled through
    operations a dependency graph cannot see (so structured pruning must
    detect the damage instead of producing it silently).
    """

    name: str
    factory: ModelFactory
    description: str
    default_input_shape: tuple[int, ...]
    family: str
    untracked_coupling: bool = False


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(
    family: str,
    *,
    default_input_shape: tuple[int, ...] = DEFAULT_INPUT_SHAPE,
    untracked_coupling: bool = False,
) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator registering a factory under its function name.

    Raises ValueError (a bug, not a user error) for a duplicate name or a
    factory without a docstring.
    """

    def decorate(factory: ModelFactory) -> ModelFactory:
        name = factory.__name__
        if name in _REGISTRY:
            raise ValueError(f"model '{name}' is registered twice")
        if not factory.__doc__:
            raise ValueError(f"model '{name}' needs a docstring: its first line is the description")
        description = factory.__doc__.strip().splitlines()[0]
        _REGISTRY[name] = ModelSpec(name, factory, description, tuple(default_input_shape), family, untracked_coupling)
        return factory

    return decorate


def list_models() -> list[ModelSpec]:
    """Every registered model, in registration order (the default model first)."""
    return list(_REGISTRY.values())


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; InputError listing the known names if there is none."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise InputError(f"unknown model '{name}'; known models: {', '.join(_REGISTRY)}")
    return spec


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, **kwargs: Any) -> nn.Module:
    """Build bundled model ``name`` with random weights (seed with ``torch.manual_seed``).

    Raises InputError for an unknown name or a size the architecture cannot take.
    """
    return get_spec(name).factory(num_classes=num_classes, in_channels=in_channels, image_size=image_size, **kwargs)


def example_input(spec_or_name: ModelSpec | str, batch: int = 1, input_shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """A deterministic standard-normal batch of shape ``(batch, *input_shape)``.

    ``input_shape`` defaults to the model's ``default_input_shape``; the global
    torch RNG is left untouched.
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    shape = tuple(input_shape or spec.default_input_shape)
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *shape), generator=generator)
