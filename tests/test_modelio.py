"""Checkpoints in the layouts people save, and pickle-free model files."""

import os

import pytest
import torch
from torch import nn

from edgeprune.config import ModelConfig
from edgeprune.errors import InputError
from edgeprune.modelio import create_model, load_model, load_weights, save_model
from tests.user_models import TinyCnn, tiny_cnn

CONFIG = ModelConfig(source="tests.user_models:tiny_cnn")


def trained_like() -> nn.Module:
    torch.manual_seed(42)
    model = TinyCnn()
    for parameter in model.parameters():
        parameter.data.normal_()
    return model


@pytest.mark.parametrize("layout", ["bare", "state_dict", "model", "dataparallel", "wrapped_dataparallel"])
def test_common_checkpoint_layouts_load(tmp_path, layout):
    source = trained_like()
    state = source.state_dict()
    payload = {
        "bare": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state, "optimizer": {"lr": 0.1}},
        "dataparallel": {f"module.{k}": v for k, v in state.items()},
        "wrapped_dataparallel": {"state_dict": {f"module.{k}": v for k, v in state.items()}},
    }[layout]
    path = tmp_path / "ckpt.pt"
    torch.save(payload, path)
    model = tiny_cnn()
    load_weights(model, path)
    x = torch.randn(2, 1, 28, 28)
    torch.testing.assert_close(model.eval()(x), source.eval()(x))


def test_full_pickles_need_explicit_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(trained_like(), path)
    with pytest.raises(InputError, match="--trust-checkpoint"):
        load_weights(tiny_cnn(), path)
    load_weights(tiny_cnn(), path, trust_checkpoint=True)


def test_bad_checkpoints_give_clear_errors(tmp_path):
    good = tmp_path / "good.pt"
    torch.save(trained_like().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(InputError, match="corrupt or truncated"):
        load_weights(tiny_cnn(), truncated)
    with pytest.raises(InputError, match="checkpoint not found"):
        load_weights(tiny_cnn(), tmp_path / "missing.pt")
    other = tmp_path / "other.pt"
    torch.save(TinyCnn(num_classes=5).state_dict(), other)
    with pytest.raises(InputError, match=r"shape mismatch at classifier.weight: checkpoint \(5, 64\) vs model \(10, 64\)"):
        load_weights(tiny_cnn(), other)
    nan = trained_like().state_dict()
    nan["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pt")
    with pytest.raises(InputError, match="NaN/inf weights in features.0.weight"):
        load_weights(tiny_cnn(), tmp_path / "nan.pt")
    torch.save({"foo": 1}, tmp_path / "junk.pt")
    with pytest.raises(InputError, match="not a state_dict"):
        load_weights(tiny_cnn(), tmp_path / "junk.pt")


def test_factories_are_checked():
    with pytest.raises(InputError, match="cannot import"):
        create_model(ModelConfig(source="tests.nope:factory"), (1, 28, 28))
    with pytest.raises(InputError, match="not a torch.nn.Module"):
        create_model(ModelConfig(source="tests.user_models:not_a_module"), (1, 28, 28))
    with pytest.raises(InputError, match="expected package.module:factory"):
        create_model(ModelConfig(source="just_a_name"), (1, 28, 28))


def test_model_files_round_trip_a_resized_model_without_pickles(tmp_path):
    model = tiny_cnn()
    # shrink a layer the way structured pruning does: fewer output channels and matching consumers
    keep = torch.arange(8)
    conv, bn, conv2 = model.features[0], model.features[1], model.features[4]
    conv.weight, conv.bias = nn.Parameter(conv.weight.data[keep]), nn.Parameter(conv.bias.data[keep])
    bn.weight, bn.bias = nn.Parameter(bn.weight.data[keep]), nn.Parameter(bn.bias.data[keep])
    bn.running_mean, bn.running_var = bn.running_mean[keep], bn.running_var[keep]
    conv2.weight = nn.Parameter(conv2.weight.data[:, keep])
    conv.out_channels = bn.num_features = conv2.in_channels = 8
    path = tmp_path / "model.pt"
    save_model(model, path, CONFIG, (1, 28, 28))
    with open(path, "rb") as handle:  # the file holds no code: the safe unpickler accepts it
        torch.load(handle, weights_only=True)
    rebuilt = load_model(path)
    assert rebuilt.features[0].out_channels == 8 and rebuilt.features[4].weight.shape == (32, 8, 3, 3)
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(rebuilt(x), model.eval()(x))


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": "edgeprune-model/1", "payload": Evil(marker)}, path)
    with pytest.raises(InputError, match="not a loadable edgeprune model file"):
        load_model(path)
    with pytest.raises(InputError, match="--trust-checkpoint"):
        load_weights(tiny_cnn(), path)
    assert not marker.exists()
