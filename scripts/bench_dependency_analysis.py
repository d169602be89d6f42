"""Dependency-analysis time per architecture: plain Torch-Pruning group construction against edgeprune's bounded analysis.

    python scripts/bench_dependency_analysis.py [--timeout 120] [--budget 120] [--baseline DIR] [example:NAME | package.module:factory ...]

With no names: every bundled architecture (``example:NAME``) and the public-style CIFAR ShuffleNetV2s in
``tests/shufflenet_public.py``. Each measurement runs in its own process, killed after ``--timeout`` seconds
(plain Torch-Pruning never finishes on a reshape-based channel shuffle). Prints one markdown row per model:
seconds and groups before and after (``edgeprune.dependency.dependency_analysis``: groups pruned, groups kept
whole). *Before* is ``edgeprune.pruning.layer_groups`` of an earlier edgeprune checked out in ``--baseline DIR``
(e.g. ``git archive <commit> | tar -x -C DIR``), or without it Torch-Pruning's own ``get_all_groups``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

DEFAULT_EXTRA = ("tests.shufflenet_public:shufflenet_v2_w05", "tests.shufflenet_public:shufflenet_v2_w10")


def build(source: str):
    import torch

    from edgeprune.config import ModelConfig
    from edgeprune.modelio import create_model
    from edgeprune.models import get_spec

    shape = get_spec(source.removeprefix("example:")).default_input_shape if source.startswith("example:") else (1, 28, 28)
    torch.manual_seed(0)
    return create_model(ModelConfig(source=source), shape).eval(), torch.randn(1, *shape)


def before(source: str, baseline: str) -> tuple[float, int, int]:
    """The earlier checkout's ``layer_groups`` (imported from ``baseline`` ahead of this tree), or plain Torch-Pruning."""
    import importlib
    import sys

    import torch
    import torch_pruning as tp

    if ":" in source and not source.startswith("example:"):
        importlib.import_module(source.partition(":")[0])  # the model's own module comes from this tree
    if baseline:
        sys.path.insert(0, baseline)
    model, example = build(source)
    start = time.perf_counter()
    if baseline:
        from edgeprune.config import PruneConfig
        from edgeprune.pruning import layer_groups

        groups = layer_groups(model, example, PruneConfig(), ())
    else:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
        groups = list(graph.get_all_groups(root_module_types=(torch.nn.Conv2d, torch.nn.Linear)))
    return time.perf_counter() - start, len(groups), 0


def bounded(source: str, budget: str) -> tuple[float, int, int]:
    from edgeprune.deadline import Budget
    from edgeprune.dependency import dependency_analysis

    model, example = build(source)
    start = time.perf_counter()
    analysis = dependency_analysis(model, example, (), Budget(float(budget)))
    return time.perf_counter() - start, len(analysis.groups), len(analysis.kept_whole)


def _child(function, source: str, setting: str, queue) -> None:
    queue.put(function(source, setting))


def timed(function, source: str, setting: str, timeout: float) -> str:
    """``seconds (groups[, kept whole])`` from a child process, or ``> timeout s (killed)``."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(function, source, setting, queue))
    process.start()
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        return f"> {timeout:g} s (killed, no result)"
    if process.exitcode != 0 or queue.empty():
        return f"failed (exit code {process.exitcode})"
    seconds, groups, kept = queue.get()
    return f"{seconds:.2f} s ({groups} groups" + (f", {kept} kept whole)" if function is bounded else ")")


def main() -> None:
    from edgeprune.models import list_models

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="example:NAME or package.module:factory (default: bundled + public ShuffleNetV2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds before a measurement's process is killed")
    parser.add_argument("--budget", type=float, default=120.0, help="prune.analysis_seconds for the bounded analysis")
    parser.add_argument("--baseline", default="", help="a checkout of an earlier edgeprune whose layer_groups is 'before'")
    args = parser.parse_args()
    sources = args.models or [f"example:{spec.name}" for spec in list_models()] + list(DEFAULT_EXTRA)
    label = f"before: layer_groups of {args.baseline}" if args.baseline else "before: Torch-Pruning get_all_groups"
    print(f"| model | {label} | after: dependency_analysis |")
    print("|---|---|---|")
    for source in sources:
        earlier = timed(before, source, args.baseline, args.timeout)
        after = timed(bounded, source, str(args.budget), args.timeout)
        print(f"| `{source}` | {earlier} | {after} |", flush=True)


if __name__ == "__main__":
    main()
