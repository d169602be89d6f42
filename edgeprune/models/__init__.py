"""Bundled reference architectures, built by name through a registry.

>>> from edgeprune.models import create_model, list_models
>>> model = create_model("resnet_mini", num_classes=10, in_channels=1, image_size=28)
>>> [spec.name for spec in list_models()][0]
'small_cnn'

Each family lives in its own module and registers its factories with
``@register_model``; importing this package imports them all (torch included).
"""

from __future__ import annotations

from edgeprune.models.registry import (
    ModelFactory,
    ModelSpec,
    create_model,
    example_input,
    get_spec,
    list_models,
    register_model,
)

# Registration order is listing order, and the default model comes first: keep these imports unsorted.
# isort: off
from edgeprune.models import small_cnn as _small_cnn  # noqa: F401  (each import registers its models)
from edgeprune.models import resnet as _resnet  # noqa: F401
from edgeprune.models import mobilenetv2 as _mobilenetv2  # noqa: F401
from edgeprune.models import densenet as _densenet  # noqa: F401
from edgeprune.models import shufflenet as _shufflenet  # noqa: F401
from edgeprune.models import vit as _vit  # noqa: F401
from edgeprune.models import untracked as _untracked  # noqa: F401
# isort: on

__all__ = ["ModelFactory", "ModelSpec", "create_model", "example_input", "get_spec", "list_models", "register_model"]
