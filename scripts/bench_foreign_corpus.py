#!/usr/bin/env python3
"""Benchmark every file of the foreign-artefact corpus with ``edgeprune bench`` and print a Markdown table.

Each file of ``tests/fixtures/foreign/corpus.json`` (see scripts/make_foreign_artefacts.py) is run through
``python -m edgeprune bench FILE --json`` in its own process, as a user would; a file the runtime refuses shows
the one line ``edgeprune bench`` printed. Columns: file, who made it, whether it loads, p50 (ms), the measuring
process's peak memory, the model's share of it, LiteRT's own tensor figure (MiB)::

    python scripts/bench_foreign_corpus.py [--iterations 50] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "foreign"


def bench(path: Path, entry: dict, args: argparse.Namespace) -> tuple[dict | None, str]:
    """(edgeprune bench's JSON, "") or (None, its one-line error)."""
    command = [sys.executable, "-m", "edgeprune", "bench", str(path), "--json", "--iterations", str(args.iterations)]
    command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
    command += [arg for shape in entry["shapes"] for arg in ("--shape", shape)]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if completed.returncode != 0:
        return None, (completed.stderr.strip().splitlines() or ["(no message)"])[-1]
    return json.loads(completed.stdout), ""


def row(name: str, entry: dict, result: dict | None, error: str) -> str:
    if result is None:
        return f"| {name} | {entry['made_by']} | no: {error.replace('|', '/')} | | | | |"

    def mb(key: str) -> str:
        return "-" if result.get(key) is None else f"{result[key]:.1f}" if result[key] >= 1 else f"{result[key]:.3f}"

    memory = " | ".join(mb(key) for key in ("peak_rss_mb", "model_memory_mb", "runtime_memory_mb"))
    return f"| {name} | {entry['made_by']} | yes | {result['latency_p50_ms']:.3f} | {memory} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    entries = json.loads((CORPUS / "corpus.json").read_text())
    print(f"machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python {platform.python_version()}")
    print("| file | made by | loads | p50 ms | peak MiB | model MiB | runtime MiB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for name, entry in entries.items():
        print(row(name, entry, *bench(CORPUS / name, entry, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
