"""The accuracy-budget search: which tensors to treat how, cheapest fix first, within a time limit.

One quantized model is built and judged (``edgeprune.quantization.gate``). When it misses the
budget, the format's quantizer ranks its tensors from two runs — the float model's and the
quantized model's, every activation exposed and matched — by the rounding noise each adds
(SQNR in dB, lower is worse), and the search climbs a ladder on the worst 1, 2, 4, … tensors,
cheapest rung first:

1. ``percentile``: the same int8 grid with a range calibrated on the 0.01/99.99 percentiles
   instead of min/max (outliers clipped; no size or speed cost);
2. ``int16``: 16-bit activations for those tensors (int8 weights; still integer);
3. ``float``: the layers around them left unquantized.

Every candidate is judged on the test split; the search stops at the first that passes, when
the ladder is exhausted, or after ``max_search_seconds`` — then with the best candidate so
far (the smallest drop) and its verdict. Each round is one line through the Reporter.

A format plugs in through :class:`MixQuantizer`: how to build a candidate with a given
per-tensor mix, which rungs it can build, and how it ranks its tensors.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeprune.errors import ExportError
from edgeprune.progress import SILENT, Reporter
from edgeprune.quantization.gate import GateResult

LADDER = ("percentile", "int16", "float")  # cheapest first
Mix = Mapping[str, str]  # tensor name -> rung; tensors not in it stay plain int8


@dataclass(frozen=True)
class TensorError:
    """One quantized tensor, from the two-run comparison.

    ``sqnr_db``: the noise its own rounding adds (the tensor before vs after its quantize/dequantize
    pair in the quantized run); ``model_sqnr_db`` and ``cosine``: against the float run's same
    tensor (error accumulated from upstream included); ``layers``: the layers that read or write it.
    """

    tensor: str
    sqnr_db: float
    model_sqnr_db: float | None = None
    cosine: float | None = None
    layers: tuple[str, ...] = ()
    cause: str = "rounding"  # "rounding": its own grid; "compute": the layers computing it (int8 weights), which only float fixes

    def to_dict(self) -> dict[str, Any]:
        rounded = {
            key: None if value is None else round(value, 4)
            for key, value in (("model_sqnr_db", self.model_sqnr_db), ("cosine", self.cosine))
        }
        return {"tensor": self.tensor, "sqnr_db": round(self.sqnr_db, 2), **rounded, "layers": list(self.layers), "cause": self.cause}


class MixQuantizer(Protocol):
    """What a format (ONNX QDQ, TFLite, ExecuTorch) provides to the search."""

    layout: str | None  # the artefact's input layout for ``artifact_logits`` (None: detect)
    rungs: tuple[str, ...]  # the rungs of LADDER this format can build, cheapest first

    def quantize(self, path: Path, mix: Mix) -> None:
        """Write a quantized model to ``path``: plain int8, except each tensor of ``mix`` at its rung."""
        ...

    def tensor_errors(self) -> list[TensorError]:
        """The last ``quantize`` call's tensors, worst first, from one float and one quantized run."""
        ...

    def refine(self, candidates: list[TensorError]) -> list[TensorError]:
        """``candidates`` re-ranked by the noise each alone adds to the logits (slower; may return them as they are)."""
        ...

    def mix_cost(self, mix: Mix) -> dict[str, Any]:
        """``float_layers`` (layer names left float) and ``macs_off_int8`` ({rung: fraction of the model's MACs})."""
        ...

    def output_grid(self) -> tuple[float, int] | None:
        """(scale, zero-point) of an int8 model output of the last ``quantize`` call; None for a float output."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class SearchLimits:
    max_search_seconds: float = 120.0
    max_float_layers: int = 8  # layers the float rung may leave float
    max_tensors: int = 32  # tensors one candidate may change
    refine_candidates: int = 0  # the top tensors re-ranked by ``MixQuantizer.refine`` (0: off)
    worse_by: float = 0.5  # top-1 points a step may lose against its base and still be built on (run-to-run noise)


@dataclass(frozen=True)
class Candidate:
    mix: dict[str, str]
    gate: GateResult
    size_bytes: int
    logits: np.ndarray = field(repr=False)

    def better_than(self, other: Candidate | None) -> bool:
        if other is None or self.gate.passed != other.gate.passed:
            return other is None or self.gate.passed
        return (self.gate.accuracy_drop, len(self.mix)) < (other.gate.accuracy_drop, len(other.mix))


@dataclass
class SearchOutcome:
    best: Candidate
    plain: Candidate
    rounds: list[dict[str, Any]]
    ranking: list[TensorError]
    stopped: str  # "plain int8 passed" | "budget met" | "time limit" | "ladder exhausted" | "float layer limit" | why it is hopeless
    elapsed_s: float


Judge = Callable[[Path], tuple[np.ndarray, GateResult]]  # a written candidate -> its test-split logits and verdict


def chunk_sizes(limit: int) -> list[int]:
    """New tensors per step: 1, 1, 2, 4, … while the total stays within ``limit``."""
    sizes, total, size = [], 0, 1
    while total + size <= limit:
        sizes.append(size)
        total, size = total + size, (1 if not sizes[:-1] else size * 2)
    return sizes or ([limit] if limit > 0 else [])


def step_mixes(
    base: Mapping[str, str], worst: list[TensorError], rungs: tuple[str, ...], limits: SearchLimits, float_layers_of: tuple[str, ...] = ()
) -> list[dict[str, str]]:
    """The candidates of one step: ``base`` plus the ``worst`` new tensors at each rung, cheapest first.

    A tensor damaged by its computation goes float at every rung; a candidate over ``max_float_layers`` is left out.
    """
    mixes: list[dict[str, str]] = []
    previous_float = set(float_layers_of)
    for rung in rungs:
        mix = {**base, **{item.tensor: rung if item.cause == "rounding" else "float" for item in worst}}
        if mix in mixes:
            continue
        float_layers = {layer for item in worst if mix[item.tensor] == "float" for layer in item.layers}
        if float_layers and len(float_layers | previous_float) > limits.max_float_layers:
            continue
        mixes.append(mix)
    return mixes


def search(
    quantizer: MixQuantizer,
    path: Path,
    judge: Judge,
    limits: SearchLimits,
    reporter: Reporter = SILENT,
    label: str = "",
    hopeless: Callable[[], str | None] = lambda: None,
) -> SearchOutcome:
    """Quantize into ``path`` the best mix found (see the module docstring); never raises on a missed budget.

    Each step re-ranks the tensors of the model it builds on (a fix can move the damage upstream) and
    adds its worst new ones at each rung; the step's best candidate is the next step's base unless it
    lost more than ``limits.worse_by`` points over that base, when those tensors are left as they were
    and not tried again. ``hopeless``
    is asked once plain int8 has missed: a reason there is no point searching (the search stops with
    it), or None.
    """
    run = _Search(quantizer, path, judge, reporter, label)
    plain = run.attempt({})
    ranking: list[TensorError] = []
    stopped = "plain int8 passed" if plain.gate.passed else (hopeless() or "ladder exhausted")
    if stopped == "ladder exhausted":
        stopped, ranking = run.climb(limits)
        run.restore_best()
    return SearchOutcome(run.best, plain, run.rounds, ranking, stopped, run.elapsed())


class _Search:
    """The rounds of one search: each candidate built, judged, reported; the best one's bytes kept aside."""

    def __init__(self, quantizer: MixQuantizer, path: Path, judge: Judge, reporter: Reporter, label: str) -> None:
        self.quantizer, self.path, self.judge, self.reporter, self.label = quantizer, path, judge, reporter, label
        self.best_copy = path.with_name(f"{path.stem}.best{path.suffix}")
        self.start, self.rounds, self.best = time.monotonic(), [], None
        self.built: dict[str, str] | None = None  # the mix whose model is in ``path`` now

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def attempt(self, mix: dict[str, str]) -> Candidate | None:
        """The candidate ``mix`` built and judged; None when the converter refuses a mix (plain int8 it must build)."""
        try:
            self.quantizer.quantize(self.path, mix)
        except ExportError as error:
            if not mix:
                raise
            self.built = None  # whatever ``path`` holds now is no candidate
            self.rounds.append({"mix": _rung_summary(mix), "tensors": len(mix), "failed": str(error), "elapsed_s": self.elapsed()})
            self.reporter.info(f"  {self.label} round {len(self.rounds) - 1}: {_rung_summary(mix)}: not built: {error}")
            return None
        self.built = mix
        logits, gate = self.judge(self.path)
        candidate = Candidate(mix, gate, self.path.stat().st_size, logits)
        rung = _rung_summary(mix)
        self.rounds.append({"mix": rung, "tensors": len(mix), **gate.to_dict(), "elapsed_s": self.elapsed()})
        self.reporter.info(
            f"  {self.label} round {len(self.rounds) - 1}: {rung}: drop {gate.accuracy_drop:+.2f} points, "
            f"agreement {gate.top1_agreement:.4f}, {'pass' if gate.passed else 'miss'} ({self.elapsed():.1f}s)"
        )
        if candidate.better_than(self.best):
            self.best = candidate
            shutil.copyfile(self.path, self.best_copy)
        return candidate

    def climb(self, limits: SearchLimits) -> tuple[str, list[TensorError]]:
        """Steps up the ladder until a candidate passes, the tensors run out, or time does."""
        first_ranking: list[TensorError] = []
        base: dict[str, str] = {}
        base_drop, tried = self.best.gate.accuracy_drop, set()  # plain int8's drop; tensors whose every rung made it worse
        for size in chunk_sizes(limits.max_tensors):
            if time.monotonic() - self.start >= limits.max_search_seconds:
                return "time limit", first_ranking
            if self.built != base:
                self.quantizer.quantize(self.path, base)  # rank the model the step builds on
                self.built = base
            ranking = [item for item in rank(self.quantizer, limits) if item.tensor not in base and item.tensor not in tried]
            first_ranking = first_ranking or ranking
            if not ranking:
                return "ladder exhausted", first_ranking
            base_float = tuple(self.quantizer.mix_cost(base)["float_layers"]) if base else ()
            mixes = step_mixes(base, ranking[:size], self.quantizer.rungs, limits, base_float)
            if not mixes:  # only the float rung is left, and it would pass quantize.max_float_layers
                return "float layer limit", first_ranking
            worst = ", ".join(f"{item.tensor} {item.sqnr_db:.1f} dB" for item in ranking[:size])
            self.reporter.info(f"  {self.label} ranked {len(ranking)} tensors from two runs; trying {worst} ({self.elapsed():.1f}s)")
            step_best: Candidate | None = None
            for mix in mixes:
                if time.monotonic() - self.start >= limits.max_search_seconds:
                    return "time limit", first_ranking
                candidate = self.attempt(mix)
                if candidate is None:
                    continue
                if candidate.gate.passed:
                    return "budget met", first_ranking
                if step_best is None or candidate.gate.accuracy_drop <= step_best.gate.accuracy_drop:
                    step_best = candidate  # a tie goes to the higher rung: the cheaper ones did not help
            if step_best is not None and step_best.gate.accuracy_drop <= base_drop + limits.worse_by:
                base, base_drop = step_best.mix, step_best.gate.accuracy_drop
            else:  # every rung of these tensors lost clearly more than the base: the next step builds on the base without them
                tried.update(item.tensor for item in ranking[:size])
        return "ladder exhausted", first_ranking

    def restore_best(self) -> None:
        if self.best_copy.exists():
            shutil.move(self.best_copy, self.path)  # the best candidate's bytes, whichever round made them


def _rung_summary(mix: Mapping[str, str]) -> str:
    return ", ".join(f"{r} on {sum(v == r for v in mix.values())}" for r in dict.fromkeys(mix.values())) or "plain int8"


def rank(quantizer: MixQuantizer, limits: SearchLimits) -> list[TensorError]:
    """The two-run ranking, its top ``limits.refine_candidates`` re-ranked by the noise each alone adds."""
    ranking = quantizer.tensor_errors()
    if limits.refine_candidates > 0:
        top = limits.refine_candidates
        ranking = [*quantizer.refine(ranking[:top]), *ranking[top:]]
    return ranking
