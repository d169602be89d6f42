"""``adb://SERIAL``: benchmark on an Android device (or any adb target) over USB/TCP.

Two ways to run, chosen per artefact:

* ``adb://SERIAL?benchmark_model=/host/path/benchmark_model`` — TFLite's official
  ``benchmark_model`` binary (built for the device's ABI, supplied by the user) is
  pushed and runs .tflite artefacts. It reports a mean but no percentiles, so the
  result's p50 is that mean (``BenchResult.p50_is_mean``).
* ``adb://SERIAL?executor_runner=/host/path/executor_runner`` — ExecuTorch's
  ``executor_runner`` (built for the device's ABI with the XNNPACK backend, supplied by
  the user) is pushed and runs .pte artefacts, ``--cpu_threads`` set to the thread count.
  Its log is parsed (``edgeprune.runtimes.executor_runner_output``): per-execution times
  give percentiles where the release prints them, else p50 is the mean; no memory figure.
* ``adb://SERIAL?python=/data/.../python3`` — ``runner.py`` under a Python that lives
  on the device (e.g. Termux), for .onnx, .tflite and .pte, with full percentiles.

With ``benchmark_model``, ``profile_ops`` runs it once with ``--enable_op_profiling=true``: each
operator's time on the device, for the speed-up search's latency table.

Files go to a ``mktemp -d`` directory under /data/local/tmp, removed in ``cleanup``.
"""

from __future__ import annotations

import logging
import re
import shlex
import subprocess
from functools import partial
from pathlib import Path

from edgeprune.errors import DeviceError, TransientDeviceError
from edgeprune.runtimes.base import (
    RUNNER_PATH,
    BenchResult,
    BenchSettings,
    DeviceUrl,
    run_repeats,
    with_retries,
)
from edgeprune.runtimes.benchmark_model_output import benchmark_model_args, op_profiling_run, parse_benchmark_model_output
from edgeprune.runtimes.commands import parse_runner_stdout, run_command, stderr_tail
from edgeprune.runtimes.executor_runner_output import (
    executor_runner_args,
    parse_executor_runner_output,
    runner_json_from_executor_runner,
)
from edgeprune.runtimes.local import check_artifact
from edgeprune.runtimes.registry import register_adapter

_LOG = logging.getLogger(__name__)
DEVICE_TMP = "/data/local/tmp"
_ADB_TRANSIENT = re.compile(
    r"device offline|device '.*' not found|no devices|error: closed|protocol fault"
    r"|connection reset|device still authorizing",
    re.IGNORECASE,
)
_SAFE_REMOTE_DIR = re.compile(r"^/data/local/tmp/[A-Za-z0-9._-]+$")
_PROPERTY = re.compile(r"^\[([^\]]+)\]: \[(.*)\]$")


def runner_json_from_benchmark_model(parsed: dict, settings: BenchSettings, facts: dict) -> dict:
    """A runner-shaped dict from ``parse_benchmark_model_output``; p50/p90/p99 are None."""
    return {
        "init_ms": parsed["init_ms"],
        "first_run_ms": parsed["first_inference_ms"],
        "latency_p50_ms": None,
        "latency_p90_ms": None,
        "latency_p99_ms": None,
        "latency_mean_ms": parsed["inference_avg_ms"],
        "latency_std_ms": parsed["inference_std_ms"],
        "latency_min_ms": parsed["inference_min_ms"],
        "latency_max_ms": parsed["inference_max_ms"],
        "iterations": parsed["inference_count"] or 0,
        "threads": parsed["num_threads"] or settings.threads,
        "peak_rss_mb": parsed["peak_memory_mb"],
        "memory_overall_mb": parsed["memory_overall_mb"],
        "rss_before_load_mb": None,
        "runtime": "tflite benchmark_model",
        "runtime_version": "unknown",
        "providers": ["xnnpack" if settings.use_xnnpack else "builtin"],
        "op_profile": parsed["op_profile"],
        **facts,
    }


class AdbAdapter:
    """Benchmarks on one adb device; ``remote_dir`` is the temp dir while prepared."""

    def __init__(
        self,
        serial: str,
        settings: BenchSettings = BenchSettings(),
        device: str = "",
        benchmark_model: Path | None = None,
        python: str | None = None,
        adb: str = "adb",
        executor_runner: Path | None = None,
    ) -> None:
        self.serial = serial
        self.settings = settings
        self.name = device or f"adb://{serial}"
        self.benchmark_model = benchmark_model
        self.executor_runner = executor_runner
        self.python = python or "python3"
        self.adb = adb
        self.remote_dir: str | None = None
        self._prepared_artifact: Path | None = None
        self._device_facts: dict = {}

    def _device_tool(self, artifact: Path) -> tuple[str, Path] | None:
        """(name on the device, host path) of the native tool that runs ``artifact``; None: runner.py."""
        suffix = artifact.suffix.lower()
        if self.benchmark_model is not None and suffix == ".tflite":
            return "benchmark_model", self.benchmark_model
        if self.executor_runner is not None and suffix == ".pte":
            return "executor_runner", self.executor_runner
        return None

    def _adb(self, args: list[str], timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
        completed = run_command([self.adb, "-s", self.serial, *args], timeout_s, what)
        if completed.returncode != 0 and _ADB_TRANSIENT.search(completed.stderr):
            raise TransientDeviceError(f"{what}: {stderr_tail(completed.stderr)}")
        return completed

    def _shell(self, command: str, what: str, timeout_s: float | None = None) -> subprocess.CompletedProcess[str]:
        return self._adb(["shell", command], timeout_s or self.settings.timeout_s, what)

    def _make_remote_dir(self) -> str:
        what = f"{self.name}: mktemp -d"
        completed = self._shell(f"mktemp -d {DEVICE_TMP}/edgeprune.XXXXXX", what)
        remote_dir = completed.stdout.strip()
        if completed.returncode != 0 or not _SAFE_REMOTE_DIR.match(remote_dir):
            raise DeviceError(f"{what}: got {remote_dir!r}: {stderr_tail(completed.stderr)}")
        return remote_dir

    def _push(self, local: Path, remote: str) -> None:
        what = f"{self.name}: push {local.name}"
        completed = self._adb(["push", str(local), remote], self.settings.timeout_s, what)
        if completed.returncode != 0:
            raise DeviceError(f"{what}: {stderr_tail(completed.stderr or completed.stdout)}")

    def _read_device_facts(self) -> dict:
        completed = self._shell("getprop", f"{self.name}: getprop", timeout_s=30.0)
        props = dict(m.groups() for m in map(_PROPERTY.match, completed.stdout.splitlines()) if m)
        return {
            "platform": f"Android {props.get('ro.build.version.release', '?')} ({props.get('ro.product.model', '?')})",
            "machine": props.get("ro.product.cpu.abi"),
            "cpu_model": props.get("ro.soc.model") or props.get("ro.board.platform") or props.get("ro.hardware"),
        }

    def prepare(self, artifact: Path) -> None:
        """Make the temp dir and push the artefact plus benchmark_model or runner.py.

        Raises:
            DeviceError: the device is gone after ``settings.retries`` or a push failed.
        """
        check_artifact(artifact)
        if self._prepared_artifact == artifact:
            return
        retries = self.settings.retries
        if self.remote_dir is None:
            self.remote_dir = with_retries(self._make_remote_dir, retries, f"{self.name}: mkdir")
            self._device_facts = self._read_device_facts()
        tool = self._device_tool(artifact)
        pushes = [(artifact, f"{self.remote_dir}/{artifact.name}")]
        pushes.append((tool[1], f"{self.remote_dir}/{tool[0]}") if tool else (RUNNER_PATH, f"{self.remote_dir}/{RUNNER_PATH.name}"))
        for local, remote in pushes:
            with_retries(partial(self._push, local, remote), retries, f"{self.name}: push {local.name}")
        if tool:
            self._shell(f"chmod 755 {self.remote_dir}/{tool[0]}", f"{self.name}: chmod", timeout_s=30.0)
        self._prepared_artifact = artifact

    def _run_once(self, artifact: Path, settings: BenchSettings, what: str) -> dict:
        model, tool = f"{self.remote_dir}/{artifact.name}", self._device_tool(artifact)
        if tool is None:
            argv = [self.python, f"{self.remote_dir}/{RUNNER_PATH.name}", *settings.runner_args(model)]
            return parse_runner_stdout(self._shell(shlex.join(argv), what), what)
        if tool[0] == "executor_runner":
            return self._run_executor_runner(model, settings, what)
        completed = self._shell(shlex.join(benchmark_model_args(f"{self.remote_dir}/benchmark_model", model, settings)), what)
        try:
            parsed = parse_benchmark_model_output(completed.stdout + "\n" + completed.stderr)
        except DeviceError as error:
            raise DeviceError(f"{what}: exit {completed.returncode}: {error}") from error
        return runner_json_from_benchmark_model(parsed, settings, self._device_facts)

    def _run_executor_runner(self, model: str, settings: BenchSettings, what: str) -> dict:
        executions = settings.warmup + settings.iterations  # the tool has no warmup: the first ``warmup`` are dropped
        argv = executor_runner_args(f"{self.remote_dir}/executor_runner", model, executions, settings.threads)
        completed = self._shell(shlex.join(argv), what)
        try:
            parsed = parse_executor_runner_output(completed.stdout + "\n" + completed.stderr)
        except DeviceError as error:
            raise DeviceError(f"{what}: exit {completed.returncode}: {error}") from error
        return runner_json_from_executor_runner(parsed, settings.warmup, settings.threads, self._device_facts)

    def profile_ops(self, artifact: Path, settings: BenchSettings) -> dict:
        """One benchmark_model run of a .tflite with op profiling: ``run_order`` (each operator's ``node_type``,
        ``name``, ``avg_ms``) and ``inference_avg_ms``.

        Raises:
            DeviceError: no ``benchmark_model`` for this artefact, or the run failed.
        """
        tool = self._device_tool(artifact)
        if tool is None or tool[0] != "benchmark_model":
            raise DeviceError(f"{self.name}: op profiling runs TFLite's benchmark_model: pass ?benchmark_model=/host/path and a .tflite")
        self.prepare(artifact)
        what = f"{self.name}: op profile of {artifact.name}"
        argv = benchmark_model_args(f"{self.remote_dir}/benchmark_model", f"{self.remote_dir}/{artifact.name}", settings, op_profiling=True)
        return with_retries(lambda: op_profiling_run(self._shell(shlex.join(argv), what), what), settings.retries, what)

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult:
        """One benchmark_model, executor_runner or runner process per repeat, retried if the device drops.

        Raises:
            DeviceError: naming the serial and the stage that failed.
        """
        self.prepare(artifact)
        return run_repeats(partial(self._run_once, artifact, settings), settings, self.name, self.name, artifact)

    def cleanup(self) -> None:
        """Remove the device temp dir (one attempt); a failure is logged, never raised."""
        remote_dir, self.remote_dir, self._prepared_artifact = self.remote_dir, None, None
        if remote_dir is None:
            return
        try:
            completed = self._shell(f"rm -rf {shlex.quote(remote_dir)}", f"{self.name}: cleanup", timeout_s=60.0)
            if completed.returncode != 0:
                _LOG.warning("%s: cleanup of %s failed: %s", self.name, remote_dir, stderr_tail(completed.stderr))
        except DeviceError as error:
            _LOG.warning("%s", error)


@register_adapter("adb")
def open_adb(url: DeviceUrl, settings: BenchSettings) -> AdbAdapter:
    """``adb://SERIAL[?benchmark_model=/host/path&executor_runner=/host/path&python=/device/path]``."""
    serial = url.text.split("://", 1)[1].split("?", 1)[0].strip("/")
    if not serial:
        raise DeviceError(f"device {url.text!r}: no serial; use adb://SERIAL (see `adb devices`)")
    url.check_options(("benchmark_model", "executor_runner", "python"))
    tools = {}
    for option in ("benchmark_model", "executor_runner"):
        binary = url.options.get(option)
        if binary and not Path(binary).expanduser().is_file():
            raise DeviceError(f"device {url.text!r}: {option} binary {binary} not found on this machine")
        tools[option] = Path(binary).expanduser() if binary else None
    return AdbAdapter(serial, settings, url.text, python=url.options.get("python"), **tools)
