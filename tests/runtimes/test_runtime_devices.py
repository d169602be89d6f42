"""Device URLs, the gpu adapter's refusal without CUDA, and benchmark_many's scheduling."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from edgeprune.errors import DeviceError
from edgeprune.runtimes import BenchResult, BenchSettings, benchmark, benchmark_many, open_adapter
from edgeprune.runtimes.adb import AdbAdapter
from edgeprune.runtimes.base import DeviceUrl, parse_device_url
from edgeprune.runtimes.gpu import CUDA, GpuAdapter, available_providers
from edgeprune.runtimes.local import LocalAdapter
from edgeprune.runtimes.registry import ADAPTER_FACTORIES
from edgeprune.runtimes.ssh import SshAdapter


def test_ssh_url_with_port_and_options(tmp_path):
    key = tmp_path / "id_ed25519"
    key.write_text("not really a key")
    adapter = open_adapter(f"ssh://pi@rpi5.local:2222?python=/usr/bin/python3.11&key={key}", BenchSettings(timeout_s=5.0))
    assert isinstance(adapter, SshAdapter)
    target = adapter.target
    assert (target.user, target.host, target.port, target.python) == ("pi", "rpi5.local", 2222, "/usr/bin/python3.11")
    assert target.key == key and target.connect_timeout_s == 5
    argv = target.ssh_argv("true")
    assert argv[0] == "ssh" and argv[-2:] == ["pi@rpi5.local", "true"]
    assert argv[argv.index("-p") + 1] == "2222"
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=accept-new" in argv and "ConnectTimeout=5" in argv
    assert any(option.startswith("UserKnownHostsFile=") and "edgeprune" in option for option in argv)
    assert argv[argv.index("-i") + 1] == str(key)


def test_ssh_url_defaults():
    adapter = open_adapter("ssh://jetson")
    assert (adapter.target.user, adapter.target.port, adapter.target.python, adapter.target.key) == (None, 22, "python3", None)
    assert adapter.target.label == "jetson:22"


def test_adb_url_serials_and_benchmark_model(tmp_path):
    binary = tmp_path / "benchmark_model"
    binary.write_text("#!/bin/sh\n")
    adapter = open_adapter(f"adb://R58M12ABCDE?benchmark_model={binary}")
    assert isinstance(adapter, AdbAdapter)
    assert adapter.serial == "R58M12ABCDE" and adapter.benchmark_model == binary
    assert open_adapter("adb://192.168.1.20:5555").serial == "192.168.1.20:5555"
    assert open_adapter("adb://emulator-5554?python=/data/data/com.termux/files/usr/bin/python").python.endswith("python")


def test_local_and_gpu_urls():
    assert isinstance(open_adapter("local"), LocalAdapter)
    assert isinstance(open_adapter(" LOCAL "), LocalAdapter)
    gpu = open_adapter("gpu?provider=tensorrt&device_id=1")
    assert isinstance(gpu, GpuAdapter)
    assert gpu._local.providers[0] == "TensorrtExecutionProvider"
    assert gpu._local.extra_env == {"CUDA_VISIBLE_DEVICES": "1"}


def test_tensorrt_builds_with_sparse_tactics_unless_the_url_turns_them_off(tmp_path):
    model = tmp_path / "model.onnx"
    sparse, dense = open_adapter("gpu?provider=tensorrt"), open_adapter("gpu?provider=tensorrt&sparsity=0")
    chain = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    argv = sparse._local._runner_argv(model, BenchSettings(providers=chain))
    assert argv[argv.index("--provider-option") + 1] == "TensorrtExecutionProvider:trt_sparsity_enable=1"
    assert "--provider-option" not in dense._local._runner_argv(model, BenchSettings(providers=chain))
    assert (sparse.sparse_tactics, dense.sparse_tactics, open_adapter("gpu").sparse_tactics) == (True, False, False)
    # providers given in the settings win: an option for a provider they leave out is not passed
    assert "--provider-option" not in sparse._local._runner_argv(model, BenchSettings(providers=("CUDAExecutionProvider",)))


@pytest.mark.parametrize(
    ("device", "message"),
    [
        ("bluetooth://phone", r"unknown device 'bluetooth://phone': use one of adb, gpu, local, ssh"),
        ("raspberry", r"unknown device 'raspberry'"),
        ("ssh://", r"no host"),
        ("ssh://pi@host:notaport", r"bad port"),
        ("ssh://pi@host?python=a&python=b", r"query keys given twice: python"),
        ("ssh://pi@host?pyhton=/usr/bin/python3", r"unknown options \['pyhton'\]"),
        ("ssh://pi@host?key=/nonexistent/id_ed25519", r"key file /nonexistent/id_ed25519 not found"),
        ("adb://", r"no serial"),
        ("adb://X?benchmark_model=/nonexistent/benchmark_model", r"benchmark_model binary .* not found"),
        ("gpu?provider=rocm", r"provider must be one of \['cuda', 'tensorrt'\]"),
        ("gpu?sparsity=1", r"sparsity=0\|1 applies to provider=tensorrt only"),
        ("gpu?provider=tensorrt&sparsity=on", r"sparsity=0\|1 applies to provider=tensorrt only"),
        ("local?threads=4", r"unknown options \['threads'\]"),
    ],
)
def test_bad_device_urls_are_one_line_device_errors(device, message):
    with pytest.raises(DeviceError, match=message) as caught:
        open_adapter(device)
    assert "\n" not in str(caught.value)
    assert caught.value.exit_code == 4


def test_parse_device_url_keeps_parts():
    url = parse_device_url("ssh://ci@10.0.0.7:2200?python=/opt/py/bin/python3")
    assert (url.scheme, url.user, url.host, url.port) == ("ssh", "ci", "10.0.0.7", 2200)
    assert url.options == {"python": "/opt/py/bin/python3"}


@pytest.mark.skipif(CUDA in available_providers(), reason="this machine has CUDA: the refusal cannot happen")
def test_gpu_without_cuda_provider_refuses_with_the_fix(tiny_artifacts):
    with pytest.raises(DeviceError, match=r"no CUDA execution provider: install onnxruntime-gpu"):
        benchmark(tiny_artifacts["onnx"], "gpu", BenchSettings(repeats=1))


@pytest.mark.gpu
@pytest.mark.skipif(CUDA not in available_providers(), reason="needs onnxruntime-gpu and a CUDA GPU")
def test_gpu_benchmark_runs_on_cuda(tiny_artifacts):
    result = benchmark(tiny_artifacts["onnx"], "gpu", BenchSettings(repeats=2, iterations=20))
    assert result.providers[0] == CUDA
    assert 0 < result.latency_p50_ms <= result.latency_p99_ms


def test_gpu_refuses_tflite(tiny_artifacts):
    with pytest.raises(DeviceError, match="runs .onnx artefacts only"):
        benchmark(tiny_artifacts["tflite"], "gpu", BenchSettings(repeats=1))


# ---------------------------------------------------------------- benchmark_many


class FakeAdapter:
    """Sleeps instead of benchmarking and records how many runs overlap per device."""

    active: dict[str, int] = {}
    peak: dict[str, int] = {}
    overall_peak = 0
    guard = threading.Lock()

    def __init__(self, url: DeviceUrl) -> None:
        self.name = url.text
        self.cleaned = False

    def prepare(self, artifact: Path) -> None:
        if self.name == "fake://broken":
            raise DeviceError("fake://broken: unreachable")

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult:
        cls = FakeAdapter
        with cls.guard:
            cls.active[self.name] = cls.active.get(self.name, 0) + 1
            cls.peak[self.name] = max(cls.peak.get(self.name, 0), cls.active[self.name])
            cls.overall_peak = max(cls.overall_peak, sum(cls.active.values()))
        time.sleep(0.15)
        with cls.guard:
            cls.active[self.name] -= 1
        runner_json = {"latency_p50_ms": 1.0, "latency_mean_ms": 1.0, "iterations": 1, "runtime": "fake"}
        return BenchResult.from_runner_json([runner_json], self.name, str(artifact))

    def cleanup(self) -> None:
        self.cleaned = True


@pytest.fixture
def fake_devices(monkeypatch):
    open_adapter("local")  # registers the built-in schemes before we add ours
    monkeypatch.setitem(ADAPTER_FACTORIES, "fake", lambda url, settings: FakeAdapter(url))
    FakeAdapter.active, FakeAdapter.peak, FakeAdapter.overall_peak = {}, {}, 0


def test_benchmark_many_isolates_a_failing_device(fake_devices):
    pairs = [(Path("a.onnx"), "fake://one"), (Path("b.onnx"), "fake://broken"), (Path("c.onnx"), "fake://two")]
    results = benchmark_many(pairs, BenchSettings(), max_parallel=3)
    assert [type(r).__name__ for r in results] == ["BenchResult", "DeviceError", "BenchResult"]
    assert (results[0].device, results[0].artifact) == ("fake://one", "a.onnx")
    assert str(results[1]) == "fake://broken: unreachable"
    assert results[2].artifact == "c.onnx"


def test_benchmark_many_never_overlaps_runs_on_one_device(fake_devices):
    pairs = [(Path(f"m{i}.onnx"), device) for i in range(3) for device in ("fake://one", "fake://two")]
    started = time.monotonic()
    results = benchmark_many(pairs, BenchSettings(), max_parallel=4)
    elapsed = time.monotonic() - started
    assert [r.artifact for r in results] == [str(p) for p, _ in pairs]  # input order
    assert FakeAdapter.peak == {"fake://one": 1, "fake://two": 1}
    assert FakeAdapter.overall_peak == 2  # the two devices did run side by side
    assert elapsed >= 0.45  # 3 runs of 0.15 s, one after another, on each device


def test_benchmark_many_bugs_are_not_swallowed(fake_devices, monkeypatch):
    def explode(url, settings):
        raise RuntimeError("a bug, not a device failure")

    monkeypatch.setitem(ADAPTER_FACTORIES, "fake", explode)
    with pytest.raises(RuntimeError, match="a bug"):
        benchmark_many([(Path("a.onnx"), "fake://one")], BenchSettings(), max_parallel=1)
