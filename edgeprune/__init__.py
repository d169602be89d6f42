"""edgeprune: turn a trained PyTorch model into small, fast, verified device artefacts.

Importing this package does not import torch or any converter; they load when a
build needs them.
"""

from edgeprune.api import BuildResult, bench, build, resolve, targets
from edgeprune.errors import EdgepruneError
from edgeprune.versions import __version__

__all__ = ["BuildResult", "EdgepruneError", "__version__", "bench", "build", "resolve", "targets"]
