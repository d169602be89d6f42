"""runner.py as a stand-alone script: copied alone, run in a fresh interpreter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprune.runtimes import runner
from edgeprune.runtimes.base import RUNNER_PATH


@pytest.fixture(scope="module")
def lone_runner(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """runner.py copied into an empty folder, as it would be on a Raspberry Pi."""
    folder = tmp_path_factory.mktemp("lone_runner")
    return Path(shutil.copy(RUNNER_PATH, folder / "runner.py"))


def run_runner(script: Path, *args: str) -> tuple[int, dict]:
    """Run the script isolated (-I: no cwd/PYTHONPATH on sys.path); (exit code, JSON)."""
    completed = subprocess.run([sys.executable, "-I", str(script), *args], capture_output=True, text=True, cwd=script.parent, timeout=120)
    lines = completed.stdout.strip().splitlines()
    assert len(lines) == 1, completed.stdout  # exactly one JSON line, runtime chatter went to stderr
    return completed.returncode, json.loads(lines[0])


@pytest.mark.parametrize("kind", ["onnx", "tflite"])
def test_runner_reports_ordered_positive_figures(lone_runner, tiny_artifacts, kind):
    code, result = run_runner(lone_runner, "--model", str(tiny_artifacts[kind]), "--threads", "1", "--warmup", "3", "--iterations", "25")
    assert code == 0, result
    assert result["iterations"] == 25 and result["threads"] == 1 and result["warmup"] == 3
    assert result["init_ms"] > 0 and result["first_run_ms"] > 0
    assert 0 < result["latency_min_ms"] <= result["latency_p50_ms"] <= result["latency_p90_ms"] <= result["latency_p99_ms"]
    assert result["latency_std_ms"] >= 0 and result["latency_mean_ms"] >= result["latency_min_ms"]
    assert result["peak_rss_mb"] >= result["rss_before_load_mb"] > 0
    assert result["runtime"] == {"onnx": "onnxruntime", "tflite": "ai-edge-litert"}[kind]
    assert result["providers"] == {"onnx": ["CPUExecutionProvider"], "tflite": ["xnnpack"]}[kind]
    assert result["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert result["cpu_model"] and result["machine"]
    if hasattr(os, "sched_getaffinity"):
        assert result["cpu_affinity"] == sorted(os.sched_getaffinity(0))


def test_runner_min_seconds_extends_the_timed_loop(lone_runner, tiny_artifacts):
    code, result = run_runner(
        lone_runner, "--model", str(tiny_artifacts["tflite"]), "--no-xnnpack", "--warmup", "0", "--iterations", "1", "--min-seconds", "0.3"
    )
    assert code == 0, result
    assert result["providers"] == ["builtin"]
    # at least 0.3 s of runs, each well under 0.3 s: many more than the 1 asked for
    assert result["iterations"] > 10
    assert result["iterations"] * result["latency_mean_ms"] >= 300 * 0.95


def test_runner_feeds_batch_1_to_a_dynamic_batch_model(lone_runner, tiny_artifacts):
    code, result = run_runner(lone_runner, "--model", str(tiny_artifacts["onnx_dynamic_batch"]), "--iterations", "3", "--warmup", "0")
    assert code == 0, result
    assert result["iterations"] == 3 and result["latency_p50_ms"] > 0


def test_runner_uses_the_given_input(lone_runner, tiny_artifacts, tmp_path):
    ones = tmp_path / "ones.npy"
    np.save(ones, np.ones((1, 3, 32, 32), dtype=np.float32))
    code, result = run_runner(
        lone_runner, "--model", str(tiny_artifacts["onnx"]), "--input", str(ones), "--iterations", "2", "--warmup", "0"
    )
    assert code == 0 and result["iterations"] == 2


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp: ["--model", str(tmp / "missing.onnx")], "model file not found: .*missing.onnx"),
        (lambda tmp: ["--model", str(_write(tmp / "bad.onnx", b"garbage"))], "Protobuf parsing failed"),
        (lambda tmp: ["--model", str(_write(tmp / "bad.tflite", b"garbage"))], "not a valid Flatbuffer"),
        (lambda tmp: ["--model", str(_write(tmp / "model.pt", b"x"))], "unsupported model type '.pt'"),
        (lambda tmp: ["--iterations", "3"], "bad arguments: .*--model"),
        (lambda tmp: ["--model", "m.onnx", "--threads", "0"], "need --threads >= 1"),
    ],
)
def test_runner_errors_are_one_json_line_with_exit_2(lone_runner, tmp_path, make_args, message):
    code, result = run_runner(lone_runner, *make_args(tmp_path))
    assert code == 2
    assert list(result) == ["error"]
    assert re.search(message, result["error"]), result


def test_runner_without_numpy_says_so_in_json(lone_runner, tiny_artifacts):
    # -S: no site-packages, so this interpreter has no numpy, like a bare Raspberry Pi OS
    completed = subprocess.run(
        [sys.executable, "-I", "-S", str(lone_runner), "--model", str(tiny_artifacts["onnx"])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert completed.returncode == 2
    assert json.loads(completed.stdout) == {"error": "numpy is not installed for this Python: pip install numpy"}


def test_runner_refuses_an_unavailable_provider(lone_runner, tiny_artifacts):
    code, result = run_runner(lone_runner, "--model", str(tiny_artifacts["onnx"]), "--providers", "NoSuchExecutionProvider")
    assert code == 2
    assert "onnxruntime lacks providers ['NoSuchExecutionProvider']" in result["error"]


def test_provider_options_go_to_the_provider_they_name():
    providers = ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    entries = ["TensorrtExecutionProvider:trt_sparsity_enable=1", "TensorrtExecutionProvider:trt_fp16_enable=0"]
    assert runner.provider_settings(providers, entries) == [
        ("TensorrtExecutionProvider", {"trt_sparsity_enable": "1", "trt_fp16_enable": "0"}),
        "CUDAExecutionProvider",
    ]
    assert runner.provider_settings(providers, []) == providers
    with pytest.raises(runner.RunnerError, match="expected PROVIDER:KEY=VALUE"):
        runner.provider_settings(providers, ["trt_sparsity_enable=1"])


def test_runner_refuses_an_option_for_a_provider_it_was_not_given(lone_runner, tiny_artifacts):
    option = "TensorrtExecutionProvider:trt_sparsity_enable=1"
    code, result = run_runner(lone_runner, "--model", str(tiny_artifacts["onnx"]), "--provider-option", option)
    assert code == 2
    assert "names TensorrtExecutionProvider, which is not among --providers []" in result["error"]


def test_random_inputs_are_seeded_and_match_dtype():
    shapes, guessed = runner.resolve_shapes([("x", ["batch", 3, None, -1, 8]), ("y", [2, 4])], {})
    assert shapes == {"x": [1, 3, 1, 1, 8], "y": [2, 4]} and guessed == ("x",)
    first = runner.random_input([2, 5], np.int8, np.random.default_rng(0))
    again = runner.random_input([2, 5], np.int8, np.random.default_rng(0))
    assert first.dtype == np.int8 and np.array_equal(first, again)
    assert first.min() >= -128 and first.max() <= 127
    unsigned = runner.random_input([1000], np.uint8, np.random.default_rng(0))
    assert unsigned.dtype == np.uint8 and unsigned.max() > 200  # spans the range, not just 0/1
    floats = runner.random_input([1000], np.float32, np.random.default_rng(0))
    assert floats.dtype == np.float32 and abs(float(floats.mean())) < 0.1
    token_ids = runner.random_input([1000], np.int64, np.random.default_rng(0))
    assert token_ids.dtype == np.int64 and set(np.unique(token_ids)) == {0, 1}  # valid rows of any embedding table


def test_shapes_named_on_the_command_line_replace_dynamic_dimensions():
    shapes, guessed = runner.resolve_shapes([("ids", ["batch", "seq"]), ("mask", ["batch", "seq"])], runner.parse_shapes(["ids=2,16"]))
    assert shapes == {"ids": [2, 16], "mask": [1, 1]} and guessed == ("mask",)
    for bad in (["ids=2,x"], ["ids="], ["=2"], ["ids=0,3"]):
        with pytest.raises(runner.RunnerError, match="bad --shape"):
            runner.parse_shapes(bad)
    with pytest.raises(runner.RunnerError, match="does not have"):
        runner.resolve_shapes([("ids", [1, 4])], {"tokens": [1, 4]})
    with pytest.raises(runner.RunnerError, match="has 3 dimensions"):
        runner.resolve_shapes([("ids", [1, 4])], {"ids": [1, 4, 4]})


def test_an_error_repeated_for_every_tensor_is_said_once_with_the_count():
    sentence = "tensorflow/lite/core/subgraph.cc:{n} Tensor 'conv{n}/w' has invalid quantization parameters: scale {n}.5 is not positive."
    message = "\n".join(sentence.format(n=n) for n in range(57)) + "\nFailed to allocate tensors."
    line = runner.one_line(message)
    assert "\n" not in line and len(line) < 300
    assert line.count("invalid quantization") == 1 and "the same for 57 tensors" in line and "Failed to allocate" in line


def test_latency_stats_are_in_milliseconds():
    stats = runner.latency_stats([1_000_000, 2_000_000, 3_000_000, 4_000_000, 5_000_000])
    assert stats["latency_p50_ms"] == 3.0
    assert stats["latency_p90_ms"] == pytest.approx(4.6)
    assert stats["latency_p99_ms"] == pytest.approx(4.96)
    assert stats["latency_mean_ms"] == 3.0 and stats["latency_min_ms"] == 1.0
    assert stats["latency_std_ms"] == pytest.approx(2**0.5)
    assert stats["iterations"] == 5


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("baseline_kind", ["onnx", "tflite"])
def test_runner_times_a_baseline_in_alternation_in_the_same_process(lone_runner, tiny_artifacts, baseline_kind):
    model, baseline = str(tiny_artifacts["onnx"]), str(tiny_artifacts[baseline_kind])
    code, result = run_runner(
        lone_runner, "--model", model, "--baseline", baseline, "--threads", "1", "--warmup", "3", "--iterations", "200"
    )
    assert code == 0, result
    paired = result["baseline"]
    assert result["iterations"] == paired["iterations"] == 200  # one baseline run beside every model run
    assert paired["model"] == os.path.basename(baseline) and paired["model_bytes"] == os.path.getsize(baseline)
    assert 0 < paired["latency_min_ms"] <= paired["latency_p50_ms"] <= paired["latency_p99_ms"]
    assert result["speedup_p50"] == pytest.approx(paired["latency_p50_ms"] / result["latency_p50_ms"])
    if baseline_kind == "onnx":  # the same file on both sides: alternation makes the ratio hold near 1 on a busy machine too
        assert 0.75 < result["speedup_p50"] < 1.33


def test_onnx_sessions_timed_in_alternation_share_one_spinning_thread_pool(lone_runner, tiny_artifacts):
    # two per-session pools read 0.59x-1.55x for one file against itself (2 threads, 2 cores); the timing itself is
    # measured by `scripts/bench_repeatability.py --paired`, not here, where a shared CI machine sets the noise
    model = str(tiny_artifacts["onnx"])
    code, result = run_runner(lone_runner, "--model", model, "--baseline", model, "--threads", "2", "--iterations", "20")
    assert code == 0 and result["thread_pool"] == runner.SHARED_POOL, result
    code, alone = run_runner(lone_runner, "--model", model, "--threads", "2", "--iterations", "20")
    assert code == 0 and "thread_pool" not in alone


def test_session_options_for_each_thread_pool():
    ort = pytest.importorskip("onnxruntime")
    shared = runner.session_options(ort, 2, runner.SHARED_POOL)
    assert not shared.use_per_session_threads and shared.intra_op_num_threads == 0  # sized by the pool, not the session
    quiet = runner.session_options(ort, 2, runner.PER_SESSION_NO_SPIN)
    assert quiet.get_session_config_entry("session.intra_op.allow_spinning") == "0" and quiet.intra_op_num_threads == 2
    own = runner.session_options(ort, 2)
    assert own.use_per_session_threads and own.intra_op_num_threads == 2 and own.inter_op_num_threads == 1
    with pytest.raises(RuntimeError, match="does not have configuration"):  # unset: onnxruntime's default, spinning
        own.get_session_config_entry("session.intra_op.allow_spinning")


def test_without_a_shared_pool_of_the_asked_size_paired_sessions_stop_spinning(monkeypatch):
    monkeypatch.setattr(runner, "_shared_pool_threads", None)
    assert runner.paired_thread_pool(object(), 2) == runner.PER_SESSION_NO_SPIN  # an onnxruntime without shared pools
    assert runner._shared_pool_threads is None
    monkeypatch.setattr(runner, "_shared_pool_threads", 4)  # the process's pool was made with 4 threads
    assert runner.paired_thread_pool(object(), 2) == runner.PER_SESSION_NO_SPIN
    assert runner.paired_thread_pool(object(), 4) == runner.SHARED_POOL


def test_runner_refuses_a_missing_baseline_in_json(lone_runner, tiny_artifacts, tmp_path):
    code, result = run_runner(lone_runner, "--model", str(tiny_artifacts["onnx"]), "--baseline", str(tmp_path / "gone.onnx"))
    assert code == runner.EXIT_ERROR and result["error"].startswith("model file not found") and "gone.onnx" in result["error"]
