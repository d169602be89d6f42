"""ONNX export: ``torch.onnx.export`` + onnxsim, file out, with stable names and metadata properties.

The file has stable names (input ``input``, output ``logits``), the opset of
``export.opset``, an optional symbolic batch dimension (``export.dynamic_batch``)
and the metadata properties it is given (``stamp_metadata``). Used by the
export_onnx stage, the TFLite fallback, the speed-up search and the scripts.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch
from torch import nn

from edgeprune.config import ExportConfig
from edgeprune.errors import ExportError
from edgeprune.progress import Reporter
from edgeprune.versions import __version__

INPUT_NAME, OUTPUT_NAME = "input", "logits"
BATCH_AXIS = "batch"


def export_onnx(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    config: ExportConfig,
    metadata: dict[str, str] | None = None,
    reporter: Reporter | None = None,
) -> bool:
    """Write ``model`` as ONNX at ``path``; returns whether onnxsim simplified it.

    ``example`` is one NCHW input (its batch dimension becomes symbolic with
    ``config.dynamic_batch``). ``metadata`` goes into the file's metadata_props.
    Raises ExportError naming the operator the exporter cannot handle.
    """
    import onnx

    dynamic_axes = {INPUT_NAME: {0: BATCH_AXIS}, OUTPUT_NAME: {0: BATCH_AXIS}} if config.dynamic_batch else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not broken
            torch.onnx.export(
                model.eval(), (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=config.opset, dynamic_axes=dynamic_axes, dynamo=False,
            )  # fmt: skip
    except Exception as error:  # the exporter raises many types; all mean "cannot export"
        raise ExportError(onnx_failure_message(error, config.opset)) from None
    proto = onnx.load(str(path))
    simplified = False
    if config.simplify:
        proto, simplified = simplify(proto, reporter or Reporter(verbosity=0))
    stamp_metadata(proto, metadata or {})
    onnx.save(proto, str(path))
    return simplified


def onnx_failure_message(error: Exception, opset: int) -> str:
    """One line: which operator the ONNX exporter rejected and what to try."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    operator = re.search(r"operator '([\w:.]+)'", text)
    what = f"cannot export {operator.group(1)}" if operator else "failed"
    return f"ONNX export {what} (torch.onnx, opset {opset}): {text}; try another export.opset or replace the operator in the model"


def simplify(proto, reporter: Reporter):
    """onnxsim, falling back to the unsimplified graph when it fails or cannot verify."""
    import onnxsim

    try:
        simplified, ok = onnxsim.simplify(proto)
    except Exception as error:  # onnxsim raises bare RuntimeErrors from C++
        reporter.warn(f"onnxsim failed ({str(error).strip().splitlines()[0]}); keeping the unsimplified model")
        return proto, False
    if not ok:
        reporter.warn("onnxsim could not verify the simplified model; keeping the unsimplified one")
        return proto, False
    return simplified, True


def stamp_metadata(proto, entries: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``entries``; the producer is edgeprune."""
    del proto.metadata_props[:]
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)
    proto.producer_name, proto.producer_version = "edgeprune", __version__
