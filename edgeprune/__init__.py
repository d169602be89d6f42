"""edgeprune: turn a trained PyTorch model into small, fast, verified device artefacts.

Importing this package does not import torch or any converter; they load when a
build needs them.
"""

__version__ = "0.1.0"

from edgeprune.api import BuildResult, bench, build, resolve, targets  # noqa: E402
from edgeprune.errors import EdgepruneError  # noqa: E402

__all__ = ["BuildResult", "EdgepruneError", "__version__", "bench", "build", "resolve", "targets"]
