"""Version facts: edgeprune's own version and the installed versions of the tools a build depends on.

A leaf module (it imports nothing of edgeprune): the stage cache key and manifest.json both read
``tool_versions()``, and exported files are stamped with ``__version__``.
"""

from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

TOOLS = ("edgeprune", "torch", "torch-pruning", "onnx", "onnxruntime", "onnxsim", "litert-torch", "ai-edge-litert", "executorch", "numpy")


def tool_versions() -> dict[str, str]:
    """``{distribution: version}`` for every tool in ``TOOLS``; "not installed" where it is missing."""
    versions = {}
    for tool in TOOLS:
        try:
            versions[tool] = metadata.version(tool)
        except metadata.PackageNotFoundError:
            versions[tool] = "not installed"
    return versions
