"""The int8 accuracy-budget search, old and new, on the bundled architectures and a ResNet-56-size model.

Usage::

    .venv/bin/python scripts/bench_quant_budget.py                              # every registered model + resnet56
    .venv/bin/python scripts/bench_quant_budget.py --models small_cnn resnet56

Each model is trained briefly on the bundled Fashion-MNIST data and exported to ONNX.
``resnet56`` is the CIFAR ResNet-56 layout (3 stages x 9 basic blocks, 16/32/64
channels) whose trained weights are rescaled, function-preserving, so a few activations
carry one channel ``--outlier`` times the others (ReLU commutes with a positive scale;
the next conv reads that channel as much weaker): what makes plain per-tensor int8 miss.
Budget: 0.5 top-1 points (McNemar, p < 0.05) and 99 % top-1 agreement on the test split.

Columns: ``old s`` one pass of the previous ranking (one onnxruntime session per
tensor, each tensor's effect alone on the logits; that search ran it once per round),
``rank s`` the two-run ranking, ``search s`` the whole new search (plain int8 included);
the rungs and tensors the search changed; drop / agreement against fp32; MACs in 16-bit
or float layers; size and p50 (onnxruntime, 1 thread, 1 image, medians of interleaved
runs) of fp32, plain int8 and the searched artefact.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from edgeprune.config import DataConfig, ExportConfig, QuantizeConfig
from edgeprune.data import load_dataset
from edgeprune.models import create_model, list_models
from edgeprune.models.resnet import BasicBlock, ResNetMini
from edgeprune.parity import artifact_logits
from edgeprune.progress import Reporter
from edgeprune.stages.export_onnx import export_onnx
from edgeprune.stages.quantize import OnnxQuantizer, quantize_within_budget
from edgeprune.training import TrainSettings, train

BUDGET = QuantizeConfig(max_accuracy_drop=0.5, min_top1_agreement=0.99)
COLUMNS = ("model", "old s", "rank s", "search s", "mix", "drop/agree", "MACs off %", "KiB fp32/int8/mix", "p50 ms fp32/int8/mix")


def resnet56(num_classes: int = 10) -> ResNetMini:
    """ResNet-56's layout: a stem and 3 stages of 9 basic blocks at 16/32/64 channels."""
    model = ResNetMini(num_classes, 1)
    blocks, previous = [], 16
    for index, width in enumerate((16, 32, 64)):
        for block in range(9):
            blocks.append(BasicBlock(previous, width, stride=2 if index and block == 0 else 1))
            previous = width
    model.blocks = nn.Sequential(*blocks)
    return model


def add_outliers(model: ResNetMini, factor: float, every: int = 6) -> None:
    """Every ``every``-th block: one channel of conv1's BN output ``factor`` x larger, conv2 reading it ``factor`` x weaker."""
    with torch.no_grad():
        for block in list(model.blocks)[::every]:
            batchnorm, conv = block.conv1[1], block.conv2[0]
            batchnorm.weight[0] *= factor
            batchnorm.bias[0] *= factor
            conv.weight[:, 0] /= factor


def p50_ms(paths: list[Path], image: np.ndarray, rounds: int = 5, iterations: int = 50) -> list[float]:
    """Median per-image latency of each model, measured in interleaved rounds (paired under the same load)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 3
    sessions = [ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]) for path in paths]
    samples: list[list[float]] = [[] for _ in paths]
    for _ in range(rounds):
        for session, times in zip(sessions, samples, strict=True):
            name = session.get_inputs()[0].name
            session.run(None, {name: image})
            for _ in range(iterations):
                start = time.perf_counter()
                session.run(None, {name: image})
                times.append(1000 * (time.perf_counter() - start))
    return [float(np.median(times)) for times in samples]


def measure(name: str, data, args, folder: Path) -> list[str]:
    torch.manual_seed(0)
    model = resnet56() if name == "resnet56" else create_model(name, 10, 1, 28)
    train(
        model,
        data.x_train[: args.train_samples],
        data.y_train[: args.train_samples],
        TrainSettings(epochs=args.epochs, lr=1e-2, batch_size=128, seed=0),
    )
    model.eval()
    if name == "resnet56":
        add_outliers(model, args.outlier)
    fp32 = folder / "fp32.onnx"
    export_onnx(model, torch.from_numpy(data.x_test[:1].copy()), fp32, ExportConfig())
    fp32_logits = artifact_logits(fp32, data.x_test)
    calibration = data.calibration_batches(args.calibration, 0)
    quantizer = OnnxQuantizer(fp32, calibration, BUDGET, folder)
    try:
        quantizer.quantize(folder / "plain.onnx", {})
        old = time.monotonic()
        if args.old:
            quantizer.tensor_noise()
        old = time.monotonic() - old
        ranking = time.monotonic()
        quantizer.tensor_errors()
        ranking = time.monotonic() - ranking
        search = time.monotonic()
        _, meta = quantize_within_budget(
            f"{name}/int8", "fp32", quantizer, folder / "mix.onnx", fp32_logits, data.x_test, data.y_test, BUDGET, Reporter()
        )
        search = time.monotonic() - search
    finally:
        quantizer.close()
    budget, mix = meta["budget"], meta["quant_mix"]
    by_rung = ", ".join(f"{sum(r == rung for r in mix.values())} {rung}" for rung in dict.fromkeys(mix.values())) or "none"
    sizes = [(folder / f).stat().st_size / 1024 for f in ("fp32.onnx", "plain.onnx", "mix.onnx")]
    latencies = p50_ms([folder / f for f in ("fp32.onnx", "plain.onnx", "mix.onnx")], data.x_test[:1])
    off = meta.get("macs_off_int8", {})
    return [
        name,
        f"{old:.1f}" if args.old else "-",
        f"{ranking:.1f}",
        f"{search:.1f}",
        f"{by_rung} ({'pass' if budget['passed'] else 'MISSED'})",
        f"{budget['accuracy_drop']:+.2f} / {budget['top1_agreement']:.4f} (plain {meta['plain_int8']['accuracy_drop']:+.2f} / "
        f"{meta['plain_int8']['top1_agreement']:.4f})",
        " / ".join(f"{rung} {100 * share:.1f}" for rung, share in off.items()) or "0",
        "/".join(f"{size:.0f}" for size in sizes),
        "/".join(f"{ms:.3f}" for ms in latencies),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=[spec.name for spec in list_models()] + ["resnet56"])
    parser.add_argument("--train-samples", type=int, default=6000, help="training images for the brief training")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=128, help="int8 calibration images")
    parser.add_argument("--outlier", type=float, default=40.0, help="resnet56's outlier channel factor")
    parser.add_argument("--no-old", dest="old", action="store_false", help="skip the old per-tensor ranking (slow on big models)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = load_dataset(DataConfig(), 10)
    print(
        f"test images {len(data.x_test)}; budget {BUDGET.max_accuracy_drop} points (McNemar p < {BUDGET.significance}), agreement >= 0.99"
    )
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory() as folder:
            rows.append(measure(name, data, args, Path(folder)))
        print("| " + " | ".join(rows[-1]) + " |", flush=True)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
