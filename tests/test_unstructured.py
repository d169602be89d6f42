"""Unstructured pruning: magnitude masks, the cubic schedule, 2:4 sparsity, and builds that ship them."""

import gzip
import json

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune import api
from edgeprune.cli import main
from edgeprune.config import SparsityConfig
from edgeprune.sparsity import (
    apply_masks,
    compute_masks,
    cubic_sparsity,
    lamp_scores,
    prunable_weights,
    pruning_plan,
    satisfies_two_four,
    schedule_updates,
    sparsity_masks,
    sparsity_report,
    two_four_eligible,
    two_four_mask,
)
from edgeprune.training import TrainSettings, train
from tests.conftest import FAST, USER_MODEL, onnx_op_types


def small_net() -> nn.Module:
    """Eligible and ineligible layers for 2:4: a 1-channel stem, a depthwise conv, a 6-channel conv, linears."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3),  # in 1: not 2:4 eligible
        nn.Conv2d(8, 8, 3, groups=8),  # depthwise: not eligible
        nn.Conv2d(8, 6, 1),  # eligible (8 inputs)
        nn.Conv2d(6, 12, 3),  # in 6: not eligible
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 16),  # eligible
        nn.ReLU(),
        nn.Linear(16, 10),  # eligible
    )


def test_cubic_schedule_follows_zhu_and_gupta():
    assert cubic_sparsity(0, 8, 0.9) == 0.0 and cubic_sparsity(8, 8, 0.9) == pytest.approx(0.9)
    assert cubic_sparsity(4, 8, 0.8) == pytest.approx(0.8 - 0.8 * 0.5**3)
    assert cubic_sparsity(1, 2, 0.5, initial=0.1) == pytest.approx(0.5 - 0.4 / 8)
    plan = pruning_plan(SparsityConfig(amount=0.9, schedule="cubic", schedule_steps=8))
    assert len(plan) == 8 and plan[-1] == pytest.approx(0.9) and plan[0] == pytest.approx(0.9 * (1 - (7 / 8) ** 3))
    assert (np.diff(plan) > 0).all() and (np.diff(plan, n=2) < 0).all()  # fast at first, slowing down
    assert pruning_plan(SparsityConfig(amount=0.7)) == [0.7]
    assert pruning_plan(SparsityConfig(pattern="2:4", schedule="cubic")) == [0.5]


def test_global_scope_zeroes_the_smallest_weights_across_layers():
    model = small_net()
    weights = {f"{name}.weight": module.weight.detach().clone() for name, module in prunable_weights(model).items()}
    total = sum(weight.numel() for weight in weights.values())
    masks = compute_masks(model, SparsityConfig(amount=0.6), 0.6)
    assert set(masks) == set(weights)
    pruned = torch.cat([weights[name][mask == 0].abs() for name, mask in masks.items()])
    kept = torch.cat([weights[name][mask == 1].abs() for name, mask in masks.items()])
    assert len(pruned) == round(0.6 * total) and pruned.max() <= kept.min()
    apply_masks(model, masks)
    report = sparsity_report(model)
    assert report["global_sparsity"] == pytest.approx(round(0.6 * total) / total)
    assert len({round(row["sparsity"], 3) for row in report["layers"]}) > 1  # one threshold, uneven per layer


def test_layer_scope_gives_every_layer_its_quantile():
    model = small_net()
    apply_masks(model, compute_masks(model, SparsityConfig(amount=0.75, scope="layer"), 0.75))
    for row in sparsity_report(model)["layers"]:
        assert row["sparsity"] == round(0.75 * row["weights"]) / row["weights"]


def test_lamp_score_is_a_weights_square_over_the_squares_ranked_at_or_above_it():
    scores = lamp_scores(torch.tensor([3.0, -1.0, 2.0, 0.0]))
    assert scores.tolist() == pytest.approx([1.0, 1 / 14, 4 / 13, 0.0])  # squares 9, 1, 4, 0: ranked 0 < 1 < 4 < 9


def test_lamp_scope_keeps_a_small_layer_that_one_magnitude_threshold_empties():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 4))
    with torch.no_grad():
        model[1].weight.mul_(0.05)  # a small layer of small weights: all below the big layer's magnitude threshold
    by_magnitude = compute_masks(model, SparsityConfig(amount=0.9), 0.9)
    by_lamp = compute_masks(model, SparsityConfig(amount=0.9, scope="lamp"), 0.9)
    total = sum(mask.numel() for mask in by_lamp.values())
    assert sum(int((mask == 0).sum()) for mask in by_lamp.values()) == round(0.9 * total)  # the same global amount
    assert by_magnitude["1.weight"].sum() == 0  # emptied: the classifier would output its bias only
    kept = by_lamp["1.weight"]
    assert 0.2 <= kept.mean() <= 1.0
    # within a layer LAMP still keeps the largest magnitudes
    weight = model[1].weight.detach().abs()
    assert weight[kept == 0].max() <= weight[kept == 1].min()


def test_two_four_mask_groups_along_the_input_dimension():
    weight = torch.zeros(2, 8, 1, 3)
    # output 0, kernel column 0: input channels 0..3 = 1, 4, 3, 2 and 4..7 = 8, 7, 6, 5
    weight[0, :, 0, 0] = torch.tensor([1.0, 4.0, 3.0, 2.0, 8.0, 7.0, 6.0, 5.0])
    weight[0, :, 0, 1] = torch.tensor([-9.0, 1.0, 0.5, 9.5, 1.0, 1.5, 2.0, 2.5])
    weight[1] = torch.randn(8, 1, 3)
    mask = two_four_mask(weight)
    assert mask[0, :, 0, 0].tolist() == [0, 1, 1, 0, 1, 1, 0, 0]
    assert mask[0, :, 0, 1].tolist() == [1, 0, 0, 1, 0, 0, 1, 1]  # magnitudes: the sign does not matter
    assert (mask.movedim(1, -1).reshape(-1, 4).sum(1) == 2).all()
    assert satisfies_two_four(weight * mask) and not satisfies_two_four(weight[1:])


def test_two_four_masks_only_eligible_layers():
    model = small_net()
    modules = dict(model.named_modules())
    eligible = {name for name, module in modules.items() if two_four_eligible(module)}
    assert eligible == {"2", "6", "8"}
    masks = compute_masks(model, SparsityConfig(pattern="2:4"), 0.5)
    assert set(masks) == {f"{name}.weight" for name in eligible}
    apply_masks(model, masks)
    rows = {row["layer"]: row for row in sparsity_report(model, "2:4")["layers"]}
    assert {name for name, row in rows.items() if row["pattern"] == "2:4"} == eligible
    assert all(rows[name]["sparsity"] == 0.5 for name in eligible) and rows["0"]["sparsity"] == 0.0
    assert all(satisfies_two_four(modules[name].weight) for name in eligible)


def test_schedule_updates_spread_steps_over_the_first_part_of_training():
    config = SparsityConfig(amount=0.9, schedule="cubic", schedule_steps=5, schedule_end=0.5)
    updates = schedule_updates(config, total_steps=101)
    assert sorted(updates) == [12, 25, 38, 50]  # steps 2..5 evenly up to half of the 101 steps
    assert schedule_updates(SparsityConfig(amount=0.9), 100) == {}
    model = small_net()
    final = updates[50](model)
    assert sum(int((mask == 0).sum()) for mask in final.values()) == round(0.9 * sum(mask.numel() for mask in final.values()))


def test_training_holds_masks_and_applies_the_schedule(example_data):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))
    config = SparsityConfig(amount=0.8, schedule="cubic", schedule_steps=4, schedule_end=0.5)
    apply_masks(model, compute_masks(model, config, pruning_plan(config)[0]))
    first = sparsity_masks(model)
    settings = TrainSettings(epochs=1, lr=1e-2, batch_size=64, seed=0)
    images, labels = example_data.x_train[:640], example_data.y_train[:640]
    train(model, images, labels, settings, frozen_masks=first, mask_updates=schedule_updates(config, 10))
    report = sparsity_report(model)
    total = sum(row["weights"] for row in report["layers"])
    assert report["global_sparsity"] == round(0.8 * total) / total
    for name, mask in first.items():  # once pruned, always pruned
        assert (dict(model.named_parameters())[name][mask == 0] == 0).all()


def test_a_cubic_schedule_without_finetuning_is_a_config_error(workdir, user_checkpoint, capsys):
    code = main(
        [
            "build",
            "--target",
            "cpu-x86",
            "--model",
            USER_MODEL,
            "--weights",
            str(user_checkpoint),
            "--set",
            "prune.mode='unstructured'",
            "--set",
            "sparsity.schedule='cubic'",
            "--set",
            "finetune.epochs=0",
            "--set",
            "benchmark.enabled=false",
        ]
    )
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1
    assert "sparsity.schedule = 'cubic' prunes during finetuning: set finetune.epochs > 0" in error
    user = ["--model", USER_MODEL, "--weights", str(user_checkpoint)]
    code = main(["build", "--target", "nvidia-gpu", *user, "--set", "sparsity.schedule=cubic"])
    assert code == 2 and "does not apply to sparsity.pattern = '2:4'" in capsys.readouterr().err


def gzip_bytes(path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9, mtime=0))


@pytest.mark.slow
@pytest.mark.numerics
def test_size_profile_ships_a_sparse_int8_onnx_many_times_smaller(workdir, user_checkpoint):
    import onnx
    from onnx import numpy_helper

    result = api.build("size", model=USER_MODEL, weights=str(user_checkpoint), overrides=(*FAST, "benchmark.enabled=false"))
    stages = {stage["name"]: stage["metrics"] for stage in result.manifest["stages"]}
    first_step = cubic_sparsity(1, 8, 0.9)
    assert stages["prune_unstructured"]["global_sparsity"] == pytest.approx(first_step, abs=1e-4)
    assert stages["finetune"]["global_sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert len(stages["finetune"]["pruning_steps"]) == 7
    assert stages["finetune"]["accuracy"] > 60
    folder = workdir / "dist/size"
    int8, fp32 = folder / "model_int8.onnx", folder / "model_fp32.onnx"
    assert "DequantizeLinear" in onnx_op_types(int8) and "QuantizeLinear" not in onnx_op_types(int8)  # int8 weights, float activations
    assert result.manifest["artifacts"]["onnx_int8"]["names_minified"] is True
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(int8)).graph.initializer if t.data_type == onnx.TensorProto.INT8]
    large = [w for w in weights if w.size >= 1000]
    assert large and sum(int((w == 0).sum()) for w in large) / sum(w.size for w in large) >= 0.9
    artifacts = result.manifest["artifacts"]
    assert artifacts["onnx_int8"]["size_gzip_bytes"] == gzip_bytes(int8)
    ratio = fp32.stat().st_size / gzip_bytes(int8)
    assert ratio >= 12.0, ratio  # 16.2x measured (LAMP, float16 constants); tiny_cnn (23 k weights) has relatively more graph overhead
    assert abs(artifacts["onnx_int8"]["accuracy"] - artifacts["onnx_fp32"]["accuracy"]) <= 1.5


@pytest.mark.slow
def test_nvidia_gpu_profile_keeps_two_four_sparsity_through_finetune_and_export(workdir, user_checkpoint):
    import onnx
    from onnx import numpy_helper

    from edgeprune.modelio import load_model

    result = api.build("nvidia-gpu", model=USER_MODEL, weights=str(user_checkpoint), overrides=(*FAST, "benchmark.enabled=false"))
    folder = workdir / "dist/nvidia-gpu"
    assert result.manifest["model"]["macs"] < result.manifest["model"]["macs_dense"]  # structured first ...
    model = load_model(folder / "model.pt")
    eligible = [module for module in model.modules() if two_four_eligible(module)]
    assert len(eligible) == 3  # conv2, conv3 and the classifier; conv1 has one input channel
    assert all(satisfies_two_four(module.weight) and (module.weight == 0).float().mean() >= 0.5 for module in eligible)  # ... then 2:4
    finetune = {stage["name"]: stage["metrics"] for stage in result.manifest["stages"]}["finetune"]
    assert [row["pattern"] for row in finetune["layers"]] == ["dense", "2:4", "2:4", "2:4"]
    for name in ("model_fp32.onnx", "model_fp16.onnx"):
        checked = two_four_initializers(onnx.load(str(folder / name)), numpy_helper)
        assert len(checked) == len(eligible) and all(checked.values()), (name, checked)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["artifacts"]["onnx_fp16"]["parity"]["max_abs_error"] < 5e-2


def two_four_initializers(proto, numpy_helper) -> dict[str, bool]:
    """For every Conv/Gemm/MatMul weight initializer with an input dimension divisible by 4: does it hold 2:4?"""
    initializers = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    checked = {}
    for node in proto.graph.node:
        weight = initializers.get(node.input[1]) if len(node.input) > 1 else None
        if weight is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        attributes = {a.name: a for a in node.attribute}
        if node.op_type == "Conv" and attributes.get("group") and attributes["group"].i != 1:
            continue
        transposed = node.op_type == "MatMul" or (node.op_type == "Gemm" and not (attributes.get("transB") and attributes["transB"].i))
        input_dim = 0 if transposed else 1
        if weight.shape[input_dim] % 4 == 0:
            checked[node.input[1]] = satisfies_two_four(torch.from_numpy(weight.astype(np.float32)), input_dim)
    return checked
