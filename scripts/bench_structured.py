"""Structured pruning, measured: MAC reduction against the speed-up onnxruntime and LiteRT really deliver.

Usage (from the repository root):

    .venv/bin/python scripts/bench_structured.py
    .venv/bin/python scripts/bench_structured.py --models small_cnn,resnet_mini --speedup-models small_cnn
    .venv/bin/python scripts/bench_structured.py --help

Table 1, for each reference architecture (``edgeprune.models.list_models()``), each ``--round-to`` and each
``--drop-blocks`` count: the dense baseline is trained on the bundled Fashion-MNIST subset; that many residual
blocks are removed first (depth pruning: the ones whose removal alone costs least top-1, as
``prune.drop_block_count`` ranks them; ``all`` = every removable block; counts the model does not have are
skipped), the uniform pruning ratio whose overall MAC reduction is closest to ``--mac-target`` is picked,
and the build prunes, finetunes (distilled) and exports
ONNX and TFLite; its benchmark stage then measures the pruned and the dense fp32 exports (``--threads``
threads, ``--repeats`` fresh processes each; p50 = median of the per-process medians) and the speed-up
from ``--repeats`` processes that time pruned and dense in alternation, iteration by iteration (the
median of their p50 ratios: a shared machine's noise hits both alike). realized/MAC = that speed-up /
MAC reduction.

Table 2, for ``--speedup-models``: the latency-aware mode (``prune.speedup``) with uniform per-group
ratios against ratios guided by ``edgeprune analyze`` (``prune.ratios_from``), with the same finetune
budget (no recovery between steps, ``--finetune-epochs`` after): the measured speed-up at the last
step, the benchmark stage's independent re-measurement, and top-1 before/after on the test split.

Table 3, for ``--pareto-models``: the same comparison at equal measured speed-up. Uniform plans are
built at ``--pareto-levels`` (``prune.amount``) and sensitivity-guided ones at ``--pareto-guided-levels``,
each finetuned ``--finetune-epochs``; then every plan's export is timed beside the dense export, the plans
in turn, ``--repeats`` rounds (a slow spell of a shared machine falls on all of them). Top-1 at
``--speedup`` is read off each plan's accuracy/speed-up curve by linear interpolation between the two
levels around it (blank when its levels do not bracket it): the loop of table 2 stops at the first
step past the target, which may be further past it for one plan than the other.

Channel multiples matter: onnxruntime's x86 kernels use NCHWc blocks of 16 channels with AVX-512 (8
with AVX2); a width off that multiple makes it wrap layers in layout reorders that eat the gain.

Stage results are cached in ``--cache-dir``, so a rerun re-measures without retraining. The machine
may be shared: every figure is a median over repeats, measured side by side, and printed as measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from edgeprune import api  # noqa: E402
from edgeprune.errors import StageError  # noqa: E402
from edgeprune.progress import Reporter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated reference architectures of table 1 (default: all registered; '' to skip)")
    parser.add_argument("--speedup-models", default="small_cnn,resnet_mini", help="architectures for table 2 ('' to skip)")
    parser.add_argument("--mac-target", type=float, default=2.0, help="MAC reduction of the uniform builds (default 2.0)")
    parser.add_argument("--round-to", default="16,8", help="prune.round_to values of table 1; table 2 uses the first (default 16,8)")
    parser.add_argument("--drop-blocks", default="0", help="table 1's residual blocks removed first: counts or 'all' (default 0)")
    parser.add_argument("--pareto-models", default="", help="architectures for table 3 (default '' = skip)")
    parser.add_argument("--pareto-levels", default="0.3,0.4,0.5,0.6", help="table 3's uniform prune.amount levels")
    parser.add_argument(
        "--pareto-guided-levels",
        default="0.4,0.6,0.8,0.95",
        help="table 3's sensitivity-guided prune.amount levels (weights below 1 hold groups back: higher ones)",
    )
    parser.add_argument("--speedup", type=float, default=2.5, help="prune.speedup of table 2 (default 2.5)")
    parser.add_argument("--speedup-step", type=float, default=0.05, help="prune.speedup_step (default 0.05)")
    parser.add_argument("--epochs", type=int, default=4, help="baseline training epochs (default 4)")
    parser.add_argument("--finetune-epochs", type=int, default=2, help="finetune epochs after pruning (default 2)")
    parser.add_argument("--train-samples", type=int, default=0, help="training images (default 0 = all 6000)")
    parser.add_argument("--seed", type=int, default=0, help="build seed: training, finetuning, pruning data (default 0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5, help="benchmark processes per artefact (default 5)")
    parser.add_argument("--iterations", type=int, default=1000, help="timed runs per process (default 1000)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--cache-dir", type=Path, default=REPO / ".edgeprune-cache")
    parser.add_argument("--out", type=Path, default=REPO / "dist" / "bench_structured")
    return parser.parse_args(argv)


def common_overrides(args: argparse.Namespace, round_to: int) -> tuple[str, ...]:
    return (
        f"seed={args.seed}",
        f"train.epochs={args.epochs}",
        f"data.train_samples={args.train_samples}",
        f"finetune.epochs={args.finetune_epochs}",
        "quantize.scheme='none'",
        f"prune.round_to={round_to}",
        "budgets.max_accuracy_drop=0",
        "benchmark.enabled=true",
        f"benchmark.threads={args.threads}",
        f"benchmark.repeats={args.repeats}",
        f"benchmark.iterations={args.iterations}",
        f"benchmark.warmup={args.warmup}",
    )


def amount_for_mac_target(name: str, target: float, round_to: int, blocks: list[str]) -> float:
    """The uniform level whose MAC reduction (with ``blocks`` removed first) is closest to ``target``, found on the
    (untrained) architecture itself; 0 when removing the blocks reaches it."""
    from edgeprune.depth_pruning import drop_blocks
    from edgeprune.models import create_model, example_input
    from edgeprune.training import count_macs_params

    dense, example = create_model(name).eval(), example_input(name)
    shallower = drop_blocks(dense, blocks)
    remaining = target * count_macs_params(shallower, example)["macs"] / count_macs_params(dense, example)["macs"]
    if remaining <= 1.0:
        return 0.0
    level, _ = uniform_level_for_mac_target(shallower, example, remaining, round_to)
    return level


def blocks_to_drop(name: str, args: argparse.Namespace, round_to: int, count: str) -> list[str] | None:
    """The residual blocks a build of ``name`` removes for ``count`` ('all', or that many ranked as ``prune.drop_block_count``
    ranks them: a build with nothing else to do); None when the model has fewer removable blocks."""
    from edgeprune.depth_pruning import residual_blocks
    from edgeprune.models import create_model, example_input
    from edgeprune.pruning import protected_layers

    config = api.resolve("cpu-x86", overrides=common_overrides(args, round_to), model=f"example:{name}")
    model = create_model(name).eval()
    candidates = residual_blocks(model, example_input(name, batch=4), protected_layers(model, config.prune.ignored_layers, 10))
    if count == "all":
        return candidates
    if int(count) == 0:
        return []
    if int(count) > len(candidates):
        return None
    nothing_else = ("export.formats=[]", "benchmark.enabled=false", "finetune.epochs=0", "prune.amount=0")
    manifest = build(name, args, round_to, *nothing_else, f"prune.drop_block_count={count}", tag=f"blocks{count}")
    return [row["block"] for row in stage_metrics(manifest, "prune_structured")["depth"]["blocks"]]


def uniform_level_for_mac_target(model: Any, example: Any, target: float, round_to: int) -> tuple[float, Any]:
    """The uniform ``prune.amount`` whose MAC reduction of ``model`` (guarded, as the build prunes) is closest to ``target``,
    and ``model`` pruned to it."""
    import torch

    from edgeprune.config import PruneConfig
    from edgeprune.pruning import Guard, guarded_prune, layer_groups, protected_layers
    from edgeprune.pruning_plan import GroupPlan
    from edgeprune.training import count_macs_params

    config = PruneConfig(round_to=round_to)
    protected = protected_layers(model, (), 10)
    analysis = layer_groups(model, example, config, protected)
    groups, protected = analysis.groups, analysis.protected(protected)
    guard = Guard(torch.randn(4, *example.shape[1:], generator=torch.Generator().manual_seed(0)), 10)
    plan = GroupPlan.from_config(groups, config)
    dense = count_macs_params(model, example)["macs"]

    def pruned_at(level: float) -> Any:  # guarded, as the build prunes: a group whose coupling breaks the model stays whole
        return guarded_prune(model, config, protected, groups, plan.targets(level, config.round_to), guard).model

    def reduction(level: float) -> float:
        return dense / count_macs_params(pruned_at(level), example)["macs"]

    low, high = 0.0, 0.9
    for _ in range(7):  # the reduction grows with the level, in steps (round_to)
        middle = (low + high) / 2
        low, high = (middle, high) if reduction(middle) < target else (low, middle)
    level = round(min((low, high), key=lambda level: abs(reduction(level) - target)), 4)
    return level, pruned_at(level)


def build(name: str, args: argparse.Namespace, round_to: int, *overrides: str, tag: str) -> dict[str, Any]:
    result = api.build(
        "cpu-x86",
        model=f"example:{name}",
        overrides=common_overrides(args, round_to) + overrides,
        out=args.out / f"{name}-{tag}",
        cache_dir=args.cache_dir,
        reporter=Reporter(verbosity=0),
    )
    return result.manifest


def stage_metrics(manifest: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(entry["metrics"] for entry in manifest["stages"] if entry["name"] == stage)


def uniform_row(name: str, args: argparse.Namespace, round_to: int, blocks: list[str]) -> dict[str, Any]:
    amount = amount_for_mac_target(name, args.mac_target, round_to, blocks)
    depth = (f"prune.drop_blocks={json.dumps(blocks)}",) if blocks else ()
    tag = f"uniform{round_to}" + (f"-depth{len(blocks)}" if blocks else "")
    manifest = build(name, args, round_to, "export.formats=['onnx', 'tflite']", f"prune.amount={amount}", *depth, tag=tag)
    results = stage_metrics(manifest, "benchmark")["results"]
    macs = manifest["model"]["macs_dense"] / manifest["model"]["macs"]
    row = {"model": name, "round_to": round_to, "blocks": len(blocks), "amount": amount, "macs": macs}
    row["before"] = manifest["accuracy"]["baseline"]
    row["after"] = manifest["artifacts"]["onnx_fp32"]["accuracy"]
    row["untracked"] = len(stage_metrics(manifest, "prune_structured")["untracked_coupling"])
    paired = stage_metrics(manifest, "benchmark")["speedups"]
    for fmt in ("onnx", "tflite"):
        dense, pruned = results[f"{fmt}_fp32_dense"]["latency_p50_ms"], results[f"{fmt}_fp32"]["latency_p50_ms"]
        row[fmt] = {"dense": dense, "pruned": pruned, "speedup": paired[f"{fmt}_fp32"], "spread": results[f"{fmt}_fp32"]["p50_spread_pct"]}
    return row


def analysis_path(name: str, args: argparse.Namespace, round_to: int) -> tuple[Path, float]:
    """``edgeprune analyze`` of ``name`` on onnxruntime with this run's settings: its sensitivity.json and the seconds it took."""
    from edgeprune.analysis import run_analysis

    config = api.resolve("cpu-x86", overrides=common_overrides(args, round_to) + ("export.formats=['onnx']",), model=f"example:{name}")
    started = time.perf_counter()
    analysis = run_analysis(config, out=args.out / f"{name}-analysis", cache_dir=args.cache_dir, reporter=Reporter(verbosity=0))
    return analysis.json_path, time.perf_counter() - started


def pareto_rows(name: str, args: argparse.Namespace, round_to: int, analysis: Path) -> list[dict[str, Any]]:
    """Uniform builds of ``name`` at ``--pareto-levels`` and sensitivity-guided ones (``analysis``) at ``--pareto-guided-levels``:
    MACs, top-1 after finetuning, and the speed-up of each against the dense export, all timed together
    (``interleaved_speedups``) so the machine's slow and fast spells are shared by every plan."""
    untimed = ("export.formats=['onnx']", "benchmark.enabled=false")
    dense = build(name, args, round_to, *untimed, "prune.mode='none'", tag="dense")
    plans = [("uniform", level, ()) for level in map(float, args.pareto_levels.split(","))]
    plans += [("sensitivity", level, (f"prune.ratios_from='{analysis}'",)) for level in map(float, args.pareto_guided_levels.split(","))]
    rows, paths = [], []
    for mode, level, extra in plans:
        tag = f"pareto-{mode}-{level:g}"
        manifest = build(name, args, round_to, *untimed, f"prune.amount={level}", *extra, tag=tag)
        paths.append(args.out / f"{name}-{tag}" / manifest["artifacts"]["onnx_fp32"]["file"])
        macs = manifest["model"]["macs_dense"] / manifest["model"]["macs"]
        row = {"model": name, "mode": mode, "level": level, "macs": macs, "before": manifest["accuracy"]["baseline"]}
        rows.append({**row, "after": manifest["artifacts"]["onnx_fp32"]["accuracy"]})
    dense_path = args.out / f"{name}-dense" / dense["artifacts"]["onnx_fp32"]["file"]
    for row, (speedup, spread) in zip(rows, interleaved_speedups(dense_path, paths, args), strict=True):
        row.update(speedup=speedup, spread=spread)
    return rows


def interleaved_speedups(dense: Path, candidates: list[Path], args: argparse.Namespace) -> list[tuple[float, list[float]]]:
    """Per candidate: the median and range of ``--repeats`` paired speed-ups against ``dense`` (one process times both in
    alternation), the candidates taken in turn each round, so a spell of a shared machine falls on all of them."""
    from edgeprune.runtimes import BenchSettings, benchmark_pair, paired_speedup

    settings = BenchSettings(threads=args.threads, warmup=args.warmup, iterations=args.iterations, repeats=1)
    ratios: list[list[float]] = [[] for _ in candidates]
    for _ in range(args.repeats):
        for index, candidate in enumerate(candidates):
            ratios[index].append(paired_speedup(benchmark_pair(dense, candidate, "local", settings)))
    return [(statistics.median(values), [min(values), max(values)]) for values in ratios]


def accuracy_at_speedup(rows: list[dict[str, Any]], speedup: float) -> float | None:
    """Top-1 at ``speedup`` on the curve through ``rows`` (one plan's levels, ordered by measured speed-up), linearly
    interpolated between the two points around it; None when no two points bracket it."""
    points = sorted((row["speedup"], row["after"]) for row in rows)
    for (low_speedup, low_top1), (high_speedup, high_top1) in itertools.pairwise(points):
        if low_speedup <= speedup <= high_speedup:
            share = (speedup - low_speedup) / (high_speedup - low_speedup) if high_speedup > low_speedup else 0.0
            return low_top1 + share * (high_top1 - low_top1)
    return None


def speedup_rows(name: str, args: argparse.Namespace, round_to: int, analysis: Path, analysis_seconds: float) -> list[dict[str, Any]]:
    """The latency-aware builds of ``name``, uniform and guided by ``analysis`` (its seconds count towards the guided row's)."""
    latency = (
        "export.formats=['onnx']",
        f"prune.speedup={args.speedup}",
        f"prune.speedup_step={args.speedup_step}",
        "prune.recover_epochs=0",  # the same finetune budget for both: finetune.epochs after the last step
    )
    rows = []
    for mode, extra in (("uniform", ()), ("sensitivity", (f"prune.ratios_from='{analysis}'",))):
        started = time.perf_counter()
        try:
            manifest = build(name, args, round_to, *latency, *extra, tag=f"speedup-{mode}")
        except StageError as error:  # the target is out of reach or the accuracy budget broke: a measured result too
            rows.append({"model": name, "mode": mode, "error": str(error), "seconds": time.perf_counter() - started})
            continue
        trajectory = stage_metrics(manifest, "prune_structured")["trajectory"]
        rows.append(
            {
                "model": name,
                "mode": mode,
                "steps": len(trajectory) - 1,
                "macs": manifest["model"]["macs_dense"] / manifest["model"]["macs"],
                "loop_speedup": trajectory[-1]["speedup"],
                "bench_speedup": manifest["speedups"]["onnx_fp32"],
                "before": manifest["accuracy"]["baseline"],
                "after": manifest["artifacts"]["onnx_fp32"]["accuracy"],
                "seconds": time.perf_counter() - started + (analysis_seconds if mode == "sensitivity" else 0.0),
            }
        )
    return rows


def print_tables(tables: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    uniform, latency, pareto = tables["uniform"], tables["latency"], tables["pareto"]
    print(f"\n## Uniform pruning to ~{args.mac_target:g}x fewer MACs, fp32, {args.threads} threads, p50 of {args.repeats} processes\n")
    print(
        "| model | round_to | blocks removed | ratio | MACs ↓ | ORT dense / pruned ms | ORT speed-up | ORT realized/MAC "
        "| LiteRT dense / pruned ms | LiteRT speed-up | LiteRT realized/MAC | top-1 before → after | groups left out |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in uniform:
        cells = [row["model"], str(row["round_to"]), str(row["blocks"]), f"{row['amount']:.3f}", f"{row['macs']:.2f}x"]
        for fmt in ("onnx", "tflite"):
            result = row[fmt]
            realized = result["speedup"] / row["macs"]
            cells += [f"{result['dense']:.4f} / {result['pruned']:.4f}", f"{result['speedup']:.2f}x", f"{realized:.2f}"]
        cells += [f"{row['before']:.2f} → {row['after']:.2f} %", str(row["untracked"])]
        print("| " + " | ".join(cells) + " |")
    round_to = args.round_to.split(",")[0]
    if latency:
        print_speedup_table(latency, args, round_to)
    if pareto:
        print_pareto_table(pareto, args, round_to)


def print_speedup_table(latency: list[dict[str, Any]], args: argparse.Namespace, round_to: str) -> None:
    print(
        f"\n## prune.speedup={args.speedup:g} on onnxruntime ({args.threads} threads, round_to {round_to}): "
        f"uniform vs sensitivity-guided group ratios, {args.finetune_epochs} finetune epochs each\n"
    )
    print("| model | group ratios | steps | MACs ↓ | speed-up (loop) | re-measured (benchmark stage) | top-1 before → after | drop | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in latency:
        if "error" in row:
            print(f"| {row['model']} | {row['mode']} | {row['error']} |")
            continue
        cells = [row["model"], row["mode"], str(row["steps"]), f"{row['macs']:.2f}x", f"{row['loop_speedup']:.2f}x"]
        cells += [f"{row['bench_speedup']:.2f}x", f"{row['before']:.2f} → {row['after']:.2f} %", f"{row['before'] - row['after']:.2f}"]
        print("| " + " | ".join([*cells, f"{row['seconds']:.0f}"]) + " |")


def print_pareto_table(pareto: list[dict[str, Any]], args: argparse.Namespace, round_to: str) -> None:
    print(
        f"\n## Top-1 at equal measured speed-up on onnxruntime ({args.threads} threads, round_to {round_to}): uniform vs "
        f"sensitivity-guided plans, {args.finetune_epochs} finetune epochs each, speed-ups timed together\n"
    )
    print("| model | group ratios | prune.amount | MACs ↓ | measured speed-up (range) | top-1 before → after |")
    print("|---|---|---:|---:|---:|---:|")
    for row in pareto:
        spread = f"{row['speedup']:.2f}x ({row['spread'][0]:.2f}–{row['spread'][1]:.2f})"
        cells = [row["model"], row["mode"], f"{row['level']:g}", f"{row['macs']:.2f}x", spread]
        print("| " + " | ".join([*cells, f"{row['before']:.2f} → {row['after']:.2f} %"]) + " |")
    print(f"\n| model | group ratios | top-1 at {args.speedup:g}x (interpolated) |\n|---|---|---:|")
    for name in dict.fromkeys(row["model"] for row in pareto):
        for mode in ("uniform", "sensitivity"):
            rows = [row for row in pareto if row["model"] == name and row["mode"] == mode]
            top1 = accuracy_at_speedup(rows, args.speedup)
            nearest = min(rows, key=lambda row: abs(row["speedup"] - args.speedup))
            unbracketed = f"not bracketed: the nearest level measured {nearest['speedup']:.2f}x at {nearest['after']:.2f} %"
            print(f"| {name} | {mode} | {unbracketed if top1 is None else f'{top1:.2f} %'} |")


def main(argv: list[str] | None = None) -> int:
    """Measure everything asked for; Ctrl-C prints the tables of what was measured so far."""
    from edgeprune.models import list_models

    args = parse_args(argv)
    names = [spec.name for spec in list_models()] if args.models is None else list(filter(None, args.models.split(",")))
    round_tos = [int(value) for value in args.round_to.split(",")]
    tables: dict[str, list[dict[str, Any]]] = {"uniform": [], "latency": [], "pareto": []}
    uniform, latency, pareto = tables["uniform"], tables["latency"], tables["pareto"]
    analyses: dict[str, tuple[Path, float]] = {}  # one analysis per model serves tables 2 and 3

    def analysis_of(name: str) -> tuple[Path, float]:
        if name not in analyses:
            analyses[name] = analysis_path(name, args, round_tos[0])
        return analyses[name]

    try:
        for name in names:
            for round_to, count in itertools.product(round_tos, filter(None, args.drop_blocks.split(","))):
                started = time.perf_counter()
                blocks = blocks_to_drop(name, args, round_to, count)
                if blocks is None or (count == "all" and not blocks):
                    continue  # the model has fewer removable blocks
                uniform.append(uniform_row(name, args, round_to, blocks))
                save_rows(args.out, tables)
                seconds = time.perf_counter() - started
                print(f"{name}: uniform, round_to {round_to}, {count} blocks: {seconds:.0f} s", file=sys.stderr, flush=True)
        for name in filter(None, args.speedup_models.split(",")):
            latency.extend(speedup_rows(name, args, round_tos[0], *analysis_of(name)))
            save_rows(args.out, tables)
            print(f"{name}: latency-aware builds measured", file=sys.stderr, flush=True)
        for name in filter(None, args.pareto_models.split(",")):
            pareto.extend(pareto_rows(name, args, round_tos[0], analysis_of(name)[0]))
            save_rows(args.out, tables)
            print(f"{name}: equal-speed-up builds measured", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted: the tables hold what was measured so far", file=sys.stderr)
    print_tables(tables, args)
    return 0


def save_rows(out: Path, tables: dict[str, list[dict[str, Any]]]) -> None:
    """Every row measured so far, as JSON in ``out``, so a long run's figures survive an interruption."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(tables, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    raise SystemExit(main())
