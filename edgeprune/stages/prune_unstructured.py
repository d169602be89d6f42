"""Unstructured pruning: individual weights zeroed by L1 magnitude (for size), or a 2:4 pattern (for GPUs).

The masks and the schedule are ``edgeprune.sparsity``. The zeros are written into the
weights themselves (the masks are permanent), so the finetune stage re-derives the masks
from the zeros and holds them fixed while it trains, and the zeros compress in the shipped
file. With ``sparsity.schedule = "cubic"`` this stage applies the schedule's first step.
"""

from __future__ import annotations

from typing import Any

from edgeprune.config import BuildConfig
from edgeprune.sparsity import apply_masks, check_sparsity_config, compute_masks, pruning_plan, sparsity_report
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import read_model, write_model
from edgeprune.training import evaluate

# How the shipped files store the zeros (recorded in the metrics for the manifest). litert-torch 0.10's converter
# has no option to write TFLite sparse tensors (ai-edge-litert could read them). ONNX sparse_initializer loads in
# onnxruntime, but its int64 indices make a gzipped int8 file bigger: scripts/bench_unstructured.py measures both.
STORAGE = "dense: zeros stored in place; the size benefit is in the gzip/zip download"


class PruneUnstructured:
    name = "prune_unstructured"
    version = "3"  # 3: metrics say which step they describe
    sections = ("prune", "sparsity")
    consumes = ("model",)
    trains = False

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        check_sparsity_config(config)
        return {}

    def run(self, context: StageContext) -> StageOutput:
        sparsity = context.config.sparsity
        model = read_model(context)
        targets = pruning_plan(sparsity)
        apply_masks(model, compute_masks(model, sparsity, targets[0]))
        report = sparsity_report(model, sparsity.pattern)
        metrics = {  # this stage's own figures: the model after step 1 of the schedule, not the shipped one
            "describes": f"the model after pruning step 1 of {len(targets)}",
            "global_sparsity": report["global_sparsity"],
            "layers": report["layers"],
            "pattern": sparsity.pattern,
            "scope": sparsity.scope,
            "schedule": {"kind": sparsity.schedule, "targets": targets, "applied": 1},
            "storage": STORAGE,
            "accuracy": evaluate(model, context.dataset.x_test, context.dataset.y_test),
        }
        return StageOutput(write_model(context, model), metrics)
