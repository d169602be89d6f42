"""The local adapter on real artefacts, and how BenchResult aggregates repeats."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgeprune.errors import ConfigError, DeviceError, InputError, TransientDeviceError
from edgeprune.runtimes import BenchResult, BenchSettings, benchmark
from edgeprune.runtimes.base import with_retries

QUICK = BenchSettings(threads=1, warmup=3, iterations=30, repeats=3, timeout_s=120.0)


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_local_benchmark_on_real_artifacts(tiny_artifacts, kind):
    result = benchmark(tiny_artifacts[kind], "local", QUICK)

    assert result.device == "local" and result.artifact == str(tiny_artifacts[kind])
    assert len(result.repeats) == 3
    assert result.iterations == 90 and result.threads == 1
    assert 0 < result.latency_min_ms <= result.latency_p50_ms <= result.latency_p90_ms <= result.latency_p99_ms
    for repeat in result.repeats:
        assert 0 < repeat["latency_p50_ms"] <= repeat["latency_p90_ms"] <= repeat["latency_p99_ms"]
        assert repeat["peak_rss_mb"] > 0
    assert result.latency_p50_ms == sorted(r["latency_p50_ms"] for r in result.repeats)[1]
    assert result.peak_rss_mb == max(r["peak_rss_mb"] for r in result.repeats) > 0
    assert result.init_ms > 0 and result.first_run_ms > 0 and result.p50_spread_pct >= 0
    assert not result.p50_is_mean
    assert result.runtime == {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}[kind]
    if hasattr(os, "sched_getaffinity"):
        assert result.repeats[0]["host_affinity"] == sorted(os.sched_getaffinity(0))
    assert len({r["pid"] for r in result.repeats}) == 3  # a fresh process per repeat
    assert all(r["rss_before_load_mb"] < r["peak_rss_mb"] for r in result.repeats)
    json.dumps(result.to_dict())  # JSON-safe


def test_local_settings_reach_the_runner(tiny_artifacts):
    settings = BenchSettings(threads=2, warmup=0, iterations=7, repeats=2, use_xnnpack=False)
    result = benchmark(tiny_artifacts["tflite"], "local", settings)
    assert result.providers == ("builtin",)
    assert [r["iterations"] for r in result.repeats] == [7, 7]
    assert [r["threads"] for r in result.repeats] == [2, 2]


def test_local_runner_failure_is_a_device_error(tmp_path):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(DeviceError, match=r"local \(corrupt.tflite\): run repeat 1/3: runner failed: .*Flatbuffer"):
        benchmark(corrupt, "local", QUICK)


def test_missing_artifact_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        benchmark(tmp_path / "absent.onnx", "local", QUICK)
    with pytest.raises(InputError, match="expected a .onnx, .tflite or .pte"):
        benchmark(tmp_path / "model.pt", "local", QUICK)


def _runner_json(p50: float, **extra: float) -> dict:
    return {
        "latency_p50_ms": p50,
        "latency_p90_ms": p50 + 1,
        "latency_p99_ms": p50 + 2,
        "latency_mean_ms": p50 + 0.5,
        "latency_std_ms": 0.1,
        "latency_min_ms": p50 - 1,
        "iterations": 50,
        "threads": 2,
        "peak_rss_mb": 100 + p50,
        "init_ms": 5.0,
        "first_run_ms": 9.0,
        "runtime": "onnxruntime",
        "runtime_version": "1.0",
        "providers": ["CPUExecutionProvider"],
        "cpu_affinity": [0, 1],
        **extra,
    }


def test_headline_is_median_of_repeat_p50s_and_spread_is_relative():
    result = BenchResult.from_runner_json([_runner_json(10.0), _runner_json(12.0), _runner_json(11.0)], "local", "m.onnx")
    assert result.latency_p50_ms == 11.0
    assert result.p50_spread_pct == pytest.approx((12.0 - 10.0) / 11.0 * 100)  # 18.18 %
    assert result.latency_p90_ms == 12.0 and result.latency_p99_ms == 13.0
    assert result.latency_min_ms == 9.0
    assert result.peak_rss_mb == 112.0
    assert result.iterations == 150
    assert result.cpu_affinity == (0, 1)
    data = result.to_dict()
    assert data["providers"] == ["CPUExecutionProvider"] and data["cpu_affinity"] == [0, 1]
    assert len(data["repeats"]) == 3 and json.loads(json.dumps(data)) == data


def test_mean_only_repeats_flag_p50_as_mean():
    mean_only = [
        dict(_runner_json(0), latency_p50_ms=None, latency_p90_ms=None, latency_p99_ms=None, latency_mean_ms=mean) for mean in (20.0, 22.0)
    ]
    result = BenchResult.from_runner_json(mean_only, "adb://x", "m.tflite")
    assert result.p50_is_mean and result.latency_p50_ms == 21.0
    assert result.latency_p90_ms is None and result.latency_p99_ms is None
    assert result.p50_spread_pct == pytest.approx(2.0 / 21.0 * 100)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeats": 0}, r"repeats=0 \(minimum 1\)"),
        ({"threads": 0, "iterations": 0}, r"threads=0 \(minimum 1\), iterations=0 \(minimum 1\)"),
        ({"timeout_s": 0.0}, r"timeout_s=0.0 \(must be > 0\)"),
        ({"retries": -1}, r"retries=-1 \(minimum 0\)"),
    ],
)
def test_impossible_settings_are_config_errors(changes, message):
    with pytest.raises(ConfigError, match=message):
        BenchSettings(**changes)


def test_no_repeats_is_a_device_error():
    with pytest.raises(DeviceError, match="no benchmark repeat"):
        BenchResult.from_runner_json([], "local", "m.onnx")


def test_retries_stop_after_the_budget():
    calls = []

    def flaky() -> int:
        calls.append(1)
        if len(calls) < 3:
            raise TransientDeviceError("connection reset")
        return 42

    assert with_retries(flaky, retries=2, what="stage", backoff_s=0) == 42 and len(calls) == 3
    calls.clear()
    with pytest.raises(DeviceError, match=r"stage failed after 2 attempt\(s\): connection reset"):
        with_retries(flaky, retries=1, what="stage", backoff_s=0)
    assert len(calls) == 2


def test_importing_runtimes_imports_no_torch_and_no_runtime():
    code = (
        "import sys, edgeprune.runtimes, edgeprune.runtimes.ssh, edgeprune.runtimes.adb, "
        "edgeprune.runtimes.gpu; "
        "print(sorted(m for m in ('torch', 'onnxruntime', 'ai_edge_litert', 'tensorflow') if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
    )
    assert completed.stdout.strip() == "[]"


def test_local_compare_times_both_in_each_process_and_sees_the_wider_model_slower(tiny_artifacts, tmp_path):
    import torch

    from edgeprune.runtimes.local import LocalAdapter

    wide = torch.nn.Sequential(torch.nn.Conv2d(3, 96, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(96, 96, 3, padding=1)).eval()
    wide_path = tmp_path / "wide.onnx"
    torch.onnx.export(wide, (torch.randn(1, 3, 32, 32),), str(wide_path), dynamo=False, input_names=["input"])
    pairs = LocalAdapter().compare(wide_path, tiny_artifacts["onnx"], QUICK)
    assert len(pairs) == QUICK.repeats and all(baseline > 0 and p50 > 0 for baseline, p50 in pairs)
    # 144x the MACs of the 2-conv net (96x96 against 8x8 channels in the second conv): far slower in every process
    assert all(baseline / p50 > 3 for baseline, p50 in pairs)
