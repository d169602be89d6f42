"""The parser of ExecuTorch ``executor_runner`` logs, and the adb adapter running .pte files with it.

The fixtures follow the ``ET_LOG`` lines of executor_runner.cpp through ExecuTorch's POSIX platform
layer (``%c %02u:%02u:%02u.%06lu executorch:%s:%zu] %s``): a recent release that prints every
execution, a 1.x release that prints only the total, and a method that failed to load.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from edgeprune.errors import DeviceError
from edgeprune.runtimes import BenchSettings
from edgeprune.runtimes.adb import AdbAdapter
from edgeprune.runtimes.executor_runner_output import log_messages, parse_executor_runner_output, runner_json_from_executor_runner
from tests.runtimes.test_runtime_adb import SERIAL, _executable, fake_phone  # noqa: F401 - the fixture

FIXTURES = Path(__file__).with_name("fixtures")


def test_per_iteration_log_gives_every_execution():
    parsed = parse_executor_runner_output((FIXTURES / "executor_runner_per_iteration.txt").read_text())
    assert parsed["iteration_ms"] == [0.641, 0.298, 0.295, 0.311, 0.289, 0.346]
    assert parsed["executions"] == 6 and parsed["total_ms"] == pytest.approx(2.18)
    assert parsed["load_ms"] == pytest.approx(3.512) and parsed["threads"] == 4
    result = runner_json_from_executor_runner(parsed, warmup=1, threads=4, facts={})
    assert result["iterations"] == 5  # the first execution is the warmup
    assert result["latency_p50_ms"] == pytest.approx(0.298) and result["latency_min_ms"] == pytest.approx(0.289)
    assert result["latency_p99_ms"] == pytest.approx(0.311 + 0.96 * (0.346 - 0.311))  # linear interpolation, as runner.py
    assert result["first_run_ms"] == pytest.approx(0.641) and result["peak_rss_mb"] is None


def test_total_only_log_gives_the_mean():
    parsed = parse_executor_runner_output((FIXTURES / "executor_runner_total_only.txt").read_text())
    assert parsed["iteration_ms"] == [] and parsed["load_ms"] is None
    assert parsed["executions"] == 50 and parsed["mean_ms"] == pytest.approx(0.765)
    result = runner_json_from_executor_runner(parsed, warmup=10, threads=2, facts={"machine": "arm64-v8a"})
    assert result["latency_p50_ms"] is None and result["latency_mean_ms"] == pytest.approx(0.765)
    assert result["threads"] == 2 and result["machine"] == "arm64-v8a"


def test_failed_load_names_the_first_error_line():
    with pytest.raises(DeviceError, match=r"no successful execution: Missing operator: \[0\] quantized_decomposed::quantize_per_tensor"):
        parse_executor_runner_output((FIXTURES / "executor_runner_failed.txt").read_text())
    with pytest.raises(DeviceError, match="no successful execution: Segmentation fault"):
        parse_executor_runner_output("Segmentation fault\n")


def test_only_et_log_lines_are_read():
    text = "OutputX 0: tensor(sizes=[1, 10], [...])\nW executorch:file.cpp:3] short form without a timestamp\n"
    assert log_messages(text) == [("W", "short form without a timestamp")]


def test_adb_runs_pte_with_executor_runner(fake_phone, tmp_path):  # noqa: F811 - the imported fixture
    artifact = tmp_path / "model_int8.pte"
    artifact.write_bytes(b"\x00" * 64)  # the fake tool does not read it
    log = FIXTURES / "executor_runner_per_iteration.txt"
    tool = _executable(tmp_path / "executor_runner", f'#!/bin/sh\necho "$@" >> "$(dirname "$0")/../../calls.txt"\ncat {log}\n')
    settings = BenchSettings(threads=4, warmup=1, iterations=5, repeats=2)
    adapter = AdbAdapter(SERIAL, settings, executor_runner=tool, python=sys.executable, adb=str(fake_phone["adb"]))
    try:
        result = adapter.run(artifact, settings)
        remote = fake_phone["device_tmp"] / Path(adapter.remote_dir).name
        assert sorted(p.name for p in remote.iterdir()) == ["executor_runner", "model_int8.pte"]
    finally:
        adapter.cleanup()
    calls = (fake_phone["device_tmp"].parent / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and calls[0].split()[1:] == ["--num_executions=6", "--cpu_threads=4"]
    model_flag = calls[0].split()[0]  # the fake adb maps the device path into a host folder
    assert model_flag.startswith("--model_path=") and model_flag.endswith(f"/data/local/tmp/{remote.name}/{artifact.name}")
    assert result.runtime == "executorch executor_runner" and not result.p50_is_mean
    assert result.latency_p50_ms == pytest.approx(0.298) and result.iterations == 10 and result.threads == 4
    assert result.platform == "Android 14 (Pixel 8)"
