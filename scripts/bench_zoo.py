"""Build every third-party-style corpus architecture (tests/zoo) from its wild checkpoint and print one row each.

Usage (from the repository root)::

    PYTHONPATH=. .venv/bin/python scripts/bench_zoo.py                          # the whole corpus, cpu-x86
    PYTHONPATH=. .venv/bin/python scripts/bench_zoo.py --models resnet20_a vgg --epochs 3 --train-images 6000

Each architecture is trained (``--epochs`` on the first ``--train-images`` of ``--data``, by default the bundled
Fashion-MNIST subset; tested on the first ``--test-images`` of its test split), saved in
the checkpoint layout the corpus gives it (legacy pickle, CUDA-tagged tensors, EMA wrapper, safetensors ...), and
built for ``--target`` through ``edgeprune.api.build`` exactly as ``edgeprune build --model --weights --data`` does.
Columns: the checkpoint format and how many adaptations loading it took; layer groups pruned / kept whole (and
residual blocks removed); MACs dense / pruned; the onnxruntime speed-up of the pruned fp32 and int8 files over the
dense fp32 export (paired in one process by the benchmark stage); top-1 before → after; parity of every exported
artefact; the int8 budget; whether the pruned model converts to TFLite (litert-torch); the build's budgets (what its
exit code says) and, with ``--set prune.speedup=X``, whether the speed-up search reached X (removing residual blocks
where the rounding or a channel shuffle keeps every layer group whole).

It then prunes the option-A ResNet-56 with plain Torch-Pruning (``MagnitudePruner``, no guard) and prints
what happens to the model: the dependency graph does not see the pad shortcut's hard-coded channel counts.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgeprune import api
from edgeprune.budgets import shipped_speedup_meets
from edgeprune.data import EXAMPLE_DATA
from edgeprune.errors import EdgepruneError
from edgeprune.export.tflite import try_litert
from edgeprune.modelio import load_model
from edgeprune.progress import Reporter
from tests.zoo import load_zoo
from tests.zoo.resnets import resnet56_a
from tests.zoo.trained import train_and_save, write_subset

HEADER = (
    "model",
    "loads (format)",
    "groups pruned / whole",
    "MACs",
    "ORT speed-up",
    "top-1 before → after",
    "parity",
    "int8",
    "TFLite",
    "budgets",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="corpus names (default: all)")
    parser.add_argument("--target", default="cpu-x86")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=3000)
    parser.add_argument("--test-images", type=int, default=1000)
    parser.add_argument("--data", type=Path, default=EXAMPLE_DATA, help=".npz with x_train, y_train, x_test, y_test")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="extra build settings")
    args = parser.parse_args()
    zoo = load_zoo()
    names = args.models or sorted(zoo)
    print(plain_torch_pruning_on_resnet56(), end="\n\n", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-zoo-") as scratch:
        folder = Path(scratch)
        data = write_subset(folder / "subset.npz", args.train_images, args.test_images, args.data)
        print("| " + " | ".join(HEADER) + " |")
        print("|" + "---|" * len(HEADER))
        for name in names:
            checkpoint = train_and_save(zoo[name], data, folder, epochs=args.epochs)
            print("| " + " | ".join(corpus_row(name, zoo[name].source, checkpoint, data, args, folder)) + " |", flush=True)


def corpus_row(name: str, source: str, checkpoint: Path, data: Path, args: argparse.Namespace, folder: Path) -> list[str]:
    try:
        result = api.build(
            args.target,
            model=source,
            weights=str(checkpoint),
            data=str(data),
            overrides=tuple(args.overrides),
            out=folder / f"out-{name}",
            cache_dir=folder / "cache",
            reporter=Reporter(verbosity=0),
        )
    except EdgepruneError as error:
        return [name, f"FAILED: {error}"] + ["-"] * (len(HEADER) - 2)
    manifest = result.manifest
    return [name, *manifest_cells(manifest), tflite_cell(result.out / "model.pt", manifest), budget_cell(result)]


def budget_cell(result: api.BuildResult) -> str:
    """The build's budgets (the exit code a CI job would see) and, with ``prune.speedup``, the search's verdict."""
    pruned = next(stage for stage in result.manifest["stages"] if stage["name"] == "prune_structured")["metrics"]
    search, verdict = pruned.get("speed_search"), ""
    if search is not None:
        shipped = shipped_speedup_meets(result.manifest, search["target"])
        state = "reached" if search["reached"] else "reached by the shipped file" if shipped else "NOT reached"
        verdict = f"speed-up {search['target']:g}x {state} (search {search['measured_speedup']:.2f}x, {search['accuracy_drop']:+.2f} pt); "
    if not result.violations:
        return verdict + "met"
    return verdict + "; ".join(f"{violation.kind}: {violation.message[:120]}" for violation in result.violations)


def manifest_cells(manifest: dict[str, Any]) -> list[str]:
    model, accuracy = manifest["model"], manifest["accuracy"]
    pruned = next(stage for stage in manifest["stages"] if stage["name"] == "prune_structured")["metrics"]
    moved = sum(1 for ratio in pruned["group_ratios"].values() if ratio > 0)
    whole = len(model.get("left_unpruned", []))
    checkpoint = model["checkpoint"]
    exported = [entry for entry in manifest["artifacts"].values() if "parity" in entry]
    parity = "ok" if exported and all(entry["parity"].get("top1_agreement", 0) > 0 for entry in exported) else "-"
    budgets = [entry["budget"] for entry in manifest["artifacts"].values() if "budget" in entry]
    int8 = ", ".join(f"{budget['accuracy_drop']:+.2f} pt (≤ {budget['max_accuracy_drop']:g})" for budget in budgets) or "-"
    speedups = manifest["speedups"]
    measured = " / ".join(f"{name.split('_', 1)[1]} {speedups[name]:.2f}x" for name in ("onnx_fp32", "onnx_int8") if name in speedups)
    blocks = len(model.get("blocks_removed", []))
    return [
        f"{checkpoint['format']} ({len(checkpoint['adapted'])} adapted)",
        f"{moved} / {whole}" + (f" + {blocks} blocks" if blocks else ""),
        f"{model['macs_dense'] / 1e6:.1f}M → {model['macs'] / 1e6:.1f}M ({model['macs_dense'] / max(model['macs'], 1):.2f}x)",
        measured or "-",
        f"{accuracy['baseline']:.2f} → {accuracy['primary']:.2f} %",
        parity,
        int8,
    ]


def tflite_cell(model_file: Path, manifest: dict[str, Any]) -> str:
    """Whether the pruned model (the build's model.pt) converts with litert-torch, the android profile's converter."""
    if not model_file.is_file():
        return "-"
    model = load_model(model_file)
    with tempfile.TemporaryDirectory() as scratch:
        failure = try_litert(model, torch.zeros(manifest["preprocessing"]["input_shape"]), Path(scratch) / "model.tflite")
    return "converts" if not failure else f"fails: {failure[:80]}"


def plain_torch_pruning_on_resnet56() -> str:
    """Torch-Pruning's MagnitudePruner at 50 % on the option-A ResNet-56, without edgeprune's guard."""
    import torch_pruning as tp

    torch.manual_seed(0)
    model = resnet56_a().eval()
    example = torch.randn(2, 1, 28, 28)
    line = "plain Torch-Pruning MagnitudePruner (pruning_ratio 0.5) on resnet56_a (option A): "
    try:
        pruner = tp.pruner.MagnitudePruner(
            model, example[:1], importance=tp.importance.MagnitudeImportance(p=2), pruning_ratio=0.5, ignored_layers=[model.linear]
        )
        pruner.step()
    except Exception as error:  # the point of the row: what Torch-Pruning does on this graph
        return line + f"pruning raises {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    try:
        with torch.no_grad():
            logits = model(example)
    except Exception as error:
        return line + f"the pruned model crashes: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
    return line + f"the pruned model runs (output {tuple(logits.shape)}); compare its accuracy before trusting it"


if __name__ == "__main__":
    main()
