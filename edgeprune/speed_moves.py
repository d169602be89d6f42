"""The moves a speed-up search weighs, and what each costs in accuracy and gains in predicted latency.

Three kinds of move change a model: removing a residual block whole (``edgeprune.depth_pruning``: every
operator of the block is gone), narrowing one layer group by one step of ``prune.round_to``
(``edgeprune.rounding.allowed_widths``; at most ``MAX_RATIO`` of its channels go), and, in a transformer
whose attention declares ``num_heads`` (timm's layout, ``edgeprune.pruning.attention_heads``), dropping one
attention head whole (Torch-Pruning's head pruning: the qkv projection loses one head's rows, the output
projection its columns, ``num_heads`` goes down by one; at least one head stays). A move is *scored* by
building the candidate, re-estimating its BatchNorm statistics, and measuring its top-1 on held-out
training images: the score is the latency the table predicts it saves (``edgeprune.latency_table``) per
point of held-out top-1 it costs. A width move that the pruning guard finds would break the model (a
group coupled through a shortcut that pads channels by a hard-coded count) is never proposed again; a
block whose output shape differs from its input (a strided or channel-padding shortcut) is never a move:
such blocks stay whole, and ``kept_whole_blocks`` says why.

``edgeprune.speed_search`` drives the greedy search over these moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.depth_pruning import DroppedBlock, drop_blocks, residual_blocks
from edgeprune.latency_table import LatencyTable, ProfiledRun, block_of, layer_signatures
from edgeprune.pruning import MAX_RATIO, Guard, attention_heads, guarded_prune, protected_layers, root_channels, verify_pruned_model
from edgeprune.rounding import allowed_widths
from edgeprune.structured_pruning import TAYLOR_SAMPLES, PruningRun
from edgeprune.training import count_macs_params, evaluate, example_batch, recalibrate_batchnorm

SCORE_IMAGES = 512  # held-out training images (the last ones) a candidate's top-1 is measured on
SCORE_RECALIBRATION = 256  # training images its BatchNorm statistics are re-estimated on before that
LOSS_FLOOR = 0.05  # points: a move that costs no held-out top-1 is ranked by its latency gain alone
SHAPE_CHANGE = "its output shape differs from its input (a strided or channel-padding shortcut): removing it would break the model"


@dataclass(frozen=True)
class Move:
    """Remove a residual block (``kind`` depth, ``target`` the block) or narrow a group to ``width`` channels."""

    kind: str
    target: str
    width: int = 0

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}:{self.width}"

    def describe(self) -> str:
        if self.kind == "heads":
            return f"drop one attention head of {self.target} ({self.width} qkv features left)"
        return f"remove block {self.target}" if self.kind == "depth" else f"narrow {self.target} to {self.width} channels"


@dataclass
class Scored:
    """A move's candidate model, its held-out top-1 and predicted latency (µs in table units)."""

    move: Move
    model: nn.Module
    held_out_accuracy: float
    predicted_us: float

    def value(self, current_accuracy: float, current_us: float) -> float:
        """Predicted µs saved per point of held-out top-1 lost (-inf when it saves nothing)."""
        gain = current_us - self.predicted_us
        return gain / max(current_accuracy - self.held_out_accuracy, LOSS_FLOOR) if gain > 0 else -math.inf


@dataclass
class LatencyPredictor:
    """Predicts a torch model's latency from the table and the last profiled model's other nodes.

    ``scale`` turns table microseconds into the milliseconds the device's benchmark measures; ``calibrate``
    sets it from a measured model. Without a profiler (``table`` None: a device onnxruntime does not profile
    here) latency is predicted as proportional to MACs.
    """

    table: LatencyTable | None
    example: torch.Tensor
    blocks: list[str]
    others: dict[str, float] = field(default_factory=dict)  # block ("" = rest of the graph) -> other nodes' µs
    overhead_us: float = 0.0
    scale: float = 1e-3

    def refresh(self, run: ProfiledRun) -> None:
        """Take the other nodes' time and the per-run overhead from a profile of the model now being searched."""
        self.others = {}
        for node, micros in run.others.items():
            block = block_of(node, self.blocks)
            self.others[block] = self.others.get(block, 0.0) + micros
        self.overhead_us = run.overhead_us()

    def predict_us(self, model: nn.Module) -> float:
        if self.table is None:
            return count_macs_params(model, self.example)["macs"] / 1000
        present = {name for name, module in model.named_modules() if name and not isinstance(module, DroppedBlock)}
        layers = sum(self.table.layer_us(sig) for sig in layer_signatures(model, self.example).values())
        others = sum(micros for block, micros in self.others.items() if not block or block in present)
        return self.overhead_us + layers + others

    def predict_ms(self, model: nn.Module) -> float:
        return self.predict_us(model) * self.scale

    def calibrate(self, model: nn.Module, measured_ms: float) -> None:
        self.scale = measured_ms / max(self.predict_us(model), 1e-9)


@dataclass
class MoveScorer:
    """Builds and scores the candidates of the model a ``PruningRun`` holds (``run.model``)."""

    run: PruningRun
    predictor: LatencyPredictor
    kinds: tuple[str, ...]  # "depth", "width" and/or "heads"
    rejected: dict[str, str] = field(default_factory=dict)  # move key -> why it cannot be made

    def held_out(self) -> tuple[np.ndarray, np.ndarray]:
        dataset = self.run.dataset
        return dataset.x_train[-SCORE_IMAGES:], dataset.y_train[-SCORE_IMAGES:]

    def accuracy(self, model: nn.Module) -> float:
        return evaluate(model, *self.held_out())

    def moves(self) -> list[Move]:
        """Every move the current model allows, blocks first (in model order), then groups."""
        model, run = self.run.model, self.run
        found: list[Move] = []
        if "depth" in self.kinds:
            found += [Move("depth", name) for name in removable_blocks(run)]
        if "width" in self.kinds:
            flagged, round_to = {item.layer for item in run.untracked}, run.config.prune.round_to
            present = {name for name, _ in model.named_modules()}
            for name, width in run.plan.widths.items():
                if name in present and name not in flagged:
                    narrower = next_width(width, root_channels(model, name), round_to)
                    found += [Move("width", name, narrower)] if narrower else []
        if "heads" in self.kinds:
            found += head_moves(run)
        return [move for move in found if move.key not in self.rejected]

    def score(self, move: Move) -> Scored | None:
        """The candidate ``move`` gives, with BatchNorm statistics re-estimated; None when the move breaks the model."""
        run = self.run
        if move.kind == "depth":
            candidate = drop_blocks(run.model, [move.target])
            verify_pruned_model(candidate, example_batch(run.dataset, batch=4), run.config.model.num_classes)
        else:
            candidate = self.narrowed(move)
            if candidate is None or (move.kind == "heads" and not self.one_head_fewer(move, candidate)):
                return None
        if run.config.prune.recalibrate_batchnorm:
            recalibrate_batchnorm(candidate, run.dataset.x_train[:SCORE_RECALIBRATION])
        return Scored(move, candidate, self.accuracy(candidate), self.predictor.predict_us(candidate))

    def narrowed(self, move: Move) -> nn.Module | None:
        run, guard = self.run, pruning_guard(self.run)
        flagged = {item.layer for item in run.untracked}
        config = replace(run.config.prune, prune_num_heads=move.kind == "heads")
        pruned = guarded_prune(run.model, config, run.protected | flagged, run.groups, {move.target: move.width}, guard)
        if pruned.untracked:
            for item in pruned.untracked:
                run.reporter.warn(f"prune_structured: keeping {item.layer} whole: {item.reason}")
            run.untracked += pruned.untracked
            self.rejected[move.key] = pruned.untracked[0].reason
            return None
        verify_pruned_model(pruned.model, guard.sample, run.config.model.num_classes)
        return pruned.model

    def one_head_fewer(self, move: Move, candidate: nn.Module) -> bool:
        """Whether dropping a head left ``move.target``'s attention with exactly one head fewer (else never proposed again)."""
        before, after = heads_of(self.run.model, move.target), heads_of(candidate, move.target)
        if after == before - 1:
            return True
        self.rejected[move.key] = f"head pruning left {after} of {before} heads, not one fewer"
        return False


def heads_of(model: nn.Module, qkv: str) -> int:
    """``num_heads`` of the attention module whose qkv projection is ``qkv``."""
    return int(model.get_submodule(qkv.rpartition(".")[0]).num_heads)


def head_moves(run: PruningRun) -> list[Move]:
    """One head-dropping move per attention of ``run.model`` the plan may narrow that has more than one head and keeps
    at least ``1 - MAX_RATIO`` of its original qkv features after it."""
    flagged, moves, names = {item.layer for item in run.untracked}, [], names_of(run.model)
    for qkv, heads in attention_heads(run.model).items():
        name = names.get(qkv, "")
        original = run.plan.widths.get(name)
        width = qkv.out_features - qkv.out_features // max(heads, 1)
        if original and name not in flagged and heads > 1 and width >= math.ceil(original * (1 - MAX_RATIO) - 1e-9):
            moves.append(Move("heads", name, width))
    return moves


def pruning_guard(run: PruningRun) -> Guard:
    """What each narrowing is checked against: test images, the class count, training images for Taylor importance."""
    dataset = run.dataset
    return Guard(
        example_batch(dataset, batch=4),
        run.config.model.num_classes,
        torch.from_numpy(dataset.x_train[:TAYLOR_SAMPLES]),
        torch.from_numpy(dataset.y_train[:TAYLOR_SAMPLES]),
    )


def next_width(original: int, current: int, round_to: int) -> int:
    """The next narrower width ``round_to`` allows a group of ``original`` channels now at ``current``, keeping at
    least ``1 - MAX_RATIO`` of them; 0 when there is none."""
    floor = math.ceil(original * (1 - MAX_RATIO) - 1e-9)
    narrower = [width for width in allowed_widths(original, round_to) if floor <= width < current]
    return max(narrower, default=0)


def removable_blocks(run: PruningRun, model: nn.Module | None = None) -> list[str]:
    """The residual blocks of ``model`` (default ``run.model``) that can be removed whole (``depth_pruning.residual_blocks``).

    Only the layers the user protects (and the classifier) keep their block: ``run.protected`` also holds the layers
    the dependency analysis keeps whole channel-wise (e.g. the residual streams an option-A pad joins), and a block
    made of them is still removed whole, its input passed through unchanged."""
    model = run.model if model is None else model
    protected = protected_layers(model, run.config.prune.ignored_layers, run.config.model.num_classes)
    return residual_blocks(model, example_batch(run.dataset, batch=4), protected)


def kept_whole_blocks(model: nn.Module, removable: list[str]) -> list[dict[str, str]]:
    """The siblings of removable blocks (same container, same class) that cannot go themselves, each with the reason."""
    modules = dict(model.named_modules())
    kinds = {(name.rpartition(".")[0], type(modules[name])) for name in removable if name in modules}
    kept = []
    for name, module in modules.items():
        if name and name not in removable and (name.rpartition(".")[0], type(module)) in kinds:
            kept.append({"block": name, "reason": SHAPE_CHANGE})
    return kept


def describe_model(run: PruningRun, dense_widths: dict[str, int]) -> dict[str, Any]:
    """Blocks removed and channels removed so far (over the groups the plan can narrow)."""
    present = {name for name, _ in run.model.named_modules()}
    removed = [name for name, module in run.model.named_modules() if isinstance(module, DroppedBlock)]
    narrowed = {name: width - root_channels(run.model, name) for name, width in dense_widths.items() if name in present}
    moved = sum(1 for channels in narrowed.values() if channels)
    attentions = [names_of(run.dense)[qkv] for qkv in attention_heads(run.dense)]
    heads = sum(heads_of(run.dense, name) - heads_of(run.model, name) for name in attentions if name in present)
    return {"blocks_removed": removed, "channels_removed": sum(narrowed.values()), "groups_narrowed": moved, "heads_removed": heads}


def names_of(model: nn.Module) -> dict[nn.Module, str]:
    return {module: name for name, module in model.named_modules()}
