"""Attention heads in the speed-up search: a transformer's linear layers in the latency table, and dropping one
head whole as a move beside removing blocks and narrowing groups (the bundled ``vit_tiny``)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.config import BuildConfig, ExportConfig, PruneConfig
from edgeprune.data import Dataset
from edgeprune.export.onnx import export_onnx
from edgeprune.latency_table import LatencyTable, layer_class, layer_macs, layer_signatures, profile_onnx, signature
from edgeprune.models.vit import vit_tiny
from edgeprune.progress import Reporter
from edgeprune.pruning import layer_groups, protected_layers
from edgeprune.pruning_plan import GroupPlan
from edgeprune.speed_moves import LatencyPredictor, Move, MoveScorer, describe_model
from edgeprune.speed_search import GreedySearch, untried_moves
from edgeprune.structured_pruning import PruningRun

QUIET = Reporter(verbosity=0)


def vit_run(kinds: str = "search") -> PruningRun:
    torch.manual_seed(0)
    model = vit_tiny().eval()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 64)
    data = Dataset(x, y, x[:16].copy(), y[:16].copy(), "synthetic")
    config = BuildConfig(prune=PruneConfig(round_to=8, recover_epochs=0, speedup_moves=kinds))  # type: ignore[arg-type]
    example = torch.from_numpy(data.x_test[:1])
    protected = protected_layers(model, (), 10)
    analysis = layer_groups(model, example, config.prune, protected)
    plan = GroupPlan.from_config(analysis.groups, config.prune)
    return PruningRun(model, copy.deepcopy(model), config, data, QUIET, analysis.protected(protected), analysis.groups, plan)


def test_a_transformers_linear_layers_are_keyed_by_their_rows_and_found_in_onnxruntimes_trace(tmp_path: Path) -> None:
    model, example = vit_tiny().eval(), torch.zeros(1, 1, 28, 28)
    layers = list(layer_signatures(model, example).values())
    assert layers[:3] == ["conv:1x1x28x28:64x1x4x4:7x7", "gemm:49x64:192x64", "gemm:49x64:64x64"]  # 49 tokens of 64 features
    assert layers[-1] == "gemm:1x64:10x64"  # the head sees one pooled vector
    assert signature("gemm", (4, 49, 64), (192, 64), batch=4) == "gemm:49x64:192x64"  # the rows of one sample
    assert layer_macs("gemm:49x64:192x64") == 49 * 64 * 192
    export_onnx(model, example, tmp_path / "vit.onnx", ExportConfig())
    profiled = profile_onnx(tmp_path / "vit.onnx", threads=1, torch_layers=layers, runs=3, warmup=1)
    # onnxruntime runs each linear as a Gemm on the flattened tokens: its times land on the torch layers' keys
    assert set(profiled.layers) == set(layers)
    assert len(profiled.layers["gemm:49x64:192x64"]) == 4 and all(t > 0 for times in profiled.layers.values() for t in times)


def test_dropping_a_head_is_a_move_and_its_candidate_has_one_head_fewer() -> None:
    run = vit_run()
    scorer = MoveScorer(run, LatencyPredictor(None, torch.from_numpy(run.dataset.x_test[:1]), []), ("depth", "width", "heads"))
    heads = [move for move in scorer.moves() if move.kind == "heads"]
    assert heads == [Move("heads", f"blocks.{index}.attn.qkv", 144) for index in range(4)]
    scored = scorer.score(heads[1])
    assert scored is not None and "drop one attention head of blocks.1.attn.qkv" in heads[1].describe()
    attention = scored.model.blocks[1].attn
    assert (attention.num_heads, attention.head_dim, attention.qkv.out_features, attention.proj.in_features) == (3, 16, 144, 48)
    assert scored.model.blocks[0].attn.num_heads == 4  # the other blocks keep theirs
    assert scored.model(torch.from_numpy(run.dataset.x_test[:2])).shape == (2, 10)
    assert scored.predicted_us < scorer.predictor.predict_us(run.model)  # MACs: fewer
    run.model = scored.model
    assert describe_model(run, {})["heads_removed"] == 1
    assert [move.width for move in scorer.moves() if move.target == "blocks.1.attn.qkv" and move.kind == "heads"] == [96]


def test_the_search_drops_a_head_where_the_table_says_heads_cost_most() -> None:
    run = vit_run()
    example = torch.from_numpy(run.dataset.x_test[:1])
    dense = layer_signatures(run.model, example).values()
    # every linear layer costs its MACs except the full 4-head qkv projection, which costs 10x
    table = LatencyTable({}, {sig: [layer_macs(sig) / 1e4 * (10 if sig == "gemm:49x64:192x64" else 1)] for sig in dense})
    table.entries["gemm:49x64:144x64"] = [layer_macs("gemm:49x64:144x64") / 1e4]
    table.entries["gemm:49x48:64x48"] = [layer_macs("gemm:49x48:64x48") / 1e4]
    scorer = MoveScorer(run, LatencyPredictor(table, example, [name for name, _ in run.model.named_modules() if name]), ("heads", "width"))
    search = GreedySearch(scorer, probe=None, dense_path=Path("-"), folder=Path("-"), target=2.0, table=table, accuracy=100.0)  # type: ignore[arg-type]
    chosen = search.choose()
    assert chosen is not None and chosen.move.kind == "heads"
    assert untried_moves(run, ("depth", "width", "heads"), []) == []  # heads are a move of the search now
    assert "dropping attention heads (prune.speedup_moves = 'width')" in untried_moves(vit_run("width"), ("width",), [])


@pytest.mark.parametrize("moves", ["depth", "width"])
def test_a_search_restricted_to_one_kind_proposes_no_head_move(moves: str) -> None:
    run = vit_run(moves)
    scorer = MoveScorer(run, LatencyPredictor(None, torch.from_numpy(run.dataset.x_test[:1]), []), (moves,))
    assert all(move.kind == moves for move in scorer.moves())


class StridedNet(torch.nn.Module):
    """Two depthwise convs with the same input and weight shapes, one of stride 1 and one of stride 2."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(1, 32, 3, 1, 1)
        self.same = torch.nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.down = torch.nn.Conv2d(32, 32, 3, 2, 1, groups=32)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.stem(x))
        out = torch.relu(self.same(out)) + out
        return self.head(self.down(out).mean((2, 3)))


def test_a_strided_conv_is_not_keyed_as_its_stride_1_twin_and_onnxruntimes_trace_lands_on_both(tmp_path: Path) -> None:
    model, example = StridedNet().eval(), torch.zeros(1, 1, 28, 28)
    layers = layer_signatures(model, example)
    assert layers["same"] == "conv:1x32x28x28:32x1x3x3:28x28" and layers["down"] == "conv:1x32x28x28:32x1x3x3:14x14"
    assert layer_macs(layers["same"]) == 4 * layer_macs(layers["down"]) == 32 * 9 * 28 * 28
    assert layer_class(layers["same"]) != layer_class(layers["down"])  # fitted apart: their costs per MAC differ
    export_onnx(model, example, tmp_path / "strided.onnx", ExportConfig())
    profiled = profile_onnx(tmp_path / "strided.onnx", threads=1, torch_layers=list(layers.values()), runs=3, warmup=1)
    assert set(profiled.layers) == set(layers.values())  # both matched by their output size, each with its own time
