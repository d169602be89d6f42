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
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


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
