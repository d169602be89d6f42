"""What a matrix build saves: the targets built together (one cache) vs each alone (its own cache).

Usage:
    .venv/bin/python scripts/bench_matrix.py                                   # android, rpi5, cpu-x86, bundled example
    .venv/bin/python scripts/bench_matrix.py --target android --target cpu-x86 \\
        --model tests.user_models:tiny_cnn --weights tiny.pt --set finetune.epochs=1

Every run starts from an empty cache in a temporary folder, so the bundled example trains its
baseline in each (about a minute on two cores). Prints, per target and in total, the stages that
ran (not served from the cache) and the wall-clock seconds of both ways, measured in this one run,
then whether both ways produced the same artefacts (sha256).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeprune import api  # noqa: E402
from edgeprune.progress import SILENT  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", action="append", help="repeatable (default: android, rpi5, cpu-x86)")
    parser.add_argument("--model")
    parser.add_argument("--weights")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    targets = args.target or ["android", "rpi5", "cpu-x86"]
    options = dict(overrides=tuple(args.overrides), model=args.model, weights=args.weights, reporter=SILENT)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        matrix = api.build_matrix(targets, out=root / "matrix", cache_dir=root / "matrix-cache", **options)
        matrix_total = time.perf_counter() - started
        if matrix.failures:
            raise SystemExit(f"matrix build failed: {matrix.failures}")
        started = time.perf_counter()
        alone = {
            target: api.build(target, out=root / "alone" / target, cache_dir=root / f"cache-{target}", **options) for target in targets
        }
        alone_total = time.perf_counter() - started
    print_table(targets, {build.target: build.manifest for build in matrix.builds}, {t: b.manifest for t, b in alone.items()})
    print(f"\nwall-clock: matrix {matrix_total:.1f} s, targets alone {alone_total:.1f} s ({alone_total / matrix_total:.2f}× longer)")
    return 0


def ran(manifest: dict) -> list[str]:
    return [stage["name"] for stage in manifest["stages"] if not stage["cached"]]


def stage_seconds(manifest: dict) -> float:
    return sum(stage["seconds"] for stage in manifest["stages"])


def print_table(targets: list[str], matrix: dict[str, dict], alone: dict[str, dict]) -> None:
    print("| target | stages run, matrix | stages run, alone | stage seconds, matrix | stage seconds, alone | same artefacts |")
    print("|---|---:|---:|---:|---:|---|")
    for target in targets:
        together, single = matrix[target], alone[target]
        same = all(entry["sha256"] == single["artifacts"][name]["sha256"] for name, entry in together["artifacts"].items())
        row = f"{len(ran(together))} | {len(ran(single))} | {stage_seconds(together):.1f} | {stage_seconds(single):.1f}"
        print(f"| {target} | {row} | {'yes' if same else 'NO'} |")
    runs = [sum(len(ran(side[t])) for t in targets) for side in (matrix, alone)]
    seconds = [sum(stage_seconds(side[t]) for t in targets) for side in (matrix, alone)]
    print(f"| total | {runs[0]} | {runs[1]} | {seconds[0]:.1f} | {seconds[1]:.1f} | |")


if __name__ == "__main__":
    sys.exit(main())
