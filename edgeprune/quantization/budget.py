"""The quantize stage's work, file in → file out: an int8 (or dynamic, fp16) artefact within the accuracy budget, verified.

Every int8/dynamic artefact is run on the whole test split and judged against its fp32 sibling
(``edgeprune.quantization.gate``: the top-1 drop, allowed over ``quantize.max_accuracy_drop`` only
while McNemar's paired test calls it noise; top-1 agreement gated when ``quantize.min_top1_agreement``
> 0). When it misses, ``edgeprune.quantization.search`` ranks the tensors from one float and one
quantized run and climbs a ladder on the worst ones — percentile calibration, 16-bit activations
(ONNX), float layers — within ``quantize.max_search_seconds``; each candidate is screened on the
test images it is likeliest to change before it is judged on the whole split (``TestSplitReferee``).
The chosen per-tensor mix, its MAC cost, its size and paired p50 beside plain int8 and fp32
(``edgeprune.quantization.cost``), each round and the verdict go into the artefact's meta. A missed
budget does not stop the build: the best candidate is written and verified, and the build's budget
check exits 10.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig, QuantizeConfig
from edgeprune.onnx_compaction import minify_names
from edgeprune.parity import artifact_logits, check_parity, parity_report
from edgeprune.progress import SILENT, Reporter
from edgeprune.quant_sensitivity import fake_quantize
from edgeprune.quantization.cost import mix_cost_figures
from edgeprune.quantization.gate import GateResult, judge_logits, judge_screened, screening_images
from edgeprune.quantization.onnx import OnnxQuantizer, convert_onnx_fp16
from edgeprune.quantization.pte import PteQuantizer
from edgeprune.quantization.search import MixQuantizer, Screening, SearchLimits, SearchOutcome, search
from edgeprune.quantization.tflite import TfliteQuantizer
from edgeprune.training import top1_accuracy


@dataclass(frozen=True)
class QuantizeInputs:
    """What quantizing a model's artefacts needs besides the configuration.

    ``example``: one input batch (NCHW); ``calibration``: the calibration images; ``images`` and
    ``labels``: the test split the budget is judged on; ``parent_logits``: the torch model's logits on it.
    """

    model: nn.Module
    example: torch.Tensor
    calibration: np.ndarray
    images: np.ndarray
    labels: np.ndarray
    parent_logits: np.ndarray


def quantize_artifact(
    fmt: str, fp32: Artifact, inputs: QuantizeInputs, config: BuildConfig, workdir: Path, reporter: Reporter = SILENT
) -> Artifact:
    """``<fmt>_<scheme>`` in ``workdir`` from the fp32 artefact: the best mix the budget search found, verified."""
    precision = config.quantize.scheme
    name = f"{fmt}_{precision}"
    path = workdir / f"{name}.{fmt}"
    fp32_logits = artifact_logits(fp32.path, inputs.images, layout=fp32.meta.get("input_layout"))
    if precision == "fp16":
        convert_onnx_fp16(fp32.path, path)
        logits, extra = artifact_logits(path, inputs.images), {}
    else:
        quantizer = make_quantizer(fmt, fp32, inputs, config.quantize, workdir)
        try:
            logits, extra = quantize_within_budget(
                name, fp32.name, quantizer, path, fp32_logits, inputs.images, inputs.labels, config.quantize, reporter, fp32.path
            )
        finally:
            quantizer.close()
        if fmt == "onnx" and config.quantize.minify_names and minify_names(path, path):
            logits = artifact_logits(path, inputs.images)  # the shipped bytes are what parity checks
            extra["names_minified"] = True
    tolerance = "fp16" if precision == "fp16" else "int8"  # dynamic-range int8 is held to the int8 tolerance
    enforce = extra.get("budget", {}).get("passed", True)  # a missed budget is the verdict; parity is reported beside it
    meta = verified(name, fp32.name, tolerance, logits, inputs.parent_logits, fp32_logits, inputs.labels, config, enforce)
    return Artifact.from_file(name, fmt, path, format=fmt, precision=precision, parent=fp32.name, **meta, **extra)


def make_quantizer(fmt: str, fp32: Artifact, inputs: QuantizeInputs, config: QuantizeConfig, scratch: Path) -> MixQuantizer:
    """The quantizer for ``fp32``'s format; TFLite keeps the fp32 file's input layout."""
    if fmt == "onnx":
        return OnnxQuantizer(fp32.path, inputs.calibration, config, scratch)
    if fmt == "pte":  # ExecuTorch: PT2E with the XNNPACK quantizer, the same budget search
        return PteQuantizer(inputs.model, inputs.example, inputs.calibration, config)
    channels_last = fp32.meta.get("input_layout") == "NHWC"
    return TfliteQuantizer(inputs.model, inputs.example, inputs.calibration, config, channels_last, float_path=fp32.path)


def verified(
    name: str,
    fp32_name: str,
    tolerance: str,
    logits: np.ndarray,
    parent_logits: np.ndarray,
    fp32_logits: np.ndarray,
    labels: np.ndarray,
    config: BuildConfig,
    enforce: bool = True,
) -> dict[str, Any]:
    """Accuracy, and parity against the torch parent and the fp32 sibling (ParityError when broken and ``enforce``)."""
    count = min(config.parity.samples, len(labels))
    parity = parity_report(parent_logits[:count], logits[:count], labels[:count])
    versus_fp32 = parity_report(fp32_logits[:count], logits[:count], labels[:count])
    if enforce or parity["nonfinite"] or versus_fp32["nonfinite"]:
        check_parity(name, tolerance, parity, config.parity)
        check_parity(name, tolerance, versus_fp32, config.parity, against=fp32_name)
    return {"accuracy": top1_accuracy(logits, labels), "parity": parity, "versus_fp32": versus_fp32}


class TestSplitReferee:
    """Judges candidates against the fp32 logits on the test split (``images``, ``labels``; ``layout``: the artefacts' input).

    ``screen`` runs a candidate on the images ``gate.screening_images`` picks from plain int8's
    logits (chosen once, at the first screen); ``judge`` runs the rest of the split and gives the verdict.
    """

    def __init__(
        self, fp32_logits: np.ndarray, images: np.ndarray, labels: np.ndarray, config: QuantizeConfig, layout: str | None = None
    ) -> None:
        self.fp32_logits, self.images, self.labels, self.layout = fp32_logits, images, labels, layout
        self.limits = (config.max_accuracy_drop, config.min_top1_agreement, config.significance)
        self._screened: np.ndarray | None = None
        self._chosen = False

    def judge(self, path: Path, screening: Screening | None = None) -> tuple[np.ndarray, GateResult]:
        if screening is None:
            logits = artifact_logits(path, self.images, layout=self.layout)
        else:
            rest = np.setdiff1d(np.arange(len(self.images)), screening.index)
            logits = np.empty((len(self.images), screening.logits.shape[1]), np.float32)
            logits[screening.index] = screening.logits
            logits[rest] = artifact_logits(path, self.images[rest], layout=self.layout)
        return logits, judge_logits(self.fp32_logits, logits, self.labels, *self.limits)

    def screen(self, path: Path, plain_logits: np.ndarray) -> Screening | None:
        if not self._chosen:
            self._screened, self._chosen = screening_images(self.fp32_logits, plain_logits), True
        if self._screened is None:
            return None
        logits = artifact_logits(path, self.images[self._screened], layout=self.layout)
        return Screening(self._screened, logits, judge_screened(self.fp32_logits, logits, self._screened, self.labels, *self.limits))


def quantize_within_budget(
    name: str,
    fp32_name: str,
    quantizer: MixQuantizer,
    path: Path,
    fp32_logits: np.ndarray,
    images: np.ndarray,
    labels: np.ndarray,
    config: QuantizeConfig,
    reporter: Reporter = SILENT,
    fp32_path: Path | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Quantize into ``path`` the best per-tensor mix the budget search finds (``edgeprune.quantization.search``).

    ``fp32_logits`` are the fp32 sibling's logits for the test split (``images``, ``labels``).
    Returns the artefact's test-split logits and its meta: ``budget`` (the limits, the gate's
    figures, ``passed`` and ``verdict``), ``quant_mix`` ({tensor: rung}), ``float_layers``,
    ``macs_off_int8``, ``float_layers_size_bytes`` (bytes over plain int8), ``mix_cost`` (when
    the chosen mix is not plain int8 and ``fp32_path`` is given: size and paired p50 of fp32,
    plain int8 and the mix) and, when the search ran, ``search`` (each round, the ranking's worst
    tensors, why it stopped, seconds). A missed budget is a verdict in the meta, never an exception.
    """
    limits = SearchLimits(
        config.max_search_seconds, config.max_float_layers, refine_candidates=config.refine_candidates, worse_by=config.max_accuracy_drop
    )
    reporter.info(f"  {name}: quantizing against {fp32_name} (budget: drop <= {config.max_accuracy_drop:g} points)")
    outcome = search(
        quantizer,
        path,
        TestSplitReferee(fp32_logits, images, labels, config, quantizer.layout),
        limits,
        reporter,
        name,
        lambda: output_ceiling(fp32_name, quantizer.output_grid(), fp32_logits, labels, config),
    )
    best = outcome.best
    verdict = "within budget" if best.gate.passed else f"missed budget ({outcome.stopped}): {best.gate.reason}"
    if not best.gate.passed:
        reporter.warn(f"{name}: {verdict}")
    limits_meta = {
        "max_accuracy_drop": config.max_accuracy_drop,
        "min_top1_agreement": config.min_top1_agreement,
        "significance": config.significance,
    }
    meta: dict[str, Any] = {
        **quantizer.describe(),
        "budget": {**limits_meta, **best.gate.to_dict(), "verdict": verdict},
        "quant_mix": dict(best.mix),
        **quantizer.mix_cost(best.mix),
        "float_layers_size_bytes": best.size_bytes - outcome.plain.size_bytes,
        "plain_int8": {"size_bytes": outcome.plain.size_bytes, **outcome.plain.gate.to_dict()},
    }
    if outcome.plain_path is not None:
        try:
            if best.mix and fp32_path is not None:
                meta["mix_cost"] = mix_cost_figures({"fp32": Path(fp32_path), "plain_int8": outcome.plain_path, "mix": path})
                reporter.info(f"  {name}: {cost_line(meta['mix_cost'])}")
        finally:
            outcome.plain_path.unlink(missing_ok=True)
    if not outcome.plain.gate.passed:
        meta["search"] = search_record(outcome)
    return best.logits, meta


def cost_line(cost: dict[str, Any]) -> str:
    """The mix's cost in one line: KiB and p50 of fp32, plain int8 and the mix."""
    sizes = " / ".join(f"{size / 1024:.1f}" for size in cost["size_bytes"].values())
    latencies = cost["latency_p50_ms"]
    timed = " / ".join(f"{value:.3g}" for value in latencies.values()) + " ms p50 (in-build, 1 thread)" if latencies else "p50 not measured"
    return f"fp32 / plain int8 / mix: {sizes} KiB, {timed}"


def search_record(outcome: SearchOutcome) -> dict[str, Any]:
    return {
        "stopped": outcome.stopped,
        "seconds": outcome.elapsed_s,
        "rounds": outcome.rounds,
        "worst_tensors": [item.to_dict() for item in outcome.ranking[:5]],
    }


def output_ceiling(
    fp32_name: str, grid: tuple[float, int] | None, fp32_logits: np.ndarray, labels: np.ndarray, config: QuantizeConfig
) -> str | None:
    """Why no mix can pass when an int8 model output alone (its grid: scale, zero-point) breaks the budget; None otherwise.

    Rounding the fp32 logits to that grid shows what no float layer can win back: the
    logits' margins are finer than one int8 step, so close calls become ties.
    """
    if grid is None:
        return None
    rounded = fake_quantize(fp32_logits, np.float32(grid[0]), np.int8(grid[1]))
    ceiling = judge_logits(fp32_logits, rounded, labels, config.max_accuracy_drop, config.min_top1_agreement, config.significance)
    if ceiling.passed:
        return None
    return (
        f"its int8 output (scale {grid[0]:.4g}) alone agrees with {fp32_name} on {ceiling.top1_agreement:.4f} of the test split "
        f"and loses {ceiling.accuracy_drop:.2f} top-1 points ({ceiling.reason}): no float layer can fix that. "
        "Use quantize.tflite_io = 'float', or loosen the budget"
    )
