"""The ssh adapter against a real OpenSSH server on 127.0.0.1, started per test."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeprune.errors import DeviceError
from edgeprune.runtimes import BenchSettings, benchmark, open_adapter
from edgeprune.runtimes.ssh import SshAdapter

pytestmark = pytest.mark.slow

QUICK = BenchSettings(threads=1, warmup=2, iterations=20, repeats=2, timeout_s=60.0, retries=1)


def test_ssh_benchmarks_onnx_end_to_end_and_removes_remote_dir(start_sshd, tiny_artifacts):
    server = start_sshd()
    result = benchmark(tiny_artifacts["onnx"], server.device(sys.executable), QUICK)

    assert result.device.startswith("ssh://") and f":{server.port}?" in result.device
    assert result.runtime == "onnxruntime"
    assert len(result.repeats) == 2
    assert result.iterations == 40
    assert 0 < result.latency_min_ms <= result.latency_p50_ms <= result.latency_p90_ms <= result.latency_p99_ms
    assert result.peak_rss_mb > 0 and result.init_ms > 0
    assert result.repeats[0]["model"] == "two_conv.onnx"
    # The remote dir was made under the sessions' TMPDIR and is gone again.
    assert server.remote_dirs() == []
    # accept-new stored the host key in our private known_hosts (maybe hashed), not ~/.ssh.
    lookup = subprocess.run(
        ["ssh-keygen", "-F", f"[127.0.0.1]:{server.port}", "-f", str(server.known_hosts)], capture_output=True, text=True
    )
    assert lookup.returncode == 0 and "ssh-ed25519" in lookup.stdout


def test_ssh_remote_dir_exists_between_prepare_and_cleanup(start_sshd, tiny_artifacts):
    server = start_sshd()
    adapter = open_adapter(server.device(sys.executable), QUICK)
    assert isinstance(adapter, SshAdapter)
    try:
        adapter.prepare(tiny_artifacts["tflite"])
        remote_dir = Path(adapter.remote_dir)
        assert remote_dir.parent == server.remote_tmp
        assert sorted(p.name for p in remote_dir.iterdir()) == ["runner.py", "two_conv.tflite"]
        assert (remote_dir / "two_conv.tflite").read_bytes() == tiny_artifacts["tflite"].read_bytes()
    finally:
        adapter.cleanup()
    assert not remote_dir.exists()
    assert adapter.remote_dir is None


def test_ssh_runner_error_is_reported_with_host_and_stage(start_sshd, tmp_path):
    server = start_sshd()
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not a protobuf")
    with pytest.raises(DeviceError, match=r"ssh .*127\.0\.0\.1:\d+: run repeat 1/2.*runner failed: .*Protobuf"):
        benchmark(corrupt, server.device(sys.executable), QUICK)
    assert server.remote_dirs() == []


def test_ssh_missing_remote_python_names_the_fix(start_sshd, tiny_artifacts):
    server = start_sshd()
    with pytest.raises(DeviceError, match=r"'/nonexistent/python3' not found on the host; pass \?python="):
        benchmark(tiny_artifacts["onnx"], server.device("/nonexistent/python3"), QUICK)


def test_ssh_dead_port_fails_after_retries(dead_port, tiny_artifacts):
    device = f"ssh://nobody@127.0.0.1:{dead_port}"
    settings = BenchSettings(retries=2, timeout_s=10.0)
    started = time.monotonic()
    with pytest.raises(DeviceError, match=r"ssh nobody@127\.0\.0\.1:\d+: mkdir failed after 3 attempt\(s\):.*refused"):
        benchmark(tiny_artifacts["onnx"], device + f"?known_hosts={tiny_artifacts['onnx'].parent / 'kh'}", settings)
    assert time.monotonic() - started < 10  # refused connections fail fast; 0.5 s + 1 s backoff


def test_ssh_server_killed_mid_run_gives_device_error(start_sshd, tiny_artifacts):
    server = start_sshd()
    long_run = BenchSettings(threads=1, warmup=0, iterations=1, min_seconds=20.0, repeats=1, retries=1)
    adapter = open_adapter(server.device(sys.executable), long_run)
    outcome: dict[str, Exception] = {}

    def run() -> None:
        try:
            adapter.run(tiny_artifacts["onnx"], long_run)
        except Exception as error:  # handed to the test thread
            outcome["error"] = error

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 15
    while not server.runner_running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.runner_running(), "the remote runner never started"
    server.kill()
    worker.join(timeout=30)
    adapter.cleanup()  # the server is gone: must log, not raise

    assert not worker.is_alive()
    error = outcome.get("error")
    assert isinstance(error, DeviceError), error
    assert "run repeat 1/1 failed after 2 attempt(s)" in str(error)
    assert f"127.0.0.1:{server.port}" in str(error)
    for leftover in server.remote_dirs():  # cleanup could not reach the dead server
        shutil.rmtree(leftover)
