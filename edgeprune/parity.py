"""Run exported artefacts in-process and prove they compute what PyTorch computes.

``artifact_logits`` feeds the same preprocessed NCHW float32 images the torch
model saw and returns float logits: in chunks for an ONNX file with a dynamic
batch, transposed to NHWC for a TFLite file with channels-last input, and
quantized with the scale and zero-point stored in the file for int8 input;
an ExecuTorch .pte runs through ``executorch.runtime`` (``edgeprune.export.executorch``).
``parity_report`` compares logits with the parent's; ``check_parity`` holds them
to the per-precision tolerances of ``ParityConfig``:

| precision | checked against the parent (and, with ``reference``, the fp32 artefact) |
|---|---|
| fp32 | max abs error <= ``fp32_max_abs`` and top-1 agreement beyond near-ties >= ``fp32_min_top1_agreement`` |
| fp16 | max abs error <= ``fp16_max_abs`` and top-1 agreement beyond near-ties >= ``fp16_min_top1_agreement`` |
| int8 | top-1 agreement >= ``int8_min_top1_agreement`` (logit errors are expected) |

A near-tie is a changed prediction where the parent's own top two logits (its class and the artefact's) were
within ``NEAR_TIE_MARGIN[precision]`` of that image's logit range: rounding at that precision may flip it
without the artefact computing anything else. fp32/fp16 agreement is gated with those flips set aside, so
one near-tied image of a briefly trained model does not refuse a faithful file; ``top1_agreement`` (every
flip counted) and ``near_tie_flips`` are always reported. Any NaN or infinite logit fails every precision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np

from edgeprune.config import ParityConfig
from edgeprune.errors import ParityError
from edgeprune.pte_runtime import pte_logits

BATCH = 256  # chunk size for ONNX files with a dynamic batch dimension
Layout = Literal["NCHW", "NHWC"]
# the parent's top-two margin, as a fraction of the image's logit range, under which a changed prediction is a near-tie:
# float32 reordering errors are ~1e-6 of the logits' scale, float16 rounding ~1e-3 (2^-11 per operation, accumulated)
NEAR_TIE_MARGIN = {"fp32": 1e-3, "fp16": 1e-2}


def artifact_logits(path: Path, images: np.ndarray, threads: int = 2, layout: Layout | None = None) -> np.ndarray:
    """Float logits of an .onnx, .tflite or .pte artefact for NCHW float32 ``images``.

    ``layout`` is the artefact's input layout; None detects it from the file's
    input shape (see ``input_layout``). Raises ParityError when the file's input
    cannot take these images.
    """
    suffix = Path(path).suffix
    if suffix == ".onnx":
        return _onnx_logits(path, images, threads)
    if suffix == ".tflite":
        return _tflite_logits(path, images, threads, layout)
    if suffix == ".pte":
        return pte_logits(path, images, threads)
    raise ValueError(f"no in-process runner for {path}")


def _onnx_logits(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model_input = session.get_inputs()[0]
    _check_input_shape(path, model_input.shape[1:], images.shape[1:])
    fixed = isinstance(model_input.shape[0], int)
    batch = model_input.shape[0] if fixed else BATCH
    dtype = np.float16 if "float16" in model_input.type else np.float32
    outputs = []
    for start in range(0, len(images), batch):
        chunk = images[start : start + batch]
        padded = _pad_batch(chunk, batch) if fixed else chunk  # a fixed batch > 1 needs a full last chunk
        outputs.append(session.run(None, {model_input.name: padded.astype(dtype)})[0][: len(chunk)])
    return np.concatenate(outputs).astype(np.float32)


def _pad_batch(chunk: np.ndarray, batch: int) -> np.ndarray:
    if len(chunk) == batch:
        return chunk
    return np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])


def _check_input_shape(path: Path, model_shape: Any, image_shape: tuple[int, ...]) -> None:
    known = [(m, i) for m, i in zip(model_shape, image_shape, strict=False) if isinstance(m, (int, np.integer))]
    if len(model_shape) != len(image_shape) or any(m != i for m, i in known):
        raise ParityError(
            f"{Path(path).name}: input shape {list(model_shape)} does not take test images of shape {list(image_shape)} (check data.*)"
        )


def tflite_interpreter(path: Path, threads: int):
    """An Interpreter from ai_edge_litert, or tflite_runtime on devices that have that."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - only on boards with the old runtime
        from tflite_runtime.interpreter import Interpreter
    return Interpreter(model_path=str(path), num_threads=threads)


def _tflite_logits(path: Path, images: np.ndarray, threads: int, layout: Layout | None) -> np.ndarray:
    interpreter = tflite_interpreter(path, threads)
    input_detail = interpreter.get_input_details()[0]
    layout = layout or input_layout(path, input_detail["shape"], images.shape)
    samples = images.transpose(0, 2, 3, 1) if layout == "NHWC" else images
    _check_input_shape(path, list(input_detail["shape"][1:]), samples.shape[1:])
    interpreter.resize_tensor_input(input_detail["index"], [1, *input_detail["shape"][1:]])
    interpreter.allocate_tensors()
    input_detail, output_detail = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for sample in samples:
        interpreter.set_tensor(input_detail["index"], quantize_input(sample[None], input_detail))
        interpreter.invoke()
        outputs.append(dequantize_output(interpreter.get_tensor(output_detail["index"]), output_detail))
    return np.concatenate(outputs).astype(np.float32)


def input_layout(path: Path, model_shape: Any, images_shape: tuple[int, ...]) -> Layout:
    """Whether a file's input wants the NCHW ``images`` as they are or transposed to NHWC.

    Raises ParityError when the input shape takes neither, or both differently
    (C == H == W: pass ``layout`` explicitly then).
    """
    model = tuple(int(d) for d in model_shape[1:])
    nchw = tuple(images_shape[1:])
    nhwc = (*images_shape[2:], images_shape[1]) if len(images_shape) == 4 else None
    if model == nchw == nhwc:  # C == H == W
        raise ParityError(f"{Path(path).name}: input shape {list(model)} is ambiguous between NCHW and NHWC; pass layout explicitly")
    if model == nchw:
        return "NCHW"
    if model == nhwc:
        return "NHWC"
    raise ParityError(f"{Path(path).name}: input shape {list(model)} takes neither NCHW {list(nchw)} nor NHWC test images (check data.*)")


def quantize_input(sample: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """Float input → the tensor type the model wants (int8/uint8 via scale and zero-point)."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.floating):
        return sample.astype(dtype)
    scale, zero_point = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(sample / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize_output(values: np.ndarray, detail: dict[str, Any]) -> np.ndarray:
    """A TFLite tensor as float32: integer values on their (scale, zero-point) grid; an integer tensor without a grid
    (scale 0: indices, shapes) as it is."""
    if np.issubdtype(detail["dtype"], np.floating):
        return values.astype(np.float32)
    scale, zero_point = detail["quantization"]
    return (values.astype(np.float32) - zero_point) * scale if scale else values.astype(np.float32)


def parity_report(parent_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Max/mean abs error, top-1 agreement (fraction), sample and non-finite logit counts, and the flips that are
    near-ties at fp32 and at fp16 (``near_tie_flips``: ``{"fp32": n, "fp16": n}``).

    Both arrays are (samples, classes); non-finite logits make both errors infinite.
    """
    error = np.abs(parent_logits.astype(np.float64) - logits)
    nonfinite = int((~np.isfinite(logits)).sum())
    if nonfinite:
        error = np.full_like(error, np.inf)
    return {
        "max_abs_error": float(error.max()),
        "mean_abs_error": float(error.mean()),
        "top1_agreement": float((parent_logits.argmax(1) == logits.argmax(1)).mean()),
        "near_tie_flips": {precision: near_tie_flips(parent_logits, logits, margin) for precision, margin in NEAR_TIE_MARGIN.items()},
        "samples": int(len(labels)),
        "nonfinite": nonfinite,
    }


def near_tie_flips(parent_logits: np.ndarray, logits: np.ndarray, relative_margin: float) -> int:
    """Changed predictions where the parent's logits for its class and the artefact's class differ by at most
    ``relative_margin`` of that image's logit range (max - min)."""
    parent = parent_logits.astype(np.float64)
    ours, theirs = parent.argmax(1), logits.argmax(1)
    flipped = np.flatnonzero(ours != theirs)
    if flipped.size == 0:
        return 0
    margin = parent[flipped, ours[flipped]] - parent[flipped, theirs[flipped]]
    spread = parent[flipped].max(1) - parent[flipped].min(1)
    return int((margin <= relative_margin * spread).sum())


def agreement_beyond_near_ties(report: dict[str, Any], precision: str) -> float:
    """Top-1 agreement with the precision's near-tie flips counted as agreeing (reports without the count: as measured)."""
    ties = (report.get("near_tie_flips") or {}).get(precision, 0)
    return min(1.0, report["top1_agreement"] + ties / max(report["samples"], 1))


def check_parity(name: str, precision: str, report: dict[str, float], config: ParityConfig, against: str = "") -> None:
    """Raise ParityError naming the artefact, what it was compared with, the numbers and the knob."""
    versus = f" versus {against}" if against else ""
    where = f"{name}: {precision} parity failed{versus}"
    agreement, max_abs, samples = report["top1_agreement"], report["max_abs_error"], report["samples"]
    if report.get("nonfinite"):
        raise ParityError(f"{where}: {report['nonfinite']} NaN/inf logits on {samples} test images (the converter broke the model)")
    if precision == "int8":
        limit = config.int8_min_top1_agreement
        if agreement < limit:
            raise ParityError(
                f"{where}: top-1 agreement {agreement:.4f} < {limit} on {samples} test images (max abs error {max_abs:.4g}); "
                "try quantize.calibration='percentile' or more data.calibration_samples, or lower parity.int8_min_top1_agreement"
            )
        return
    tolerance = config.fp16_max_abs if precision == "fp16" else config.fp32_max_abs
    if max_abs > tolerance:
        raise ParityError(
            f"{where}: max abs error {max_abs:.4g} > {tolerance} (top-1 agreement {agreement:.4f} on {samples} test images); "
            f"raise parity.{precision}_max_abs only if this error is acceptable"
        )
    limit = config.fp16_min_top1_agreement if precision == "fp16" else config.fp32_min_top1_agreement
    beyond = agreement_beyond_near_ties(report, precision)
    if beyond < limit:
        ties = (report.get("near_tie_flips") or {}).get(precision, 0)
        raise ParityError(
            f"{where}: top-1 agreement {beyond:.4f} < {limit} on {samples} test images, not counting {ties} near-tied "
            f"prediction(s) (all flips: {agreement:.4f}; max abs error {max_abs:.4g}); lower parity.{precision}_min_top1_agreement "
            "only if these flips are expected"
        )


def verify_artifact(
    name: str,
    path: Path,
    precision: str,
    parent_logits: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    config: ParityConfig,
    *,
    layout: Layout | None = None,
    reference: Path | None = None,
    reference_name: str = "fp32",
) -> dict[str, Any]:
    """Accuracy on the test split plus parity against the parent; raises ParityError on failure.

    ``parent_logits`` are the parent's logits for ``images`` (the whole test split);
    parity uses the first ``config.samples`` of them. With ``reference`` (the fp32
    artefact a quantized one was made from) the artefact is also held to its
    precision's tolerance against that file, reported as ``versus_fp32``.
    """
    logits = artifact_logits(path, images, layout=layout)
    if logits.shape != parent_logits.shape:
        raise ParityError(f"{name}: output shape {list(logits.shape)} differs from the PyTorch parent's {list(parent_logits.shape)}")
    count = min(config.samples, len(images))
    report = parity_report(parent_logits[:count], logits[:count], labels[:count])
    check_parity(name, precision, report, config)
    result: dict[str, Any] = {"accuracy": float((logits.argmax(1) == labels).mean() * 100.0), "parity": report}
    if reference is not None:
        versus = parity_report(artifact_logits(reference, images[:count]), logits[:count], labels[:count])
        check_parity(name, precision, versus, config, against=reference_name)
        result["versus_fp32"] = versus
    return result
