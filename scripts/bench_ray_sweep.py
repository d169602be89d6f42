#!/usr/bin/env python3
"""Local executor vs Ray for a pruning sensitivity sweep, measured side by side in one run.

The sweep has the shape of ``edgeprune analyze`` without its latency probes: every prunable
layer group of a bundled model (a Torch-Pruning DepGraph group rooted at a conv layer), pruned
alone at each ratio on a fresh copy (lowest-L2 filters first) and evaluated on the test split.
The same points run through ``LocalExecutor`` (this process, one after another) and through a
Ray runtime (``RayExecutor``); the script checks both give the same accuracies, then prints
the Ray start-up, each sweep's wall time and local / Ray.

Honest expectations: on a two-core machine the gain is small or negative. Ray's workers start
cold (each imports torch), and every task runs with the driver's torch thread count (so a
build computes the same weights wherever it runs), so two tasks on two cores oversubscribe
them. The point of the Ray path is scaling out: ``--ray-address`` sends the same points to a
cluster's CPUs.

Usage (from the repository root)::

    python scripts/bench_ray_sweep.py                          # small_cnn, ratios 0.25 0.5 0.75, local Ray on all cores
    python scripts/bench_ray_sweep.py --model resnet_mini --num-cpus 2
    python scripts/bench_ray_sweep.py --ray-address auto       # an existing cluster sharing this checkout
    python scripts/bench_ray_sweep.py --analyze                # the real ``edgeprune analyze`` (cpu-x86, latency
                                                               # probes included) through both executors

With ``--analyze`` each layer group is one task that exports, evaluates and times its candidates;
the timings take turns under the device lock, so only the export/evaluate part runs in parallel.

Needs Ray (``pip install 'edgeprune[ray]'``). Exit codes: 0 done, 1 the executors disagreed,
2+ an edgeprune error.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

try:
    import edgeprune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from edgeprune.config import DataConfig
from edgeprune.data import load_dataset
from edgeprune.errors import EdgepruneError
from edgeprune.executors import LocalExecutor, RayExecutor, sweep
from edgeprune.models import create_model
from edgeprune.training import TrainSettings, evaluate, train


def prune_and_evaluate(point: tuple[str, float], state: dict[str, torch.Tensor], model_name: str, images, labels) -> float:
    """Top-1 (%) of the model with ``ratio`` of layer ``point[0]``'s output channels (and their group) removed."""
    import torch_pruning as tp

    layer, ratio = point
    model = create_model(model_name)
    model.load_state_dict(state)
    model.eval()
    root = model.get_submodule(layer)
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.from_numpy(images[:1]))
    weakest = root.weight.detach().flatten(1).norm(dim=1).argsort()[: round(root.out_channels * ratio)]
    graph.get_pruning_group(root, tp.prune_conv_out_channels, idxs=weakest.tolist()).prune()
    return evaluate(model, images, labels)


def conv_layers(model: nn.Module) -> list[str]:
    """Conv layers that root a group of their own: not depthwise (pruned with the layer feeding them)."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Conv2d) and module.groups == 1]


def timed(action):
    started = time.perf_counter()
    result = action()
    return result, time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn", help="a bundled model (edgeprune.models.list_models())")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--train-epochs", type=int, default=1, help="train the model first so accuracies mean something")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray runtime (default: all)")
    parser.add_argument("--ray-address", default=None, help="an existing Ray cluster instead of a local runtime")
    parser.add_argument("--analyze", action="store_true", help="time api.analyze (cpu-x86, this --model) instead of the bare sweep")
    args = parser.parse_args(argv)
    if args.analyze:
        return compare_analyze(args)

    data = load_dataset(DataConfig(), 10)
    torch.manual_seed(0)
    model = create_model(args.model)
    train(model, data.x_train, data.y_train, TrainSettings(args.train_epochs, 5e-3, 128, seed=0))
    points = [(layer, ratio) for layer in conv_layers(model) for ratio in args.ratios]
    evaluate_point = functools.partial(
        prune_and_evaluate, state=model.state_dict(), model_name=args.model, images=data.x_test, labels=data.y_test
    )
    print(
        f"{args.model}: {len(points)} points ({len(conv_layers(model))} layers x {len(args.ratios)} ratios), "
        f"top-1 unpruned {evaluate(model, data.x_test, data.y_test):.2f} %, torch threads {torch.get_num_threads()}"
    )

    local, local_s = timed(lambda: sweep(evaluate_point, points, LocalExecutor()))
    ray_executor, startup_s = timed(lambda: RayExecutor(args.ray_address, args.num_cpus))
    try:
        cold, cold_s = timed(lambda: sweep(evaluate_point, points, ray_executor))
        warm, warm_s = timed(lambda: sweep(evaluate_point, points, ray_executor))
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        ray_executor.close()

    rows = [
        ("local (in-process, sequential)", local_s, "1.00"),
        (f"ray, {cpus} CPUs, first sweep (workers start)", cold_s, f"{local_s / cold_s:.2f}"),
        (f"ray, {cpus} CPUs, second sweep (warm)", warm_s, f"{local_s / warm_s:.2f}"),
    ]
    print(f"\nray start-up: {startup_s:.1f} s (not in the sweep times)\n")
    print(f"| {'executor':<44} | {'wall s':>7} | {'local / this':>12} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 14}|")
    for name, seconds, ratio in rows:
        print(f"| {name:<44} | {seconds:7.2f} | {ratio:>12} |")
    same = np.allclose(local, cold) and np.allclose(local, warm)
    largest = float(np.max(np.abs(np.subtract(local, cold)))), float(np.max(np.abs(np.subtract(local, warm))))
    print(f"\nsame accuracies from every executor: {same} (max |diff| {max(largest):.3g} points)")
    return 0 if same else 1


def compare_analyze(args: argparse.Namespace) -> int:
    """``edgeprune analyze`` local vs Ray on one shared cache (the baseline is trained once, before either is timed)."""
    import tempfile
    from pathlib import Path

    from edgeprune import api
    from edgeprune.progress import Reporter

    with tempfile.TemporaryDirectory(prefix="bench_ray_analyze.") as folder:
        options = dict(
            model=f"example:{args.model}",
            overrides=(f"train.epochs={args.train_epochs}", "benchmark.repeats=2", "benchmark.iterations=100"),
            cache_dir=Path(folder) / "cache",
            ratios=tuple(args.ratios),
            reporter=Reporter(verbosity=0),
        )
        api.analyze("cpu-x86", out=Path(folder) / "warmup", **{**options, "ratios": (0.5,)})  # trains and caches the baseline
        local, local_s = timed(lambda: api.analyze("cpu-x86", out=Path(folder) / "local", **options))
        remote, ray_s = timed(
            lambda: api.analyze("cpu-x86", out=Path(folder) / "ray", executor="ray", ray_address=args.ray_address, **options)
        )

    def accuracies(result) -> list[float]:
        return [row["accuracy"] for group in result.data["groups"] for row in group["results"]]

    groups = len(local.data["groups"])
    print(f"edgeprune analyze --target cpu-x86, example:{args.model}: {groups} groups x {len(args.ratios)} ratios")
    print(f"| {'executor':<44} | {'wall s':>7} | {'local / this':>12} |")
    print(f"|{'-' * 46}|{'-' * 9}|{'-' * 14}|")
    print(f"| {'local':<44} | {local_s:7.2f} | {'1.00':>12} |")
    print(f"| {'ray (start-up included)':<44} | {ray_s:7.2f} | {local_s / ray_s:12.2f} |")
    same = accuracies(local) == accuracies(remote)
    print(f"\nsame accuracies from both executors: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except EdgepruneError as error:
        print(f"bench_ray_sweep: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
