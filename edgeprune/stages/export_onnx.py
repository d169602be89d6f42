"""Export ONNX: the build's model (and the dense reference) as ONNX, checked against PyTorch on real test inputs.

The conversion is ``edgeprune.export.onnx``. The file carries metadata properties a
device app can read:

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
from typing import Any

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig
from edgeprune.export.onnx import export_onnx
from edgeprune.parity import verify_artifact
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model, reference_pairs
from edgeprune.training import predict_logits
from edgeprune.versions import __version__


class ExportOnnx:
    name = "export_onnx"
    version = "2"
    sections = ("export", "parity", "prune", "benchmark")
    consumes = ("model", "baseline_model")
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        return {"target": config.name}  # the target is written into the file

    def run(self, context: StageContext) -> StageOutput:
        artifacts, metrics = [], {}
        config = context.config.export
        for source, name in reference_pairs(context, "onnx_fp32"):
            model = read_model(context, source)
            path = context.workdir / f"{name}.onnx"
            stamp = file_metadata(context, source)
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


def file_metadata(context: StageContext, source: str) -> dict[str, str]:
    """What a device app can read from the file: producer, target, build key, preprocessing."""
    data = context.config.data
    return {
        "edgeprune_version": __version__,
        "target": context.config.name,
        "build_key": context.key,
        "model_sha256": context.inputs[source].sha256,
        "preprocessing": json.dumps({"layout": "NCHW", "scale": data.scale, "mean": list(data.mean), "std": list(data.std)}),
    }
