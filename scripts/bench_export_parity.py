"""Export every bundled architecture to ONNX and TFLite, fp32 and int8, and print parity and conversion time.

Usage::

    .venv/bin/python scripts/bench_export_parity.py                      # every registered model
    .venv/bin/python scripts/bench_export_parity.py --models small_cnn vit_tiny --images 512

Each model is first trained briefly (``--train-samples`` images, one epoch) so its
logits have realistic margins, then converted the way a build does it:
``export_onnx`` (+ onnxsim), litert-torch, onnxruntime QDQ int8 and litert-torch
PT2E int8 (the quantize stage's budget may keep noisy layers float: the
``float`` column counts them). Where TensorFlow and onnx2tf are installed
(``pip install "edgeprune[tensorflow]"``) the fallback converter ONNX → onnx2tf
is measured on the same model too. Columns: conversion seconds (wall clock,
including int8 calibration), max abs logit error and top-1 agreement against
the PyTorch model on the first ``--images`` test images.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from edgeprune.config import DataConfig, ExportConfig, QuantizeConfig
from edgeprune.data import load_dataset
from edgeprune.errors import StageError
from edgeprune.export import onnx2tf as onnx2tf_fallback
from edgeprune.export.onnx import export_onnx
from edgeprune.export.tflite import convert_tflite
from edgeprune.models import create_model, list_models
from edgeprune.parity import artifact_logits, parity_report
from edgeprune.quantization.budget import quantize_within_budget
from edgeprune.quantization.onnx import OnnxQuantizer
from edgeprune.quantization.tflite import TfliteQuantizer
from edgeprune.training import TrainSettings, predict_logits, train

COLUMNS = ("model", "format", "precision", "converter", "seconds", "max_abs_error", "top1_agreement", "float")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=[spec.name for spec in list_models()])
    parser.add_argument("--images", type=int, default=512, help="test images for parity (default 512, parity.samples)")
    parser.add_argument("--train-samples", type=int, default=2000, help="training images for the brief training")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs (default 1; 3+ gives the margins of a real model)")
    parser.add_argument("--calibration", type=int, default=64, help="int8 calibration images")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = load_dataset(DataConfig(), 10)
    fallback = not onnx2tf_fallback.missing_requirements()
    print(f"torch threads {torch.get_num_threads()}; onnx2tf fallback {'measured' if fallback else 'not installed: skipped'}")
    print(" | ".join(f"{c:>14}" if i > 3 else f"{c:<17}" for i, c in enumerate(COLUMNS)))
    for name in args.models:
        for row in measure(name, data, args, fallback):
            print(" | ".join(_cell(i, value) for i, value in enumerate(row)), flush=True)


def measure(name: str, data, args, fallback: bool) -> list[tuple]:
    torch.manual_seed(0)
    model = train(
        create_model(name), data.x_train[: args.train_samples], data.y_train[: args.train_samples], TrainSettings(args.epochs, 5e-3, 128, 0)
    )
    images, labels = data.x_test[: args.images], data.y_test[: args.images]
    parent, example = predict_logits(model, images), torch.from_numpy(images[:1].copy())
    calibration = data.calibration_batches(args.calibration, seed=0)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)

        def timed(fmt: str, precision: str, converter: str, path: Path, convert) -> None:
            started = time.perf_counter()
            try:
                extra = convert() or {}
            except StageError as error:  # a converter that cannot take this model is a result too
                print(f"  {name} {fmt} {precision} via {converter}: {error}", flush=True)
                rows.append((name, fmt, precision, converter, time.perf_counter() - started, float("nan"), float("nan"), "FAILED"))
                return
            seconds = time.perf_counter() - started
            report = parity_report(parent, artifact_logits(path, images), labels)
            rows.append(
                (name, fmt, precision, converter, seconds, report["max_abs_error"], report["top1_agreement"], extra.get("float", ""))
            )

        timed(
            "onnx",
            "fp32",
            "torch.onnx",
            folder / "fp32.onnx",
            lambda: export_onnx(model, example, folder / "fp32.onnx", ExportConfig()) and None,
        )
        timed("tflite", "fp32", "litert-torch", folder / "fp32.tflite", lambda: convert_tflite(model, example, folder / "fp32.tflite"))
        if fallback:
            timed(
                "tflite",
                "fp32",
                "onnx2tf",
                folder / "o2t.tflite",
                lambda: onnx2tf_fallback.convert_onnx(folder / "fp32.onnx", folder / "o2t.tflite", images) and None,
            )
        for fmt, quantizer in (
            ("onnx", lambda: OnnxQuantizer(folder / "fp32.onnx", calibration, QuantizeConfig(), folder)),
            ("tflite", lambda: TfliteQuantizer(model, example, calibration, QuantizeConfig())),
        ):
            converter = "onnxruntime" if fmt == "onnx" else "litert-torch"
            timed(
                fmt,
                "int8",
                converter,
                folder / f"int8.{fmt}",
                lambda fmt=fmt, quantizer=quantizer: quantize(fmt, quantizer(), folder, images, labels),
            )
    return rows


def quantize(fmt: str, quantizer, folder: Path, images: np.ndarray, labels: np.ndarray) -> dict[str, str]:
    """The quantize stage's path: int8 within its accuracy budget (0.5 points, 99 % agreement) against the fp32 file.

    The ``float`` column: layers kept float and the budget's figures (top-1 drop in points / agreement
    with the fp32 file), or the stage's failure when no fallback met the budget.
    """
    fp32_logits = artifact_logits(folder / f"fp32.{fmt}", images)
    try:
        _, meta = quantize_within_budget(
            f"{fmt}_int8",
            f"{fmt}_fp32",
            quantizer,
            folder / f"int8.{fmt}",
            fp32_logits,
            images,
            labels,
            QuantizeConfig(min_top1_agreement=0.99),
        )
    finally:
        quantizer.close()
    budget = meta["budget"]
    if not budget["passed"]:
        print(f"  {fmt} int8 budget not met: {budget['verdict']}", flush=True)
        return {"float": "FAILED"}
    return {"float": f"{len(meta['float_layers'])} ({budget['accuracy_drop']:+.2f}/{budget['top1_agreement']:.3f})"}


def _cell(index: int, value) -> str:
    if isinstance(value, float):
        return f"{value:>14.2f}" if index == 4 else (f"{value:>14.4f}" if index == 6 else f"{value:>14.2e}")
    return f"{value!s:>14}" if index > 3 else f"{value!s:<17}"


if __name__ == "__main__":
    main()
