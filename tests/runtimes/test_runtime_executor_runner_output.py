"""The parser of ExecuTorch ``executor_runner`` logs, and the adb adapter running .pte files with it.

``tests/fixtures/executor_runner`` holds real logs of executorch 1.5.1's runner on fp32 and int8
XNNPACK .pte files and on broken ones (made by scripts/make_executor_runner_fixtures.sh). The one
hand-written log here (tests/runtimes/fixtures) stands for a runner that prints only the total.
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
REAL = Path(__file__).parents[1] / "fixtures" / "executor_runner"


def test_real_fp32_log_gives_every_execution():
    parsed = parse_executor_runner_output((REAL / "fp32_xnnpack_2threads.txt").read_text())
    times = parsed["iteration_ms"]
    assert len(times) == parsed["executions"] == 20 and times[0] == 0.25343 and times[-1] == 0.095835
    assert parsed["total_ms"] == 2.124574 and sum(times) == pytest.approx(parsed["total_ms"], abs=1e-5)  # the runner sums the same ticks
    assert parsed["load_ms"] == 8.748109 and parsed["threads"] == 2 and parsed["output_sizes"] == [[1, 10]]
    result = runner_json_from_executor_runner(parsed, warmup=2, threads=2, facts={})
    assert result["iterations"] == 18  # the first two executions are the warmup
    assert result["latency_p50_ms"] == pytest.approx(0.096227) and result["latency_min_ms"] == pytest.approx(0.095616)
    assert result["latency_p99_ms"] == pytest.approx(0.10533797)  # linear interpolation, as runner.py
    assert result["first_run_ms"] == 0.25343 and result["init_ms"] == 8.748109 and result["peak_rss_mb"] is None


def test_real_int8_log_on_one_thread():
    parsed = parse_executor_runner_output((REAL / "int8_xnnpack_1thread.txt").read_text())
    assert parsed["executions"] == 20 and parsed["total_ms"] == 1.177465 and parsed["threads"] == 1
    assert sum(parsed["iteration_ms"]) == pytest.approx(parsed["total_ms"], abs=1e-5)
    result = runner_json_from_executor_runner(parsed, warmup=2, threads=1, facts={})
    assert result["latency_p50_ms"] == pytest.approx(0.048045) and result["latency_p90_ms"] == pytest.approx(0.0559885)


def test_real_log_without_a_thread_count():
    # --cpu_threads left at -1: cpuinfo finds no performant cores on x86, the runner logs 0 and keeps the pool as it was.
    parsed = parse_executor_runner_output((REAL / "int8_xnnpack_default_threads.txt").read_text())
    assert parsed["threads"] is None and parsed["executions"] == 5 and parsed["load_ms"] == 0.498909
    assert runner_json_from_executor_runner(parsed, warmup=1, threads=2, facts={})["threads"] == 2  # the count asked for


@pytest.mark.parametrize(
    ("log", "reason"),
    [
        ("truncated_pte.txt", r"File size is too small\. Expected file size from extended header is 422184, actual .* 2000"),
        ("missing_pte.txt", r"Failed to open missing\.pte: No such file or directory"),
    ],
)
def test_real_failures_name_the_first_error_line(log, reason):
    with pytest.raises(DeviceError, match="no successful execution: " + reason):
        parse_executor_runner_output((REAL / log).read_text())


def test_total_only_log_gives_the_mean():
    parsed = parse_executor_runner_output((FIXTURES / "executor_runner_total_only.txt").read_text())
    assert parsed["iteration_ms"] == [] and parsed["load_ms"] is None
    assert parsed["executions"] == 50 and parsed["mean_ms"] == pytest.approx(0.765)
    result = runner_json_from_executor_runner(parsed, warmup=10, threads=2, facts={"machine": "arm64-v8a"})
    assert result["latency_p50_ms"] is None and result["latency_mean_ms"] == pytest.approx(0.765)
    assert result["threads"] == 2 and result["machine"] == "arm64-v8a"


def test_a_log_cut_short_names_its_last_line():
    text = (REAL / "fp32_xnnpack_2threads.txt").read_text().split("Iteration 3 of 20")[0] + "\nSegmentation fault\n"
    with pytest.raises(DeviceError, match="no successful execution: Segmentation fault"):
        parse_executor_runner_output(text)


def test_only_et_log_lines_are_read():
    text = "OutputX 0: tensor(sizes=[1, 10], [...])\nW executorch:file.cpp:3] short form without a timestamp\n"
    assert log_messages(text) == [("W", "short form without a timestamp")]


def test_adb_runs_pte_with_executor_runner(fake_phone, tmp_path):  # noqa: F811 - the imported fixture
    artifact = tmp_path / "model_int8.pte"
    artifact.write_bytes(b"\x00" * 64)  # the fake tool does not read it
    log = REAL / "fp32_xnnpack_2threads.txt"
    tool = _executable(tmp_path / "executor_runner", f'#!/bin/sh\necho "$@" >> "$(dirname "$0")/../../calls.txt"\ncat {log}\n')
    settings = BenchSettings(threads=4, warmup=2, iterations=18, repeats=2)
    adapter = AdbAdapter(SERIAL, settings, executor_runner=tool, python=sys.executable, adb=str(fake_phone["adb"]))
    try:
        result = adapter.run(artifact, settings)
        remote = fake_phone["device_tmp"] / Path(adapter.remote_dir).name
        assert sorted(p.name for p in remote.iterdir()) == ["executor_runner", "model_int8.pte"]
    finally:
        adapter.cleanup()
    calls = (fake_phone["device_tmp"].parent / "calls.txt").read_text().splitlines()
    assert len(calls) == 2 and calls[0].split()[1:] == ["--num_executions=20", "--cpu_threads=4"]
    model_flag = calls[0].split()[0]  # the fake adb maps the device path into a host folder
    assert model_flag.startswith("--model_path=") and model_flag.endswith(f"/data/local/tmp/{remote.name}/{artifact.name}")
    assert result.runtime == "executorch executor_runner" and not result.p50_is_mean
    assert result.latency_p50_ms == pytest.approx(0.096227) and result.iterations == 36 and result.threads == 2  # as logged
    assert result.platform == "Android 14 (Pixel 8)"
