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

Every candidate is screened first on the test images it is likeliest to change (plain int8's
disagreements with fp32 and its closest calls, ``gate.screening_images``), and judged on the
whole test split only when the screen does not already miss: only a whole-split judgement is a
verdict. The search stops at the first candidate that passes, when the ladder is exhausted, or
after ``max_search_seconds`` — then with the best candidate so far (the smallest drop; the best
screened one judged whole first when its screen beat every judged one) and its verdict. Each
round is one line through the Reporter.

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
class Screening:
    """A candidate's logits on the screened test images (``index``) and the whole-split verdict they imply."""

    index: np.ndarray = field(repr=False)
    logits: np.ndarray = field(repr=False)
    gate: GateResult


class Referee(Protocol):
    """Judges a written candidate against the fp32 model on the test split."""

    def judge(self, path: Path, screening: Screening | None = None) -> tuple[np.ndarray, GateResult]:
        """The candidate's logits on the whole split and the verdict; the images of ``screening`` are not run again."""
        ...

    def screen(self, path: Path, plain_logits: np.ndarray) -> Screening | None:
        """The candidate on the images a mix near plain int8 (``plain_logits``) is likeliest to change; None: judge it whole."""
        ...


@dataclass(frozen=True)
class Candidate:
    """A built mix and its verdict; ``logits`` None: only screened (``gate`` is then the screen's estimate)."""

    mix: dict[str, str]
    gate: GateResult
    size_bytes: int
    logits: np.ndarray | None = field(repr=False)

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
    plain_path: Path | None = None  # plain int8's file, kept beside ``path`` when the search ran (the caller removes it)


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
    referee: Referee,
    limits: SearchLimits,
    reporter: Reporter = SILENT,
    label: str = "",
    hopeless: Callable[[], str | None] = lambda: None,
) -> SearchOutcome:
    """Quantize into ``path`` the best mix found (see the module docstring); never raises on a missed budget.

    Each step re-ranks the tensors of the model it builds on (a fix can move the damage upstream) and
    adds its worst new ones at each rung; the step's best candidate is the next step's base unless it
    lost more than ``limits.worse_by`` points over that base, when those tensors are left as they were
    and not tried again (screened candidates compare by their screens). ``hopeless``
    is asked once plain int8 has missed: a reason there is no point searching (the search stops with
    it), or None.
    """
    run = _Search(quantizer, path, referee, reporter, label)
    plain = run.plain = run.attempt({})
    ranking: list[TensorError] = []
    stopped = "plain int8 passed" if plain.gate.passed else (hopeless() or "ladder exhausted")
    plain_path = None
    if stopped == "ladder exhausted":
        plain_path = path.with_name(f"{path.stem}.plain{path.suffix}")
        shutil.copyfile(path, plain_path)
        stopped, ranking = run.climb(limits)
        run.judge_best_screened()
        run.restore_best()
    return SearchOutcome(run.best, plain, run.rounds, ranking, stopped, run.elapsed(), plain_path)


class _Search:
    """The rounds of one search: each candidate built, screened or judged, reported; the best ones' bytes kept aside."""

    def __init__(self, quantizer: MixQuantizer, path: Path, referee: Referee, reporter: Reporter, label: str) -> None:
        self.quantizer, self.path, self.referee, self.reporter, self.label = quantizer, path, referee, reporter, label
        self.best_copy = path.with_name(f"{path.stem}.best{path.suffix}")
        self.screened_copy = path.with_name(f"{path.stem}.screened{path.suffix}")
        self.start, self.rounds = time.monotonic(), []
        self.best: Candidate | None = None  # judged on the whole split
        self.best_screened: Candidate | None = None  # screened only
        self.plain: Candidate | None = None
        self.built: dict[str, str] | None = None  # the mix whose model is in ``path`` now

    def elapsed(self) -> float:
        return round(time.monotonic() - self.start, 2)

    def attempt(self, mix: dict[str, str]) -> Candidate | None:
        """Build ``mix``; screen it (once plain int8 is judged) and judge it on the whole split unless the screen misses.
        None when the converter refuses a mix (plain int8 it must build)."""
        try:
            self.quantizer.quantize(self.path, mix)
        except ExportError as error:
            if not mix:
                raise
            self.built = None  # whatever ``path`` holds now is no candidate
            rung = _rung_summary(mix)
            self.rounds.append({"mix": rung, "tensors": len(mix), "failed": str(error), "elapsed_s": self.elapsed()})
            self.reporter.info(f"  {self.label} round {len(self.rounds) - 1}: {rung}: not built: {error}")
            return None
        self.built = mix
        size = self.path.stat().st_size
        screening = self.referee.screen(self.path, self.plain.logits) if self.plain is not None else None
        if screening is not None and not screening.gate.passed:
            candidate = Candidate(mix, screening.gate, size, None)
            self.report(candidate, len(screening.index))
            if candidate.better_than(self.best_screened):
                self.best_screened = candidate
                shutil.copyfile(self.path, self.screened_copy)
            return candidate
        return self.judged(mix, size, screening)

    def judged(self, mix: dict[str, str], size: int, screening: Screening | None = None) -> Candidate:
        logits, gate = self.referee.judge(self.path, screening)
        candidate = Candidate(mix, gate, size, logits)
        self.report(candidate)
        if candidate.better_than(self.best):
            self.best = candidate
            shutil.copyfile(self.path, self.best_copy)
        return candidate

    def report(self, candidate: Candidate, screened_images: int = 0) -> None:
        mix, gate = candidate.mix, candidate.gate
        rung = _rung_summary(mix)
        judged_on = {"screened_images": screened_images} if screened_images else {}
        self.rounds.append({"mix": rung, "tensors": len(mix), **gate.to_dict(), **judged_on, "elapsed_s": self.elapsed()})
        where = f"screened on {screened_images} images, " if screened_images else ""
        self.reporter.info(
            f"  {self.label} round {len(self.rounds) - 1}: {rung}: {where}drop {gate.accuracy_drop:+.2f} points, "
            f"agreement {gate.top1_agreement:.4f}, {'pass' if gate.passed else 'miss'} ({self.elapsed():.1f}s)"
        )

    def judge_best_screened(self) -> None:
        """When no candidate passed and the best screen beat every judged candidate: that candidate judged on the whole split."""
        screened = self.best_screened
        if screened is None or self.best.gate.passed or not screened.better_than(self.best):
            self.screened_copy.unlink(missing_ok=True)
            return
        shutil.move(self.screened_copy, self.path)
        self.built = screened.mix
        self.judged(screened.mix, screened.size_bytes)

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
                if candidate.gate.passed:  # only a candidate judged on the whole split passes
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
