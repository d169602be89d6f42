"""edgeprune inspect: what a user needs to choose a profile, found by loading, pruning on trial and converting."""

from __future__ import annotations

import json

import pytest
import torch

from edgeprune.cli import main
from tests.checkpoint_files import WRITERS
from tests.zoo import load_zoo

ZOO = load_zoo()


@pytest.fixture
def option_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet20.th"
    WRITERS["legacy-cuda-dataparallel"](ZOO["resnet20_a"].factory(), path)
    return path


@pytest.mark.slow
def test_inspect_reports_checkpoint_groups_rounding_blocks_and_conversion(workdir, option_a_checkpoint, capsys):
    args = ["inspect", "--model", ZOO["resnet20_a"].source, "--weights", str(option_a_checkpoint), "--json", "--timeout", "400"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["checkpoint"]["format"] == "legacy torch pickle (pre-1.6)"
    assert "key prefix 'module.' stripped" in summary["checkpoint"]["adapted"]
    assert summary["macs"] > 20_000_000 and summary["params"] == sum(p.numel() for p in ZOO["resnet20_a"].factory().parameters())
    groups = {row["layer"]: row for row in summary["groups"]}
    assert groups["layer3.0.conv1"]["widths"] == [16, 32, 48, 64]  # cpu-x86 rounds to 16
    kept = {row["layer"]: row["reason"] for row in summary["kept_whole"]}
    assert "prune.round_to = 16 allows no narrower width" in kept["layer1.0.conv1"]
    assert summary["residual_blocks"] == ["layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]
    assert summary["conversion"]["onnx"]["ok"] and "Pad" in summary["conversion"]["onnx"]["ops"]
    assert summary["conversion"]["int8"]["ok"] and summary["conversion"]["tflite"]["ok"]


def test_inspect_bounds_the_conversion_time(workdir, option_a_checkpoint, capsys):
    args = ["inspect", "--model", ZOO["vgg"].source, "--json", "--timeout", "0.01", "--set", "prune.round_to=8"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["conversion"]["tflite"] == {"ok": False, "error": "did not finish within 0.01 s"}
    assert summary["checkpoint"] is None
    assert [row["channels"] for row in summary["groups"]][:3] == [16, 32, 64]
    assert not summary["kept_whole"] or all("round_to" not in row["reason"] for row in summary["kept_whole"])
