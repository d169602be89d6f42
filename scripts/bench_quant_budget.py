"""The int8 accuracy-budget search, old and new, on the bundled architectures and a ResNet-56-size model.

Usage::

    .venv/bin/python scripts/bench_quant_budget.py                              # every registered model + resnet56
    .venv/bin/python scripts/bench_quant_budget.py --models small_cnn resnet56
    .venv/bin/python scripts/bench_quant_budget.py --models resnet56 --model-cache /tmp/qb   # train once, rerun in seconds

Run from the repository root with ``PYTHONPATH=.`` (``resnet56`` comes from ``tests/zoo``).

Each model is trained briefly on the bundled Fashion-MNIST data (or its weights are read from
``--model-cache``, written there by an earlier run) and exported to ONNX. The quantization settings
are the ``[quantize]`` section of the ``--target`` profile (default ``cpu-x86``: uint8 activations,
what onnxruntime's x86 kernels run fused).
``resnet56`` is the clean-room CIFAR ResNet-56 of the test corpus (``tests.zoo.resnets:resnet56_a``:
option-A shortcuts, 3 stages x 9 basic blocks at 16/32/64 channels) whose trained weights are
rescaled, function-preserving, so every ``--outlier-every``-th block's first activation carries one
channel ``--outlier`` times the others (ReLU commutes with a positive scale; the next conv reads that
channel as much weaker): what makes plain per-tensor int8 miss. Budget: 0.5 top-1 points against
fp32 on the test split (a larger drop passes only while McNemar's paired test, p >= 0.05, calls it
noise); ``--agreement 0.99`` adds the 99 % top-1 agreement gate.

Columns: ``old s`` the previous search's ranking, one onnxruntime session per tensor (each
tensor's effect alone on the logits), which that search ran once per round: measured on the first
``--old-tensors`` tensors and scaled to all of them (``~``), or measured whole with ``--old-tensors 0``;
``rank s`` the two-run ranking; ``search s`` the whole new search (calibration, plain int8 and every
candidate included); ``rounds`` the candidates built after plain int8, and how many of them were only
screened (run on the test images they were likeliest to change and dropped there, never judged
whole); the rungs and tensors the search changed; drop / agreement against fp32 (and plain int8's);
MACs in 16-bit or float layers; size and p50 (``edgeprune.quantization.cost``, what a build records:
in-process, 1 thread, 1 image, the three files timed in turns) of fp32, plain int8 and the searched
artefact.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from pathlib import Path

import torch

from edgeprune.config import DataConfig, ExportConfig
from edgeprune.data import load_dataset
from edgeprune.export.onnx import export_onnx
from edgeprune.models import create_model, list_models
from edgeprune.parity import artifact_logits
from edgeprune.progress import Reporter
from edgeprune.quant_sensitivity import onnx_activations, onnx_rounded_tensors, onnx_tensor_noise
from edgeprune.quantization.budget import quantize_within_budget
from edgeprune.quantization.cost import mix_cost_figures
from edgeprune.quantization.onnx import SENSITIVITY_SAMPLES, OnnxQuantizer
from edgeprune.targets import resolve_config
from edgeprune.training import TrainSettings, train
from tests.zoo.resnets import CifarResNetA, resnet56_a

COLUMNS = (
    "model", "old s", "rank s", "search s", "rounds (screened)", "mix", "drop/agree", "MACs off %", "KiB fp32/int8/mix",
    "p50 ms fp32/int8/mix",
)  # fmt: skip


def add_outliers(model: CifarResNetA, factor: float, every: int) -> int:
    """Every ``every``-th block: one channel of bn1's output ``factor`` x larger, conv2 reading it ``factor`` x weaker.

    Returns the number of blocks changed. The model computes the same function in float.
    """
    blocks = [block for stage in (model.layer1, model.layer2, model.layer3) for block in stage][::every]
    with torch.no_grad():
        for block in blocks:
            block.bn1.weight[0] *= factor
            block.bn1.bias[0] *= factor
            block.conv2.weight[:, 0] /= factor
    return len(blocks)


def old_ranking_seconds(quantizer: OnnxQuantizer, plain: Path, tensors: int) -> tuple[float, bool]:
    """Seconds of the previous ranking pass (one session per tensor); scaled from the first ``tensors`` when > 0."""
    start = time.monotonic()
    images = quantizer.calibration[:SENSITIVITY_SAMPLES]
    rounded = onnx_rounded_tensors(quantizer.prepared, plain, onnx_activations(quantizer.prepared, images))
    names = list(rounded)
    subset = names if tensors <= 0 or tensors >= len(names) else names[:tensors]
    setup = time.monotonic() - start
    start = time.monotonic()
    onnx_tensor_noise(quantizer.prepared, {name: rounded[name] for name in subset}, images)
    per_tensor = (time.monotonic() - start) / max(len(subset), 1)
    return setup + per_tensor * len(names), len(subset) < len(names)


def trained(name: str, data, args) -> torch.nn.Module:
    """The model after its brief training, or its weights from ``--model-cache`` when an earlier run left them there."""
    torch.manual_seed(0)
    model = resnet56_a() if name == "resnet56" else create_model(name, 10, 1, 28)
    cached = Path(args.model_cache) / f"{name}-{args.train_samples}x{args.epochs}.pt" if args.model_cache else None
    if cached is not None and cached.is_file():
        model.load_state_dict(torch.load(cached, weights_only=True))
        return model.eval()
    settings = TrainSettings(epochs=args.epochs, lr=1e-2, batch_size=64, seed=0)
    train(model, data.x_train[: args.train_samples], data.y_train[: args.train_samples], settings)
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cached)
    return model.eval()


def measure(name: str, data, args, folder: Path) -> list[str]:
    model = trained(name, data, args)
    if name == "resnet56":
        add_outliers(model, args.outlier, args.outlier_every)
    fp32 = folder / "fp32.onnx"
    export_onnx(model, torch.from_numpy(data.x_test[:1].copy()), fp32, ExportConfig())
    fp32_logits = artifact_logits(fp32, data.x_test)
    budget = quantize_config(args)
    quantizer = OnnxQuantizer(fp32, data.calibration_batches(args.calibration, 0), budget, folder)
    try:
        quantizer.quantize(folder / "plain.onnx", {})
        old, scaled = old_ranking_seconds(quantizer, folder / "plain.onnx", args.old_tensors) if args.old else (0.0, False)
        ranking = time.monotonic()
        quantizer.tensor_errors()
        ranking = time.monotonic() - ranking
        (folder / "calibration-minmax.json").unlink(missing_ok=True)  # the search calibrates from scratch, as a build does
        search = time.monotonic()
        _, meta = quantize_within_budget(
            f"{name}/int8", "fp32", quantizer, folder / "mix.onnx", fp32_logits, data.x_test, data.y_test, budget, Reporter()
        )
        search = time.monotonic() - search
    finally:
        quantizer.close()
    return row(name, meta, folder, (old, scaled) if args.old else None, ranking, search)


def quantize_config(args):
    overrides = (f"quantize.min_top1_agreement={args.agreement}", f"quantize.max_search_seconds={args.max_search_seconds}")
    return resolve_config(args.target, overrides=overrides).quantize


def row(name: str, meta: dict, folder: Path, old: tuple[float, bool] | None, ranking: float, search: float) -> list[str]:
    budget, mix = meta["budget"], meta["quant_mix"]
    by_rung = ", ".join(f"{sum(r == rung for r in mix.values())} {rung}" for rung in dict.fromkeys(mix.values())) or "none"
    cost = mix_cost_figures({key: folder / f"{key}.onnx" for key in ("fp32", "plain", "mix")}, seconds=6.0)
    latencies = cost["latency_p50_ms"] or {}
    rounds = meta.get("search", {}).get("rounds", [])[1:]
    off = meta.get("macs_off_int8", {})
    plain = meta["plain_int8"]
    return [
        name,
        "-" if old is None else f"{'~' if old[1] else ''}{old[0]:.1f}",
        f"{ranking:.1f}",
        f"{search:.1f}",
        f"{len(rounds)} ({sum('screened_images' in item for item in rounds)})",
        f"{by_rung} ({'pass' if budget['passed'] else 'MISSED'})",
        f"{budget['accuracy_drop']:+.2f} / {budget['top1_agreement']:.4f} "
        f"(plain {plain['accuracy_drop']:+.2f} / {plain['top1_agreement']:.4f})",
        " / ".join(f"{rung} {100 * share:.1f}" for rung, share in off.items()) or "0",
        "/".join(f"{size / 1024:.0f}" for size in cost["size_bytes"].values()),
        "/".join(f"{latencies[key]:.3f}" for key in latencies) or "-",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=[spec.name for spec in list_models()] + ["resnet56"])
    parser.add_argument("--train-samples", type=int, default=6000, help="training images for the brief training")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--model-cache", default=None, help="folder for the trained weights: read when there, written when not")
    parser.add_argument("--target", default="cpu-x86", help="the profile whose [quantize] settings the search uses")
    parser.add_argument("--calibration", type=int, default=128, help="int8 calibration images")
    parser.add_argument("--outlier", type=float, default=40.0, help="resnet56's outlier channel factor")
    parser.add_argument("--outlier-every", type=int, default=6, help="resnet56: every n-th block gets an outlier channel")
    parser.add_argument("--agreement", type=float, default=0.0, help="quantize.min_top1_agreement (0: reported, not gated)")
    parser.add_argument("--max-search-seconds", type=float, default=300.0)
    parser.add_argument("--old-tensors", type=int, default=16, help="old ranking timed on this many tensors, scaled (0: all)")
    parser.add_argument("--no-old", dest="old", action="store_false", help="skip timing the old per-tensor ranking")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = load_dataset(DataConfig(), 10)
    budget = quantize_config(args)
    print(
        f"test images {len(data.x_test)}; {args.target}: {budget.activation_type} activations, {budget.calibration} calibration; "
        f"budget {budget.max_accuracy_drop} points (McNemar p < {budget.significance}), "
        f"agreement >= {args.agreement:g}; search limit {args.max_search_seconds:g} s"
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
