"""ExecuTorch .pte beside ONNX and TFLite on every bundled architecture: parity, int8 drop, delegation, p50.

Usage::

    .venv/bin/python scripts/bench_pte.py                         # every registered model, 2 threads
    .venv/bin/python scripts/bench_pte.py --models small_cnn vit_tiny --threads 1 --rounds 7

Each model is trained briefly (``--train-samples`` images, ``--epochs``), then exported the way
a build does it: fp32 .pte lowered to XNNPACK, int8 .pte through PT2E with the XNNPACK quantizer
inside the quantize stage's accuracy budget (0.5 top-1 points against the fp32 file, judged with McNemar's test;
layers the search left float: the ``float`` column), fp32 ONNX (+ onnxsim) and fp32 TFLite (litert-torch).

Columns: max abs logit error and top-1 agreement of each .pte against the PyTorch model on the
first ``--images`` test images; int8 top-1 drop against the fp32 .pte (points); the share of
operators XNNPACK took (fp32 / int8; the portable-kernel operators are listed under the table);
p50 latency of the four files, all opened in this one process with ``--threads`` threads
(onnxruntime intra-op threads, LiteRT interpreter threads with XNNPACK, ExecuTorch's thread pool)
through ``runner.py``'s own loaders, and timed in ``--rounds`` rounds of ``--iterations`` runs each,
the files taking turns, so all see the same moments of a shared machine. p50 is over all rounds.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from edgeprune.config import DataConfig, ExportConfig, QuantizeConfig
from edgeprune.data import load_dataset
from edgeprune.errors import StageError
from edgeprune.export.executorch import export_pte
from edgeprune.export.onnx import export_onnx
from edgeprune.export.tflite import convert_tflite
from edgeprune.models import create_model, list_models
from edgeprune.parity import artifact_logits, parity_report
from edgeprune.pte_runtime import xnnpack_threads
from edgeprune.quantization.budget import quantize_within_budget
from edgeprune.quantization.cost import open_run_once, p50_in_turns
from edgeprune.quantization.pte import PteQuantizer
from edgeprune.training import TrainSettings, predict_logits, top1_accuracy, train

HEADER = (
    "model", "fp32 max err", "fp32 agree", "int8 agree", "int8 drop", "float", "deleg fp32", "deleg int8",
    "p50 pte fp32", "p50 pte int8", "p50 onnx fp32", "p50 tflite fp32",
)  # fmt: skip
TIMED = ("pte_fp32", "pte_int8", "onnx_fp32", "tflite_fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=[spec.name for spec in list_models()])
    parser.add_argument("--images", type=int, default=512, help="test images for parity and the int8 drop")
    parser.add_argument("--train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calibration", type=int, default=64, help="int8 calibration images")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100, help="timed runs per file per round")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    data = load_dataset(DataConfig(), 10)
    print(f"threads {args.threads}; p50 in ms over {args.rounds} x {args.iterations} runs per file, files taking turns")
    print(" | ".join(HEADER))
    for name in args.models:
        try:
            row, note = measure(name, data, args)
        except StageError as error:  # an architecture ExecuTorch cannot take is a result too
            row, note = [name, "FAILED"] + ["-"] * (len(HEADER) - 2), str(error)
        print(" | ".join(row), flush=True)
        if note:
            print(f"  {name}: {note}", flush=True)  # under its row: a run cut short keeps it


def measure(name: str, data, args) -> tuple[list[str], str]:
    torch.manual_seed(0)
    settings = TrainSettings(args.epochs, 5e-3, 128, 0)
    model = train(create_model(name), data.x_train[: args.train_samples], data.y_train[: args.train_samples], settings).eval()
    images, labels = data.x_test[: args.images], data.y_test[: args.images]
    parent, example = predict_logits(model, images), torch.from_numpy(images[:1].copy())
    with tempfile.TemporaryDirectory() as scratch:
        files = {key: Path(scratch) / f"{key}.{key.split('_')[0]}" for key in TIMED}
        fp32 = export_pte(model, example, files["pte_fp32"])
        fp32_logits = artifact_logits(files["pte_fp32"], images)
        int8, int8_logits = quantize_pte(
            model, example, data.calibration_batches(args.calibration, seed=0), files["pte_int8"], fp32_logits, images, labels
        )
        export_onnx(model, example, files["onnx_fp32"], ExportConfig())
        convert_tflite(model, example, files["tflite_fp32"])
        p50 = paired_p50(files, args.threads, args.rounds, args.iterations)
    fp32_parity = parity_report(parent, fp32_logits, labels)
    row = [name, f"{fp32_parity['max_abs_error']:.1e}", f"{fp32_parity['top1_agreement']:.4f}"]
    if int8_logits is None:
        row += ["FAILED", "-", "-", f"{fp32['delegated_share']:.3f}", "-"]
    else:
        drop = top1_accuracy(fp32_logits, labels) - top1_accuracy(int8_logits, labels)
        row += [f"{parity_report(parent, int8_logits, labels)['top1_agreement']:.4f}", f"{drop:+.2f}", str(len(int8["float_layers"]))]
        row += [f"{fp32['delegated_share']:.3f}", f"{int8['delegated_share']:.3f}"]
    row += [f"{p50[key]:.4f}" if key in p50 else "-" for key in TIMED]
    portable = {**fp32["portable_kernels"], **(int8 or {}).get("portable_kernels", {})}
    return row, ("portable kernels " + ", ".join(f"{op} x{count}" for op, count in portable.items())) if portable else ""


def quantize_pte(model, example, calibration, path: Path, fp32_logits, images, labels) -> tuple[dict | None, np.ndarray | None]:
    """The quantize stage's int8 .pte: the best mix its budget search finds (a missed budget is printed, and still measured)."""
    config = QuantizeConfig()
    quantizer = PteQuantizer(model, example, calibration, config)
    try:
        logits, meta = quantize_within_budget("pte_int8", "pte_fp32", quantizer, path, fp32_logits, images, labels, config)
    finally:
        quantizer.close()
    if not meta["budget"]["passed"]:
        print(f"  int8 {meta['budget']['verdict']}", flush=True)
    return meta, logits


def paired_p50(files: dict[str, Path], threads: int, rounds: int, iterations: int) -> dict[str, float]:
    """p50 (ms) of each file opened with runner.py's loaders in this process, timed in turns."""
    loops = {key: open_run_once(path, threads) for key, path in files.items() if path.exists()}
    with xnnpack_threads(threads):  # ExecuTorch's pool is process-wide: sized once for both .pte files
        return p50_in_turns(loops, dict.fromkeys(loops, iterations), rounds, warmup=10)


if __name__ == "__main__":
    main()
