"""How much of a MAC reduction onnxruntime turns into speed, by model width and ``prune.round_to``.

Usage (from the repository root):

    .venv/bin/python scripts/bench_width_efficiency.py
    .venv/bin/python scripts/bench_width_efficiency.py --widths 32,64,128 --round-to auto,16,32 --repeats 5

For each ResNet width triple (``--widths``, ``;``-separated: the reference ``resnet_wide`` is 32,64,128, a CIFAR
ResNet-20's compute) and each ``--round-to``, the uniform ``prune.amount`` closest to ``--mac-target`` fewer MACs
is found as ``bench_structured.py`` finds it, the dense and pruned models are exported to ONNX the way the build
exports them, and ``--repeats`` processes each time both in alternation on one shared thread pool (the runner's
paired mode). It prints MAC reduction, measured speed-up (median of the per-process ratios), realized/MAC, and
the fixed per-inference cost that would explain the shortfall if the rest scaled with MACs
(``(d - p * r) / (1 - r)`` for dense and pruned p50 ``d``, ``p`` and MAC reduction ``r``; negative when the
pruned layers run faster per MAC than the dense ones).

A second table sets, per width triple, the ``round_to`` that measured fastest here beside what
``prune.round_to = "auto"`` derives on this machine (its vector width: 16 with AVX-512, 8 with AVX2), so the
profile's "auto" is checked against the machine at hand. ``auto`` in ``--round-to`` stands for that value.

Latency does not depend on the weights' values, so the models are untrained: this measures the runtime, not
accuracy (``bench_structured.py`` has both). The machine may be shared: figures are medians of paired processes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_structured import uniform_level_for_mac_target  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="32,64,128;64,128,256;96,192,384", help="ResNet stage widths, ';' between models")
    parser.add_argument("--round-to", default="auto,8,16,64", help="prune.round_to values; auto: this host's (default auto,8,16,64)")
    parser.add_argument("--mac-target", type=float, default=2.0, help="MAC reduction to prune to (default 2.0)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="paired processes per model (default 3)")
    parser.add_argument("--iterations", type=int, default=300, help="timed runs of each model per process (default 300)")
    parser.add_argument("--warmup", type=int, default=20)
    return parser.parse_args(argv)


def measure(widths: tuple[int, ...], round_to: int, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """Prune a ResNet of ``widths`` uniformly to ~``--mac-target`` fewer MACs and time it beside the dense one."""
    import torch

    from edgeprune.config import ExportConfig
    from edgeprune.export.onnx import export_onnx
    from edgeprune.models.resnet import ResNetMini
    from edgeprune.runtimes import BenchSettings, benchmark_pair
    from edgeprune.speedup_search import pairs_summary
    from edgeprune.training import count_macs_params

    torch.manual_seed(0)
    model, example = ResNetMini(10, 1, widths).eval(), torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    level, pruned = uniform_level_for_mac_target(model, example, args.mac_target, round_to)
    stem = folder / f"{'-'.join(map(str, widths))}-r{round_to}"
    dense_path, pruned_path = stem.with_name(stem.name + "-dense.onnx"), stem.with_name(stem.name + "-pruned.onnx")
    export_onnx(model, example, dense_path, ExportConfig())
    export_onnx(pruned, example, pruned_path, ExportConfig())
    settings = BenchSettings(threads=args.threads, warmup=args.warmup, iterations=args.iterations, repeats=args.repeats)
    timing = pairs_summary(benchmark_pair(dense_path, pruned_path, "local", settings))
    dense_macs, pruned_macs = count_macs_params(model, example)["macs"], count_macs_params(pruned, example)["macs"]
    reduction, speedup = dense_macs / pruned_macs, timing["speedup"]
    dense_ms, pruned_ms = timing["dense_p50_ms"], timing["latency_p50_ms"]
    return {
        "level": level,
        "dense_mmacs": dense_macs / 1e6,
        "reduction": reduction,
        "dense_ms": dense_ms,
        "pruned_ms": pruned_ms,
        "speedup": speedup,
        "fixed_us": 1000 * (dense_ms - pruned_ms * reduction) / (1 - reduction),
    }


def round_to_values(text: str, auto: int) -> list[int]:
    """``--round-to`` as distinct integers in order, ``auto`` replaced by this host's channel multiple."""
    values = [auto if value.strip() == "auto" else int(value) for value in text.split(",") if value.strip()]
    return list(dict.fromkeys(values))


def print_auto_against_best(rows: dict[tuple[int, ...], dict[int, dict[str, float]]], auto: int, reason: str) -> None:
    print(f'\n## prune.round_to = "auto" on this machine: {auto} ({reason}) against the fastest measured\n')
    print("| widths | fastest round_to | its speed-up | auto | auto's speed-up |")
    print("|---|---:|---:|---:|---:|")
    for widths, by_round_to in rows.items():
        best = max(by_round_to, key=lambda round_to: by_round_to[round_to]["speedup"])
        auto_speedup = f"{by_round_to[auto]['speedup']:.2f}x" if auto in by_round_to else "not measured"
        print(f"| {','.join(map(str, widths))} | {best} | {by_round_to[best]['speedup']:.2f}x | {auto} | {auto_speedup} |")


def main(argv: list[str] | None = None) -> int:
    from edgeprune.simd import host_channel_multiple

    args = parse_args(argv)
    host = host_channel_multiple()
    models = [tuple(int(width) for width in spec.split(",")) for spec in args.widths.split(";") if spec]
    round_tos = round_to_values(args.round_to, host.value)
    rows: dict[tuple[int, ...], dict[int, dict[str, float]]] = {}
    print(f"\n## Uniform pruning to ~{args.mac_target:g}x fewer MACs, ONNX fp32 on onnxruntime, {args.threads} threads\n")
    print("| widths | dense MMACs | round_to | prune.amount | MACs ↓ | dense / pruned ms | speed-up | realized/MAC | fixed µs |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory(prefix="edgeprune-width-") as folder:
        for widths in models:
            for round_to in round_tos:
                row = rows.setdefault(widths, {})[round_to] = measure(widths, round_to, args, Path(folder))
                cells = [",".join(map(str, widths)), f"{row['dense_mmacs']:.1f}", str(round_to), f"{row['level']:.3f}"]
                cells += [f"{row['reduction']:.2f}x", f"{row['dense_ms']:.3f} / {row['pruned_ms']:.3f}", f"{row['speedup']:.2f}x"]
                cells += [f"{row['speedup'] / row['reduction']:.3f}", f"{row['fixed_us']:.0f}"]
                print("| " + " | ".join(cells) + " |", flush=True)
    print_auto_against_best(rows, host.value, host.reason)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
