"""Run a device command (a local process, ``ssh``, ``adb``) and read the runner's JSON."""

from __future__ import annotations

import json
import subprocess

from edgeprune.errors import DeviceError, TransientDeviceError

_STDERR_TAIL_CHARS = 300


def stderr_tail(text: str) -> str:
    """The last non-empty lines of ``text`` on one line, at most 300 characters."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    tail = " | ".join(lines[-3:]) or "<no output>"
    return tail[-_STDERR_TAIL_CHARS:]


def run_command(argv: list[str], timeout_s: float, what: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` capturing text stdout/stderr; the exit code is the caller's to judge.

    ``env`` replaces the child's environment when given (``None``: inherit).

    Raises:
        DeviceError: the program is not installed.
        TransientDeviceError: it ran longer than ``timeout_s`` seconds (and was killed).
    """
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False, env=env)
    except FileNotFoundError as error:
        raise DeviceError(f"{what}: {argv[0]!r} is not installed or not on PATH") from error
    except subprocess.TimeoutExpired as error:
        raise TransientDeviceError(f"{what}: no answer within {timeout_s:g} s") from error


def parse_runner_stdout(completed: subprocess.CompletedProcess[str], what: str) -> dict:
    """The runner's JSON object (the last JSON line on stdout).

    Raises:
        DeviceError: the runner reported ``{"error": ...}`` or printed no JSON at all.
    """
    for line in reversed(completed.stdout.strip().splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(result, dict):
            continue
        if "error" in result:
            raise DeviceError(f"{what}: runner failed: {result['error']}")
        return result
    detail = stderr_tail(completed.stderr or completed.stdout)
    raise DeviceError(f"{what}: runner printed no result (exit code {completed.returncode}): {detail}")
