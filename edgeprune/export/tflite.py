"""TFLite conversion through litert-torch (no TensorFlow), with ONNX → onnx2tf as the fallback.

``export.tflite_channels_last`` gives the file NHWC input (litert-torch's
``to_channel_last_io``), what Android camera pipelines feed. When litert-torch cannot
lower an operator, ``export.tflite_converter = "auto"`` falls back to ONNX → onnx2tf
(``edgeprune.export.onnx2tf``, an optional TensorFlow install); without it the
conversion fails with an ``ExportError`` naming the operator and the install command.
``convert_tflite`` converts a PT2E-quantized module for the quantize stage.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.config import ExportConfig
from edgeprune.errors import ExportError
from edgeprune.export import onnx2tf
from edgeprune.export.onnx import export_onnx
from edgeprune.progress import Reporter


def convert_for_target(model: nn.Module, path: Path, config: ExportConfig, images: np.ndarray, reporter: Reporter) -> dict[str, str]:
    """``model`` as a .tflite at ``path`` the way ``config`` asks: litert-torch, else (``tflite_converter`` auto or
    onnx2tf) ONNX → onnx2tf. ``images`` are real NCHW test inputs (the first is the example the converters trace,
    onnx2tf checks its conversion on them). Returns how the file was made; ExportError when no converter can."""
    channels_last = config.tflite_channels_last
    failure = ""
    if config.tflite_converter != "onnx2tf":
        failure = try_litert(model, example_from(images), path, channels_last=channels_last)
        if not failure:
            return {"converter": "litert-torch", "input_layout": "NHWC" if channels_last else "NCHW"}
        if config.tflite_converter == "litert-torch":
            raise ExportError(f"{litert_failure(failure)}; set export.tflite_converter='auto' to fall back to ONNX → onnx2tf")
        if onnx2tf.missing_requirements():
            raise ExportError(f"{litert_failure(failure)}; {onnx2tf.INSTALL_HINT}")
        reporter.warn(f"{litert_failure(failure)}; converting {path.name} through ONNX → onnx2tf instead")
    layout = convert_through_onnx(model, path, config, images, reporter, failure)
    made = {"converter": "onnx2tf", "input_layout": layout}
    return {**made, "fallback_reason": litert_failure(failure)} if failure else made


def example_from(images: np.ndarray) -> torch.Tensor:
    """The first of ``images`` as a batch of one: the input the converters trace."""
    return torch.from_numpy(images[:1].copy())


def convert_through_onnx(
    model: nn.Module, path: Path, config: ExportConfig, images: np.ndarray, reporter: Reporter, litert_error: str
) -> str:
    """The fallback: a simplified, static-batch ONNX file, then onnx2tf on real test images."""
    onnx_path = path.with_name(f"{path.stem}.fallback.onnx")
    settings = dataclasses.replace(config, simplify=True, dynamic_batch=False)
    try:
        export_onnx(model, example_from(images), onnx_path, settings, reporter=reporter)
        return onnx2tf.convert_onnx(onnx_path, path, images, settings.tflite_channels_last)
    except ExportError as error:
        tried = f"{litert_failure(litert_error)}, and " if litert_error else ""
        raise ExportError(f"no converter can make {path.name}: {tried}{error}") from None
    finally:
        onnx_path.unlink(missing_ok=True)


def convert_tflite(model: nn.Module, example: torch.Tensor, path: Path, quant_config: Any = None, channels_last: bool = False) -> None:
    """Convert a torch (or PT2E-quantized) module to a .tflite file at ``path`` with litert-torch.

    ``example`` is one NCHW input; ``channels_last`` gives the file NHWC input.
    Raises ExportError naming the operator litert-torch cannot lower.
    """
    failure = try_litert(model, example, path, quant_config, channels_last)
    if failure and quant_config is not None:
        raise ExportError(
            f"{litert_failure(failure)}; int8 TFLite needs litert-torch: replace the operator, or ship fp32 (quantize.scheme='none')"
        )
    if failure:
        raise ExportError(f"{litert_failure(failure)}; {onnx2tf.INSTALL_HINT}")


def try_litert(model: nn.Module, example: torch.Tensor, path: Path, quant_config: Any = None, channels_last: bool = False) -> str:
    """litert-torch's conversion; returns its error's first line, or "" on success."""
    import litert_torch

    if channels_last:
        model, example = litert_torch.to_channel_last_io(model, args=[0]), example.permute(0, 2, 3, 1).contiguous()
    try:
        with quiet_litert(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # pytree deprecations inside torch.export
            edge_model = litert_torch.convert(model, (example,), quant_config=quant_config)
            edge_model.export(str(path))
    except Exception as error:  # the converter raises many types; all mean "cannot convert"
        return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ""


def litert_failure(error_line: str) -> str:
    """``litert-torch cannot convert <op>: <its message>`` from the converter's error line."""
    operator = re.search(r"\baten[.:]+[\w.]+", error_line)
    return f"litert-torch cannot convert {operator.group(0) if operator else 'the model'}: {error_line}"


@contextlib.contextmanager
def quiet_litert() -> Iterator[None]:
    """Silence litert-torch's progress lines for the conversion, restoring the caller's setting."""
    previous = os.environ.get("LITERT_TORCH_SHOW_PROGRESS")
    os.environ["LITERT_TORCH_SHOW_PROGRESS"] = "n"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("LITERT_TORCH_SHOW_PROGRESS", None)
        else:
            os.environ["LITERT_TORCH_SHOW_PROGRESS"] = previous
