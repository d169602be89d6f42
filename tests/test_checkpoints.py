"""Checkpoints as they exist in the wild load with weights_only=True, and say what was adapted."""

import pytest
import torch
from torch import nn

from edgeprune.checkpoints import read_checkpoint
from edgeprune.errors import InputError
from edgeprune.modelio import load_weights
from tests.checkpoint_files import WRITERS, save_cuda_tagged, storage_locations, training_checkpoint, without_batch_counters


class BnNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.linear = nn.Linear(4, classes)

    def forward(self, x):
        return self.linear(torch.relu(self.bn1(self.conv1(x))).mean((2, 3)))


def trained(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    model = BnNet(classes)
    for tensor in model.state_dict().values():
        if tensor.is_floating_point():
            tensor.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("layout", sorted(WRITERS))
def test_every_wild_layout_loads_the_same_weights(tmp_path, layout):
    source = trained()
    path = tmp_path / f"{layout}.ckpt"
    WRITERS[layout](source, path)
    model = BnNet()
    checkpoint = load_weights(model, path)
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)
    assert checkpoint.format in {"torch zip archive", "legacy torch pickle (pre-1.6)", "safetensors"}
    assert ("safetensors" in layout) == (checkpoint.format == "safetensors")
    assert ("legacy" in layout) == checkpoint.format.startswith("legacy")


def test_a_cuda_saved_legacy_checkpoint_with_everything_old_says_each_adaptation_once(tmp_path):
    path = tmp_path / "resnet56.th"
    WRITERS["legacy-cuda-dataparallel"](trained(), path)
    assert b"cuda:0" in storage_locations(path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # what a plain load does on this machine
    checkpoint = load_weights(BnNet(), path)
    assert checkpoint.adaptations == [
        "tensors saved on cuda:0 mapped to cpu",
        "weights taken from 'state_dict' (beside best_prec1, epoch, optimizer)",
        "key prefix 'module.' stripped",
        "filled 1 missing BatchNorm num_batches_tracked buffers (unused at inference)",
    ]


def test_the_model_weights_are_preferred_to_an_ema_copy_which_is_named(tmp_path):
    main, ema = trained(), BnNet()
    path = tmp_path / "timm.pth.tar"
    torch.save({"state_dict": main.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 1}, path)
    model = BnNet()
    checkpoint = load_weights(model, path)
    torch.testing.assert_close(model.linear.weight, main.linear.weight)
    assert "the EMA copy 'state_dict_ema' is not used" in checkpoint.adaptations[0]


def test_a_compiled_models_prefix_is_stripped_only_where_it_fits(tmp_path):
    path = tmp_path / "compiled.pt"
    torch.save({f"_orig_mod.module.{k}": v for k, v in trained().state_dict().items()}, path)
    checkpoint = load_weights(BnNet(), path)
    assert "key prefix '_orig_mod.' stripped" in checkpoint.adaptations
    assert "key prefix 'module.' stripped" in checkpoint.adaptations


def test_a_renamed_layer_is_one_line_naming_the_closest_key_and_leaves_the_model_untouched(tmp_path):
    state = trained().state_dict()
    state["fc.weight"], state["fc.bias"] = state.pop("linear.weight"), state.pop("linear.bias")
    path = tmp_path / "renamed.pt"
    torch.save(training_checkpoint(state), path)
    model = BnNet()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(InputError) as caught:
        load_weights(model, path)
    message = str(caught.value)
    assert "\n" not in message
    assert "2 missing, first 'linear.weight' (closest in the checkpoint: 'fc.weight')" in message
    assert "2 unexpected, first 'fc.weight'" in message
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_a_head_of_another_size_is_named(tmp_path):
    path = tmp_path / "cifar100.pt"
    torch.save(trained(classes=100).state_dict(), path)
    with pytest.raises(InputError, match=r"shape mismatch at linear.weight: checkpoint \(100, 4\) vs model \(10, 4\) \(a classifier"):
        load_weights(BnNet(), path)


def test_missing_weights_other_than_batch_counters_are_still_an_error(tmp_path):
    state = without_batch_counters(trained().state_dict())
    del state["bn1.running_var"]
    path = tmp_path / "partial.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match="1 missing, first 'bn1.running_var'"):
        load_weights(BnNet(), path)


def test_torchscript_and_pickled_modules_need_trust_and_then_load(tmp_path):
    source = trained()
    scripted, pickled = tmp_path / "model.torchscript.pt", tmp_path / "whole.pt"
    torch.jit.script(source).save(str(scripted))
    save_cuda_tagged({"model": source, "epoch": 3}, pickled)
    with pytest.raises(InputError, match="a TorchScript archive .*--trust-checkpoint"):
        read_checkpoint(scripted)
    with pytest.raises(InputError, match="pickled objects .*--trust-checkpoint"):
        read_checkpoint(pickled)
    for path in (scripted, pickled):
        model = BnNet()
        checkpoint = load_weights(model, path, trust_checkpoint=True)
        assert "trusted" in checkpoint.format
        torch.testing.assert_close(model.linear.weight, source.linear.weight)


def test_a_truncated_safetensors_file_is_one_line(tmp_path):
    path = tmp_path / "model.safetensors"
    WRITERS["safetensors"](trained(), path)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(InputError, match="corrupt or truncated safetensors"):
        load_weights(BnNet(), path)


def test_half_precision_weights_are_cast_and_said(tmp_path):
    path = tmp_path / "fp16.pt"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in trained().state_dict().items()}, path)
    checkpoint = load_weights(BnNet(), path)
    assert "float16 tensors cast to the model's dtype" in checkpoint.adaptations
