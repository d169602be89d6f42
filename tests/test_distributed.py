"""DDP finetuning: the same updates as single-process training (exactly, without BatchNorm), the same top-1
within a point on a real CNN, spawned by edgeprune or launched by torchrun."""

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune import api
from edgeprune.ddp_finetune import ddp_train, launched_by_torchrun
from edgeprune.errors import ConfigError
from edgeprune.training import TrainSettings, evaluate, train
from tests.conftest import USER_MODEL
from tests.user_models import tiny_cnn

ROOT = Path(__file__).resolve().parents[1]


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 32), nn.ReLU(), nn.Linear(32, 10))


def max_parameter_difference(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_torchrun_is_recognised_by_its_environment(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert not launched_by_torchrun()
    monkeypatch.setenv("RANK", "1")
    assert launched_by_torchrun()


def test_a_world_of_no_processes_is_refused(example_data, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    settings = TrainSettings(epochs=1, lr=1e-2, batch_size=64, seed=0)
    with pytest.raises(ConfigError, match="processes must be >= 1, got 0"):
        ddp_train(mlp(), example_data.x_train[:64], example_data.y_train[:64], settings, processes=0)


@pytest.mark.slow
@pytest.mark.numerics
def test_two_process_ddp_on_a_cnn_matches_single_process_top1(example_data, user_checkpoint, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    teacher = tiny_cnn()
    teacher.load_state_dict(torch.load(user_checkpoint, weights_only=True))
    settings = TrainSettings(epochs=1, lr=1e-2, batch_size=128, seed=0, distill_alpha=0.5)
    images, labels = example_data.x_train[:3000], example_data.y_train[:3000]
    untouched = tiny_cnn()
    single = train(copy.deepcopy(untouched), images, labels, settings, teacher)
    distributed = ddp_train(tiny_cnn(), images, labels, settings, processes=2, teacher=teacher)

    single_top1 = evaluate(single, example_data.x_test, example_data.y_test)
    ddp_top1 = evaluate(distributed, example_data.x_test, example_data.y_test)
    assert ddp_top1 > evaluate(untouched, example_data.x_test, example_data.y_test) + 30  # it trained
    assert abs(ddp_top1 - single_top1) <= 1.0, (single_top1, ddp_top1)
    assert not distributed.training


TORCHRUN_SCRIPT = """
import os, sys
import torch
from edgeprune.config import DataConfig
from edgeprune.data import load_dataset
from edgeprune.ddp_finetune import ddp_train
from edgeprune.training import TrainSettings
from tests.test_distributed import mlp

data = load_dataset(DataConfig(train_samples=1050), 10)
model = ddp_train(mlp(), data.x_train, data.y_train, TrainSettings(epochs=1, lr=1e-2, batch_size=100, seed=0), processes=1)
torch.save(model.state_dict(), os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"))
"""


@pytest.mark.slow
def test_torchrun_ddp_makes_the_single_process_updates_on_every_rank(example_data, tmp_path):
    """Without BatchNorm the averaged gradient is the full batch's: 1050 images in batches of 100 (a short last one).

    ``processes=1`` in the script: under torchrun the world is torchrun's (2 here).
    """
    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(tmp_path)]
    finished = subprocess.run(command, cwd=ROOT, env=_with_root_on_path(), capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-2000:]

    single = train(mlp(), example_data.x_train[:1050], example_data.y_train[:1050], TrainSettings(1, 1e-2, 100, 0))
    for rank in (0, 1):
        trained = mlp()
        trained.load_state_dict(torch.load(tmp_path / f"rank{rank}.pt", weights_only=True))
        assert max_parameter_difference(trained, single) < 1e-5
        assert max_parameter_difference(trained, mlp()) > 1e-2  # and it did move


def _with_root_on_path() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_the_finetune_stage_runs_ddp_when_asked_and_matches_one_process(user_checkpoint, tmp_path, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.chdir(tmp_path)
    fast = ("data.train_samples=2000", "finetune.epochs=1", "quantize.scheme='none'", "benchmark.enabled=false")
    finetuned = {}
    for processes in (1, 2):
        result = api.build(
            "cpu-x86",
            model=USER_MODEL,
            weights=str(user_checkpoint),
            overrides=(*fast, f"finetune.processes={processes}"),
            out=tmp_path / f"dist{processes}",
            cache_dir=tmp_path / "cache",
        )
        finetuned[processes] = next(stage["metrics"] for stage in result.manifest["stages"] if stage["name"] == "finetune")
    assert finetuned[2]["processes"] == 2 and finetuned[1]["processes"] == 1
    assert finetuned[2]["accuracy_before"] == finetuned[1]["accuracy_before"]  # the same pruned model went in
    assert abs(finetuned[2]["accuracy"] - finetuned[1]["accuracy"]) <= 1.5, finetuned


def test_ddp_finetune_refuses_sparsity_masks(user_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"finetune.processes > 1 cannot hold unstructured sparsity masks"):
        api.build(
            "size",
            model=USER_MODEL,
            weights=str(user_checkpoint),
            overrides=("data.train_samples=256", "finetune.epochs=1", "finetune.processes=2", "benchmark.enabled=false"),
            cache_dir=tmp_path / "cache",
        )
