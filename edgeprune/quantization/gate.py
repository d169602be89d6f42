"""Is a quantized model's accuracy loss real, or noise? A paired test on the same test images.

The quantized model and its fp32 sibling classify the same images, so what tells them
apart are the *discordant* images: right in fp32 and wrong quantized (``lost``), or the
other way round (``gained``). Under "no real difference" each discordant image is a fair
coin, so McNemar's exact test — a one-sided binomial test on the discordant pairs — gives
the probability of losing at least ``lost`` of them by chance. The gate:

- the observed top-1 drop is within ``max_accuracy_drop`` points: pass;
- it is over, but p >= ``significance`` (the drop is within the noise of this test split): pass;
- it is over and significant: fail, a real loss.

``significance = 0`` turns the allowance off (a plain threshold on the observed drop). Top-1
agreement with fp32 is always measured and gated only when ``min_top1_agreement`` > 0.

Screening (what makes the search fast): a candidate that differs from plain int8 in a few tensors
changes its predictions on the images plain int8 already gets different from fp32 and on its
closest calls, hardly anywhere else. ``screening_images`` picks those (a quarter of a large split),
and ``judge_screened`` gives the verdict the whole split would give if every other image kept
fp32's prediction. A candidate that misses there is dropped; one that passes is judged on the
whole split, which alone gives a verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SCREEN_SHARE = 0.25  # of the test split a candidate is screened on
MIN_SCREENED_SPLIT = 1000  # smaller test splits are judged whole every time: screening would save little


@dataclass(frozen=True)
class GateResult:
    """The budget's verdict on one quantized candidate, with the numbers behind it."""

    accuracy_drop: float  # top-1 points lost against fp32 (negative: gained)
    top1_agreement: float  # fraction of test images where both predict the same class
    lost: int  # images fp32 gets right and the quantized model wrong
    gained: int  # images the quantized model gets right and fp32 wrong
    p_value: float  # McNemar exact, one-sided: P(at least `lost` of the discordant images lost by chance)
    passed: bool
    reason: str  # one line: why it passed or failed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_p_value(lost: int, gained: int) -> float:
    """One-sided exact McNemar p-value: P(X >= lost) for X ~ Binomial(lost + gained, 1/2); 1.0 with no discordant image."""
    trials = lost + gained
    if trials == 0 or lost == 0:
        return 1.0
    tail = sum(math.comb(trials, k) for k in range(lost, trials + 1))
    return min(1.0, tail / (1 << trials))  # exact integers: 2.0**trials overflows past ~1000 images


def judge(
    fp32_correct: np.ndarray,
    quant_correct: np.ndarray,
    top1_agreement: float,
    max_accuracy_drop: float,
    min_top1_agreement: float = 0.0,
    significance: float = 0.05,
) -> GateResult:
    """The verdict from per-image correctness (boolean vectors over the same test images)."""
    fp32_correct, quant_correct = np.asarray(fp32_correct, bool), np.asarray(quant_correct, bool)
    lost = int((fp32_correct & ~quant_correct).sum())
    gained = int((quant_correct & ~fp32_correct).sum())
    drop = round(100.0 * (lost - gained) / max(len(fp32_correct), 1), 4)
    p_value = mcnemar_p_value(lost, gained)
    if drop <= max_accuracy_drop + 1e-9:
        passed, reason = True, f"drop {drop:.2f} <= {max_accuracy_drop:g} points"
    elif significance > 0 and p_value >= significance:
        passed, reason = True, f"drop {drop:.2f} > {max_accuracy_drop:g} points but within noise (McNemar p = {p_value:.3g})"
    else:
        passed, reason = (
            False,
            f"drop {drop:.2f} > {max_accuracy_drop:g} points, a real loss (McNemar p = {p_value:.3g}, {lost} lost / {gained} gained)",
        )
    if passed and top1_agreement < min_top1_agreement:
        passed, reason = False, f"top-1 agreement {top1_agreement:.4f} < {min_top1_agreement:g}"
    return GateResult(drop, top1_agreement, lost, gained, p_value, passed, reason)


def judge_logits(
    fp32_logits: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    max_accuracy_drop: float,
    min_top1_agreement: float = 0.0,
    significance: float = 0.05,
) -> GateResult:
    """``judge`` on two models' logits for the same labelled images."""
    fp32_top1, top1 = fp32_logits.argmax(1), logits.argmax(1)
    agreement = float((fp32_top1 == top1).mean())
    return judge(fp32_top1 == labels, top1 == labels, agreement, max_accuracy_drop, min_top1_agreement, significance)


def screening_images(fp32_logits: np.ndarray, plain_logits: np.ndarray, share: float = SCREEN_SHARE) -> np.ndarray | None:
    """Indices of the test images to screen candidates on, or None where the whole split should be judged.

    Every image plain int8 classifies differently from fp32, then plain int8's closest calls (the
    smallest gap between its two highest logits) up to ``share`` of the split, or twice the
    disagreements when those are more. None for a split under ``MIN_SCREENED_SPLIT`` images or
    when the screen would cover over half of it.
    """
    total = len(fp32_logits)
    disagreeing = fp32_logits.argmax(1) != plain_logits.argmax(1)
    count = max(round(share * total), 2 * int(disagreeing.sum()))
    if total < MIN_SCREENED_SPLIT or count > total // 2:
        return None
    top_two = np.sort(plain_logits, axis=1)[:, -2:]
    risk = np.where(disagreeing, -np.inf, top_two[:, 1] - top_two[:, 0])
    return np.sort(np.argsort(risk, kind="stable")[:count])


def judge_screened(
    fp32_logits: np.ndarray,
    screened_logits: np.ndarray,
    screened: Sequence[int] | np.ndarray,
    labels: np.ndarray,
    max_accuracy_drop: float,
    min_top1_agreement: float = 0.0,
    significance: float = 0.05,
) -> GateResult:
    """The verdict on the whole split if every image outside ``screened`` (indices) kept fp32's prediction.

    ``screened_logits`` are the candidate's logits on the screened images, in that order. Counts,
    drop and agreement are over the whole split: for plain int8, screened on its own disagreements,
    they are its exact figures.
    """
    logits = fp32_logits.copy()
    logits[np.asarray(screened)] = screened_logits
    return judge_logits(fp32_logits, logits, labels, max_accuracy_drop, min_top1_agreement, significance)
