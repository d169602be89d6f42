"""``local``: benchmark on this machine, one fresh Python process per repeat.

A fresh process per repeat keeps allocator state, JIT caches and the peak-RSS figure of
one repeat out of the next, and keeps the runtime out of the caller's process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

from edgeprune.errors import InputError
from edgeprune.runtimes.base import (
    RUNNER_PATH,
    BenchResult,
    BenchSettings,
    DeviceUrl,
    run_repeats,
    with_retries,
)
from edgeprune.runtimes.commands import parse_runner_stdout, run_command
from edgeprune.runtimes.registry import register_adapter


def check_artifact(artifact: Path) -> None:
    """Raises InputError unless ``artifact`` is an existing .onnx, .tflite or .pte file."""
    if artifact.suffix.lower() not in (".onnx", ".tflite", ".pte"):
        raise InputError(f"cannot benchmark {artifact}: expected a .onnx, .tflite or .pte file")
    if not artifact.is_file():
        raise InputError(f"cannot benchmark {artifact}: file not found")


class LocalAdapter:
    """Runs ``runner.py`` with ``python`` (default: this interpreter) as a child process.

    ``providers`` are used when ``BenchSettings.providers`` is empty; ``provider_options``
    (``PROVIDER:KEY=VALUE``) configure them; ``extra_env`` is added to the children's
    environment (this process's is left alone). ``host_affinity`` records the CPUs this
    process (and so every child) may use.
    """

    def __init__(
        self,
        device: str = "local",
        python: str = sys.executable,
        providers: tuple[str, ...] = (),
        extra_env: dict[str, str] | None = None,
        provider_options: tuple[str, ...] = (),
    ) -> None:
        self.name = device
        self.python = python
        self.providers = providers
        self.provider_options = provider_options
        self.extra_env = dict(extra_env or {})
        self.host_affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None

    def prepare(self, artifact: Path) -> None:
        """Check the artefact; a local device needs nothing copied."""
        check_artifact(artifact)

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult:
        """``settings.repeats`` isolated runner processes, aggregated.

        Raises:
            DeviceError: the runner failed (its error message is kept) or timed out
                ``settings.retries + 1`` times.
        """
        self.prepare(artifact)
        settings, requested = self._within_cores(self._with_providers(settings))
        argv = self._runner_argv(artifact, settings)
        label = f"{self.name} ({artifact.name})"
        return run_repeats(partial(self._run_once, argv, settings, requested=requested), settings, label, self.name, artifact)

    def compare(self, baseline: Path, artifact: Path, settings: BenchSettings) -> list[tuple[float, float]]:
        """(baseline p50, artifact p50) from each of ``settings.repeats`` processes that time both in alternation.

        Raises DeviceError like ``run``.
        """
        self.prepare(baseline)
        self.prepare(artifact)
        settings, _ = self._within_cores(self._with_providers(settings))
        argv = [*self._runner_argv(artifact, settings), "--baseline", str(baseline.resolve())]
        label = f"{self.name} ({artifact.name} beside {baseline.name})"
        pairs = []
        for _ in range(settings.repeats):
            result = with_retries(partial(self._run_once, argv, settings, label), settings.retries, label)
            pairs.append((result["baseline"]["latency_p50_ms"], result["latency_p50_ms"]))
        return pairs

    def _with_providers(self, settings: BenchSettings) -> BenchSettings:
        return replace(settings, providers=self.providers) if not settings.providers and self.providers else settings

    def host_cores(self) -> int:
        """CPUs the runner may use: this process's affinity, else the machine's count."""
        return len(self.host_affinity) if self.host_affinity else (os.cpu_count() or 1)

    def _within_cores(self, settings: BenchSettings) -> tuple[BenchSettings, int | None]:
        """``settings`` with at most ``host_cores`` threads (unless ``threads_beyond_cores``), and the count
        asked for where it was lowered: more threads than cores time the scheduler, not the model."""
        cores = self.host_cores()
        if settings.threads <= cores or settings.threads_beyond_cores:
            return settings, None
        return replace(settings, threads=cores), settings.threads

    def _runner_argv(self, artifact: Path, settings: BenchSettings) -> list[str]:
        """The runner's command line; provider options only for providers the settings use (theirs win)."""
        used = [option for option in self.provider_options if option.partition(":")[0] in settings.providers]
        options = [arg for option in used for arg in ("--provider-option", option)]
        return [self.python, str(RUNNER_PATH), *settings.runner_args(str(artifact.resolve())), *options]

    def _run_once(self, argv: list[str], settings: BenchSettings, what: str, requested: int | None = None) -> dict:
        env = {**os.environ, **self.extra_env} if self.extra_env else None
        completed = run_command(argv, settings.timeout_s, what, env=env)
        result = parse_runner_stdout(completed, what)
        result["host_affinity"] = self.host_affinity
        if requested is not None:
            result["threads_requested"] = requested
        return result

    def cleanup(self) -> None:
        """Nothing to remove: the runner writes no files."""


@register_adapter("local")
def open_local(url: DeviceUrl, settings: BenchSettings) -> LocalAdapter:
    """``local`` or ``local?python=/path/to/python`` (another interpreter on this machine)."""
    url.check_options(("python",))
    return LocalAdapter(url.text, python=url.options.get("python", sys.executable))
