"""Baseline: the unpruned fp32 model — the user's checkpoint, or the bundled example trained once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgeprune.artifacts import sha256_of
from edgeprune.config import BuildConfig
from edgeprune.errors import InputError
from edgeprune.modelio import create_model, load_weights
from edgeprune.stages.base import StageContext, StageOutput
from edgeprune.stages.common import example_input, write_model
from edgeprune.training import TrainSettings, count_macs_params, evaluate, train


class Baseline:
    name = "baseline"
    version = "2"
    trains = True  # its cache key includes torch's thread count
    sections = ("model", "train")
    consumes = ()

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        weights = config.model.weights
        if not weights:
            return {}
        if not Path(weights).is_file():
            raise InputError(f"checkpoint not found: {weights}")
        return {"weights_sha256": sha256_of(Path(weights))}

    def run(self, context: StageContext) -> StageOutput:
        config, dataset = context.config, context.dataset
        torch.manual_seed(config.seed)
        model = create_model(config.model, dataset.input_shape)
        loaded = {}
        if config.model.weights:
            checkpoint = load_weights(model, Path(config.model.weights), config.model.trust_checkpoint)
            for adaptation in checkpoint.adaptations:
                context.reporter.info(f"checkpoint ({checkpoint.format}): {adaptation}")
            origin, loaded = "checkpoint", {"checkpoint": checkpoint.summary()}
        elif config.model.source.startswith("example:"):
            check_runs(model, context)
            settings = TrainSettings(config.train.epochs, config.train.lr, config.train.batch_size, config.seed)
            train(model, dataset.x_train, dataset.y_train, settings, reporter=context.reporter, description="train baseline")
            origin = "trained"
        else:
            context.reporter.warn(f"no weights given for {config.model.source}: using the factory's own weights")
            origin = "factory"
        check_runs(model, context)
        accuracy = evaluate(model, dataset.x_test, dataset.y_test)
        metrics = {"origin": origin, **loaded, "accuracy": accuracy, **count_macs_params(model, example_input(context))}
        return StageOutput(write_model(context, model, ("baseline_model", "model")), metrics)


def check_runs(model: nn.Module, context: StageContext) -> None:
    """Fail with one clear line when the model rejects the data's input shape or class count."""
    sample = example_input(context, batch=2)
    model.eval()
    try:
        with torch.no_grad():
            logits = model(sample)
    except (RuntimeError, ValueError, TypeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"the model rejects inputs of shape {tuple(sample.shape)} from the data: {first_line}") from None
    expected = (2, context.config.model.num_classes)
    if not torch.is_tensor(logits) or tuple(logits.shape) != expected:
        shape = tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__
        raise InputError(f"the model returns {shape} for a batch of 2, expected logits of shape {expected}")
    if not torch.isfinite(logits).all():
        raise InputError("the model produces NaN/inf outputs on the data")
