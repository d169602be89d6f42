"""The types every runtime adapter shares: benchmark settings and results, the adapter protocol, device URLs.

A *device* is a URL naming where an artefact is benchmarked:

``local``                                   a fresh local Python process per repeat
``gpu``                                     the same, on onnxruntime's CUDA/TensorRT providers
``ssh://user@host[:port][?python=...&key=...&known_hosts=...]``   a remote machine over OpenSSH
``adb://SERIAL[?benchmark_model=...&executor_runner=...&python=...]`` an Android device over adb

Every adapter ends up running ``runner.py`` (or TFLite's ``benchmark_model``) once per
repeat in an isolated process and turns the per-repeat JSON into one ``BenchResult``.
Nothing here imports torch; runtimes are imported lazily by the adapters.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from edgeprune.errors import ConfigError, DeviceError, TransientDeviceError

RUNNER_PATH = Path(__file__).with_name("runner.py")
_T = TypeVar("_T")


@dataclass(frozen=True)
class BenchSettings:
    """How to benchmark: the same settings mean comparable numbers on any device.

    ``threads`` intra-op/interpreter threads; ``warmup`` untimed runs after the first;
    ``iterations`` and ``min_seconds`` the minimum timed runs and seconds per repeat;
    ``repeats`` isolated processes per benchmark; ``use_xnnpack`` the LiteRT CPU delegate;
    ``providers`` onnxruntime execution providers in priority order (empty: the adapter's
    default); ``timeout_s`` per remote command or process; ``retries`` extra attempts after
    a transient (connection) failure; ``input_shapes`` ``NAME=1,3,224,224`` shapes for inputs with
    dynamic dimensions; ``max_spread_pct`` the p50 spread between repeats above which more repeats are
    taken, for at most ``spread_time_limit_s`` seconds (0: never); ``threads_beyond_cores`` lets a local
    benchmark run more threads than the host has cores (by default it runs as many as there are).
    """

    threads: int = 2
    warmup: int = 10
    iterations: int = 50
    min_seconds: float = 0.0
    repeats: int = 3
    use_xnnpack: bool = True
    providers: tuple[str, ...] = ()
    timeout_s: float = 300.0
    retries: int = 1
    input_shapes: tuple[str, ...] = ()
    max_spread_pct: float = 0.0
    spread_time_limit_s: float = 60.0
    threads_beyond_cores: bool = False

    def __post_init__(self) -> None:
        """Raises ConfigError for settings no runner could honour (e.g. ``repeats=0``)."""
        minimums = {"threads": 1, "warmup": 0, "iterations": 1, "min_seconds": 0, "repeats": 1, "retries": 0, "max_spread_pct": 0}
        bad = [f"{name}={getattr(self, name)!r} (minimum {low})" for name, low in minimums.items() if getattr(self, name) < low]
        if self.timeout_s <= 0:
            bad.append(f"timeout_s={self.timeout_s!r} (must be > 0)")
        if bad:
            raise ConfigError(f"invalid benchmark settings: {', '.join(bad)}")

    def runner_args(self, model_path: str) -> list[str]:
        """Command-line arguments of ``runner.py`` for ``model_path``."""
        args = ["--model", model_path, "--threads", str(self.threads), "--warmup", str(self.warmup)]
        args += ["--iterations", str(self.iterations), "--min-seconds", repr(self.min_seconds)]
        if self.providers:
            args += ["--providers", ",".join(self.providers)]
        if not self.use_xnnpack:
            args.append("--no-xnnpack")
        return args + [arg for shape in self.input_shapes for arg in ("--shape", shape)]


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _extreme(values: Sequence[float | None], pick: Callable) -> float | None:
    present = [v for v in values if v is not None]
    return pick(present) if present else None


_RUNNER_NUMBERS = (  # latency_mean_ms is required, the others may be absent or null
    "latency_mean_ms",
    "latency_p50_ms",
    "latency_p90_ms",
    "latency_p99_ms",
    "latency_std_ms",
    "latency_min_ms",
    "init_ms",
    "first_run_ms",
    "peak_rss_mb",
    "rss_before_load_mb",
    "model_memory_mb",
    "model_resident_mb",
    "runtime_memory_mb",
    "iterations",
    "threads",
)
_RUNNER_TEXTS = ("python_version", "platform", "machine", "cpu_model", "emulated")


def _checked_runner_json(run: object, where: str) -> dict:
    """One repeat's runner JSON with every figure a finite number (a device's output is untrusted text).

    Raises:
        DeviceError: naming the first field no runner could have printed.
    """
    if not isinstance(run, dict):
        raise DeviceError(f"{where}: a benchmark repeat returned {type(run).__name__}, not a JSON object")
    for key in _RUNNER_NUMBERS:
        value = run.get(key)
        if value is None and key != "latency_mean_ms":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise DeviceError(f"{where}: benchmark result field {key} = {value!r:.40} is not a finite number")
    bad_texts = [key for key in _RUNNER_TEXTS if not isinstance(run.get(key), (str, type(None)))]
    affinity, providers = run.get("cpu_affinity"), run.get("providers")
    if affinity is not None and not (isinstance(affinity, list) and all(type(cpu) is int for cpu in affinity)):
        bad_texts.append("cpu_affinity")
    if providers is not None and not (isinstance(providers, list) and all(isinstance(name, str) for name in providers)):
        bad_texts.append("providers")
    if bad_texts:
        raise DeviceError(f"{where}: benchmark result field {bad_texts[0]} = {run[bad_texts[0]]!r:.40} has the wrong type")
    return run


def p50_spread_pct(p50s: Sequence[float]) -> float:
    """(max - min) / median of per-repeat p50s, in percent (0 for a zero median)."""
    middle = statistics.median(p50s)
    return (max(p50s) - min(p50s)) / middle * 100.0 if middle > 0 else 0.0


def _repeat_p50(run: dict) -> float:
    p50 = run.get("latency_p50_ms")
    return run.get("latency_mean_ms", 0.0) if p50 is None else p50


def steadiest(runs: Sequence[dict], count: int) -> list[dict]:
    """The ``count`` repeats whose p50s lie closest together (the smallest spread), in the order taken:
    on a shared machine a repeat slowed by another process says nothing about the model."""
    if count >= len(runs):
        return list(runs)
    order = sorted(range(len(runs)), key=lambda index: _repeat_p50(runs[index]))
    windows = [order[start : start + count] for start in range(len(order) - count + 1)]
    best = min(windows, key=lambda window: p50_spread_pct([_repeat_p50(runs[index]) for index in window]))
    return [runs[index] for index in sorted(best)]


@dataclass(frozen=True)
class BenchResult:
    """One artefact on one device, aggregated over ``repeats`` isolated processes.

    Times are ms, memory MiB. Latency figures, ``init_ms`` and ``first_run_ms`` are the
    median over repeats of each repeat's figure (so ``latency_p50_ms`` is the median of
    the per-repeat p50s); ``latency_min_ms`` is the overall minimum, ``peak_rss_mb`` the
    largest peak, ``iterations`` the timed runs summed over repeats. ``p50_spread_pct`` is
    (max - min) / median of the per-repeat p50s, in percent. ``p50_is_mean`` is true when
    the tool reported no percentiles (TFLite ``benchmark_model``) and p50 is its mean;
    p90/p99 are then None. ``repeats`` keeps every raw runner JSON.

    Memory: ``peak_rss_mb`` is the largest peak resident set of a measuring process (its own, from
    VmHWM); ``model_memory_mb`` the largest share of it the model took (peak minus the process before
    the model was loaded); ``model_resident_mb`` its share still resident after the timed runs;
    ``runtime_memory_mb`` the runtime's own figure where it gives one.

    When more repeats were taken because the first spread more than the settings allow, the figures
    come from the ``kept`` repeats whose p50s lie closest together (``repeats_taken`` in all);
    ``noisy`` says the spread stayed above the limit. ``threads_requested`` is the thread count asked
    for when the host ran fewer (``threads``), else None. ``emulated`` says how the device was emulated (qemu-user,
    say) where it was: its timings then say nothing about the real device's speed.
    """

    device: str
    artifact: str
    latency_p50_ms: float
    latency_p90_ms: float | None
    latency_p99_ms: float | None
    latency_mean_ms: float
    latency_std_ms: float | None
    latency_min_ms: float | None
    p50_spread_pct: float
    init_ms: float | None
    first_run_ms: float | None
    iterations: int
    threads: int | None
    peak_rss_mb: float | None
    rss_before_load_mb: float | None
    runtime: str
    runtime_version: str
    providers: tuple[str, ...]
    python_version: str | None
    platform: str | None
    machine: str | None
    cpu_model: str | None
    cpu_affinity: tuple[int, ...] | None
    p50_is_mean: bool = False
    repeats: list[dict] = field(default_factory=list)
    model_memory_mb: float | None = None
    model_resident_mb: float | None = None
    runtime_memory_mb: float | None = None
    threads_requested: int | None = None
    repeats_taken: int = 0
    max_spread_pct: float = 0.0
    noisy: bool = False
    emulated: str | None = None

    @classmethod
    def from_runner_json(
        cls, runner_jsons: Sequence[dict], device: str, artifact: str, keep: int | None = None, max_spread_pct: float = 0.0
    ) -> BenchResult:
        """Aggregate one runner JSON per repeat, over the ``keep`` steadiest (all by default); ``max_spread_pct``
        (0: none) marks the result noisy above it. Raises DeviceError if there is none."""
        if not runner_jsons:
            raise DeviceError(f"{device}: no benchmark repeat produced a result for {artifact}")
        taken = [_checked_runner_json(run, f"{device}: {artifact}") for run in runner_jsons]
        runner_jsons = steadiest(taken, keep or len(taken))
        first = runner_jsons[0]
        means = [r["latency_mean_ms"] for r in runner_jsons]
        p50_is_mean = any(r.get("latency_p50_ms") is None for r in runner_jsons)
        p50s = means if p50_is_mean else [r["latency_p50_ms"] for r in runner_jsons]
        headline = statistics.median(p50s)
        spread = p50_spread_pct(p50s)
        affinity = first.get("cpu_affinity")

        def median_of(key: str) -> float | None:
            return _median([r.get(key) for r in runner_jsons])

        return cls(
            device=device,
            artifact=artifact,
            latency_p50_ms=headline,
            latency_p90_ms=None if p50_is_mean else median_of("latency_p90_ms"),
            latency_p99_ms=None if p50_is_mean else median_of("latency_p99_ms"),
            latency_mean_ms=statistics.median(means),
            latency_std_ms=median_of("latency_std_ms"),
            latency_min_ms=_extreme([r.get("latency_min_ms") for r in runner_jsons], min),
            p50_spread_pct=spread,
            init_ms=median_of("init_ms"),
            first_run_ms=median_of("first_run_ms"),
            iterations=sum(int(r.get("iterations") or 0) for r in runner_jsons),
            threads=first.get("threads"),
            peak_rss_mb=_extreme([r.get("peak_rss_mb") for r in runner_jsons], max),
            rss_before_load_mb=median_of("rss_before_load_mb"),
            runtime=str(first.get("runtime", "unknown")),
            runtime_version=str(first.get("runtime_version", "unknown")),
            providers=tuple(first.get("providers") or ()),
            python_version=first.get("python_version"),
            platform=first.get("platform"),
            machine=first.get("machine"),
            cpu_model=first.get("cpu_model"),
            cpu_affinity=None if affinity is None else tuple(affinity),
            p50_is_mean=p50_is_mean,
            repeats=[dict(r) for r in taken],
            model_memory_mb=_extreme([r.get("model_memory_mb") for r in runner_jsons], max),
            model_resident_mb=_extreme([r.get("model_resident_mb") for r in runner_jsons], max),
            runtime_memory_mb=_extreme([r.get("runtime_memory_mb") for r in runner_jsons], max),
            threads_requested=first.get("threads_requested"),
            repeats_taken=len(taken),
            max_spread_pct=max_spread_pct,
            noisy=0 < max_spread_pct < spread,
            emulated=first.get("emulated"),
        )

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (tuples become lists)."""
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["cpu_affinity"] = None if self.cpu_affinity is None else list(self.cpu_affinity)
        return data


class RuntimeAdapter(Protocol):
    """Runs artefacts on one device. Use: ``prepare`` → ``run`` (any times) → ``cleanup``.

    ``run`` prepares on its own if needed; ``cleanup`` must be safe to call after any
    failure and never raises. Failures are ``DeviceError`` with a one-line message.
    """

    name: str

    def prepare(self, artifact: Path) -> None: ...

    def run(self, artifact: Path, settings: BenchSettings) -> BenchResult: ...

    def cleanup(self) -> None: ...


def with_retries(action: Callable[[], _T], retries: int, what: str, backoff_s: float = 0.5) -> _T:
    """Run ``action``; after a TransientDeviceError try again up to ``retries`` more times.

    The n-th retry waits ``n * backoff_s`` seconds (at most 5 s) first.

    Raises:
        DeviceError: ``what`` plus the last failure, once every attempt failed.
    """
    attempts = max(0, retries) + 1
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except TransientDeviceError as error:
            if attempt == attempts:
                raise DeviceError(f"{what} failed after {attempts} attempt(s): {error}") from error
            time.sleep(min(backoff_s * attempt, 5.0))
    raise AssertionError("unreachable")


def run_repeats(run_once: Callable[[str], dict], settings: BenchSettings, label: str, device: str, artifact: Path) -> BenchResult:
    """Call ``run_once(what)`` ``settings.repeats`` times, each with retries, and aggregate.

    While the steadiest ``settings.repeats`` of them spread more than ``settings.max_spread_pct``, take
    another, until ``settings.spread_time_limit_s`` seconds have gone on them.
    ``what`` names the stage for messages: ``"{label}: run repeat i/n"``.

    Raises:
        DeviceError: a repeat failed for good (after ``settings.retries`` for transient causes).
    """
    runs = []
    for repeat in range(1, settings.repeats + 1):
        what = f"{label}: run repeat {repeat}/{settings.repeats}"
        runs.append(with_retries(partial(run_once, what), settings.retries, what))
    started = time.monotonic()
    while _too_spread(runs, settings) and time.monotonic() - started < settings.spread_time_limit_s:
        what = f"{label}: extra repeat {len(runs) + 1} (p50 spread above {settings.max_spread_pct:g} %)"
        runs.append(with_retries(partial(run_once, what), settings.retries, what))
    return BenchResult.from_runner_json(runs, device, str(artifact), settings.repeats, settings.max_spread_pct)


def _too_spread(runs: list[dict], settings: BenchSettings) -> bool:
    if settings.max_spread_pct <= 0:
        return False
    return p50_spread_pct([_repeat_p50(run) for run in steadiest(runs, settings.repeats)]) > settings.max_spread_pct


# ---------------------------------------------------------------- device URLs


@dataclass(frozen=True)
class DeviceUrl:
    """A parsed device URL: ``scheme://user@host:port/path?key=value``."""

    text: str
    scheme: str
    user: str | None = None
    host: str | None = None
    port: int | None = None
    options: dict[str, str] = field(default_factory=dict)

    def check_options(self, allowed: Sequence[str]) -> None:
        """Raises DeviceError naming any query key outside ``allowed`` (a typo, usually)."""
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            takes = ", ".join(f"{key}=" for key in allowed) or "no options"
            raise DeviceError(f"device {self.text!r}: unknown options {unknown}; {self.scheme} takes {takes}")


def parse_device_url(device: str) -> DeviceUrl:
    """Split a device URL; bare words (``local``, ``gpu``) are schemes of their own.

    Raises:
        DeviceError: a malformed port or a repeated query key.
    """
    text = device.strip()
    if "://" not in text:
        name, _, query = text.partition("?")
        return DeviceUrl(text=text, scheme=name.lower(), options=_query_options(query, text))
    parts = urlsplit(text)
    try:
        port = parts.port
    except ValueError as error:
        raise DeviceError(f"device {text!r}: bad port ({error})") from error
    return DeviceUrl(
        text=text,
        scheme=parts.scheme.lower(),
        user=parts.username,
        host=parts.hostname,
        port=port,
        options=_query_options(parts.query, text),
    )


def _query_options(query: str, text: str) -> dict[str, str]:
    options = parse_qs(query, keep_blank_values=True)
    repeated = sorted(key for key, values in options.items() if len(values) > 1)
    if repeated:
        raise DeviceError(f"device {text!r}: query keys given twice: {', '.join(repeated)}")
    return {key: values[0] for key, values in options.items()}
