"""The adb adapter against a fake ``adb`` that maps /data/local/tmp into a local folder.

The fake implements ``-s SERIAL push SRC DST`` and ``-s SERIAL shell CMD`` (run by
``sh`` with device paths rewritten), so the adapter's real command lines, pushes,
benchmark_model flags, parsing and cleanup all run; only the USB cable is missing.
"""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from edgeprune.errors import DeviceError
from edgeprune.runtimes import BenchSettings
from edgeprune.runtimes.adb import AdbAdapter

SERIAL = "emulator-5554"
FIXTURE_LOG = Path(__file__).with_name("fixtures") / "mobilenet_v1_riscv64_op_profiling.txt"

FAKE_ADB = """#!{python}
import shutil, subprocess, sys
ROOT = {root!r}
args = sys.argv[1:]
if args[:2] != ["-s", {serial!r}]:
    sys.exit(print(f"adb: device '{{args[1]}}' not found", file=sys.stderr) or 1)
verb, rest = args[2], args[3:]
to_host = lambda text: text.replace("/data/local/tmp", ROOT + "/data/local/tmp")
if verb == "push":
    shutil.copy(rest[0], to_host(rest[1]))
    sys.exit(print(f"{{rest[0]}}: 1 file pushed") or 0)
if verb == "shell" and rest == ["getprop"]:
    print("[ro.product.cpu.abi]: [arm64-v8a]")
    print("[ro.build.version.release]: [14]")
    print("[ro.product.model]: [Pixel 8]")
    sys.exit(print("[ro.soc.model]: [Tensor G3]") or 0)
if verb == "shell":
    done = subprocess.run(["sh", "-c", to_host(" ".join(rest))], capture_output=True, text=True)
    sys.stdout.write(done.stdout.replace(ROOT, ""))
    sys.stderr.write(done.stderr)
    sys.exit(done.returncode)
sys.exit(print(f"adb: unknown command {{verb}}", file=sys.stderr) or 1)
"""

FAKE_BENCHMARK_MODEL = """#!/bin/sh
echo "$@" >> "$(dirname "$0")/../../calls.txt"
cat {log}
"""


def _executable(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.fixture
def fake_phone(tmp_path: Path) -> dict[str, Path]:
    """A fake adb, a fake benchmark_model (prints the real RISC-V log) and the phone's /data/local/tmp."""
    device_tmp = tmp_path / "phone" / "data" / "local" / "tmp"
    device_tmp.mkdir(parents=True)
    adb = _executable(tmp_path / "adb", FAKE_ADB.format(python=sys.executable, root=str(tmp_path / "phone"), serial=SERIAL))
    binary = _executable(tmp_path / "benchmark_model", FAKE_BENCHMARK_MODEL.format(log=FIXTURE_LOG))
    return {"adb": adb, "benchmark_model": binary, "device_tmp": device_tmp}


def test_benchmark_model_mode_pushes_runs_parses_and_cleans_up(fake_phone, tiny_artifacts):
    settings = BenchSettings(threads=4, warmup=5, iterations=50, repeats=2, use_xnnpack=False)
    adapter = AdbAdapter(SERIAL, settings, benchmark_model=fake_phone["benchmark_model"], adb=str(fake_phone["adb"]))
    try:
        adapter.prepare(tiny_artifacts["tflite"])
        remote = fake_phone["device_tmp"] / Path(adapter.remote_dir).name
        assert sorted(p.name for p in remote.iterdir()) == ["benchmark_model", "two_conv.tflite"]
        result = adapter.run(tiny_artifacts["tflite"], settings)
    finally:
        adapter.cleanup()

    assert list(fake_phone["device_tmp"].iterdir()) == []  # temp dir removed
    calls = (fake_phone["device_tmp"].parent / "calls.txt").read_text().splitlines()
    assert len(calls) == 2  # one benchmark_model process per repeat
    graph, *flags = calls[0].split()
    assert graph.startswith("--graph=") and graph.endswith(f"/data/local/tmp/{remote.name}/two_conv.tflite")
    assert flags == [
        "--num_threads=4",
        "--warmup_runs=5",
        "--warmup_min_secs=0",
        "--num_runs=50",
        "--min_secs=0",
        "--max_secs=300",
        "--use_xnnpack=false",
    ]
    assert result.p50_is_mean and result.latency_p50_ms == pytest.approx(2950.34)
    assert result.latency_p90_ms is None and result.latency_p99_ms is None
    assert result.latency_min_ms == pytest.approx(2727.568) and result.latency_std_ms == pytest.approx(109.798)
    assert result.init_ms == pytest.approx(17.187) and result.first_run_ms == pytest.approx(3512.391)
    assert result.iterations == 100 and result.threads == 4 and result.p50_spread_pct == 0.0
    assert result.runtime == "tflite benchmark_model" and result.providers == ("builtin",)
    assert (result.machine, result.cpu_model) == ("arm64-v8a", "Tensor G3")
    assert result.platform == "Android 14 (Pixel 8)"
    assert result.repeats[0]["op_profile"]["nodes_executed"] == 31


def test_runner_mode_under_a_device_python(fake_phone, tiny_artifacts):
    settings = BenchSettings(threads=1, warmup=1, iterations=10, repeats=2)
    adapter = AdbAdapter(SERIAL, settings, python=sys.executable, adb=str(fake_phone["adb"]))
    try:
        result = adapter.run(tiny_artifacts["onnx"], settings)
    finally:
        adapter.cleanup()
    assert list(fake_phone["device_tmp"].iterdir()) == []
    assert result.runtime == "onnxruntime" and not result.p50_is_mean
    assert result.iterations == 20 and 0 < result.latency_p50_ms <= result.latency_p99_ms
    assert result.device == f"adb://{SERIAL}"


def test_unplugged_device_fails_after_retries(fake_phone, tiny_artifacts):
    settings = BenchSettings(retries=1)
    adapter = AdbAdapter("R58M-GONE", settings, python=sys.executable, adb=str(fake_phone["adb"]))
    with pytest.raises(DeviceError, match=r"adb://R58M-GONE: mkdir failed after 2 attempt\(s\): .*not found"):
        adapter.run(tiny_artifacts["onnx"], settings)
    adapter.cleanup()  # nothing was made: a no-op


def test_benchmark_model_crash_is_a_device_error(fake_phone, tiny_artifacts, tmp_path):
    crashing = _executable(tmp_path / "crashing_benchmark_model", "#!/bin/sh\necho 'Segmentation fault' >&2\nexit 139\n")
    settings = BenchSettings(repeats=1)
    adapter = AdbAdapter(SERIAL, settings, benchmark_model=crashing, adb=str(fake_phone["adb"]))
    try:
        with pytest.raises(DeviceError, match=r"run repeat 1/1: exit 139: benchmark_model printed no inference latency"):
            adapter.run(tiny_artifacts["tflite"], settings)
    finally:
        adapter.cleanup()
    assert list(fake_phone["device_tmp"].iterdir()) == []
