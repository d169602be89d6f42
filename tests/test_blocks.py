"""Depth pruning: which blocks are residual, what removing them computes, how the model file and the build record it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune import api
from edgeprune.config import ModelConfig
from edgeprune.depth_pruning import DroppedBlock, drop_blocks, dropped_blocks, residual_blocks, score_blocks
from edgeprune.errors import ConfigError
from edgeprune.modelio import load_model, save_model
from edgeprune.models import create_model, example_input
from edgeprune.models.layers import conv_bn
from edgeprune.pruning import protected_layers


def removable(name: str) -> list[str]:
    torch.manual_seed(0)
    model = create_model(name).eval()
    return residual_blocks(model, example_input(name, batch=4), protected_layers(model, (), 10))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("resnet_mini", ["blocks.0"]),  # blocks.1 and .2 have a strided 1×1 conv shortcut: removing them changes shapes
        ("mobilenetv2_mini", ["features.3", "features.5"]),  # the inverted residuals with an add
        ("vit_tiny", ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]),  # whole transformer blocks, not their branches
        ("shufflenet_mini", ["features.3.branch", "features.5.branch"]),  # the branches of the stride-1 split units
        ("densenet_mini", []),  # concatenations grow the channels
        ("small_cnn", []),
    ],
)
def test_residual_blocks_are_found_by_what_they_compute_in_every_reference_architecture(name: str, expected: list[str]) -> None:
    assert removable(name) == expected


def test_cifar_mobilenetv2_has_its_ten_residual_blocks_found_even_where_untrained_activations_are_tiny() -> None:
    # the untrained 17-block network's activations shrink to ~1e-6 deep down: an absolute tolerance would call the
    # zeroed BatchNorm layers there "identities"; the relative one finds exactly the ten inverted residuals with an add
    blocks = removable("mobilenetv2_cifar")
    model = create_model("mobilenetv2_cifar")
    assert blocks == [name for name, module in model.named_modules() if getattr(module, "use_residual", False)]
    assert len(blocks) == 10


class Stack(nn.Module):
    """A residual block, a plain shape-keeping conv, a block called with two tensors, a protected residual block."""

    def __init__(self) -> None:
        super().__init__()
        self.residual = Residual()
        self.plain = conv_bn(8, 8)
        self.gated = Gated()
        self.kept = Residual()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.kept(self.gated(self.plain(self.residual(x)), x))
        return self.head(x)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(8, 8), conv_bn(8, 8, activation=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.gate(skip)


def test_only_blocks_that_reduce_to_the_identity_with_their_weights_zeroed_are_removable() -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    sample = torch.randn(4, 8, 6, 6)
    assert residual_blocks(model, sample) == ["residual", "kept"]  # the plain conv is not, the two-input block is skipped
    assert residual_blocks(model, sample, protected={"kept.branch.0.0"}) == ["residual"]  # holds a protected layer


class SplitUnit(nn.Module):
    """A ShuffleNetV2 unit: half the channels pass, the other half go through the branch, then a channel shuffle."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = nn.Sequential(conv_bn(4, 4), conv_bn(4, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = x.chunk(2, dim=1)
        out = torch.cat([left, self.branch(right)], 1)
        batch, channels, height, width = out.shape
        return out.view(batch, 2, channels // 2, height, width).transpose(1, 2).reshape(batch, channels, height, width)


class Wrapped(nn.Module):
    """A plain conv behind a wrapper: with the conv gone the wrapper is an identity, but nothing went around the conv."""

    def __init__(self) -> None:
        super().__init__()
        self.body = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Mixed(nn.Module):
    """A unit whose branch output is added to a permuted half: zeroed, a path goes around it, but bypassed it is no
    permutation (two channels summed)."""

    def __init__(self) -> None:
        super().__init__()
        self.branch = conv_bn(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1) + self.branch(x)


def test_a_split_units_branch_is_bypassable_and_removing_it_leaves_the_shuffle_of_the_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(conv_bn(1, 8), SplitUnit(), Wrapped(), Mixed(), nn.Flatten(), nn.LazyLinear(10)).eval()
    sample = torch.randn(4, 1, 6, 6)
    model(sample)
    assert residual_blocks(model, sample) == ["1.branch"]  # not the wrapped conv, not the summing unit
    assert residual_blocks(model, sample, protected={"1.branch.0.0"}) == []
    shallower = drop_blocks(model, ["1.branch"])
    with torch.no_grad():
        features = model[0](sample)
        order = [0, 4, 1, 5, 2, 6, 3, 7]  # the shuffle of two halves of four: left and right channels interleaved
        assert torch.equal(shallower[1](features), features[:, order])
        assert not torch.allclose(model[1](features), features[:, order], atol=1e-3)  # the branch did contribute
    assert dropped_blocks(shallower) == ["1.branch"] and residual_blocks(shallower, sample) == []


def test_a_removed_block_computes_the_model_with_its_branch_silenced_and_the_original_is_untouched() -> None:
    torch.manual_seed(0)
    model = create_model("mobilenetv2_mini").eval()
    sample = example_input("mobilenetv2_mini", batch=4)
    silenced = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in silenced.features[5].parameters():
            parameter.zero_()
        expected, original = silenced(sample), model(sample)
        shallower = drop_blocks(model, ["features.5"])
        assert torch.allclose(shallower(sample), expected, atol=1e-6)
        kept, removed = model.features[:6](sample), shallower.features[:6](sample)
        assert float((kept - removed).abs().max()) > 0.01 * float(kept.abs().max())  # the block did contribute
        assert torch.equal(model(sample), original) and dropped_blocks(model) == []
    assert dropped_blocks(shallower) == ["features.5"] and isinstance(shallower.features[5], DroppedBlock)


def test_the_model_file_records_removed_blocks_and_rebuilds_the_shallower_network(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = drop_blocks(create_model("vit_tiny").eval(), ["blocks.1", "blocks.3"])
    save_model(model, tmp_path / "model.pt", ModelConfig(source="example:vit_tiny"), (1, 28, 28))
    rebuilt = load_model(tmp_path / "model.pt")
    sample = example_input("vit_tiny", batch=3)
    assert dropped_blocks(rebuilt) == ["blocks.1", "blocks.3"]
    with torch.no_grad():
        assert torch.allclose(rebuilt(sample), model(sample), atol=1e-6)


def test_blocks_are_ranked_by_held_out_top1_then_by_macs_removed() -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    images = torch.randn(64, 8, 6, 6).numpy()
    macs = {(): 30, ("residual",): 20, ("kept",): 25}  # removing "residual" saves 10 MACs, "kept" 5
    macs_of = lambda candidate: macs[tuple(dropped_blocks(candidate))]  # noqa: E731

    def ranking(model: nn.Module) -> list[tuple[str, float, int]]:
        labels = torch.argmax(model(torch.from_numpy(images)), dim=1).numpy()  # the model itself is 100 % right on them
        scores = score_blocks(model, ["kept", "residual"], macs_of, (images, labels), None)
        return [(score.block, score.accuracy, score.macs_removed) for score in scores]

    with torch.no_grad():
        model.head[2].weight.mul_(100.0)  # predictions that follow the features, not the classifier's bias
        model.head[2].bias.zero_()
        model.residual.branch[1][1].weight.fill_(5.0)  # a branch that matters: removing it changes predictions
        model.kept.branch[1][1].weight.zero_()  # "kept" adds nothing any more: removing it is free
        model.kept.branch[1][1].bias.zero_()
        (first, top1, removed), (second, other_top1, _) = ranking(model)
        assert (first, top1, removed, second) == ("kept", 100.0, 5, "residual") and other_top1 < 100.0
        model.residual.branch[1][1].weight.zero_()  # both free now: the one that removes more MACs goes first
        model.residual.branch[1][1].bias.zero_()
        assert ranking(model) == [("residual", 100.0, 10), ("kept", 100.0, 5)]


TINY = (
    "train.epochs=1",
    "data.train_samples=512",
    "data.eval_samples=200",
    "finetune.epochs=1",
    "prune.amount=0.2",
    "prune.round_to=8",
    "export.formats=['onnx']",
    "quantize.scheme='none'",
    "benchmark.enabled=false",
)


def test_a_build_removes_the_named_block_and_the_cheapest_other_one_then_prunes_channels(workdir: Path, example_data) -> None:
    overrides = (*TINY, "prune.drop_blocks=['features.3']", "prune.drop_block_count=1")
    result = api.build("cpu-x86", model="example:mobilenetv2_mini", overrides=overrides, out=workdir / "out", cache_dir=workdir / "cache")
    metrics = next(stage["metrics"] for stage in result.manifest["stages"] if stage["name"] == "prune_structured")
    depth = metrics["depth"]
    assert [row["block"] for row in depth["blocks"]] == ["features.3", "features.5"]  # the only other removable block
    assert [row["chosen_by"] for row in depth["blocks"]] == ["prune.drop_blocks", "prune.drop_block_count"]
    assert depth["blocks"][1]["macs_removed"] > 0 and 0.0 <= depth["blocks"][1]["held_out_accuracy"] <= 100.0
    assert 1.3 < depth["mac_reduction"] < metrics["mac_reduction"]  # blocks first, then channels took more
    gone = {row["layer"] for row in metrics["layers"] if row["channels_after"] == 0}
    assert gone == {name for name in (row["layer"] for row in metrics["layers"]) if name.startswith(("features.3.", "features.5."))}
    rebuilt = load_model(workdir / "out" / "model.pt")
    assert dropped_blocks(rebuilt) == ["features.3", "features.5"]
    model = json.loads((workdir / "out" / "manifest.json").read_text())["model"]
    assert model["macs"] == metrics["macs_after"] and model["blocks_removed"] == ["features.3", "features.5"]
    report = (workdir / "out" / "report.md").read_text()
    removed = "Blocks removed whole (residual blocks and bypassable branches; their layers show 0 after)"
    assert f"{removed}: `features.3`, `features.5`." in report


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("prune.drop_blocks=['features.4']", "prune.drop_blocks: 'features.4' is not a residual block that can be removed"),
        ("prune.drop_block_count=3", "prune.drop_block_count = 3, but the model has 2 more removable residual blocks"),
    ],
)
def test_a_block_that_cannot_be_removed_is_a_one_line_config_error(override: str, message: str, workdir: Path, example_data) -> None:
    with pytest.raises(ConfigError) as raised:
        api.build("cpu-x86", model="example:mobilenetv2_mini", overrides=(*TINY, override), out=workdir / "out", cache_dir=workdir)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)
    assert "features.3, features.5" in str(raised.value)  # it names the blocks that can go
    assert not (workdir / "out" / "model.pt").exists()
