"""The device path on a real arm64 Linux: the emulated board of scripts/arm64_board.sh (Debian arm64 under qemu-user,
its own Python 3.11 and aarch64 wheels, reached over ssh).

These tests run where the board runs: `scripts/arm64_board.sh start` prints its URL and .ci/run exports it as
EDGEPRUNE_ARM64_BOARD. Elsewhere they skip with the reason (EDGEPRUNE_ARM64_BOARD_UNAVAILABLE: what the script said
when this machine could not run a board, e.g. no root or no binfmt_misc). One build of the bundled example, shared
by the module, keeps the added time small.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from edgeprune.cli import main
from edgeprune.config import ParityConfig
from edgeprune.device_parity import parity_on_device
from edgeprune.errors import DeviceError
from edgeprune.parity import artifact_logits
from edgeprune.runtimes import BenchSettings, benchmark
from edgeprune.runtimes.base import parse_device_url
from tests.runtimes.conftest import INPUT_SHAPE

pytestmark = [pytest.mark.arm64_board, pytest.mark.slow]

BOARD_ENV = "EDGEPRUNE_ARM64_BOARD"
TFLITE_RUNTIME_PYTHON = "/opt/tflite-runtime/bin/python"  # the board's venv with tflite-runtime and numpy 1.x
QUICK = BenchSettings(threads=2, warmup=1, iterations=3, repeats=1, timeout_s=300.0, retries=0)
BOARD_BUILD = (
    "export.formats=['tflite', 'onnx']",
    "prune.mode='none'",  # the board measures the exported files; pruning is tested elsewhere (and adds dense references)
    "data.calibration_samples=64",
    "benchmark.repeats=1",
    "benchmark.warmup=1",
    "benchmark.iterations=5",
    "benchmark.max_spread_pct=0",
    "budgets.max_latency_p50_ms=0.001",  # no emulated timing may break (or meet) it: left unchecked
)


@pytest.fixture(scope="module")
def board() -> str:
    url = os.environ.get(BOARD_ENV)
    if not url:
        reason = os.environ.get(f"{BOARD_ENV}_UNAVAILABLE") or f"{BOARD_ENV} is not set (run scripts/arm64_board.sh start as root)"
        pytest.skip(f"no arm64 board: {reason}")
    return url


def with_python(url: str, python: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}python={python}"


@pytest.mark.parametrize(
    "python, kind, runtime",
    [("python3", "tflite", "ai-edge-litert"), ("python3", "onnx", "onnxruntime"), (TFLITE_RUNTIME_PYTHON, "tflite", "tflite-runtime")],
)
def test_the_runner_runs_under_the_boards_python_with_each_of_its_runtimes(board, tiny_artifacts, python, kind, runtime):
    result = benchmark(tiny_artifacts[kind], with_python(board, python), QUICK)
    assert result.runtime == runtime and result.machine == "aarch64"
    assert "Cortex-A" in result.cpu_model  # named from the board's /proc/cpuinfo part number
    assert result.python_version.startswith("3.")
    assert result.emulated.startswith("user-mode emulation: a aarch64 process on a ")
    assert result.latency_p50_ms > 0 and result.iterations == 3

    images = np.random.default_rng(3).standard_normal((4, *INPUT_SHAPE[1:])).astype(np.float32)
    here = artifact_logits(tiny_artifacts[kind], images, threads=1)  # this x86 host's kernels
    report = parity_on_device(
        f"{kind}_fp32", tiny_artifacts[kind], with_python(board, python), (images, here, np.zeros(4)), ParityConfig(), QUICK
    )
    assert report["runtime"] == runtime and report["machine"] == "aarch64"
    assert report["max_abs_error"] < 1e-4  # fp32 on Arm kernels against x86 kernels


@pytest.fixture(scope="module")
def board_build(board, tmp_path_factory) -> tuple[int, dict, str]:
    """The bundled example built for rpi5 as int8 TFLite and int8 ONNX, benchmarked (and its parity checked) on the board."""
    folder = tmp_path_factory.mktemp("board-build")
    args = ["build", "--target", "rpi5", "--out", str(folder / "rpi5"), "--cache-dir", str(folder / "cache"), "--json"]
    for override in (*BOARD_BUILD, f"benchmark.device={board}"):
        args += ["--set", override]
    code = main(args)
    return code, json.loads((folder / "rpi5" / "manifest.json").read_text()), (folder / "rpi5" / "report.md").read_text()


def test_an_int8_build_is_benchmarked_on_the_board_and_marked_emulated(board, board_build):
    code, manifest, report = board_build
    assert code == 0  # the latency budget was not checked against emulated timings
    assert manifest["benchmark_device"] == board and manifest["benchmark_emulated"].startswith("user-mode emulation")
    for name in ("tflite_int8", "onnx_int8"):
        bench = manifest["artifacts"][name]["benchmark"]
        assert bench["machine"] == "aarch64" and bench["emulated"] and bench["latency_p50_ms"] > 0
        assert bench["runtime"] == {"tflite_int8": "ai-edge-litert", "onnx_int8": "onnxruntime"}[name]
    assert manifest["speedups"] == {}  # emulated timings feed no speed-up
    assert manifest["budgets"]["passed"] and manifest["budgets"]["unchecked"][0].startswith("budgets.max_latency_p50_ms not checked")
    assert "is emulated" in report and "not representative" in report


def test_parity_of_both_int8_artefacts_is_measured_on_the_board(board, board_build):
    _, manifest, report = board_build
    for name in ("tflite_int8", "onnx_int8"):
        on_board = manifest["artifacts"][name]["parity_on_device"][board]
        here = manifest["artifacts"][name]["parity"]
        assert on_board["machine"] == "aarch64" and on_board["samples"] == here["samples"] == 512
        assert on_board["top1_agreement"] >= 0.99, on_board
        assert np.isfinite(on_board["max_abs_error"])
        print(f"{name}: top-1 agreement board {on_board['top1_agreement']:.4f} / x86 {here['top1_agreement']:.4f}, "
              f"max abs error board {on_board['max_abs_error']:.4g} / x86 {here['max_abs_error']:.4g}")  # fmt: skip
    assert "## Parity on the device" in report


def board_temp_folders(board: str) -> list[str]:
    """The ``mktemp -d`` folders in the board's /tmp."""
    url = parse_device_url(board)
    ssh = ["ssh", "-o", "BatchMode=yes", "-i", url.options["key"], "-o", f"UserKnownHostsFile={url.options['known_hosts']}"]
    listing = subprocess.run(
        [*ssh, "-p", str(url.port), "root@127.0.0.1", "ls -d /tmp/tmp.* 2>/dev/null || true"], capture_output=True, text=True
    )
    assert listing.returncode == 0, listing.stderr
    return listing.stdout.split()


def test_a_missing_runtime_wheel_on_the_board_is_one_line_and_leaves_nothing(board, tiny_artifacts):
    before = board_temp_folders(board)
    with pytest.raises(DeviceError) as caught:
        benchmark(tiny_artifacts["onnx"], with_python(board, TFLITE_RUNTIME_PYTHON), QUICK)
    message = str(caught.value)
    assert "\n" not in message and "127.0.0.1" in message
    assert "no ONNX runtime: pip install onnxruntime" in message
    assert board_temp_folders(board) == before


def test_a_wrong_host_key_is_one_line_naming_the_fix(board, tiny_artifacts, tmp_path):
    url = parse_device_url(board)
    wrong_key = tmp_path / "other_host_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(wrong_key)], check=True)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{url.port} {' '.join(Path(f'{wrong_key}.pub').read_text().split()[:2])}\n")
    device = f"ssh://root@127.0.0.1:{url.port}?key={url.options['key']}&known_hosts={known_hosts}"
    with pytest.raises(DeviceError) as caught:
        benchmark(tiny_artifacts["onnx"], device, QUICK)
    message = str(caught.value)
    assert "\n" not in message and f"127.0.0.1:{url.port}" in message
    assert "host key is not the one known for it" in message and "ssh-keygen -R" in message
