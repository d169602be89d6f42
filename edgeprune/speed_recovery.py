"""The speed-up search's accuracy judgement: the model the search stopped at recovered and checked against the
budget, stepping back to the fastest accepted step that keeps it (``settle``).

A step is judged after ``prune.recover_epochs`` of (distilled) finetuning; a step that short recovery leaves just over
the budget (by less than it gained) is judged again after the profile's finetune, as the build's own budget check
judges it (``judged_accuracy``).
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from edgeprune.structured_pruning import PruningRun
from edgeprune.training import evaluate

MAX_RECOVERIES = 3  # recoveries the search may spend finding the fastest step within the budget


def settle(run: PruningRun, models: list[nn.Module], trajectory: list[dict[str, Any]], max_drop: float) -> tuple[int, float, str]:
    """Recover the last accepted model; when it breaks the budget, step back to the fastest model that keeps it.

    Each step tried is judged by ``judged_accuracy``: its short recovery, and the profile's finetune on top when
    that recovery misses the budget by less than it gained. Each judgement calibrates a proxy: the test top-1 a step
    had before recovery plus what recovery added to the last step judged. The next step tried is the fastest the proxy
    keeps within the budget, at most ``MAX_RECOVERIES`` times; then the search's starting model. Returns the chosen
    step, its top-1 after recovery, and (when the last step broke the budget) why the search's end was not kept.
    ``run.model`` is left as the recovered chosen model.
    """
    last = len(models) - 1
    accuracy = judged_accuracy(run, models, trajectory, last, max_drop)
    if within(run, accuracy, max_drop) or last == 0:
        return last, accuracy, ""
    note = f"step {last} fell {run.reference_accuracy - accuracy:.2f} points after recovery, over budgets.max_accuracy_drop={max_drop:g}"
    high, gain = last, accuracy - trajectory[last]["accuracy"]
    for _ in range(MAX_RECOVERIES - 1):
        step = max((i for i in range(1, high) if within(run, trajectory[i]["accuracy"] + gain, max_drop)), default=0)
        if step == 0:
            break
        accuracy = judged_accuracy(run, models, trajectory, step, max_drop)
        if within(run, accuracy, max_drop):
            return step, accuracy, note
        high, gain = step, accuracy - trajectory[step]["accuracy"]
    if trajectory[0]["macs"] == run.dense_macs:  # the search started from the unpruned model: nothing to recover
        run.model = copy.deepcopy(models[0])
        return 0, run.reference_accuracy, note
    return 0, recovered_accuracy(run, models[0], 0), note


def judged_accuracy(run: PruningRun, models: list[nn.Module], trajectory: list[dict[str, Any]], step: int, max_drop: float) -> float:
    """Test top-1 of step ``step``'s model after ``prune.recover_epochs``; when that misses the budget by less than the
    recovery gained, after ``finetune.epochs`` more (the profile's finetune, which the build's budget check follows)
    as well: a short recovery underestimates what the finetune recovers, and a step it rejects by a fraction of a
    point is judged where the build judges it. The step's row records the epochs and the top-1 (``run.model`` is
    left as the recovered copy)."""
    accuracy, epochs = recovered_accuracy(run, models[step], step), run.config.prune.recover_epochs
    miss = run.reference_accuracy - accuracy - max_drop
    if max_drop > 0 and 0 < miss < accuracy - trajectory[step]["accuracy"] and run.config.finetune.epochs > 0 and epochs > 0:
        run.reporter.info(
            f"prune_structured: step {step} misses the budget by {miss:.2f} points after {plural(epochs, 'recovery epoch')}; "
            f"judging it after the profile's finetune ({plural(run.config.finetune.epochs, 'epoch')} more)"
        )
        run.recover(step, run.config.finetune.epochs)
        accuracy, epochs = evaluate(run.model, run.dataset.x_test, run.dataset.y_test), epochs + run.config.finetune.epochs
    trajectory[step].update(recovery_epochs=epochs, accuracy_after_recovery=accuracy)
    return accuracy


def recovered_accuracy(run: PruningRun, model: nn.Module, step: int) -> float:
    """Test top-1 of a copy of ``model`` after ``prune.recover_epochs`` (the copy is left in ``run.model``)."""
    run.model = copy.deepcopy(model)
    run.recover(step)
    return evaluate(run.model, run.dataset.x_test, run.dataset.y_test)


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def within(run: PruningRun, accuracy: float, max_drop: float) -> bool:
    return max_drop <= 0 or run.reference_accuracy - accuracy <= max_drop
