"""One exception hierarchy: every user-facing failure is an EdgepruneError.

The CLI prints ``str(error)`` as one line and exits with ``error.exit_code``;
anything that is not an EdgepruneError is a bug and shows a traceback.
"""

from __future__ import annotations


class EdgepruneError(Exception):
    """A failure caused by the user's input or environment, not by a bug."""

    exit_code = 2


class ConfigError(EdgepruneError):
    """A profile, project file or --set override is invalid."""


class InputError(EdgepruneError):
    """A model, checkpoint or dataset cannot be used."""


class StageError(EdgepruneError):
    """A pipeline stage failed for a reason the user can act on."""

    exit_code = 3


class ExportError(StageError):
    """No converter could produce the artefact."""


class ParityError(StageError):
    """An exported artefact does not compute what its PyTorch parent computes."""


class DeviceError(EdgepruneError):
    """A benchmark device is unreachable, vanished mid-run or lacks a runtime."""

    exit_code = 4


class TransientDeviceError(DeviceError):
    """A failure worth retrying: a dropped connection, a device that went offline."""
