"""The speed-up search: one greedy search over removing residual blocks and narrowing layer groups.

``prune.speedup`` with ``prune.speedup_moves = "search"`` (the default; ``"depth"`` or ``"width"`` restrict
it to one kind of move, ``"uniform"`` is the level-by-level loop of ``edgeprune.speedup_search``). At each
step every move the model allows is scored (``edgeprune.speed_moves``: the candidate built, its BatchNorm
statistics re-estimated, its top-1 measured on held-out training images, its latency predicted from the
device's latency table) and the move with the most predicted latency saved per point of held-out top-1
lost is taken. Scores are reused across steps and only the leading ones re-scored on the current model
(lazy greedy: a move's accuracy cost changes little when another part of the network moves), so a step
costs a few candidates, not all of them.

Each accepted step is exported and measured on the device beside the unpruned model (paired, as the
uniform loop measures); on the local onnxruntime device, and on an adb/ssh device whose URL names TFLite's
``benchmark_model`` (its ``--enable_op_profiling`` output, ``latency_table.read_op_profile``), it is also
profiled, which refreshes the predictor and grows the cached table. The row records the predicted and the measured latency. The search
stops once the measured speed-up reaches the target (confirmed by as many pairs again).

Accuracy is judged where it counts: the model the search stopped at is recovered (``prune.recover_epochs``
of distilled finetuning) and its top-1 checked against ``budgets.max_accuracy_drop`` (``edgeprune.speed_recovery``).
When that breaks the budget, earlier accepted steps are recovered (a bisection over the trajectory) until the
fastest within the budget is found. On the way, a model whose held-out top-1 has fallen ``PROXY_SLACK_POINTS``
past the budget is recovered before the search goes on. When the target is not reached within the budget the
stage still finishes with that model; the ``speed_search`` summary says so (``reached`` false, a one-line
``verdict`` naming the moves not tried) and the build's budget check turns it into exit code 13.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnxruntime
from torch import nn

from edgeprune.cache import cache_key
from edgeprune.config import BuildConfig, PruneConfig
from edgeprune.latency_table import (
    TABLE_FORMAT,
    LatencyTable,
    ProfiledRun,
    cached_table,
    layer_signatures,
    profile_onnx,
    read_op_profile,
    store_table,
    table_lineage,
)
from edgeprune.pruning import guarded_prune, root_channels
from edgeprune.runtimes import paired_speedup, profile_ops, profiles_ops
from edgeprune.runtimes.runner import cpu_model
from edgeprune.speed_moves import (
    LOSS_FLOOR,
    LatencyPredictor,
    Move,
    MoveScorer,
    Scored,
    describe_model,
    kept_whole_blocks,
    next_width,
    pruning_guard,
    removable_blocks,
)
from edgeprune.speed_recovery import settle, within
from edgeprune.speedup_search import LatencyProbe, measure_pairs, pairs_summary
from edgeprune.structured_pruning import PruningRun
from edgeprune.training import evaluate, example_batch

REFRESHES = 6  # at most this many stale scores are re-scored on the current model per step
PROXY_SLACK_POINTS = 15.0  # held-out top-1 (before recovery) may fall this far past the budget before the model is recovered
MIDWAY_RECOVERIES = 3  # recoveries the search may spend on the way when held-out top-1 falls past that slack
WIDTH_RUNS = 2  # uniform narrowings by 1..WIDTH_RUNS rounding steps profiled into the table, besides the model itself


@dataclass
class SearchOutcome:
    """The search's trajectory (one row per accepted move, row 0 the model it started from) and its summary."""

    trajectory: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class GreedySearch:
    """The state of one search: scorer, probe, the dense export, stale scores and the accepted models."""

    scorer: MoveScorer
    probe: LatencyProbe
    dense_path: Path
    folder: Path
    target: float
    table: LatencyTable | None
    stale: dict[str, tuple[float, float]] = field(default_factory=dict)  # move key -> (µs saved, points lost) when scored
    accuracy: float = 0.0  # held-out top-1 of the current model

    def choose(self) -> Scored | None:
        """The move with the most predicted latency saved per held-out point lost (lazy greedy), or None."""
        run, scorer = self.scorer.run, self.scorer
        current_us = scorer.predictor.predict_us(run.model)
        moves = {move.key: move for move in scorer.moves()}
        self.stale = {key: value for key, value in self.stale.items() if key in moves}
        fresh: dict[str, Scored] = {}
        for key, move in moves.items():
            if key not in self.stale:
                self.rescore(move, fresh, current_us)
        for _ in range(REFRESHES):
            ranked = sorted(self.stale, key=self.stale_value, reverse=True)
            if not ranked or ranked[0] in fresh:
                break
            self.rescore(moves[ranked[0]], fresh, current_us)
        best = max(fresh.values(), key=lambda scored: scored.value(self.accuracy, current_us), default=None)
        return best if best is not None and best.value(self.accuracy, current_us) > float("-inf") else None

    def rescore(self, move: Move, fresh: dict[str, Scored], current_us: float) -> None:
        scored = self.scorer.score(move)
        if scored is None:
            self.stale.pop(move.key, None)
            return
        fresh[move.key] = scored
        self.stale[move.key] = (current_us - scored.predicted_us, self.accuracy - scored.held_out_accuracy)

    def stale_value(self, key: str) -> float:
        gain, loss = self.stale[key]
        return gain / max(loss, LOSS_FLOOR) if gain > 0 else float("-inf")

    def take_moves(self, trajectory: list[dict[str, Any]], models: list[nn.Module], max_drop: float, widths: dict[str, int]) -> str:
        """Take the best move, measure it, and again, until the measured speed-up reaches the target; appends each
        accepted step's row and model, and returns why the search stopped short ("" when it reached the target)."""
        run, start_accuracy = self.scorer.run, self.accuracy
        reporter, name = self.probe.context.reporter, self.probe.context.config.name
        while trajectory[-1]["speedup"] < self.target:
            if max_drop > 0 and start_accuracy - self.accuracy > max_drop + PROXY_SLACK_POINTS:
                recovered = sum("recovered_on_the_way" in row for row in trajectory)
                if "recovered_on_the_way" in trajectory[-1] or recovered >= MIDWAY_RECOVERIES:
                    return f"held-out top-1 fell more than {max_drop + PROXY_SLACK_POINTS:g} points, recovered or not"
                self.recover_on_the_way(trajectory, models)
                continue
            scored = self.choose()
            if scored is None:
                return "no move left that the table predicts to save latency"
            run.model, self.accuracy = scored.model, scored.held_out_accuracy
            row = {**self.measure(len(trajectory), scored), **describe_model(run, widths)}
            row.update(paired_prediction(trajectory[-1], row))
            trajectory.append(row)
            models.append(run.model)
            reporter.info(
                f"[{name}] prune_structured  search step {row['step']}: {row['move']}: predicted {row['predicted_ms']:.3f} ms, "
                f"measured {row['latency_p50_ms']:.3f} ms ({row['speedup']:.2f}x), held-out top-1 {row['held_out_accuracy']:.2f} %"
            )
        return ""

    def recover_on_the_way(self, trajectory: list[dict[str, Any]], models: list[nn.Module]) -> None:
        """Recover the current model (``prune.recover_epochs``) before the search goes on: a network whose moves cost
        much top-1 that recovery gives back (depthwise-separable groups) would otherwise stop the search early. The
        recovered model replaces the step's; its row records the held-out top-1 before and after."""
        run, row = self.scorer.run, trajectory[-1]
        before = self.accuracy
        run.model = copy.deepcopy(run.model)
        run.recover(row["step"])
        models[-1], self.accuracy = run.model, self.scorer.accuracy(run.model)
        row.update(recovered_on_the_way=run.config.prune.recover_epochs, held_out_accuracy_before_recovery=before)
        row.update(held_out_accuracy=self.accuracy, accuracy=evaluate(run.model, run.dataset.x_test, run.dataset.y_test))
        run.reporter.info(
            f"prune_structured: step {row['step']} recovered on the way: held-out top-1 {before:.2f} % -> {self.accuracy:.2f} %"
        )

    def measure(self, step: int, scored: Scored | None) -> dict[str, Any]:
        """Export the current model, measure it beside the dense export (confirmed when it reaches the target),
        profile it into the table, and return its trajectory row with the prediction made before measuring."""
        run, predictor = self.scorer.run, self.scorer.predictor
        predicted = predictor.predict_ms(run.model) if scored is not None else None
        path = self.probe.export(run.model, self.folder / f"step{step}")
        pairs = measure_pairs(self.probe, self.dense_path, path)
        if paired_speedup(pairs) >= self.target:
            pairs += measure_pairs(self.probe, self.dense_path, path)
        timing = pairs_summary(pairs)
        profiled = (
            None
            if self.table is None
            else profile_model(self.probe, path, list(layer_signatures(run.model, predictor.example).values()))[0]
        )
        if profiled is not None:
            self.table.add(profiled)
            predictor.refresh(profiled)
        predictor.calibrate(run.model, timing["latency_p50_ms"])
        row = {key: value for key, value in run.row(step, 0.0).items() if key != "level"}
        row.update(timing, held_out_accuracy=self.accuracy, predicted_ms=predicted)
        row["prediction_error_pct"] = None if predicted is None else 100 * (predicted - timing["latency_p50_ms"]) / timing["latency_p50_ms"]
        if scored is not None:
            row.update(move=scored.move.describe(), kind=scored.move.kind)
        return row


def search_speedup(
    run: PruningRun,
    probe: LatencyProbe,
    config: PruneConfig,
    max_accuracy_drop: float,
    cache_root: Path | None = None,
    not_tried: tuple[str, ...] = (),
) -> SearchOutcome:
    """Search moves until the measured speed-up reaches ``config.speedup``, then recover and check the budget.

    ``not_tried`` names moves the caller already knows are out (groups the rounding or the dependency analysis
    keeps whole). Leaves the chosen model in ``run.model``, recovered. Raises what export and benchmark raise.
    """
    started = time.perf_counter()
    kinds = ("depth", "width", "heads") if config.speedup_moves == "search" else (config.speedup_moves,)
    dense_widths = {group: root_channels(run.model, group) for group in run.plan.widths}
    with tempfile.TemporaryDirectory(prefix="edgeprune-search-") as scratch:
        folder = Path(scratch)
        dense_path = probe.export(run.dense, folder / "dense")
        table, predictor_kind = open_table(run, probe, cache_root, folder)
        predictor = LatencyPredictor(table, example_batch(run.dataset), [name for name, _ in run.model.named_modules() if name])
        scorer = MoveScorer(run, predictor, kinds)
        search = GreedySearch(scorer, probe, dense_path, folder, config.speedup, table, accuracy=scorer.accuracy(run.model))
        trajectory, models = [search.measure(0, None)], [run.model]
        stop = search.take_moves(trajectory, models, max_accuracy_drop, dense_widths)
        if table is not None:
            store_table(cache_root, table)
    search_seconds = time.perf_counter() - started
    index, recovered, budget_note = settle(run, models, trajectory, max_accuracy_drop)
    kept = kept_whole_blocks(run.dense, removable_blocks(run, run.dense))  # the unpruned model: all its blocks still there
    summary = {
        "target": config.speedup,
        "moves": config.speedup_moves,
        "step": index,
        "measured_speedup": trajectory[index]["speedup"],
        "accuracy_before": run.reference_accuracy,
        "accuracy_after_recovery": recovered,
        "accuracy_drop": run.reference_accuracy - recovered,
        "reached": trajectory[index]["speedup"] >= config.speedup and within(run, recovered, max_accuracy_drop),
        "search_seconds": round(search_seconds, 1),
        "predictor": predictor_kind,
        "prediction_error_pct": prediction_error(trajectory),
        "blocks_kept_whole": kept,
        "moves_not_tried": list(not_tried) + untried_moves(run, kinds, kept),
    }
    summary["verdict"] = verdict(summary, probe, max_accuracy_drop, budget_note or stop, trajectory[index])
    return SearchOutcome(trajectory, summary)


def table_key(fmt: str, device: str, threads: int) -> dict[str, Any] | None:
    """What a latency table is kept per: the device (this machine by its CPU, a remote one by its URL), the runtime
    (onnxruntime and its version here, TFLite's benchmark_model over adb/ssh), the thread count; None where no
    per-node profiler runs (latency is then predicted from MACs)."""
    if fmt == "onnx" and device == "local":
        return {"device": f"local: {cpu_model()}", "runtime": f"onnxruntime {onnxruntime.__version__}", "threads": threads}
    if profiles_ops(device, fmt):
        return {"device": device, "runtime": "tflite benchmark_model --enable_op_profiling", "threads": threads}
    return None


def profile_model(probe: LatencyProbe, path: Path, torch_layers: list[str]) -> tuple[ProfiledRun | None, str]:
    """One profiled run of ``path`` on the probe's device (onnxruntime's per-node profiler here, TFLite's op profile
    over adb/ssh) and how its nodes were matched to ``torch_layers``; None when the profile times no layer."""
    if probe.fmt == "onnx" and probe.device == "local":
        return profile_onnx(path, probe.settings.threads, torch_layers), "onnxruntime's per-node profiler"
    measured = profile_ops(path, probe.device, probe.settings)
    read = read_op_profile(measured["run_order"], measured["inference_avg_ms"], torch_layers) if measured else None
    if read is None:
        return None, f"benchmark_model's op profile on {probe.device} timed no conv or linear layer"
    return read[0], f"benchmark_model's op profile on {probe.device}, layers matched {read[1]}"


def latency_table_identity(config: BuildConfig, cache_root: Path | None) -> dict[str, Any]:
    """The cache-key part of the latency table a profile's speed-up search would use: its key, format and lineage
    (``latency_table.table_lineage``); empty where the profile runs no search or no table is kept."""
    if config.prune.speedup <= 0 or config.prune.speedup_moves == "uniform" or not config.export.formats:
        return {}
    key = table_key(config.export.formats[0], config.benchmark.device, config.benchmark.threads)
    if key is None:
        return {}
    lineage = table_lineage(cache_root, key) if cache_root is not None else None
    return {"latency_table": {**key, "format": TABLE_FORMAT, "lineage": lineage}}


def open_table(run: PruningRun, probe: LatencyProbe, cache_root: Path | None, folder: Path) -> tuple[LatencyTable | None, str]:
    """The latency table of the probe's device (cached per device, runtime and threads), with the uniform narrowings of
    the model profiled into it unless an earlier build did; None where no per-node profiler runs (onnxruntime here,
    benchmark_model's op profile over adb/ssh) or it times no layer: latency is then predicted from MACs."""
    key = table_key(probe.fmt, probe.device, probe.settings.threads)
    if key is None:
        return None, f"MACs (no per-node profiler for {probe.describe()}); every accepted step measured"
    table, how = cached_table(cache_root, key), "profiled by earlier builds"
    example, round_to = example_batch(run.dataset), run.config.prune.round_to
    model_id = cache_key(sorted(layer_signatures(run.model, example).values()))
    for steps in range(0, WIDTH_RUNS + 1):
        fingerprint = f"{model_id}:round_to={round_to}:narrowed={steps}"
        if fingerprint in table.profiled:
            continue
        narrowed = uniformly_narrowed(run, steps)
        path = probe.export(narrowed, folder / f"table-{steps}")
        profiled, how = profile_model(probe, path, list(layer_signatures(narrowed, example).values()))
        if profiled is None:
            return None, f"MACs ({how}); every accepted step measured"
        table.add(profiled, fingerprint)
    return table, f"latency table ({len(table.entries)} layer signatures, {len(table.profiled)} profiled models; {how})"


def uniformly_narrowed(run: PruningRun, steps: int) -> nn.Module:
    """``run.model`` with every group the plan can narrow ``steps`` rounding steps narrower (latency only: weights
    are not re-estimated); groups that would break the model stay whole."""
    widths: dict[str, int] = {}
    for group, original in run.plan.widths.items():
        width = root_channels(run.model, group)
        for _ in range(steps):
            width = next_width(original, width, run.config.prune.round_to) or width
        widths[group] = width
    if steps == 0 or not widths:
        return run.model
    flagged = {item.layer for item in run.untracked}
    return guarded_prune(run.model, run.config.prune, run.protected | flagged, run.groups, widths, pruning_guard(run)).model


def paired_prediction(previous: dict[str, Any], row: dict[str, Any]) -> dict[str, float | None]:
    """The table's prediction as a speed-up over the unpruned model, beside the paired measurement.

    The prediction for a step is calibrated on the step before (``predicted_ms`` = table µs x the previous step's
    measured ms per table µs), so ``previous.p50 / predicted`` is the latency ratio the table predicts for the move;
    chained on the previous step's paired speed-up it is the speed-up the table predicts for this one. Both speed-ups
    are ratios timed in one process, which a shared machine's changing load does not shift as it shifts a p50.
    """
    predicted = row.get("predicted_ms")
    if not predicted or not previous.get("latency_p50_ms"):
        return {"predicted_speedup": None, "speedup_prediction_error_pct": None}
    speedup = previous["speedup"] * previous["latency_p50_ms"] / predicted
    return {"predicted_speedup": speedup, "speedup_prediction_error_pct": 100 * (speedup - row["speedup"]) / row["speedup"]}


def prediction_error(trajectory: list[dict[str, Any]]) -> dict[str, float | None]:
    """Mean and largest absolute error (%) of the table's prediction over the accepted steps: of the p50 itself
    (``mean_abs``, ``max_abs``) and of the speed-up over the unpruned model against the paired one (``paired_*``)."""
    errors = [abs(row["prediction_error_pct"]) for row in trajectory if row.get("prediction_error_pct") is not None]
    paired = [abs(row["speedup_prediction_error_pct"]) for row in trajectory if row.get("speedup_prediction_error_pct") is not None]
    return {
        "mean_abs": sum(errors) / len(errors) if errors else None,
        "max_abs": max(errors, default=None),
        "paired_mean_abs": sum(paired) / len(paired) if paired else None,
        "paired_max_abs": max(paired, default=None),
        "within_10_pct": sum(error <= 10.0 for error in paired),
        "steps": len(errors),
    }


def untried_moves(run: PruningRun, kinds: tuple[str, ...], kept: list[dict[str, str]]) -> list[str]:
    """The moves the search could not or did not consider, each with why."""
    found = [f"removing block {item['block']} ({item['reason']})" for item in kept]
    found += [f"narrowing {item.layer} ({item.reason})" for item in run.untracked]
    if "depth" not in kinds:
        found.append("removing residual blocks (prune.speedup_moves = 'width')")
    if "width" not in kinds:
        found.append("narrowing layer groups (prune.speedup_moves = 'depth')")
    if "heads" not in kinds and any(hasattr(module, "num_heads") for module in run.model.modules()):
        found.append(f"dropping attention heads (prune.speedup_moves = '{run.config.prune.speedup_moves}')")
    return found


def verdict(summary: dict[str, Any], probe: LatencyProbe, max_drop: float, stop: str, row: dict[str, Any]) -> str:
    """One line: the target reached, or why not, with the fastest model within the budget and the moves not tried."""
    done = (
        f"{len(row.get('blocks_removed', []))} blocks removed, {row.get('channels_removed', 0)} channels removed, "
        + (f"{row['heads_removed']} attention heads dropped, " if row.get("heads_removed") else "")
        + f"top-1 {summary['accuracy_after_recovery'] - summary['accuracy_before']:+.2f} points against the unpruned model after recovery"
    )
    if summary["reached"]:
        return f"prune.speedup={summary['target']:g} reached: measured {summary['measured_speedup']:.2f}x on {probe.describe()} ({done})"
    untried = "; ".join(summary["moves_not_tried"][:6]) or "none"
    more = len(summary["moves_not_tried"]) - 6
    return (
        f"prune.speedup={summary['target']:g} not reached on {probe.describe()}: the fastest model within budgets.max_accuracy_drop="
        f"{max_drop:g} measures {summary['measured_speedup']:.2f}x (step {summary['step']}: {done}); "
        f"stopped because {stop or 'no move was left'}; "
        f"moves not tried: {untried}{f' and {more} more' if more > 0 else ''}"
    )
