"""Finetune: recover the accuracy pruning cost, distilled from the unpruned model when asked.

Weights that unstructured pruning zeroed stay zero: their masks are re-derived
from the zeros and held fixed. With ``sparsity.schedule = "cubic"`` the
prune_unstructured stage applied only the first pruning step; the remaining
steps are applied here, spread evenly over the first ``sparsity.schedule_end``
of the training steps, each tightening the masks, and the rest of the training
recovers with the final masks fixed. The metrics report the final sparsity.
"""

from __future__ import annotations

from typing import Any

from edgeprune.config import BuildConfig
from edgeprune.ddp_finetune import ddp_train, launched_by_torchrun
from edgeprune.errors import ConfigError
from edgeprune.sparsity import schedule_updates, sparsity_masks, sparsity_report
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import read_model, write_model
from edgeprune.training import TrainSettings, evaluate, train, training_steps


class Finetune:
    name = "finetune"
    version = "3"
    trains = True  # its cache key includes torch's thread count
    sections = ("finetune", "prune", "sparsity")
    consumes = ("model", "baseline_model")

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        return {}

    def run(self, context: StageContext) -> StageOutput:
        config, dataset = context.config, context.dataset
        model = read_model(context)
        teacher = read_model(context, "baseline_model") if config.finetune.distill else None
        sparse = config.prune.mode in ("unstructured", "both")
        accuracy_before = evaluate(model, dataset.x_test, dataset.y_test)
        settings = TrainSettings(
            config.finetune.epochs,
            config.finetune.lr,
            config.finetune.batch_size,
            config.seed,
            config.finetune.distill_alpha if teacher is not None else 0.0,
            config.finetune.temperature,
        )
        processes = config.finetune.processes
        if processes > 1 or launched_by_torchrun():
            if sparse:
                raise ConfigError(
                    "finetune.processes > 1 cannot hold unstructured sparsity masks yet: use finetune.processes = 1 with "
                    f"prune.mode = '{config.prune.mode}'"
                )
            model = ddp_train(model, dataset.x_train, dataset.y_train, settings, processes, teacher)
        else:
            masks = sparsity_masks(model) if sparse else None
            updates = schedule_updates(config.sparsity, training_steps(len(dataset.x_train), settings)) if sparse else {}
            train(model, dataset.x_train, dataset.y_train, settings, teacher, context.reporter, "finetune", masks, updates)
        metrics = {
            "accuracy_before": accuracy_before,
            "accuracy": evaluate(model, dataset.x_test, dataset.y_test),
            "distilled": teacher is not None,
            "processes": processes,
        }
        if sparse:
            report = sparsity_report(model, config.sparsity.pattern)
            metrics.update(global_sparsity=report["global_sparsity"], layers=report["layers"], pruning_steps=sorted(updates))
        return StageOutput(write_model(context, model), metrics)
