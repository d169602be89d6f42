"""``ssh://user@host[:port]``: benchmark on a remote machine (a Raspberry Pi, a server).

Uses the system OpenSSH ``ssh`` and ``scp`` binaries, never a password prompt
(``BatchMode=yes``). Host keys are trusted on first use (``accept-new``) and kept in
edgeprune's own known_hosts file, not the user's. Options in the query string:

``python``       the remote interpreter (default ``python3``); it needs numpy and
                 onnxruntime, ai-edge-litert/tflite-runtime, or the executorch wheel (.pte)
``key``          a private key file (default: ssh's own choice / agent)
``known_hosts``  the known_hosts file to use (default ``~/.cache/edgeprune/known_hosts``)
``emulated``     ``yes`` / ``no``: whether the host is emulated (qemu, say), where the runner's own detection
                 (``emulated`` in its JSON) is wrong; an emulated device's timings are marked not representative
``benchmark_model``  the path *on the host* of TFLite's ``benchmark_model``: ``profile_ops`` runs it with
                 ``--enable_op_profiling=true`` on a .tflite (each operator's time, for the speed-up search's
                 latency table); benchmarks still run ``runner.py``

Each benchmark copies the artefact and ``runner.py`` into a ``mktemp -d`` directory,
runs one remote process per repeat and removes the directory in ``cleanup``. ``outputs`` copies a
``.npy`` of samples there too and copies the artefact's outputs on them back (parity on the device).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
from dataclasses import dataclass
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
from edgeprune.runtimes.benchmark_model_output import benchmark_model_args, op_profiling_run
from edgeprune.runtimes.commands import parse_runner_stdout, run_command, stderr_tail
from edgeprune.runtimes.local import check_artifact
from edgeprune.runtimes.registry import register_adapter

_LOG = logging.getLogger(__name__)
SSH_CONNECTION_FAILED = 255  # ssh's own exit code; anything else is the remote command's
_PERMANENT = re.compile(
    r"permission denied|host key verification failed|identification has changed"
    r"|could not resolve hostname",
    re.IGNORECASE,
)
_DISK_FULL = re.compile(r"no space left on device|disk quota exceeded", re.IGNORECASE)
_HOST_KEY = re.compile(r"host key verification failed|identification has changed", re.IGNORECASE)
_SAFE_REMOTE_DIR = re.compile(r"^/[A-Za-z0-9._/-]+$")


def default_known_hosts() -> Path:
    """edgeprune's private known_hosts: ``$XDG_CACHE_HOME/edgeprune/known_hosts``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "edgeprune" / "known_hosts"


@dataclass(frozen=True)
class SshTarget:
    """Where and how to connect; ``connect_timeout_s`` bounds the TCP/SSH handshake."""

    host: str
    user: str | None = None
    port: int = 22
    python: str = "python3"
    key: Path | None = None
    known_hosts: Path | None = None
    connect_timeout_s: int = 10

    @property
    def label(self) -> str:
        """``user@host:port`` for messages."""
        return f"{self.user + '@' if self.user else ''}{self.host}:{self.port}"

    def options(self) -> list[str]:
        """OpenSSH ``-o``/``-i`` options shared by ssh and scp."""
        known_hosts = self.known_hosts or default_known_hosts()
        settings = [
            "BatchMode=yes",  # never prompt for a password or passphrase
            "StrictHostKeyChecking=accept-new",
            f"UserKnownHostsFile={known_hosts}",
            f"ConnectTimeout={self.connect_timeout_s}",
            "ServerAliveInterval=5",  # notice a vanished device within ~15 s
            "ServerAliveCountMax=3",
            "LogLevel=ERROR",
        ]
        if self.key is not None:
            settings.append("IdentitiesOnly=yes")
        options = [arg for setting in settings for arg in ("-o", setting)]
        return options + (["-i", str(self.key)] if self.key is not None else [])

    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def ssh_argv(self, remote_command: str) -> list[str]:
        return ["ssh", *self.options(), "-p", str(self.port), self.destination(), remote_command]

    def scp_argv(self, local_files: list[Path], remote_dir: str) -> list[str]:
        return ["scp", "-q", *self.options(), "-P", str(self.port), *map(str, local_files), f"{self.destination()}:{remote_dir}/"]

    def fetch_argv(self, remote_file: str, local_file: Path) -> list[str]:
        return ["scp", "-q", *self.options(), "-P", str(self.port), f"{self.destination()}:{remote_file}", str(local_file)]


def _connection_failure(completed: subprocess.CompletedProcess[str], what: str) -> DeviceError:
    """A dropped or refused connection is transient; bad keys, host keys or a full disk are not."""
    detail = stderr_tail(completed.stderr)
    if _DISK_FULL.search(completed.stderr):
        return DeviceError(f"{what}: the device's disk is full ({detail}): free space in its temp folder")
    if _HOST_KEY.search(completed.stderr):
        return DeviceError(f"{what}: the device's host key is not the one known for it ({detail}): if the device was "
                           "reinstalled, remove its old key with ssh-keygen -R from the known_hosts file")  # fmt: skip
    error_class = DeviceError if _PERMANENT.search(completed.stderr) else TransientDeviceError
    return error_class(f"{what}: {detail}")


class SshAdapter:
    """Benchmarks on one SSH host; ``remote_dir`` is the temp dir while prepared."""

    def __init__(
        self,
        target: SshTarget,
        settings: BenchSettings = BenchSettings(),
        device: str = "",
        emulated: bool | None = None,
        benchmark_model: str | None = None,
    ) -> None:
        self.target = target
        self.settings = settings
        self.emulated = emulated  # None: the runner's own detection
        self.benchmark_model = benchmark_model  # its path on the host: op profiles of .tflite files
        self.name = device or f"ssh://{target.label}"
        self.remote_dir: str | None = None
        self._prepared_artifact: Path | None = None

    def _stage(self, stage: str) -> str:
        return f"ssh {self.target.label}: {stage}"

    def _ssh(self, remote_command: str, timeout_s: float, what: str) -> subprocess.CompletedProcess[str]:
        completed = run_command(self.target.ssh_argv(remote_command), timeout_s, what)
        if completed.returncode == SSH_CONNECTION_FAILED:
            raise _connection_failure(completed, what)
        return completed

    def _make_remote_dir(self) -> str:
        what = self._stage("mktemp -d")
        completed = self._ssh("mktemp -d", self.settings.timeout_s, what)
        remote_dir = completed.stdout.strip()
        if completed.returncode != 0 or not _SAFE_REMOTE_DIR.match(remote_dir) or remote_dir == "/":
            raise DeviceError(f"{what}: got {remote_dir!r} (exit {completed.returncode}): {stderr_tail(completed.stderr)}")
        return remote_dir

    def _copy(self, files: list[Path], remote_dir: str) -> None:
        what = self._stage("copy " + ", ".join(f.name for f in files))
        completed = run_command(self.target.scp_argv(files, remote_dir), self.settings.timeout_s, what)
        if completed.returncode == 0:
            return
        free_kib = self._free_kib(remote_dir) if completed.returncode != SSH_CONNECTION_FAILED else None
        needed_kib = sum(f.stat().st_size for f in files) / 1024
        if free_kib is not None and free_kib < needed_kib:
            raise DeviceError(
                f"{what}: the device's disk is full ({free_kib} KiB free in {remote_dir}, {needed_kib:.0f} KiB needed): free space there"
            )
        raise _connection_failure(completed, what)

    def _free_kib(self, remote_dir: str) -> int | None:
        """KiB free in ``remote_dir`` on the host (POSIX ``df -Pk``), None where that cannot be read: the sftp
        protocol of today's scp reports a full disk as a bare "Failure"."""
        try:
            completed = self._ssh(f"df -Pk -- {shlex.quote(remote_dir)}", min(self.settings.timeout_s, 30.0), self._stage("df"))
            return int(completed.stdout.strip().splitlines()[-1].split()[3])
        except (DeviceError, IndexError, ValueError):
            return None

    def prepare(self, artifact: Path) -> None:
        """Make the remote temp dir and copy the artefact and runner.py into it.

        Raises:
            InputError: the artefact is missing.
            DeviceError: the host is unreachable after ``settings.retries`` or refuses us.
        """
        check_artifact(artifact)
        if self._prepared_artifact == artifact:
            return
        if self.target.known_hosts is None:
            default_known_hosts().parent.mkdir(parents=True, exist_ok=True)
        if self.remote_dir is None:
            self.remote_dir = with_retries(self._make_remote_dir, self.settings.retries, self._stage("mkdir"))
        remote_dir = self.remote_dir
        with_retries(partial(self._copy, [artifact, RUNNER_PATH], remote_dir), self.settings.retries, self._stage("copy"))
        self._prepared_artifact = artifact

    def _run_once(self, artifact: Path, settings: BenchSettings, what: str) -> dict:
        return self._runner(settings.runner_args(f"{self.remote_dir}/{artifact.name}"), settings, what)

    def _runner(self, runner_args: list[str], settings: BenchSettings, what: str) -> dict:
        argv = [self.target.python, f"{self.remote_dir}/{RUNNER_PATH.name}", *runner_args]
        completed = self._ssh(shlex.join(argv), settings.timeout_s, what)
        if completed.returncode == 127:  # the shell's "command not found"
            raise DeviceError(f"{what}: {self.target.python!r} not found on the host; pass ?python=/path/to/python3")
        result = parse_runner_stdout(completed, what)
        if self.emulated is not None:
            result["emulated"] = f"declared by the device URL ({self.name})" if self.emulated else None
        return result

    def outputs(self, artifact: Path, samples: Path, local_dir: Path, settings: BenchSettings) -> dict:
        """Run ``artifact`` on each sample of ``samples`` (.npy) on the host; its first outputs are copied back to
        ``local_dir/outputs.npy`` (``outputs_path``), with the runner's JSON (runtime, machine, emulation).

        Raises:
            DeviceError: naming the host and the stage (copy, run, fetch) that failed.
        """
        self.prepare(artifact)
        remote_dir = self.remote_dir
        with_retries(partial(self._copy, [samples], remote_dir), settings.retries, self._stage("copy samples"))
        args = [*settings.runner_args(f"{remote_dir}/{artifact.name}"), "--samples", f"{remote_dir}/{samples.name}"]
        what = self._stage(f"outputs of {artifact.name} on {samples.name}")
        result = with_retries(
            partial(self._runner, [*args, "--outputs", f"{remote_dir}/outputs.npy"], settings, what), settings.retries, what
        )
        local_file = local_dir / "outputs.npy"
        completed = run_command(self.target.fetch_argv(f"{remote_dir}/outputs.npy", local_file), settings.timeout_s, what)
        if completed.returncode != 0:
            raise _connection_failure(completed, f"{what}: copy back")
        return {**result, "outputs_path": str(local_file)}

    def profile_ops(self, artifact: Path, settings: BenchSettings) -> dict:
        """One run of the host's ``benchmark_model`` on a .tflite with op profiling: ``run_order`` (each operator's
        ``node_type``, ``name``, ``avg_ms``) and ``inference_avg_ms``.

        Raises:
            DeviceError: no ``benchmark_model`` named for the host or not a .tflite, or the run failed.
        """
        if self.benchmark_model is None or artifact.suffix.lower() != ".tflite":
            raise DeviceError(f"{self.name}: op profiling runs TFLite's benchmark_model: pass ?benchmark_model=/path/on/host and a .tflite")
        self.prepare(artifact)
        what = self._stage(f"op profile of {artifact.name}")
        argv = benchmark_model_args(self.benchmark_model, f"{self.remote_dir}/{artifact.name}", settings, op_profiling=True)

        def once() -> dict:
            completed = self._ssh(shlex.join(argv), settings.timeout_s, what)
            if completed.returncode == 127:  # the shell's "command not found"
                raise DeviceError(f"{what}: {self.benchmark_model!r} not found on the host")
            return op_profiling_run(completed, what)

        return with_retries(once, settings.retries, what)

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult:
        """One remote runner process per repeat, each retried after a dropped connection.

        Raises:
            DeviceError: naming the host and the stage (mkdir, copy, repeat i/n) that failed.
        """
        self.prepare(artifact)
        label = f"ssh {self.target.label}"
        return run_repeats(partial(self._run_once, artifact, settings), settings, label, self.name, artifact)

    def cleanup(self) -> None:
        """Remove the remote temp dir (one attempt); a failure is logged, never raised."""
        remote_dir, self.remote_dir, self._prepared_artifact = self.remote_dir, None, None
        if remote_dir is None:
            return
        what = self._stage(f"cleanup of {remote_dir}")
        try:
            completed = self._ssh(f"rm -rf -- {shlex.quote(remote_dir)}", min(self.settings.timeout_s, 60.0), what)
            if completed.returncode != 0:
                _LOG.warning("%s: exit %d: %s", what, completed.returncode, stderr_tail(completed.stderr))
        except DeviceError as error:
            _LOG.warning("%s", error)


@register_adapter("ssh")
def open_ssh(url: DeviceUrl, settings: BenchSettings) -> SshAdapter:
    """``ssh://[user@]host[:port][?python=...&key=...&known_hosts=...&emulated=...&benchmark_model=...]``."""
    if not url.host:
        raise DeviceError(f"device {url.text!r}: no host; use ssh://user@host[:port]")
    url.check_options(("python", "key", "known_hosts", "emulated", "benchmark_model"))
    key = url.options.get("key")
    if key and not Path(key).expanduser().is_file():
        raise DeviceError(f"device {url.text!r}: key file {key} not found")
    known_hosts = url.options.get("known_hosts")
    target = SshTarget(
        host=url.host,
        user=url.user,
        port=url.port or 22,
        python=url.options.get("python", "python3"),
        key=Path(key).expanduser() if key else None,
        known_hosts=Path(known_hosts).expanduser() if known_hosts else None,
        connect_timeout_s=max(1, min(10, int(settings.timeout_s))),
    )
    return SshAdapter(target, settings, url.text, declared_emulation(url), url.options.get("benchmark_model"))


def declared_emulation(url: DeviceUrl) -> bool | None:
    """The URL's ``emulated=yes|no`` (None when absent). Raises DeviceError for another value."""
    value = url.options.get("emulated")
    if value is None:
        return None
    answers = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}
    if value.lower() not in answers:
        raise DeviceError(f"device {url.text!r}: emulated={value!r}; use emulated=yes or emulated=no")
    return answers[value.lower()]
