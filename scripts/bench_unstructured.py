#!/usr/bin/env python3
"""How small does unstructured sparsity + int8 make a model, and what does it cost in accuracy?

For every bundled reference architecture (or ``--models``) the script builds, through
``edgeprune.api.build`` and the stage cache, two variants of the ``size`` profile:

- **dense**: ``prune.mode = "none"``: the unpruned model as fp32 ONNX and as int8 ONNX;
- **sparse**: the ``size`` profile as shipped: 90 % sparsity ranked by LAMP scores across layers
  (``sparsity.scope = "lamp"``) reached with the cubic schedule during distilled finetuning, then
  int8 ONNX: per-channel int8 weights behind DequantizeLinear with float activations
  (``quantize.activation_type = "float"``), the remaining float constants stored float16
  (``quantize.float_constants``) and short internal names (``quantize.minify_names``).
  ``--set quantize.activation_type='int8' --set quantize.minify_names=false
  --set quantize.float_constants='float32'`` measures full int8 QDQ instead;
  ``--set sparsity.scope='global'`` one magnitude threshold across layers.

and prints one table, measured side by side in this run:

- ``sparsity``: fraction of zero conv/linear weights after finetuning;
- ``top-1 base`` / ``top-1 int8`` / ``drop``: Fashion-MNIST test split (2,000 images), the
  unpruned torch model vs the shipped sparse int8 ONNX file, in points;
- ``fp32 ONNX``: size of the **raw, uncompressed fp32 ONNX of the unpruned model**, the reference
  of every ratio;
- ``int8 gz``: gzip -9 of the dense int8 ONNX (quantization alone) and ``×`` its ratio;
- ``sparse int8 gz``: gzip -9 of the shipped sparse int8 ONNX and ``×`` its ratio (the target is
  ≥ 12× at ≤ 1.0 point drop); ``raw``: the same file uncompressed (zeros stored densely);
- ``sparse-init gz``: the same weights stored as ONNX ``sparse_initializer`` (values + int64 indices,
  densified by onnxruntime at load; the script checks the logits are identical), gzip -9.

With ``--tflite`` the sparse build also converts to full-integer int8 TFLite (litert-torch) and a
``tflite gz`` column shows its gzip size. litert-torch 0.10 cannot write TFLite sparse tensors (its
converter has no sparsity option), so TFLite stores the zeros densely too.

Usage (from the repository root)::

    python scripts/bench_unstructured.py                          # all bundled models (long on 2 cores)
    python scripts/bench_unstructured.py --models small_cnn resnet_mini --tflite
    python scripts/bench_unstructured.py --set finetune.epochs=4 --set sparsity.amount=0.85

Builds land in a temporary folder; the stage cache (``--cache-dir``, default ``.edgeprune-cache``)
makes a rerun cheap. A model whose build fails is listed under the table with the error; the exit
code is then that error's (2+), else 0.
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
from pathlib import Path

try:
    import edgeprune  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgeprune import api
from edgeprune.config import DataConfig
from edgeprune.data import load_dataset
from edgeprune.errors import EdgepruneError
from edgeprune.progress import Reporter

TARGET_RATIO, TARGET_DROP = 12.0, 1.0
COLUMNS = (
    ("model", 19),
    ("params", 7),
    ("sparsity", 8),
    ("top-1 base", 10),
    ("top-1 int8", 10),
    ("drop", 5),
    ("fp32 ONNX KiB", 13),
    ("int8 gz KiB", 11),
    ("×", 5),
    ("sparse int8 gz KiB", 18),
    ("×", 5),
    ("raw KiB", 7),
    ("sparse-init gz KiB", 18),
    ("tflite gz KiB", 13),
    ("target", 6),
)


def gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


def sparse_initializer_copy(source: Path, target: Path, min_elements: int = 256) -> None:
    """Rewrite every mostly-zero initializer of ``source`` as an ONNX SparseTensorProto (linear int64 indices)."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(str(source))
    dense = []
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.size < min_elements or (array == 0).mean() <= 0.5:
            dense.append(tensor)
            continue
        flat = array.reshape(-1)
        indices = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[indices], tensor.name)
        proto.graph.sparse_initializer.append(helper.make_sparse_tensor(values, numpy_helper.from_array(indices), list(array.shape)))
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(dense)
    onnx.save(proto, str(target))


def same_logits(first: Path, second: Path, images) -> bool:
    from edgeprune.parity import artifact_logits

    return bool((artifact_logits(first, images) == artifact_logits(second, images)).all())


def build(name: str, folder: Path, cache_dir: Path | None, overrides: tuple[str, ...]) -> tuple[dict, Path]:
    out = folder / name
    result = api.build(
        "size",
        model=f"example:{name}",
        overrides=("benchmark.enabled=false", *overrides),
        out=out,
        cache_dir=cache_dir,
        reporter=Reporter(verbosity=0),
    )
    return result.manifest, out


def measure(name: str, folder: Path, args: argparse.Namespace) -> dict:
    """Build the dense and the sparse variant of one model and measure the files."""
    dense, dense_out = build(name, folder / "dense", args.cache_dir, ("prune.mode='none'", *args.overrides))
    sparse_formats = "export.formats=['onnx','tflite']" if args.tflite else "export.formats=['onnx']"
    sparse, sparse_out = build(name, folder / "sparse", args.cache_dir, (sparse_formats, *args.overrides))
    stages = {stage["name"]: stage["metrics"] for stage in sparse["stages"]}
    sparsity = stages.get("finetune", stages.get("prune_unstructured", {})).get("global_sparsity", 0.0)
    reference = (dense_out / "model_fp32.onnx").stat().st_size
    shipped = sparse_out / "model_int8.onnx"
    rewritten = folder / f"{name}_sparse_initializer.onnx"
    sparse_initializer_copy(shipped, rewritten)
    images = load_dataset(DataConfig(), 10).x_test[:64]
    row = {
        "model": name,
        "params": int(dense["model"]["params_dense"]),
        "sparsity": sparsity,
        "top1_base": sparse["accuracy"]["baseline"],
        "top1_int8": sparse["artifacts"]["onnx_int8"]["accuracy"],
        "fp32": reference,
        "int8_gz": gzip_size(dense_out / "model_int8.onnx"),
        "sparse_gz": gzip_size(shipped),
        "sparse_raw": shipped.stat().st_size,
        "sparse_init_gz": gzip_size(rewritten) if same_logits(shipped, rewritten, images) else None,
        "tflite_gz": gzip_size(sparse_out / "model_int8.tflite") if args.tflite else None,
    }
    row["drop"] = row["top1_base"] - row["top1_int8"]
    return row


def print_table(rows: list[dict]) -> None:
    print(" | ".join(f"{title:>{width}}" for title, width in COLUMNS))
    print("-|-".join("-" * width for _, width in COLUMNS))
    for row in rows:
        met = row["sparse_gz"] * TARGET_RATIO <= row["fp32"] and row["drop"] <= TARGET_DROP
        cells = (
            row["model"],
            f"{row['params']:,}",
            f"{row['sparsity'] * 100:.1f} %",
            f"{row['top1_base']:.2f}",
            f"{row['top1_int8']:.2f}",
            f"{row['drop']:+.2f}",
            _kib(row["fp32"]),
            _kib(row["int8_gz"]),
            f"{row['fp32'] / row['int8_gz']:.1f}",
            _kib(row["sparse_gz"]),
            f"{row['fp32'] / row['sparse_gz']:.1f}",
            _kib(row["sparse_raw"]),
            _kib(row["sparse_init_gz"]),
            _kib(row["tflite_gz"]),
            "yes" if met else "no",
        )
        print(" | ".join(f"{cell:>{width}}" for cell, (_, width) in zip(cells, COLUMNS, strict=True)))
    print(f"\nratios (×) are against the raw fp32 ONNX of the unpruned model. Target: ≥ {TARGET_RATIO:g}× at ≤ {TARGET_DROP:g} point drop")


def _kib(size: int | None) -> str:
    return "-" if size is None else f"{size / 1024:.1f}"


def main(argv: list[str] | None = None) -> int:
    from edgeprune.models import list_models

    names = [spec.name for spec in list_models()]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=names, default=names, help="bundled architectures to measure (default: all)")
    parser.add_argument("--tflite", action="store_true", help="also convert the sparse model to int8 TFLite and show its gzip size")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="config override for both builds")
    parser.add_argument("--cache-dir", type=Path, default=None, help="stage cache (default: .edgeprune-cache or $EDGEPRUNE_CACHE_DIR)")
    args = parser.parse_args(argv)
    args.overrides = tuple(args.overrides)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="bench_unstructured.") as tmp:
        for name in args.models:
            print(f"building {name} ...", file=sys.stderr, flush=True)
            try:
                rows.append(measure(name, Path(tmp), args))
            except EdgepruneError as error:  # measure the others, then say which failed and why
                failures.append((name, error))
    print_table(rows)
    for name, error in failures:
        print(f"{name}: failed: {error}")
    return max((error.exit_code for _, error in failures), default=0)


if __name__ == "__main__":
    sys.exit(main())
