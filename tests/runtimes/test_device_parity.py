"""Parity on a remote device (the runner's ``--samples`` mode, the ssh adapter's ``outputs``), emulation detection,
and what an emulated device's timings may not be used for. Against an x86 sshd on 127.0.0.1; the arm64 board's
tests are in test_arm64_board.py."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgeprune.budgets import check_budgets, unchecked_budgets
from edgeprune.config import BudgetConfig, ParityConfig
from edgeprune.device_parity import parity_on_device, precision_of
from edgeprune.errors import ConfigError, DeviceError, ParityError
from edgeprune.parity import artifact_logits
from edgeprune.runtimes import BenchSettings, device_computes_outputs, runner
from edgeprune.runtimes.base import RUNNER_PATH, BenchResult
from edgeprune.runtimes.figures import caveats
from tests.runtimes.conftest import INPUT_SHAPE

QUICK = BenchSettings(threads=1, warmup=0, iterations=1, repeats=1, timeout_s=120.0, retries=0)


def run_runner(*args: str) -> dict:
    completed = subprocess.run([sys.executable, str(RUNNER_PATH), *args], capture_output=True, text=True, timeout=120)
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["onnx", "tflite", "onnx_dynamic_batch"])
def test_runner_samples_mode_returns_what_parity_computes_in_process(tiny_artifacts, tmp_path, kind):
    images = np.random.default_rng(1).standard_normal((5, *INPUT_SHAPE[1:])).astype(np.float32)
    np.save(tmp_path / "samples.npy", images)
    result = run_runner(
        "--model", str(tiny_artifacts[kind]), "--samples", str(tmp_path / "samples.npy"), "--outputs", str(tmp_path / "o.npy")
    )

    outputs = np.load(tmp_path / "o.npy")
    assert result["samples"] == 5 and result["output_shape"] == list(outputs.shape)
    expected = artifact_logits(tiny_artifacts[kind], images, threads=1)
    assert outputs.shape == expected.shape and outputs.dtype == np.float32
    np.testing.assert_allclose(outputs, expected, atol=1e-5)
    assert result["layout"] in ("as given", "NCHW samples fed channels-last")
    assert result["emulated"] is None  # this host runs its own machine's code


def test_runner_samples_of_the_wrong_shape_are_one_json_error(tiny_artifacts, tmp_path):
    np.save(tmp_path / "samples.npy", np.zeros((2, 3, 8, 8), np.float32))
    result = run_runner(
        "--model", str(tiny_artifacts["onnx"]), "--samples", str(tmp_path / "samples.npy"), "--outputs", str(tmp_path / "o.npy")
    )
    assert f"fit neither the model's input {list(INPUT_SHAPE[1:])}" in result["error"]
    assert not (tmp_path / "o.npy").exists()


def test_emulation_is_told_from_the_kernels_machine(monkeypatch):
    kernel_arch = Path("/proc/sys/kernel/arch")
    if not kernel_arch.exists():
        pytest.skip("this kernel has no /proc/sys/kernel/arch")
    native = kernel_arch.read_text().strip()
    assert runner.emulation() is None  # this process runs natively
    guest = "aarch64" if native == "x86_64" else "x86_64"
    monkeypatch.setattr(runner.platform, "machine", lambda: guest)
    assert runner.emulation() == f"user-mode emulation: a {guest} process on a {native} kernel"


def test_arm_cores_are_named_from_their_part_number(monkeypatch):
    pi5 = {"cpu implementer": "0x41", "cpu part": "0xd0b", "model": "Raspberry Pi 5 Model B Rev 1.0"}
    monkeypatch.setattr(runner, "cpuinfo_fields", lambda: pi5)
    assert runner.cpu_model() == "Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)"
    monkeypatch.setattr(runner, "cpuinfo_fields", lambda: {"cpu implementer": "0x41", "cpu part": "0xd08"})
    assert runner.cpu_model() == "Cortex-A72"
    monkeypatch.setattr(runner, "cpuinfo_fields", lambda: {"model name": "Intel(R) Xeon(R) Processor", "cpu part": "0xd0b"})
    assert runner.cpu_model() == "Intel(R) Xeon(R) Processor"


@pytest.mark.slow
def test_parity_on_an_ssh_device_matches_in_process_parity_and_leaves_nothing(start_sshd, tiny_artifacts):
    server = start_sshd()
    images = np.random.default_rng(2).standard_normal((7, *INPUT_SHAPE[1:])).astype(np.float32)
    parent = artifact_logits(tiny_artifacts["tflite"], images, threads=1) + 0.01  # a parent a little off: measured, not assumed
    samples, artefact, device = (images, parent, np.zeros(7)), tiny_artifacts["tflite"], server.device(sys.executable)
    assert device_computes_outputs(device) and not device_computes_outputs("local")

    report = parity_on_device("tflite_fp32", artefact, device, samples, ParityConfig(fp32_max_abs=0.02), QUICK)

    assert report["samples"] == 7 and report["device"] == device
    assert report["max_abs_error"] == pytest.approx(0.01, abs=1e-5)
    assert report["runtime"] == "ai-edge-litert" and report["machine"] == "x86_64" and report["emulated"] is None
    assert server.remote_dirs() == []
    with pytest.raises(ParityError, match=r"tflite_fp32: fp32 parity failed versus its PyTorch parent, run on ssh://"):
        parity_on_device("tflite_fp32", artefact, device, samples, ParityConfig(), QUICK)
    assert server.remote_dirs() == []


@pytest.mark.slow
def test_a_url_can_declare_the_device_emulated(start_sshd, tiny_artifacts):
    from edgeprune.runtimes import benchmark

    server = start_sshd()
    result = benchmark(tiny_artifacts["onnx"], server.device(sys.executable) + "&emulated=yes", QUICK)
    assert result.emulated.startswith("declared by the device URL")
    assert any(note.startswith("EMULATED") for note in caveats(result.to_dict()))
    with pytest.raises(DeviceError, match="emulated='maybe'; use emulated=yes or emulated=no"):
        benchmark(tiny_artifacts["onnx"], server.device(sys.executable) + "&emulated=maybe", QUICK)


@pytest.mark.slow
def test_a_full_disk_on_the_device_is_one_line_and_the_temp_folder_goes(start_sshd, tiny_artifacts):
    from edgeprune.runtimes import benchmark

    server = start_sshd()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(server.remote_tmp)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {mounted.stderr.decode().strip()}")
    try:
        with pytest.raises(DeviceError) as caught:
            benchmark(tiny_artifacts["onnx"], server.device(sys.executable), QUICK)
        message = str(caught.value)
        assert "\n" not in message and f"127.0.0.1:{server.port}" in message
        assert "the device's disk is full" in message and "free space" in message
        assert server.remote_dirs() == []
    finally:
        subprocess.run(["umount", str(server.remote_tmp)], check=True)


def test_precision_classes_of_artefact_names():
    assert [precision_of(name) for name in ("tflite_int8", "onnx_dynamic", "onnx_fp16", "onnx_fp32", "model")] == [
        "int8",
        "int8",
        "fp16",
        "fp32",
        "fp32",
    ]


def _manifest(emulated: str | None) -> dict:
    bench = {"latency_p50_ms": 500.0, "latency_p90_ms": 600.0}
    return {
        "primary_artifact": "tflite_int8",
        "artifacts": {"tflite_int8": {"size_bytes": 2048, "benchmark": bench}},
        "accuracy": {"drop": 0.5},
        "speedups": {},
        "benchmark_device": "ssh://root@127.0.0.1:22064",
        "benchmark_emulated": emulated,
    }


def test_emulated_timings_feed_no_budget():
    budgets = BudgetConfig(max_latency_p50_ms=1.0, min_speedup=1.5, max_size_kb=1.0, max_accuracy_drop=0.1)
    native = check_budgets(budgets, _manifest(None))
    assert sorted(v.budget for v in native) == ["max_accuracy_drop", "max_latency_p50_ms", "max_size_kb", "min_speedup"]
    emulated = _manifest("user-mode emulation: a aarch64 process on a x86_64 kernel")
    assert sorted(v.budget for v in check_budgets(budgets, emulated)) == ["max_accuracy_drop", "max_size_kb"]
    lines = unchecked_budgets(budgets, emulated)
    assert [line.split(" ")[0] for line in lines] == ["budgets.max_latency_p50_ms", "budgets.min_speedup"]
    assert all("is emulated (user-mode emulation" in line for line in lines)
    assert unchecked_budgets(budgets, _manifest(None)) == []


def test_emulated_and_native_timings_are_never_compared(tmp_path):
    from edgeprune.diff import diff_manifests

    for name, emulated in (("native", None), ("emulated", "user-mode emulation")):
        manifest = {**_manifest(emulated), "target": "rpi5", "model": {}}
        manifest["accuracy"] = {"primary": 90.0}
        (tmp_path / f"{name}.json").write_text(json.dumps(manifest))
    result = diff_manifests(tmp_path / "native.json", tmp_path / "emulated.json")
    assert not [change for change in result.changes if change.metric.startswith("latency")]
    assert any(note.startswith("timings not compared: ssh://root@127.0.0.1:22064 is emulated") for note in result.notes)


def test_prune_speedup_refuses_an_emulated_device(monkeypatch, tmp_path):
    from edgeprune import speedup_search

    emulated = BenchResult.from_runner_json([{"latency_mean_ms": 9.0, "emulated": "user-mode emulation"}], "ssh://pi", "m.tflite")
    monkeypatch.setattr(speedup_search, "benchmark", lambda *args: emulated)
    probe = speedup_search.LatencyProbe("tflite", "ssh://pi", QUICK, context=None)
    with pytest.raises(ConfigError, match=r"prune.speedup measures speed on ssh://pi, which is emulated \(user-mode emulation\)"):
        probe.p50_ms(tmp_path / "m.tflite")


@pytest.mark.slow
def test_a_device_lost_mid_build_fails_in_one_line_and_writes_no_manifest(start_sshd, workdir, user_checkpoint, capsys):
    from edgeprune.cli import main
    from tests.conftest import FAST, USER_MODEL

    server, build_over = start_sshd(), threading.Event()

    def pull_the_plug() -> None:
        while not server.runner_running() and not build_over.is_set():
            time.sleep(0.05)
        server.kill()

    killer = threading.Thread(target=pull_the_plug)
    killer.start()
    args = ["build", "--target", "cpu-x86", "--model", USER_MODEL, "--weights", str(user_checkpoint), "--out", "dist/board"]
    for override in (
        *FAST,
        "export.formats=['onnx']",
        "prune.round_to=8",
        f"benchmark.device={server.device(sys.executable)}",
        "benchmark.iterations=200000",
    ):
        args += ["--set", override]
    code = main(args)
    build_over.set()
    killer.join(timeout=60)

    assert code == 4
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("edgeprune: error:")]
    assert len(errors) == 1 and f"127.0.0.1:{server.port}" in errors[0] and "failed after" in errors[0]
    assert not (workdir / "dist" / "board" / "manifest.json").exists()
