#!/usr/bin/env python3
"""Benchmark one .onnx, .tflite or .pte artefact in this process and print one JSON object.

This file is deliberately self-contained (stdlib + numpy + the runtime, no edgeprune
imports) so it can be copied alone to a Raspberry Pi, a phone or a remote server::

    python3 runner.py --model model.onnx --threads 2 --warmup 10 --iterations 50
    python3 runner.py --model model.tflite --no-xnnpack --min-seconds 2
    python3 runner.py --model model.onnx --providers CUDAExecutionProvider,CPUExecutionProvider
    python3 runner.py --model pruned.onnx --baseline dense.onnx --iterations 500
    python3 runner.py --model model.pte --threads 4       # ExecuTorch (pip install executorch)

Stdout carries exactly one JSON object (anything the runtimes print to stdout is
redirected to stderr). Times are milliseconds, memory is MiB. On any failure the
object is ``{"error": "..."}`` and the exit code is 2.

Latency statistics are over the timed iterations only (after ``--warmup`` untimed
ones); percentiles use linear interpolation and ``latency_std_ms`` is the population
standard deviation. ``init_ms`` covers session/interpreter creation plus tensor
allocation, ``first_run_ms`` the first inference after that.

With ``--baseline`` a second artefact is loaded and timed in the same loop, alternating
per iteration (model then baseline, then baseline then model, ...): both see the same
moments of a noisy machine, so ``speedup_p50`` (baseline p50 / model p50) holds where
two separate processes minutes apart would not. Its statistics are under ``baseline``;
the memory figures then cover both sessions. onnxruntime sessions are then opened on one
shared intra-op thread pool of ``--threads`` threads (``thread_pool`` in the JSON: "shared"),
spinning as onnxruntime does by default: a deployed app's single session sees exactly that
pool. Two per-session pools fight over the cores (one's idle threads spin while the other
runs): the same file timed against itself read anywhere from 0.59x to 1.55x (2 threads, 2
cores), on one pool 0.999x to 1.002x. Turning spinning off instead also pairs fairly but adds
every operator's thread wake-up to both: resnet_wide went 0.34 -> 0.48 ms and a 2.2x speed-up
read 1.7x. An onnxruntime without shared pools (or one whose pool is already made with
another size) falls back to per-session pools that do not spin ("per-session, not spinning").

A .pte runs through ``executorch.runtime``. ExecuTorch has one process-wide thread pool (what
XNNPACK's delegate and the optimized kernels use); ``--threads`` resets it to that size before
the program loads (``thread_pool`` in the JSON: "executorch global"), so a baseline .pte shares it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

try:
    import numpy as np
except ImportError:  # reported as JSON by main(), not as a traceback
    np = None

EXIT_ERROR = 2
INPUT_SEED = 0
SHARED_POOL = "shared"
PER_SESSION = "per-session"
PER_SESSION_NO_SPIN = "per-session, not spinning"
_shared_pool_threads: int | None = None  # the process-wide onnxruntime pool, once made
_paired_pool: str | None = None  # the pool that paired onnxruntime sessions were opened on
_ORT_TYPES = {  # onnxruntime type string -> numpy dtype name
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(bool)": "bool",
}


class RunnerError(Exception):
    """A failure reported as ``{"error": ...}`` with exit code 2."""


class _JsonArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse would print usage and exit 2
        raise RunnerError(f"bad arguments: {message}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; raises RunnerError on bad arguments."""
    parser = _JsonArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=".onnx, .tflite or .pte file")
    parser.add_argument("--threads", type=int, default=2, help="intra-op / interpreter threads")
    parser.add_argument("--warmup", type=int, default=10, help="untimed runs after the first")
    parser.add_argument("--iterations", type=int, default=50, help="minimum timed runs")
    parser.add_argument("--min-seconds", type=float, default=0.0, help="minimum timed seconds")
    parser.add_argument("--providers", default="", help="onnxruntime providers, comma list")
    parser.add_argument(
        "--provider-option", action="append", default=[], metavar="PROVIDER:KEY=VALUE", help="an option of one of --providers (repeatable)"
    )
    parser.add_argument("--no-xnnpack", action="store_true", help="litert: no XNNPACK delegate")
    parser.add_argument("--input", default=None, help=".npy (one input) or .npz (by name)")
    parser.add_argument("--baseline", default=None, help="a second .onnx/.tflite/.pte timed in alternation with --model")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.warmup < 0 or args.iterations < 1 or args.min_seconds < 0:
        raise RunnerError("need --threads >= 1, --warmup >= 0, --iterations >= 1, --min-seconds >= 0")
    return args


# ---------------------------------------------------------------- memory and host facts


def _proc_status_mb(field: str) -> float | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM) in MiB, None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return None


def _ru_maxrss_mb() -> float | None:
    """Peak resident set size of this process from getrusage, in MiB."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return maxrss / (1024.0 * 1024.0) if sys.platform == "darwin" else maxrss / 1024.0


def current_rss_mb() -> float | None:
    """Resident set size now (VmRSS) in MiB, or the peak so far where VmRSS is absent."""
    rss = _proc_status_mb("VmRSS")
    return rss if rss is not None else _ru_maxrss_mb()


def cpu_model() -> str:
    """Human CPU name from /proc/cpuinfo (x86, Arm boards, RISC-V) or platform."""
    keys = ("model name", "hardware", "model", "uarch", "cpu model", "isa")
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, sep, value = line.partition(":")
                key = key.strip().lower()
                if sep and key in keys and value.strip() and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    for key in keys:
        if key in found:
            return found[key]
    return platform.processor() or platform.machine() or "unknown"


def cpu_affinity() -> list[int] | None:
    """CPUs this process may run on, None where the OS does not say."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return None


def host_facts() -> dict:
    """Python, OS and CPU facts recorded next to every measurement."""
    return {
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": cpu_affinity(),
    }


# ---------------------------------------------------------------- inputs


def random_input(shape: list[int], dtype: type, rng: np.random.Generator) -> np.ndarray:
    """Seeded random tensor; integer types get values spanning their range (capped)."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -128), min(int(info.max), 255)
        return rng.integers(low, high + 1, size=shape).astype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.standard_normal(size=shape).astype(dtype)


def static_shape(shape: list) -> list[int]:
    """Replace dynamic dimensions (None, names, -1, 0) by 1."""
    return [dim if isinstance(dim, int) and dim > 0 else 1 for dim in shape]


def load_inputs(path: str | None, specs: list[tuple[str, list[int], type]]) -> dict:
    """Inputs by name: from ``path`` (.npy for one input, .npz keyed by name) or random."""
    if path is None:
        rng = np.random.default_rng(INPUT_SEED)
        return {name: random_input(shape, dtype, rng) for name, shape, dtype in specs}
    loaded = np.load(path)
    if isinstance(loaded, np.ndarray):
        if len(specs) != 1:
            raise RunnerError(f"model has {len(specs)} inputs; pass an .npz keyed by input name")
        name, _, dtype = specs[0]
        return {name: loaded.astype(dtype, copy=False)}
    missing = [name for name, _, _ in specs if name not in loaded.files]
    if missing:
        raise RunnerError(f"{path} lacks inputs {missing}; it has {loaded.files}")
    return {name: loaded[name].astype(dtype, copy=False) for name, _, dtype in specs}


# ---------------------------------------------------------------- runtimes


def import_onnxruntime() -> tuple:
    """The onnxruntime module and its facts; raises RunnerError if it is not installed."""
    try:
        import onnxruntime
    except ImportError as error:
        raise RunnerError("no ONNX runtime: pip install onnxruntime (or onnxruntime-gpu)") from error
    return onnxruntime, {"runtime": "onnxruntime", "runtime_version": onnxruntime.__version__}


def open_onnx(args: argparse.Namespace, ort) -> tuple:
    """Create an onnxruntime session; returns (run_once, providers actually used)."""
    requested = [p.strip() for p in args.providers.split(",") if p.strip()]
    available = ort.get_available_providers()
    missing = [p for p in requested if p not in available]
    if missing:
        raise RunnerError(f"onnxruntime lacks providers {missing}; available: {available}")
    global _paired_pool
    if args.baseline:
        _paired_pool = paired_thread_pool(ort, args.threads)
    options = session_options(ort, args.threads, _paired_pool if args.baseline else PER_SESSION)
    settings = provider_settings(requested, args.provider_option)
    session = ort.InferenceSession(args.model, options, providers=settings or ["CPUExecutionProvider"])
    used = session.get_providers()
    # onnxruntime silently falls back to CPU when e.g. CUDA libraries fail to load.
    if requested and used[0] != requested[0]:
        raise RunnerError(f"asked for {requested[0]} but the session runs on {used}")
    specs = [(i.name, static_shape(i.shape), np.dtype(_ORT_TYPES.get(i.type, "float32")).type) for i in session.get_inputs()]
    feeds = load_inputs(args.input, specs)

    def run_once() -> None:
        session.run(None, feeds)

    return run_once, used


def paired_thread_pool(ort, threads: int) -> str:
    """The thread pool for sessions timed in alternation: one process-wide pool of ``threads``
    (SHARED_POOL) where this onnxruntime can make one, else per-session pools that do not spin."""
    global _shared_pool_threads
    if _shared_pool_threads is None:
        try:
            ort.capi._pybind_state.set_global_thread_pool_sizes(threads, 1)
        except Exception:  # an older onnxruntime without the call (AttributeError), or its pools already made (its Fail)
            return PER_SESSION_NO_SPIN
        _shared_pool_threads = threads
    return SHARED_POOL if _shared_pool_threads == threads else PER_SESSION_NO_SPIN


def session_options(ort, threads: int, thread_pool: str = PER_SESSION):
    """onnxruntime session options, sequential, on ``thread_pool``: its own of ``threads`` intra-op
    threads (PER_SESSION, onnxruntime's spinning default; PER_SESSION_NO_SPIN) or the process's SHARED_POOL."""
    options = ort.SessionOptions()
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if thread_pool == SHARED_POOL:  # its sizes are the pool's; setting them here only draws a warning
        options.use_per_session_threads = False
        return options
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if thread_pool == PER_SESSION_NO_SPIN:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def provider_settings(providers: list[str], entries: list[str]) -> list:
    """onnxruntime's ``providers`` argument: a name, or (name, options) where ``entries`` give it
    options as ``PROVIDER:KEY=VALUE``; raises RunnerError for an entry that is malformed or names another provider."""
    options: dict[str, dict[str, str]] = {}
    for entry in entries:
        provider, colon, setting = entry.partition(":")
        key, equals, value = setting.partition("=")
        if not (colon and equals and key):
            raise RunnerError(f"bad --provider-option {entry!r}: expected PROVIDER:KEY=VALUE")
        if provider not in providers:
            raise RunnerError(f"--provider-option {entry!r} names {provider}, which is not among --providers {providers}")
        options.setdefault(provider, {})[key] = value
    return [(name, options[name]) if name in options else name for name in providers]


def import_tflite() -> tuple:
    """The TFLite interpreter module and its facts: ai_edge_litert, else tflite_runtime."""
    try:
        from ai_edge_litert import interpreter

        return interpreter, {"runtime": "ai-edge-litert", "runtime_version": _dist_version("ai-edge-litert")}
    except ImportError:
        pass
    try:
        from tflite_runtime import interpreter

        return interpreter, {"runtime": "tflite-runtime", "runtime_version": _dist_version("tflite-runtime")}
    except ImportError as error:
        raise RunnerError("no TFLite runtime: pip install ai-edge-litert (or tflite-runtime)") from error


def _dist_version(distribution: str) -> str:
    try:
        from importlib.metadata import version

        return version(distribution)
    except Exception:  # metadata missing on hand-copied installs
        return "unknown"


def open_tflite(args: argparse.Namespace, module) -> tuple:
    """Create and allocate a TFLite interpreter; returns (run_once, delegates used)."""
    options = {"model_path": args.model, "num_threads": args.threads}
    if args.no_xnnpack:
        options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = module.Interpreter(**options)
    details = interpreter.get_input_details()
    for detail in details:
        signature = list(detail.get("shape_signature", detail["shape"]))
        if any(dim < 1 for dim in signature):
            interpreter.resize_input_tensor(detail["index"], static_shape(signature))
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    specs = [(d["name"], [int(x) for x in d["shape"]], d["dtype"]) for d in details]
    feeds = load_inputs(args.input, specs)
    indexed = [(d["index"], feeds[d["name"]]) for d in details]

    def run_once() -> None:
        for index, value in indexed:
            interpreter.set_tensor(index, value)
        interpreter.invoke()

    return run_once, ["builtin"] if args.no_xnnpack else ["xnnpack"]


# ---------------------------------------------------------------- ExecuTorch (.pte)

EXECUTORCH_POOL = "executorch global"
_ET_TYPES = {0: "uint8", 1: "int8", 2: "int16", 3: "int32", 4: "int64", 5: "float16", 6: "float32", 7: "float64", 11: "bool"}  # ScalarType


def import_executorch() -> tuple:
    """executorch.runtime and its facts; raises RunnerError if the executorch wheel is not installed."""
    try:
        from executorch import runtime
    except ImportError as error:
        raise RunnerError("no ExecuTorch runtime: pip install executorch") from error
    return runtime, {"runtime": "executorch", "runtime_version": _dist_version("executorch")}


def open_pte(args: argparse.Namespace, runtime) -> tuple:
    """Load the program's ``forward`` on an ExecuTorch pool of ``--threads``; returns (run_once, backends)."""
    global _paired_pool
    _paired_pool = EXECUTORCH_POOL
    set_executorch_threads(args.threads)
    method = runtime.Runtime.get().load_program(args.model).load_method("forward")
    meta = method.metadata
    specs = []
    for index in range(meta.num_inputs()):
        tensor = meta.input_tensor_meta(index)
        dtype = _ET_TYPES.get(int(tensor.dtype()))
        if dtype is None:
            raise RunnerError(f"{os.path.basename(args.model)}: input {index} has dtype {tensor.dtype()}, which the runner cannot feed")
        specs.append((f"input_{index}", list(tensor.sizes()), np.dtype(dtype).type))
    feeds = load_inputs(args.input, specs)
    import torch  # executorch's Python runtime takes torch tensors

    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name, _, _ in specs]

    def run_once() -> None:
        method.execute(tensors)

    return run_once, pte_backends(args.model, runtime.Runtime.get().backend_registry.registered_backend_names)


def pte_backends(path: str, registered: list[str]) -> list[str]:
    """The registered delegates the program names (a delegate's id is a plain string in the flatbuffer), then "portable"."""
    with open(path, "rb") as program:
        data = program.read()
    return sorted(name for name in registered if name.encode() in data) + ["portable"]


def set_executorch_threads(threads: int) -> None:
    """Size ExecuTorch's process-wide thread pool (XNNPACK's); a wheel without the call keeps its default."""
    try:
        from executorch.extension.pybindings import portable_lib

        portable_lib._unsafe_reset_threadpool(threads)
    except (ImportError, AttributeError):
        pass


# ---------------------------------------------------------------- measurement


def latency_stats(latencies_ns: list[int]) -> dict:
    """p50/p90/p99/mean/std/min of per-iteration latencies, in ms."""
    ms = np.asarray(latencies_ns, dtype=np.float64) / 1e6
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "latency_p50_ms": float(p50),
        "latency_p90_ms": float(p90),
        "latency_p99_ms": float(p99),
        "latency_mean_ms": float(ms.mean()),
        "latency_std_ms": float(ms.std()),
        "latency_min_ms": float(ms.min()),
        "iterations": int(ms.size),
    }


def timed_loop(run_once, iterations: int, min_seconds: float) -> list[int]:
    """Run at least ``iterations`` times and at least ``min_seconds``; latencies in ns."""
    latencies: list[int] = []
    deadline = time.perf_counter_ns() + int(min_seconds * 1e9)
    while len(latencies) < iterations or time.perf_counter_ns() < deadline:
        start = time.perf_counter_ns()
        run_once()
        latencies.append(time.perf_counter_ns() - start)
    return latencies


def paired_timed_loop(run_model, run_baseline, iterations: int, min_seconds: float) -> tuple[list[int], list[int]]:
    """Both artefacts, alternating per iteration and swapping the order each time; latencies in ns."""
    model, baseline = [], []
    deadline = time.perf_counter_ns() + int(min_seconds * 1e9)
    while len(model) < iterations or time.perf_counter_ns() < deadline:
        order = ((run_model, model), (run_baseline, baseline))
        for run_once, latencies in order if len(model) % 2 == 0 else order[::-1]:
            start = time.perf_counter_ns()
            run_once()
            latencies.append(time.perf_counter_ns() - start)
    return model, baseline


def runtime_for(path: str) -> tuple:
    """(import_runtime, open_runtime) for an existing .onnx/.tflite/.pte ``path``; RunnerError otherwise."""
    if not os.path.isfile(path):
        raise RunnerError(f"model file not found: {path}")
    extension = os.path.splitext(path)[1].lower()
    runtimes = {".onnx": (import_onnxruntime, open_onnx), ".tflite": (import_tflite, open_tflite), ".pte": (import_executorch, open_pte)}
    if extension not in runtimes:
        raise RunnerError(f"unsupported model type {extension!r}: expected .onnx, .tflite or .pte")
    return runtimes[extension]


def open_baseline(args: argparse.Namespace) -> object:
    """The ``--baseline`` artefact's run_once, opened with the same settings as ``--model``."""
    import_runtime, open_runtime = runtime_for(args.baseline)
    return open_runtime(argparse.Namespace(**{**vars(args), "model": args.baseline}), import_runtime()[0])[0]


def benchmark(args: argparse.Namespace) -> dict:
    """Load, time and describe one artefact (and its ``--baseline``); raises on any failure."""
    if np is None:
        raise RunnerError("numpy is not installed for this Python: pip install numpy")
    import_runtime, open_runtime = runtime_for(args.model)
    start = time.perf_counter_ns()
    module, runtime_facts = import_runtime()
    import_ns = time.perf_counter_ns() - start
    rss_before_load = current_rss_mb()
    start = time.perf_counter_ns()
    run_once, providers = open_runtime(args, module)
    init_ns = time.perf_counter_ns() - start
    start = time.perf_counter_ns()
    run_once()
    first_run_ns = time.perf_counter_ns() - start
    run_baseline = open_baseline(args) if args.baseline else None
    for _ in range(args.warmup):
        run_once()
        if run_baseline:
            run_baseline()
    if run_baseline:
        latencies, baseline_latencies = paired_timed_loop(run_once, run_baseline, args.iterations, args.min_seconds)
    else:
        latencies = timed_loop(run_once, args.iterations, args.min_seconds)
    ru_maxrss = _ru_maxrss_mb()
    vm_hwm = _proc_status_mb("VmHWM")
    peaks = [mb for mb in (ru_maxrss, vm_hwm) if mb is not None]
    result = {
        "import_ms": import_ns / 1e6,
        "init_ms": init_ns / 1e6,
        "first_run_ms": first_run_ns / 1e6,
        **latency_stats(latencies),
        "warmup": args.warmup,
        "threads": args.threads,
        "peak_rss_mb": max(peaks) if peaks else None,
        "ru_maxrss_mb": ru_maxrss,
        "vm_hwm_mb": vm_hwm,
        "rss_before_load_mb": rss_before_load,
        "pid": os.getpid(),
        "model": os.path.basename(args.model),
        "model_bytes": os.path.getsize(args.model),
        **runtime_facts,
        "providers": providers,
        **host_facts(),
    }
    if run_baseline:
        baseline = {
            "model": os.path.basename(args.baseline),
            "model_bytes": os.path.getsize(args.baseline),
            **latency_stats(baseline_latencies),
        }
        result["baseline"] = baseline
        if _paired_pool:
            result["thread_pool"] = _paired_pool
        result["speedup_p50"] = baseline["latency_p50_ms"] / result["latency_p50_ms"]
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point: print one JSON object on the real stdout; 0 on success, 2 on error."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # native runtime chatter must not corrupt the JSON on stdout
    try:
        result = benchmark(parse_args(sys.argv[1:] if argv is None else argv))
        code = 0
    except Exception as error:  # every failure becomes one JSON line
        message = str(error) if isinstance(error, RunnerError) else f"{type(error).__name__}: {error}"
        result, code = {"error": message}, EXIT_ERROR
    finally:
        sys.stdout.flush()
        os.dup2(real_stdout, 1)
        os.close(real_stdout)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
