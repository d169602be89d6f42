"""The speed-up search (depth + width moves, per-device latency table) beside channel-only uniform pruning and plain
Torch-Pruning at the same MAC reduction, on a CIFAR ResNet-56 with option-A shortcuts and a CIFAR-size MobileNetV2.

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python scripts/bench_speed_search.py
    PYTHONPATH=. .venv/bin/python scripts/bench_speed_search.py --models resnet56_a --targets 2.0 --train-images 2000
    PYTHONPATH=. .venv/bin/python scripts/bench_speed_search.py --data ../shared/datasets/fashion-mnist/fashion-mnist.npz \
        --train-images 6000 --test-images 5000 --epochs 6 --checkpoints ~/.cache/edgeprune/bench-checkpoints

Each model is trained (``--epochs`` on the first ``--train-images`` of ``--data``, by default the bundled
Fashion-MNIST subset; tested on the first ``--test-images`` of its test split) and built for
``--target`` (cpu-x86: onnxruntime, 2 threads) through ``edgeprune.api.build`` with ``prune.speedup`` at each of
``--targets``, every row with the same finetune budget (``--finetune-epochs``, ``prune.recover_epochs = 1``).
Columns: the measured speed-up of the shipped model over the dense export (the benchmark stage's paired
measurement: one process timing both in alternation), top-1 drop after finetuning, residual blocks / channels
removed, the search's wall time (excluding the final finetune), the latency table's mean / largest prediction
error on the accepted steps, and the search's verdict. Beside each target: uniform channel-only pruning
(``prune.amount`` at the search's MAC reduction, the same finetune) and plain Torch-Pruning (``MagnitudePruner``,
no guard, its ratio at that MAC reduction, then the same number of finetune epochs, not distilled).
The machine may be shared: every speed-up is a median of paired processes.

A trained dense model is kept in ``--checkpoints`` (when given) under its model, data and training settings, and
reused by a later run with the same ones; ``--train-only`` trains (or finds) them and stops.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

from bench_structured import uniform_level_for_mac_target  # noqa: E402

from edgeprune import api  # noqa: E402
from edgeprune.artifacts import atomic_path  # noqa: E402
from edgeprune.cache import cache_key  # noqa: E402
from edgeprune.config import DataConfig, ExportConfig  # noqa: E402
from edgeprune.data import EXAMPLE_DATA, load_dataset  # noqa: E402
from edgeprune.export.onnx import export_onnx  # noqa: E402
from edgeprune.models import create_model  # noqa: E402
from edgeprune.progress import Reporter  # noqa: E402
from edgeprune.runtimes import BenchSettings, benchmark_pair, paired_speedup  # noqa: E402
from edgeprune.training import TrainSettings, count_macs_params, evaluate, train  # noqa: E402
from tests.zoo.resnets import resnet20_a, resnet56_a  # noqa: E402
from tests.zoo.trained import write_subset  # noqa: E402

MODELS = {
    "resnet56_a": ("tests.zoo.resnets:resnet56_a", resnet56_a),
    "mobilenetv2": ("example:mobilenetv2_cifar", None),
    "resnet20_a": ("tests.zoo.resnets:resnet20_a", resnet20_a),  # the same option-A design, 20 layers: a quicker run
}
HEADER = ("model", "method", "target", "MACs ↓", "measured speed-up", "top-1 drop", "blocks / channels removed", "search s", "table error")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["resnet56_a", "mobilenetv2"], choices=list(MODELS))
    parser.add_argument("--targets", nargs="*", type=float, default=[2.0, 2.5])
    parser.add_argument("--target", default="cpu-x86")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs of the dense model")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="finetune epochs after pruning, every row alike")
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--max-drop", type=float, default=1.0, help="budgets.max_accuracy_drop (points)")
    parser.add_argument("--data", type=Path, default=EXAMPLE_DATA, help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--checkpoints", type=Path, help="folder keeping the trained dense models for later runs")
    parser.add_argument("--train-only", action="store_true", help="train (or find) the dense models and stop")
    return parser.parse_args()


def factory(name: str) -> torch.nn.Module:
    source, make = MODELS[name]
    return make() if make else create_model(source.split(":", 1)[1], num_classes=10, in_channels=1, image_size=28)


def trained_checkpoint(name: str, data: Path, folder: Path, args: argparse.Namespace) -> Path:
    """The dense model trained on ``data``: found in ``--checkpoints`` when a run with the same settings kept it."""
    settings = TrainSettings(epochs=args.epochs, lr=1e-2, batch_size=64, seed=0)
    identity = [name, str(args.data.resolve()), args.train_images, args.test_images, settings.epochs, settings.lr, settings.batch_size]
    kept = args.checkpoints.expanduser() / f"{name}-{cache_key(identity)[:16]}.pt" if args.checkpoints else None
    if kept is not None and kept.is_file():
        print(f"{name}: trained model from {kept}", file=sys.stderr, flush=True)
        return kept
    torch.manual_seed(0)
    dataset = load_dataset(DataConfig(source=str(data)), num_classes=10)
    model = factory(name)
    train(model, dataset.x_train, dataset.y_train, settings, reporter=Reporter())
    print(f"{name}: trained, top-1 {evaluate(model, dataset.x_test, dataset.y_test):.2f} % on the test split", file=sys.stderr, flush=True)
    path = kept or folder / f"{name}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as partial:
        torch.save(model.state_dict(), partial)
    return path


def build(name: str, checkpoint: Path, data: Path, folder: Path, args: argparse.Namespace, *overrides: str) -> api.BuildResult:
    common = (
        f"finetune.epochs={args.finetune_epochs}",
        "prune.recover_epochs=1",
        "quantize.scheme='none'",
        "export.formats=['onnx']",
        "benchmark.repeats=3",
        "benchmark.iterations=100",
        f"budgets.max_accuracy_drop={args.max_drop}",
    )
    return api.build(
        args.target,
        model=MODELS[name][0],
        weights=str(checkpoint),
        data=str(data),
        overrides=common + overrides,
        out=folder / f"out-{name}-{abs(hash(overrides))}",
        cache_dir=folder / "cache",
        reporter=Reporter(verbosity=1),
    )


def prune_metrics(result: api.BuildResult) -> dict[str, Any]:
    return next(stage for stage in result.manifest["stages"] if stage["name"] == "prune_structured")["metrics"]


def build_cells(result: api.BuildResult) -> list[str]:
    manifest, metrics = result.manifest, prune_metrics(result)
    speedup = manifest["speedups"].get(manifest["primary_artifact"])
    accuracy = manifest["accuracy"]
    return [
        f"{metrics['mac_reduction']:.2f}x",
        "-" if speedup is None else f"{speedup:.2f}x",
        f"{accuracy['baseline'] - accuracy['primary']:.2f} pt",
    ]


def search_row(name: str, target: float, result: api.BuildResult) -> list[str]:
    metrics = prune_metrics(result)
    search, last = metrics["speed_search"], metrics["trajectory"][metrics["speed_search"]["step"]]
    error = search["prediction_error_pct"]
    table = "-" if error["mean_abs"] is None else f"{error['mean_abs']:.1f} % / {error['max_abs']:.1f} %"
    if error.get("paired_mean_abs") is not None:
        paired = f"{error['paired_mean_abs']:.1f} % / {error['paired_max_abs']:.1f} %"
        table += f" (speed-up: {paired}, {error['within_10_pct']} of {error['steps']} ≤ 10 %)"
    removed = f"{len(last.get('blocks_removed', []))} / {last.get('channels_removed', 0)}"
    cells = [name, "search (depth + width)", f"{target:g}x", *build_cells(result), removed, f"{search['search_seconds']:.0f}", table]
    return cells + [("reached" if search["reached"] else "NOT reached: " + search["verdict"][:160])]


def uniform_row(name: str, target: float, mac_reduction: float, checkpoint: Path, data: Path, folder: Path, args) -> list[str]:
    model = factory(name)
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    example = torch.zeros(1, 1, 28, 28)
    level, _ = uniform_level_for_mac_target(model.eval(), example, mac_reduction, round_to=16)
    result = build(name, checkpoint, data, folder, args, f"prune.amount={level:.4f}")
    return [name, f"uniform channels (amount {level:.3f})", f"{target:g}x", *build_cells(result), "0 / -", "-", "-", ""]


def torch_pruning_row(name: str, target: float, mac_reduction: float, checkpoint: Path, data: Path, folder: Path, args) -> list[str]:
    """Plain Torch-Pruning MagnitudePruner at ``mac_reduction`` (bisected ratio), finetuned alike, measured paired."""
    import torch_pruning as tp

    dense = factory(name)
    dense.load_state_dict(torch.load(checkpoint, weights_only=True))
    dense.eval()
    example, dataset = torch.zeros(1, 1, 28, 28), load_dataset(DataConfig(source=str(data)), num_classes=10)
    dense_macs = count_macs_params(dense, example)["macs"]
    head = [module for module in dense.modules() if isinstance(module, torch.nn.Linear) and module.out_features == 10]
    low, high, model, failure = 0.0, 0.9, None, ""
    for _ in range(8):
        ratio, candidate = (low + high) / 2, copy.deepcopy(dense)
        try:
            ignored = [dict(candidate.named_modules())[n] for n, m in dense.named_modules() if m in head]
            importance = tp.importance.MagnitudeImportance(p=2)
            tp.pruner.MagnitudePruner(candidate, example, importance=importance, pruning_ratio=ratio, ignored_layers=ignored).step()
            with torch.no_grad():
                candidate(torch.zeros(2, 1, 28, 28))
        except Exception as error:  # the point of the row: what plain Torch-Pruning does on this graph
            failure = f"crashes at ratio {ratio:.2f}: {type(error).__name__}: {str(error).splitlines()[0][:100]}"
            break
        model = candidate
        low, high = (ratio, high) if dense_macs / count_macs_params(candidate, example)["macs"] < mac_reduction else (low, ratio)
    if failure or model is None:
        return [name, "plain Torch-Pruning", f"{target:g}x", "-", "-", "-", "-", "-", "-", failure]
    before = evaluate(dense, dataset.x_test, dataset.y_test)
    train(model, dataset.x_train, dataset.y_train, TrainSettings(epochs=args.finetune_epochs, lr=3e-3, batch_size=128, seed=0))
    after = evaluate(model, dataset.x_test, dataset.y_test)
    export_onnx(dense, example, folder / f"tp-{name}-dense.onnx", ExportConfig())
    export_onnx(model.eval(), example, folder / f"tp-{name}.onnx", ExportConfig())
    pairs = benchmark_pair(
        folder / f"tp-{name}-dense.onnx", folder / f"tp-{name}.onnx", "local", BenchSettings(threads=2, iterations=100, repeats=3)
    )
    reduction = dense_macs / count_macs_params(model, example)["macs"]
    cells = [f"{reduction:.2f}x", f"{paired_speedup(pairs):.2f}x", f"{before - after:.2f} pt", "0 / -", "-", "-", ""]
    return [name, "plain Torch-Pruning", f"{target:g}x", *cells]


def control_row(name: str, checkpoint: Path, data: Path, folder: Path, args: argparse.Namespace) -> list[str]:
    """The unpruned model given the same finetune: how far the finetune alone moves top-1 on this data."""
    result = build(name, checkpoint, data, folder, args, "prune.amount=0.0")
    accuracy = result.manifest["accuracy"]
    drop = f"{accuracy['baseline'] - accuracy['primary']:.2f} pt"
    return [name, "unpruned, the same finetune (control)", "-", "1.00x", "-", drop, "-", "-", "-", ""]


def main() -> int:
    args = parse_args()
    print("| " + " | ".join(HEADER) + " | verdict |\n|" + "---|" * (len(HEADER) + 1), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-speed-search-") as scratch:
        folder = Path(scratch)
        data = write_subset(folder / "subset.npz", args.train_images, args.test_images, args.data)
        for name in args.models:
            checkpoint = trained_checkpoint(name, data, folder, args)
            if args.train_only:
                continue
            print("| " + " | ".join(control_row(name, checkpoint, data, folder, args)) + " |", flush=True)
            for target in args.targets:
                result = build(name, checkpoint, data, folder, args, f"prune.speedup={target}")
                print("| " + " | ".join(search_row(name, target, result)) + " |", flush=True)
                reduction = prune_metrics(result)["mac_reduction"]
                for row in (uniform_row, torch_pruning_row):
                    print("| " + " | ".join(row(name, target, reduction, checkpoint, data, folder, args)) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
