"""quantize.select = "fastest": the primary artefact chosen by measuring the primary format's files side by side.

The measured cases time real ONNX files on this machine's onnxruntime: a heavy and a light network whose
MACs differ ~60-fold, so which is faster is never in doubt whatever the CPU or the load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeprune import api
from edgeprune.artifacts import Artifact
from edgeprune.budgets import check_budgets, exit_code
from edgeprune.config import BenchmarkConfig, BudgetConfig, BuildConfig, ExportConfig, QuantizeConfig
from edgeprune.errors import ConfigError
from edgeprune.export.onnx import export_onnx
from edgeprune.pipeline import plan_for
from edgeprune.primary_selection import candidates, select_fastest
from edgeprune.progress import SILENT
from edgeprune.report import markdown_report, primary_selection_line
from edgeprune.runtimes import BenchSettings
from tests.conftest import FAST, USER_MODEL

SETTINGS = BenchSettings(threads=1, warmup=3, iterations=20, repeats=2)


def conv_net(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10),
    )  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A light (8-channel) and a heavy (64-channel, ~60x the MACs) network as ONNX files."""
    folder = tmp_path_factory.mktemp("selection")
    example = torch.zeros(1, 1, 28, 28)
    paths = {}
    for name, width in (("light", 8), ("heavy", 64)):
        paths[name] = folder / f"{name}.onnx"
        export_onnx(conv_net(width), example, paths[name], ExportConfig())
    return paths


def artifact(name: str, path: Path, **meta) -> Artifact:
    return Artifact.from_file(name, "onnx", path, **meta)


def budget(passed: bool) -> dict:
    return {"passed": passed, "verdict": "within budget" if passed else "missed budget (time limit): drop 3.10 > 0.5"}


def test_a_missed_budget_or_a_larger_drop_than_allowed_is_out_of_the_choice(files):
    found = candidates(
        "onnx",
        {
            "onnx_fp32": artifact("onnx_fp32", files["heavy"], accuracy=90.0),
            "onnx_int8": artifact("onnx_int8", files["light"], accuracy=86.9, budget=budget(False)),
            "onnx_fp16": artifact("onnx_fp16", files["light"], accuracy=89.2),
            "tflite_int8": artifact("tflite_int8", files["light"], accuracy=90.0, budget=budget(True)),
        },
        max_accuracy_drop=0.5,
    )
    assert [c.name for c in found] == ["onnx_fp32", "onnx_int8", "onnx_fp16"]  # the primary format's only, fp32 first
    assert [c.within_budget for c in found] == [True, False, False]
    assert "missed budget" in found[1].reason and "loses 0.80 top-1 points (> 0.5)" in found[2].reason


def test_the_faster_file_wins_whichever_precision_it_is(files):
    for fp32, quantized, winner in (("heavy", "light", "onnx_int8"), ("light", "heavy", "onnx_fp32")):
        found = candidates(
            "onnx",
            {
                "onnx_fp32": artifact("onnx_fp32", files[fp32], accuracy=90.0),
                "onnx_int8": artifact("onnx_int8", files[quantized], accuracy=90.0, budget=budget(True)),
            },
            0.5,
        )
        selection = select_fastest(found, "local", SETTINGS)
        rows = selection["candidates"]
        assert selection["selected"] == winner and selection["method"] == "paired in one process"
        assert rows["onnx_fp32"]["speedup_vs_fp32"] == 1.0
        assert all(rows[name]["latency_p50_ms"] > 0 for name in rows)
        # the margin is the winner's speed-up over the other, from the same pairs as the p50s
        assert selection["margin"] > 2.0 and selection["runner_up"] == ({"onnx_int8", "onnx_fp32"} - {winner}).pop()
        slower = rows[selection["runner_up"]]["latency_p50_ms"] / rows[winner]["latency_p50_ms"]
        assert slower > 2.0


def test_a_faster_file_out_of_the_budget_is_not_measured_and_cannot_win(files):
    found = candidates(
        "onnx",
        {
            "onnx_fp32": artifact("onnx_fp32", files["heavy"], accuracy=90.0),
            "onnx_int8": artifact("onnx_int8", files["light"], accuracy=80.0, budget=budget(False)),
        },
        0.5,
    )
    results = {"onnx_fp32": {"latency_p50_ms": 1.5}}
    selection = select_fastest(found, "local", SETTINGS, results)
    assert selection["selected"] == "onnx_fp32" and selection["runner_up"] is None
    assert selection["candidates"]["onnx_int8"]["latency_p50_ms"] is None
    assert selection["candidates"]["onnx_fp32"]["latency_p50_ms"] == 1.5  # nothing paired: the benchmark's own figure
    line = primary_selection_line({"primary_selection": selection})
    assert "chose onnx_fp32 at 1.500 ms p50, the only file measured (onnx_int8 out of the accuracy budget)" in line


def test_a_file_left_out_for_its_missed_budget_fails_no_build():
    manifest = {
        "primary_artifact": "onnx_fp32",
        "artifacts": {
            "onnx_fp32": {"size_bytes": 1000},
            "onnx_int8": {"budget": {"passed": False, "verdict": "missed", "max_accuracy_drop": 0.5, "accuracy_drop": 3.0}},
        },
        "accuracy": {"drop": 0.1},
        "speedups": {},
    }
    assert exit_code(check_budgets(BudgetConfig(), manifest)) == 10  # without a selection: the missed budget fails
    manifest["primary_selection"] = {"candidates": {"onnx_fp32": {}, "onnx_int8": {}}, "selected": "onnx_fp32"}
    assert check_budgets(BudgetConfig(), manifest) == []


def test_fastest_without_a_benchmark_is_a_config_error_before_any_stage_runs():
    config = BuildConfig(quantize=QuantizeConfig(select="fastest"), benchmark=BenchmarkConfig(enabled=False))
    with pytest.raises(ConfigError, match="quantize.select = 'fastest'.*benchmark.enabled = true"):
        plan_for(config)


@pytest.mark.slow
def test_a_build_ships_the_fastest_file_and_its_report_says_by_how_much(tmp_path, user_checkpoint):
    out = tmp_path / "out"
    overrides = (*FAST, "prune.mode='none'", "quantize.select='fastest'")
    cache = tmp_path / "cache"
    api.build("cpu-x86", model=USER_MODEL, weights=str(user_checkpoint), overrides=overrides, out=out, cache_dir=cache, reporter=SILENT)
    manifest = json.loads((out / "manifest.json").read_text())
    selection = manifest["primary_selection"]
    rows = selection["candidates"]
    assert set(rows) == {"onnx_fp32", "onnx_int8"} and selection["method"] == "paired in one process"
    assert all(rows[name]["latency_p50_ms"] > 0 for name in rows if rows[name]["within_budget"])
    fastest = max((name for name in rows if rows[name]["within_budget"]), key=lambda name: rows[name]["speedup_vs_fp32"])
    assert manifest["primary_artifact"] == selection["selected"] == fastest
    assert manifest["accuracy"]["primary"] == manifest["artifacts"][fastest]["accuracy"]
    stage = next(stage for stage in manifest["stages"] if stage["name"] == "benchmark")
    assert stage["metrics"]["primary_selection"]["selected"] == fastest
    report = (out / "report.md").read_text()
    assert "## Primary artefact chosen by measurement" in report and f"quantize.select = 'fastest' chose {fastest}" in report
    assert markdown_report(manifest).count("chosen by measurement") == 1
    assert f"chose {fastest}" in (out / "report.html").read_text()
