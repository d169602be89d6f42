"""The bundled architectures: every registered model is built, counted, pruned and exported.

Tests loop over ``list_models()``, so a newly registered model is covered
without anyone writing a test for it.
"""

from __future__ import annotations

import dataclasses
from functools import cache
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune.errors import InputError
from edgeprune.models import ModelSpec, create_model, example_input, get_spec, list_models, register_model

MODELS = list_models()
PRUNABLE = [spec for spec in MODELS if not spec.untracked_coupling]
UNTRACKED = [spec for spec in MODELS if spec.untracked_coupling]
NUM_CLASSES = 10


def by_name(specs: list[ModelSpec]) -> dict[str, list]:
    """``parametrize`` keyword arguments: the specs, identified by model name."""
    return {"argvalues": specs, "ids": [spec.name for spec in specs]}


def build(spec: ModelSpec, in_channels: int = 1, image_size: int = 28) -> nn.Module:
    """A seeded model in eval mode whose normalization layers look trained, not freshly initialized.

    Fresh BatchNorm (gamma 1, beta 0, mean 0, var 1) is a near no-op that would
    hide export mistakes in its folding, and leaves random-init logits almost
    independent of the input.
    """
    torch.manual_seed(0)
    model = create_model(spec.name, NUM_CLASSES, in_channels, image_size)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
                module.weight.uniform_(0.5, 2.0)
                module.bias.normal_(0.0, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(16, in_channels, image_size, image_size) * 2 + 0.5)
    return model.eval()


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """Blocks following the timm convention: a fused ``qkv`` linear and an int ``num_heads``."""
    return [
        module
        for module in model.modules()
        if isinstance(getattr(module, "qkv", None), nn.Linear) and isinstance(getattr(module, "num_heads", None), int)
    ]


def half_pruner(model: nn.Module, example: torch.Tensor):
    """Torch-Pruning at ratio 0.5 (L2 group magnitude, round_to 8), the classifier kept, heads declared."""
    import torch_pruning as tp

    return tp.pruner.MetaPruner(
        model,
        example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=[m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == NUM_CLASSES],
        round_to=8,
        num_heads={block.qkv: block.num_heads for block in attention_modules(model)},
        prune_head_dims=True,
    )


def prune_half(model: nn.Module, example: torch.Tensor) -> None:
    """One pruning step, then ``num_heads``/``head_dim`` written back as the prune stage does."""
    pruner = half_pruner(model, example)
    pruner.step()
    for block in attention_modules(model):
        block.num_heads = pruner.num_heads[block.qkv]
        block.head_dim = block.qkv.out_features // (3 * block.num_heads)


def removed_output_channels(model: nn.Module, example: torch.Tensor) -> dict[str, list[int]]:
    """Prune ``model`` step by step and record, per conv/BatchNorm name, the output channels removed."""
    import torch_pruning as tp

    out_channel_handlers = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_batchnorm_out_channels)
    names = {module: name for name, module in model.named_modules()}
    removed: dict[str, set[int]] = {}
    for group in half_pruner(model, example).step(interactive=True):
        for dependency, indices in group:
            if dependency.handler in out_channel_handlers:
                removed.setdefault(names[dependency.target.module], set()).update(indices)
        group.prune()
    return {name: sorted(indices) for name, indices in removed.items()}


def macs(model: nn.Module, example: torch.Tensor) -> float:
    import torch_pruning as tp

    return tp.utils.count_ops_and_params(model, example)[0]


@cache
def pruned(name: str) -> tuple[nn.Module, nn.Module]:
    """(original, pruned) pair for a model, built once per test session."""
    spec = get_spec(name)
    original, model = build(spec), build(spec)
    prune_half(model, example_input(spec))
    return original, model.eval()


def max_abs_diff(a, b) -> float:
    return float(abs(torch.as_tensor(a) - torch.as_tensor(b)).max())


# --------------------------------------------------------------------------- registry


def test_registry_lists_the_default_model_first_with_complete_specs() -> None:
    assert MODELS[0].name == "small_cnn"
    assert len({spec.name for spec in MODELS}) == len(MODELS) >= 7
    for spec in MODELS:
        assert get_spec(spec.name) is spec
        assert spec.description and spec.family
        assert len(spec.default_input_shape) == 3
    assert [spec.name for spec in UNTRACKED] == ["padded_shortcut_net"]


def test_spec_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        MODELS[0].name = "renamed"  # type: ignore[misc]


def test_unknown_model_is_a_one_line_input_error_naming_the_known_models() -> None:
    with pytest.raises(InputError) as raised:
        create_model("resnet_9000")
    message = str(raised.value)
    assert "resnet_9000" in message and "\n" not in message
    assert all(spec.name in message for spec in MODELS)
    with pytest.raises(InputError):
        get_spec("")


def test_registering_a_name_twice_is_refused() -> None:
    def small_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> nn.Module:
        """A second model under a taken name."""
        return nn.Identity()

    with pytest.raises(ValueError, match="twice"):
        register_model(family="cnn")(small_cnn)
    assert get_spec("small_cnn").factory is not small_cnn


def test_example_input_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first = example_input("small_cnn", batch=2)
    assert torch.equal(first, example_input(get_spec("small_cnn"), batch=2))
    assert tuple(first.shape) == (2, 1, 28, 28)
    assert tuple(example_input("small_cnn", input_shape=(3, 32, 32)).shape) == (1, 3, 32, 32)
    assert torch.equal(torch.rand(1), expected_next)


def test_vit_rejects_an_image_size_its_patches_do_not_tile() -> None:
    with pytest.raises(InputError, match="patch"):
        create_model("vit_tiny", image_size=30)


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("spec", **by_name(MODELS))
@pytest.mark.parametrize("in_channels,image_size", [(1, 28), (1, 32), (3, 28), (3, 32)])
def test_forward_gives_one_logit_per_class(spec: ModelSpec, in_channels: int, image_size: int) -> None:
    model = create_model(spec.name, NUM_CLASSES, in_channels, image_size).eval()
    with torch.no_grad():
        logits = model(example_input(spec, batch=2, input_shape=(in_channels, image_size, image_size)))
    assert tuple(logits.shape) == (2, NUM_CLASSES)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("spec", **by_name(MODELS))
def test_parameter_count_is_small_and_init_is_seeded(spec: ModelSpec) -> None:
    torch.manual_seed(0)
    first = create_model(spec.name).state_dict()
    torch.manual_seed(0)
    second = create_model(spec.name).state_dict()
    torch.manual_seed(1)
    other = create_model(spec.name).state_dict()
    params = sum(tensor.numel() for key, tensor in first.items() if "running" not in key and "num_batches" not in key)
    assert 10_000 < params < 2_500_000  # the largest: mobilenetv2_cifar, the CIFAR MobileNetV2 (2.24 M)
    assert all(torch.equal(first[key], second[key]) for key in first)
    assert any(not torch.equal(first[key], other[key]) for key in first if first[key].is_floating_point())


@pytest.mark.parametrize("spec", **by_name(MODELS))
def test_onnx_export_matches_torch(spec: ModelSpec, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    model, example = build(spec), example_input(spec, batch=2)
    path = tmp_path / f"{spec.name}.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": example.numpy()})
    with torch.no_grad():
        expected = model(example)
    assert expected.abs().max() > 0.05  # not a comparison of two near-zero tensors
    assert max_abs_diff(logits, expected) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("spec", **by_name(MODELS))
def test_tflite_conversion_matches_torch(spec: ModelSpec, tmp_path: Path) -> None:
    litert_torch = pytest.importorskip("litert_torch")
    interpreter_module = pytest.importorskip("ai_edge_litert.interpreter")
    model, example = build(spec), example_input(spec, batch=2)
    path = tmp_path / f"{spec.name}.tflite"
    litert_torch.convert(model, (example,)).export(str(path))
    interpreter = interpreter_module.Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], example.numpy())
    interpreter.invoke()
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    with torch.no_grad():
        expected = model(example)
    assert max_abs_diff(logits, expected) < 1e-3


# --------------------------------------------------------------------------- structured pruning


@pytest.mark.parametrize("spec", **by_name(PRUNABLE))
def test_structured_pruning_halves_channels_and_the_model_still_runs(spec: ModelSpec) -> None:
    original, model = pruned(spec.name)
    example = example_input(spec, batch=2)
    with torch.no_grad():
        logits = model(example)
    assert tuple(logits.shape) == (2, NUM_CLASSES)
    assert macs(original, example[:1]) / macs(model, example[:1]) > 1.5
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in original.parameters())


@pytest.mark.parametrize("spec", **by_name([spec for spec in PRUNABLE if attention_modules(create_model(spec.name))]))
def test_structured_pruning_shrinks_attention_heads(spec: ModelSpec) -> None:
    original, model = pruned(spec.name)
    for before, after in zip(attention_modules(original), attention_modules(model), strict=True):
        assert after.num_heads * after.head_dim == after.qkv.out_features // 3
        assert after.num_heads * after.head_dim < before.num_heads * before.head_dim
        assert after.head_dim < before.head_dim or after.num_heads < before.num_heads


@pytest.mark.parametrize("spec", **by_name(PRUNABLE))
def test_pruned_model_exports_to_onnx(spec: ModelSpec, tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    _, model = pruned(spec.name)
    example = example_input(spec, batch=2)
    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17, input_names=["input"])
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": example.numpy()})
    with torch.no_grad():
        assert max_abs_diff(logits, model(example)) < 1e-4


# Torch-Pruning 1.6.1 sees the reshape/transpose channel shuffle as an identity, so the channels it removes
# after a shuffle are not the ones it removed before it: the pruned net runs, but is not a sub-network.
# (edgeprune.pruning.guarded_prune detects and leaves out those groups: tests/test_prune_structured.py.)
INEXACT_PRUNING = {"shufflenet_mini": "Torch-Pruning treats the channel shuffle as an identity channel mapping"}
EXACTLY_PRUNABLE = [
    pytest.param(
        spec,
        id=spec.name,
        marks=[pytest.mark.xfail(strict=True, reason=INEXACT_PRUNING[spec.name])] if spec.name in INEXACT_PRUNING else [],
    )
    # LayerNorm normalizes over channels, so removing a channel is not the same as zeroing it.
    for spec in PRUNABLE
    if not any(isinstance(module, nn.LayerNorm) for module in create_model(spec.name).modules())
]


@pytest.mark.parametrize("spec", EXACTLY_PRUNABLE)
def test_pruned_model_is_the_original_with_the_removed_channels_zeroed(spec: ModelSpec) -> None:
    """The dependency graph really followed every add, concat and split: nothing else changed."""
    original, model = build(spec), build(spec)
    example = example_input(spec, batch=4)
    modules = dict(original.named_modules())
    for name, channels in removed_output_channels(model, example[:1]).items():
        modules[name].register_forward_hook(
            lambda module, inputs, output, channels=channels: output.index_fill(1, torch.tensor(channels), 0.0)
        )
    with torch.no_grad():
        expected = original(example)
        assert max_abs_diff(model.eval()(example), expected) < 1e-5 * max(1.0, float(expected.abs().max()))


@pytest.mark.parametrize("spec", **by_name(UNTRACKED))
def test_untracked_coupling_is_invisible_to_the_dependency_graph(spec: ModelSpec) -> None:
    """Torch-Pruning prunes without complaint, yet the result no longer runs: detection is the caller's job."""
    model = build(spec)
    example = example_input(spec, batch=2)
    with torch.no_grad():
        assert tuple(model(example).shape) == (2, NUM_CLASSES)
    prune_half(model, example[:1])
    with pytest.raises(RuntimeError, match="size of tensor"), torch.no_grad():
        model(example)
