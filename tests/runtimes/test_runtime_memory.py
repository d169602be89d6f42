"""Memory figures mean the measuring process's own memory, wherever the benchmark is started from."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgeprune.runtimes import BenchSettings, benchmark

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
MIB = 1024 * 1024
SETTINGS = BenchSettings(threads=1, warmup=1, iterations=3, repeats=1)


def matmul_model(path: Path, size: int) -> Path:
    """A one-MatMul ONNX model whose float32 weight is ``size`` x ``size`` (4 * size**2 bytes)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((size, size)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "weight"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", size])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def cli_bench(artifact: Path) -> dict:
    """``edgeprune bench --json`` in a fresh, small process, as a user runs it."""
    command = [sys.executable, "-m", "edgeprune", "bench", str(artifact), "--json", "--threads", "1", "--iterations", "3"]
    command += ["--warmup", "1", "--repeats", "1", "--max-spread", "0"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, check=True)
    return json.loads(completed.stdout)


def test_a_large_calling_process_does_not_inflate_the_figure(tmp_path):
    """A build calls ``benchmark`` from a process holding its models and data (hundreds of MB); the peak must still
    be the runner's own and agree with ``edgeprune bench`` on the same file within 10 %."""
    model = matmul_model(tmp_path / "small.onnx", 512)
    ballast = np.ones(600 * MIB // 8)  # this process now holds 600 MB, as a build does
    from_build = benchmark(model, "local", SETTINGS)
    del ballast
    from_cli = cli_bench(model)
    assert from_build.peak_rss_mb < 300  # 600+ if the parent's peak leaked in (ru_maxrss survives fork+exec)
    assert from_build.peak_rss_mb == pytest.approx(from_cli["peak_rss_mb"], rel=0.10)
    assert from_build.repeats[0]["peak_rss_source"] == "VmHWM"
    assert 0 < from_build.model_memory_mb < from_build.peak_rss_mb


def test_a_50_mb_model_takes_about_50_mb_more_than_a_1_mb_model(tmp_path):
    small = benchmark(matmul_model(tmp_path / "small.onnx", 512), "local", SETTINGS)  # 1.0 MiB of weights
    large_path = matmul_model(tmp_path / "large.onnx", 3620)  # 50.0 MiB of weights
    large = benchmark(large_path, "local", SETTINGS)
    weights_mb = 4 * 3620 * 3620 / MIB
    resident = large.model_resident_mb - small.model_resident_mb
    assert 0.8 * weights_mb < resident < 1.3 * weights_mb  # the weights, held once by the running session
    # The peak also holds the parsed file while onnxruntime copies the weights out of it: once to twice their size.
    assert 0.9 * weights_mb < large.model_memory_mb - small.model_memory_mb < 2.3 * weights_mb
    assert large.peak_rss_mb - small.peak_rss_mb == pytest.approx(large.model_memory_mb - small.model_memory_mb, abs=10)
