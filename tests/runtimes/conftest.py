"""Fixtures for runtime tests: tiny real artefacts and a throw-away OpenSSH server."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

FIXTURES = Path(__file__).with_name("fixtures")
INPUT_SHAPE = (1, 3, 32, 32)


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 2-conv model as ``.onnx``, ``.tflite`` and a dynamic-batch ``.onnx``, by those keys."""
    torch = pytest.importorskip("torch")
    litert_torch = pytest.importorskip("litert_torch")

    class TwoConv(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv2(torch.relu(self.conv1(x)))

    torch.manual_seed(0)
    model = TwoConv().eval()
    example = torch.randn(*INPUT_SHAPE)
    folder = tmp_path_factory.mktemp("artifacts")
    onnx_path, tflite_path = folder / "two_conv.onnx", folder / "two_conv.tflite"
    dynamic_path = folder / "two_conv_dynamic_batch.onnx"
    torch.onnx.export(model, (example,), str(onnx_path), dynamo=False, input_names=["input"])
    torch.onnx.export(model, (example,), str(dynamic_path), dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "batch"}})
    litert_torch.convert(model, (example,)).export(str(tflite_path))
    return {"onnx": onnx_path, "tflite": tflite_path, "onnx_dynamic_batch": dynamic_path}


# ---------------------------------------------------------------- OpenSSH server


def free_port() -> int:
    """An unprivileged TCP port nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` from /proc (sshd puts sessions in their own sessions)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents first."""
    tree, frontier = [], [pid]
    while frontier:
        current = frontier.pop()
        tree.append(current)
        frontier.extend(_children(current))
    return tree


@dataclass
class SshServer:
    """A running ``sshd -D`` on 127.0.0.1 that trusts ``client_key``."""

    process: subprocess.Popen
    port: int
    client_key: Path
    known_hosts: Path
    remote_tmp: Path  # TMPDIR of the sessions: where ``mktemp -d`` creates remote dirs

    def device(self, python: str) -> str:
        user = getpass.getuser()
        return f"ssh://{user}@127.0.0.1:{self.port}?python={python}&key={self.client_key}&known_hosts={self.known_hosts}"

    def remote_dirs(self) -> list[Path]:
        """Directories under the sessions' TMPDIR (onnxruntime also drops a ``.ses`` file there)."""
        return [path for path in self.remote_tmp.iterdir() if path.is_dir()]

    def runner_running(self) -> bool:
        """True once a remote Python itself runs runner.py.

        Not merely a shell whose ``-c`` string mentions it: killing a session while the
        login shell still reads its rc files can kill a tool holding a lock there (a
        stale ``pyenv rehash`` lock then stalls every later shell for 60 s).
        """
        for pid in process_tree(self.process.pid):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if len(args) > 1 and args[1].endswith(b"/runner.py"):
                return True
        return False

    def kill(self) -> None:
        """SIGKILL the daemon and every session and remote command it started.

        Parents go first so that clients see a dropped connection, not a remote
        command that died on its own.
        """
        for pid in process_tree(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait(timeout=10)


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if os.access("/usr/sbin/sshd", os.X_OK) else None)
    if found is None:
        pytest.skip("OpenSSH server not installed (apt-get install openssh-server)")
    if shutil.which("ssh") is None or shutil.which("scp") is None:
        pytest.skip("OpenSSH client not installed (apt-get install openssh-client)")
    return found


def _ensure_privsep_dir() -> None:
    # sshd refuses to start as root without its privilege-separation directory, which
    # only the distribution's service unit creates; containers never run that unit.
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


def _write_sshd_config(folder: Path, port: int) -> Path:
    host_key, client_key = folder / "host_ed25519", folder / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    (folder / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    (folder / "remote_tmp").mkdir()
    config = folder / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile none\n"
        f"AuthorizedKeysFile {folder / 'authorized_keys'}\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
        "StrictModes no\nUsePAM no\nSubsystem sftp internal-sftp\nLogLevel ERROR\n"
        f"SetEnv TMPDIR={folder / 'remote_tmp'}\n"
    )
    return config


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited with {process.returncode}: {process.stderr.read()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on port {port} within {timeout_s} s")


@pytest.fixture
def dead_port() -> int:
    """A localhost port with no server behind it."""
    return free_port()


@pytest.fixture
def start_sshd(tmp_path: Path) -> Iterator[Callable[[], SshServer]]:
    """Factory: start an OpenSSH server as the current user; every one is killed afterwards."""
    sshd = _sshd_binary()
    _ensure_privsep_dir()
    servers: list[SshServer] = []

    def start() -> SshServer:
        folder = tmp_path / f"sshd{len(servers)}"
        folder.mkdir()
        port = free_port()
        config = _write_sshd_config(folder, port)
        process = subprocess.Popen([sshd, "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
        server = SshServer(process, port, folder / "client_ed25519", folder / "known_hosts", folder / "remote_tmp")
        servers.append(server)
        _wait_for_port(port, process)
        return server

    yield start
    for server in servers:
        if server.process.poll() is None:
            server.kill()
