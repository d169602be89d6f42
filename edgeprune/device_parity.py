"""Parity on the device: an artefact's outputs computed by the device's own runtime, compared with PyTorch's.

The in-process parity checks (``edgeprune.parity``) run the artefact with this machine's runtime and kernels.
A board runs other kernels (XNNPACK's int8 paths differ between x86 and Arm, and between Arm cores), so a build
benchmarked on a remote device also pushes a fixed sample set there, runs the artefact on it with the device's
runtime (``runner.py --samples``) and compares what comes back with the PyTorch parent's logits: top-1 agreement
and max abs error, per device, held to the same per-precision tolerances (``ParityError`` when broken).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.config import ParityConfig
from edgeprune.errors import DeviceError
from edgeprune.parity import check_parity, parity_report
from edgeprune.runtimes import BenchSettings, device_outputs

# What the device's run says about itself, kept beside the figures.
DEVICE_FACTS = ("machine", "cpu_model", "python_version", "runtime", "runtime_version", "providers", "emulated", "seconds")


def precision_of(name: str) -> str:
    """The tolerance class of an artefact name (``tflite_int8`` → int8; dynamic-range int8 counts as int8)."""
    precision = name.split("_")[1] if "_" in name else "fp32"
    return "int8" if precision in ("int8", "dynamic") else precision if precision == "fp16" else "fp32"


def parity_on_device(
    name: str,
    artifact: Path,
    device: str,
    samples: tuple[np.ndarray, np.ndarray, np.ndarray],
    config: ParityConfig,
    settings: BenchSettings,
) -> dict[str, Any] | None:
    """Top-1 agreement and max/mean abs error of ``artifact`` run on ``device`` against the parent's logits.

    ``samples`` are (NCHW float32 images, the parent's logits on them, labels). None where the device is this
    machine (the in-process checks already cover it).

    Raises:
        DeviceError: the device failed, or returned outputs of the wrong shape.
        ParityError: the device's outputs break the artefact's tolerance.
    """
    images, parent_logits, labels = samples
    with tempfile.TemporaryDirectory(prefix="edgeprune-device-parity-") as folder:
        samples_file = Path(folder) / "samples.npy"
        np.save(samples_file, np.ascontiguousarray(images, dtype=np.float32))
        run = device_outputs(artifact, samples_file, device, Path(folder), settings)
        if run is None:
            return None
        logits = np.load(run["outputs_path"], allow_pickle=False)
    if logits.shape != parent_logits.shape:
        raise DeviceError(f"{device}: {artifact.name} returned outputs of shape {list(logits.shape)}, expected {list(parent_logits.shape)}")
    report: dict[str, Any] = {**parity_report(parent_logits, logits, labels), "device": device}
    report.update({key: run.get(key) for key in DEVICE_FACTS})
    check_parity(name, precision_of(name), report, config, against=f"its PyTorch parent, run on {device}")
    return report
