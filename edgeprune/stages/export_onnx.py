"""Export ONNX: ``torch.onnx.export`` + onnxsim, checked against PyTorch on real test inputs.

The file has stable names (input ``input``, output ``logits``), the target's
opset, an optional symbolic batch dimension (``export.dynamic_batch``) and
metadata properties a device app can read:

| key | value |
|---|---|
| ``edgeprune_version`` | the version that wrote the file |
| ``target`` | the build's target profile |
| ``build_key`` | this stage's cache key: manifest.json's ``stages[].cache_key`` of ``export_onnx`` |
| ``model_sha256`` | sha256 of the torch model file it was exported from |
| ``preprocessing`` | JSON: layout, scale, mean, std |

The manifest's own hash cannot be stored: the manifest lists this file's hash,
so each would have to contain the other. The cache key hashes everything the
file is made from (config sections, input model hashes, data fingerprint,
seed, tool versions) and links the file to its manifest entry instead.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig, ExportConfig
from edgeprune.errors import ExportError
from edgeprune.parity import verify_artifact
from edgeprune.pipeline import StageContext, StageOutput
from edgeprune.progress import Reporter
from edgeprune.stages.common import example_input, read_model
from edgeprune.training import predict_logits

INPUT_NAME, OUTPUT_NAME = "input", "logits"
BATCH_AXIS = "batch"


class ExportOnnx:
    name = "export_onnx"
    version = "2"
    sections = ("export", "parity", "prune", "benchmark")
    consumes = ("model", "baseline_model")

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        return {"target": config.name}  # the target is written into the file

    def run(self, context: StageContext) -> StageOutput:
        artifacts, metrics = [], {}
        config = context.config.export
        for source, name in reference_pairs(context, "onnx_fp32"):
            model = read_model(context, source)
            path = context.workdir / f"{name}.onnx"
            stamp = file_metadata(self, context, source)
            simplified = export_onnx(model, example_input(context), path, config, stamp, context.reporter)
            check = verify_artifact(
                name, path, "fp32", predict_logits(model, context.dataset.x_test),
                context.dataset.x_test, context.dataset.y_test, context.config.parity,
            )  # fmt: skip
            facts = {
                "opset": config.opset,
                "simplified": simplified,
                "dynamic_batch": config.dynamic_batch,
                "build_key": stamp["build_key"],
            }
            artifacts.append(Artifact.from_file(name, "onnx", path, format="onnx", precision="fp32", parent=source, **facts, **check))
            metrics[name] = {**facts, **check}
        return StageOutput(artifacts, metrics)


def reference_pairs(context: StageContext, name: str) -> list[tuple[str, str]]:
    """(model artefact, output name): the build's model, plus the dense baseline when a
    benchmark needs it as the speed-up reference."""
    pairs = [("model", name)]
    if context.config.prune.mode != "none" and context.config.benchmark.enabled:
        pairs.append(("baseline_model", f"{name}_dense"))
    return pairs


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


def file_metadata(stage, context: StageContext, source: str) -> dict[str, str]:
    """What a device app can read from the file: producer, target, build key, preprocessing."""
    from edgeprune import __version__
    from edgeprune.cache import cache_key
    from edgeprune.pipeline import key_components

    data = context.config.data
    return {
        "edgeprune_version": __version__,
        "target": context.config.name,
        "build_key": cache_key(key_components(stage, context.config, context.dataset, context.inputs)),
        "model_sha256": context.inputs[source].sha256,
        "preprocessing": json.dumps({"layout": "NCHW", "scale": data.scale, "mean": list(data.mean), "std": list(data.std)}),
    }


def stamp_metadata(proto, entries: dict[str, str]) -> None:
    """Replace the file's metadata_props with ``entries``; the producer is edgeprune."""
    from edgeprune import __version__

    del proto.metadata_props[:]
    for key, value in entries.items():
        prop = proto.metadata_props.add()
        prop.key, prop.value = key, str(value)
    proto.producer_name, proto.producer_version = "edgeprune", __version__
