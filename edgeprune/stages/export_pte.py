"""Export an ExecuTorch .pte lowered to XNNPACK (``edgeprune.export.executorch``), checked against PyTorch on real test inputs.

Each artefact's meta says how much of the model XNNPACK took (``delegated_share``,
``portable_kernels``: the operators left to ExecuTorch's slower portable kernels).
int8 .pte files are made by the quantize stage, within its accuracy budget.
"""

from __future__ import annotations

from typing import Any

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig
from edgeprune.export.executorch import check_scheme, export_pte
from edgeprune.parity import verify_artifact
from edgeprune.pte_runtime import require_executorch
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, read_model, reference_pairs
from edgeprune.training import predict_logits


class ExportPte:
    name = "export_pte"
    version = "1"
    sections = ("export", "parity", "prune", "benchmark")
    consumes = ("model", "baseline_model")
    trains = False

    @classmethod
    def checked(cls, config: BuildConfig) -> ExportPte:
        """The stage, once the executorch extra is importable and the quantize settings have a .pte form (ConfigError)."""
        require_executorch()
        if config.quantize.scheme != "none":
            check_scheme(config.quantize)
        return cls()

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        return {}  # executorch's version is among the pipeline's tool versions

    def run(self, context: StageContext) -> StageOutput:
        artifacts, metrics = [], {}
        for source, name in reference_pairs(context, "pte_fp32"):
            model = read_model(context, source)
            path = context.workdir / f"{name}.pte"
            delegation = export_pte(model, example_input(context), path)
            check = verify_artifact(
                name, path, "fp32", predict_logits(model, context.dataset.x_test),
                context.dataset.x_test, context.dataset.y_test, context.config.parity,
            )  # fmt: skip
            artifacts.append(Artifact.from_file(name, "pte", path, format="pte", precision="fp32", parent=source, **delegation, **check))
            metrics[name] = {**delegation, **check}
        return StageOutput(artifacts, metrics)
