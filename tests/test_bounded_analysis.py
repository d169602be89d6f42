"""Structured pruning never hangs: channel-mixing reshapes are barriers, and every analysis has a real deadline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig, ModelConfig, PruneConfig
from edgeprune.deadline import AnalysisTimeout, Budget, Deadline
from edgeprune.dependency import dependency_analysis
from edgeprune.modelio import load_model, save_model
from edgeprune.progress import SILENT
from edgeprune.stages.base import StageContext
from edgeprune.stages.prune_structured import PruneStructured
from edgeprune.training import count_macs_params
from tests.shufflenet_public import ShuffleNetV2

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def run_prune_stage(tmp_path: Path, dataset, source: str, **prune: object):
    """The structured stage alone on ``source`` (random weights), as a build runs it; its output model and metrics."""
    config = BuildConfig(model=ModelConfig(source=source), prune=PruneConfig(recover_epochs=0, **prune))
    model_path = tmp_path / "in" / "model.pt"
    model_path.parent.mkdir()
    save_model(load_or_create(source), model_path, config.model, dataset.input_shape)
    workdir = tmp_path / "stage"
    workdir.mkdir()
    context = StageContext(config, dataset, {"model": Artifact.from_file("model", "model", model_path)}, workdir, SILENT)
    output = PruneStructured().run(context)
    return load_model(model_path), load_model(output.artifacts[0].path), output.metrics


def load_or_create(source: str) -> torch.nn.Module:
    from edgeprune.modelio import create_model

    return create_model(ModelConfig(source=source), (1, 28, 28))


@pytest.mark.slow
@pytest.mark.parametrize("factory", ["shufflenet_v2_w05", "shufflenet_v2_w10"])
def test_public_shufflenet_v2_prunes_within_its_budget_to_a_verified_model_with_fewer_macs(tmp_path: Path, example_data, factory) -> None:
    dense, pruned, metrics = run_prune_stage(tmp_path, example_data, f"tests.shufflenet_public:{factory}", amount=0.5)
    analysis = metrics["dependency_analysis"]
    # the shuffle-coupled groups (every branch output and concat input) are kept whole, named, with the op that couples them
    assert analysis["groups"] >= 15 and len(analysis["kept_whole"]) >= 20
    assert all("channel-mixing" in item["reason"] and "→" in item["reason"] for item in analysis["kept_whole"])
    assert any(item["layer"].endswith("conv3") for item in analysis["kept_whole"])
    assert metrics["untracked_coupling"] == []  # the kept groups needed no bisection
    assert metrics["mac_reduction"] > 1.3
    assert count_macs_params(dense, X[:1])["macs"] > 1.3 * count_macs_params(pruned, X[:1])["macs"]
    assert pruned.layer2[1].conv1.out_channels < dense.layer2[1].conv1.out_channels  # branch channels really removed
    with torch.no_grad():
        logits = pruned.eval()(X)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()


def test_every_group_touching_a_reshape_shuffle_is_kept_whole_and_the_rest_prune_to_an_exact_subnetwork() -> None:
    """With the shuffle as a barrier the remaining groups are exactly what Torch-Pruning computes on the uncut graph."""
    from edgeprune.pruning import Guard, guarded_prune
    from edgeprune.pruning_plan import GroupPlan

    model = ShuffleNetV2(0.5).eval()
    analysis = dependency_analysis(model, X[:1], {"linear"}, Budget(120))
    config = PruneConfig(round_to=1)
    widths = GroupPlan.from_config(analysis.groups, config).targets(0.5)
    result = guarded_prune(model, config, analysis.protected({"linear"}), analysis.groups, widths, Guard(X, 10))
    assert result.untracked == [] and result.removed
    kept = {name for item in analysis.kept_whole for name in (item.layer, *item.members)}
    assert not kept & set(result.removed)
    assert {"layer1.0.conv2", "layer1.0.conv5", "layer2.3.conv3"} <= kept


@pytest.mark.slow
class ChannelMixingNet(nn.Module):
    """conv → ``mix`` → conv → squeeze-excitation (a (N, C) → (N, C, 1, 1) view, which mixes nothing) → conv → linear."""

    def __init__(self, mix: str) -> None:
        super().__init__()
        self.mix = mix
        self.a, self.bn = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.b = nn.Conv2d(4 if mix == "pixel_shuffle" else 16, 32, 3, padding=1)
        self.se1, self.se2 = nn.Linear(32, 8), nn.Linear(8, 32)
        self.c, self.fc = nn.Conv2d(32, 24, 1), nn.Linear(24, 10)
        self.shuffle = nn.ChannelShuffle(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.a(x)))
        n, c, h, w = x.shape
        if self.mix == "pixel_shuffle":
            x = F.pixel_shuffle(x, 2)
        elif self.mix == "rearrange":  # einops: 'b (g c) h w -> b (c g) h w'
            x = x.reshape(n, 4, c // 4, h, w).permute(0, 2, 1, 3, 4).reshape(n, c, h, w)
        elif self.mix == "channel_shuffle":
            x = self.shuffle(x)
        elif self.mix == "grouped_reshape":  # statistics per group of channels
            groups = x.view(n, 4, c // 4, h, w)
            x = (groups - groups.mean(dim=(2, 3, 4), keepdim=True)).view(n, c, h, w)
        x = F.relu(self.b(x))
        scale = torch.sigmoid(self.se2(F.relu(self.se1(F.adaptive_avg_pool2d(x, 1).view(n, -1)))))
        x = F.relu(self.c(x * scale.view(n, -1, 1, 1)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("mix", ["pixel_shuffle", "rearrange", "channel_shuffle", "grouped_reshape"])
def test_a_channel_mixing_op_keeps_only_the_group_feeding_it_whole_and_the_rest_prunes_exactly(mix: str) -> None:
    from edgeprune.pruning import Guard, guarded_prune
    from edgeprune.pruning_plan import GroupPlan

    torch.manual_seed(0)
    model, x = ChannelMixingNet(mix).eval(), torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    plain = dependency_analysis(ChannelMixingNet("none").eval(), x[:1], {"fc"}, Budget(120))
    analysis = dependency_analysis(model, x[:1], {"fc"}, Budget(120))
    assert [group.name for group in plain.groups] == ["a", "se1", "se2", "c"] and plain.kept_whole == []
    assert [group.name for group in analysis.groups] == ["se1", "se2", "c"]  # b (behind the op) prunes with se2
    assert [item.layer for item in analysis.kept_whole] == ["a"] and "channel-mixing" in analysis.kept_whole[0].reason
    config = PruneConfig(round_to=1)
    widths = GroupPlan.from_config(analysis.groups, config).targets(0.5)
    result = guarded_prune(model, config, analysis.protected({"fc"}), analysis.groups, widths, Guard(x, 10))
    assert result.untracked == [] and result.model.b.out_channels == 16 and result.model.a.out_channels == 16


@pytest.mark.slow
def test_a_tiny_analysis_budget_keeps_every_group_whole_says_why_and_the_stage_goes_on(tmp_path: Path, example_data) -> None:
    dense, pruned, metrics = run_prune_stage(
        tmp_path, example_data, "tests.shufflenet_public:shufflenet_v2_w05", analysis_seconds=0.001, recalibrate_batchnorm=False
    )
    kept = metrics["dependency_analysis"]["kept_whole"]
    assert metrics["dependency_analysis"]["groups"] == 0 and kept
    assert all("prune.analysis_seconds (0.001 s)" in item["reason"] for item in kept)
    assert {item["layer"] for item in kept} >= {"conv1", "conv2", "layer1.0.conv3"}
    assert metrics["mac_reduction"] == 1.0
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(X), dense.eval()(X), atol=1e-5)


def test_the_deadline_interrupts_a_single_call_that_never_returns(monkeypatch) -> None:
    """A library call that loops forever (here: Torch-Pruning's group construction) is stopped, its groups kept whole."""
    import torch_pruning as tp

    def endless(*_args, **_kwargs):
        while True:
            try:
                pass
            except Exception:  # swallowing errors does not swallow the deadline
                continue

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", endless)
    model = ShuffleNetV2(0.5).eval()
    analysis = dependency_analysis(model, X[:1], set(), Budget(10.0))
    assert analysis.groups == [] and len(analysis.kept_whole) == sum(
        isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in model.modules()
    )
    assert all("ran past prune.analysis_seconds (10 s)" in item.reason for item in analysis.kept_whole)


def test_a_deadline_that_did_not_fire_leaves_nothing_behind() -> None:
    with Deadline(5.0):
        total = sum(range(100))
    assert total == 4950
    with pytest.raises(AnalysisTimeout):
        with Deadline(0.0):
            pass


def test_the_build_report_lists_the_groups_left_whole_and_why() -> None:
    from edgeprune.manifest import left_unpruned
    from edgeprune.report import _left_unpruned

    def _unpruned_groups(manifest: dict) -> list[str]:
        return _left_unpruned({"model": {"left_unpruned": left_unpruned(manifest["stages"][0]["metrics"])}})

    metrics = {
        "dependency_analysis": {"kept_whole": [{"layer": "layer1.0.conv2", "members": [], "reason": "a channel-mixing view"}]},
        "untracked_coupling": [{"layer": "stem.0", "reason": "pruning it breaks the model"}],
    }
    lines = _unpruned_groups({"stages": [{"name": "prune_structured", "metrics": metrics}]})
    assert "| `layer1.0.conv2` | a channel-mixing view |" in lines and "| `stem.0` | pruning it breaks the model |" in lines
    assert _unpruned_groups({"stages": [{"name": "prune_structured", "metrics": {"untracked_coupling": []}}]}) == []
