#!/usr/bin/env python3
"""Benchmark one .onnx, .tflite or .pte artefact in this process and print one JSON object.

This file is deliberately self-contained (stdlib + numpy + the runtime, no edgeprune
imports) so it can be copied alone to a Raspberry Pi, a phone or a remote server::

    python3 runner.py --model model.onnx --threads 2 --warmup 10 --iterations 50
    python3 runner.py --model model.tflite --no-xnnpack --min-seconds 2
    python3 runner.py --model model.onnx --providers CUDAExecutionProvider,CPUExecutionProvider
    python3 runner.py --model pruned.onnx --baseline dense.onnx --iterations 500
    python3 runner.py --model model.pte --threads 4       # ExecuTorch (pip install executorch)
    python3 runner.py --model model.tflite --samples images.npy --outputs logits.npy   # outputs, for parity

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
import re
import sys
import time
from typing import NamedTuple

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
    parser.add_argument("--shape", action="append", default=[], metavar="INPUT=1,3,224,224", help="an input's shape (repeatable)")
    parser.add_argument("--baseline", default=None, help="a second .onnx/.tflite/.pte timed in alternation with --model")
    parser.add_argument("--samples", default=None, help=".npy of samples for the first input: save their outputs, time nothing")
    parser.add_argument("--outputs", default=None, help="where --samples' first outputs go (.npy, float32)")
    args = parser.parse_args(argv)
    if bool(args.samples) != bool(args.outputs):
        raise RunnerError("--samples and --outputs go together")
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
    """Peak resident set size from getrusage, in MiB. On Linux it survives fork+exec: a runner
    started by a 900 MB build reads 900 MB, so it is only used where VmHWM is absent."""
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


def peak_rss() -> tuple[float | None, str]:
    """(peak resident set size of this process in MiB, where it came from): VmHWM, the high-water
    mark of this process's own memory since its exec, else getrusage's ru_maxrss."""
    peak = _proc_status_mb("VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    return _ru_maxrss_mb(), "ru_maxrss"


def memory_figures(rss_before_load: float | None, runtime_memory: tuple[float | None, str]) -> dict:
    """This process's memory once the timed runs are over, in MiB: its peak; the model's share of the peak
    (peak minus the process before the model was loaded: the runtime's import is not counted; the session,
    its weights, arenas, threads and any copy made while loading are); the model's share still resident
    now (what a running app keeps); and the runtime's own figure where it gives one."""
    peak, source = peak_rss()
    now = _proc_status_mb("VmRSS")
    runtime_mb, runtime_source = runtime_memory
    return {
        "peak_rss_mb": peak,
        "peak_rss_source": source,
        "rss_before_load_mb": rss_before_load,
        "model_memory_mb": _difference(peak, rss_before_load),
        "model_resident_mb": _difference(now, rss_before_load),
        "runtime_memory_mb": runtime_mb,
        "runtime_memory_source": runtime_source if runtime_mb is not None else None,
    }


def _difference(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None


_ARM_CORES = {  # /proc/cpuinfo "CPU part" of Arm Ltd. ("CPU implementer" 0x41) cores: arm64 kernels print no CPU name
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
    "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77",
    "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78", "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710",
    "0xd48": "Cortex-X2", "0xd49": "Neoverse-N2", "0xd4d": "Cortex-A715", "0xd4e": "Cortex-X3",
}  # fmt: skip
_ARCH_FAMILIES = {"x86_64": "x86", "amd64": "x86", "i386": "x86", "i686": "x86", "aarch64": "arm", "arm64": "arm"}


def cpuinfo_fields() -> dict[str, str]:
    """The first value of each key of /proc/cpuinfo (lower-case keys), empty off Linux."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, sep, value = line.partition(":")
                key = key.strip().lower()
                if sep and value.strip() and key not in found:
                    found[key] = value.strip()
    except OSError:
        pass
    return found


def cpu_model() -> str:
    """Human CPU name from /proc/cpuinfo (x86, Arm boards, RISC-V) or platform; an Arm core named from its part
    number ("Raspberry Pi 5 Model B Rev 1.0 (Cortex-A76)", or "Cortex-A76" where the board names itself nowhere)."""
    found = cpuinfo_fields()
    core = _ARM_CORES.get(found.get("cpu part", "")) if found.get("cpu implementer") == "0x41" else None
    for key in ("model name", "hardware", "model", "uarch", "cpu model", "isa"):
        if key in found:
            return f"{found[key]} ({core})" if core and core not in found[key] else found[key]
    return core or platform.processor() or platform.machine() or "unknown"


def _machine_family(machine: str) -> str:
    machine = machine.lower()
    return "arm" if machine.startswith("arm") else _ARCH_FAMILIES.get(machine, machine)


def emulation() -> str | None:
    """How this process is emulated, None where nothing says it is. Under user-mode emulation (qemu-user through
    binfmt_misc) uname names the guest's machine while the kernel's own sysctl (/proc/sys/kernel/arch) names the
    host's, and an unbound /proc/cpuinfo describes the host's CPU. Timings taken so say nothing about the device."""
    machine = platform.machine()
    try:
        with open("/proc/sys/kernel/arch") as arch:
            kernel = arch.read().strip()
    except OSError:
        kernel = ""
    if kernel and _machine_family(kernel) != _machine_family(machine):
        return f"user-mode emulation: a {machine} process on a {kernel} kernel"
    found = cpuinfo_fields()
    if _machine_family(machine) != "x86" and "vendor_id" in found and "flags" in found:
        return f"user-mode emulation: a {machine} process on an x86 CPU ({found['vendor_id']})"
    return None


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
        "emulated": emulation(),
    }


# ---------------------------------------------------------------- inputs


class OpenedModel(NamedTuple):
    """A loaded artefact: ``run_once`` runs one inference on its inputs; ``providers`` what runs it;
    ``runtime_memory`` (MiB, what the figure is) where the runtime reports its own memory; ``guessed``
    the inputs whose dynamic dimensions were set to 1 because no ``--shape`` named them; ``shapes`` the
    shape fed to each input."""

    run_once: object
    providers: list
    runtime_memory: tuple = (None, "")
    guessed: tuple = ()
    shapes: dict = {}
    predict: object = None


def random_input(shape: list[int], dtype: type, rng: np.random.Generator) -> np.ndarray:
    """Seeded random tensor. 8-bit integers (quantized data) span their range; wider integers (token ids,
    masks, indices) are 0 or 1, valid for any embedding table; floats are standard normal."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        low, high = (int(info.min), int(info.max)) if dtype.itemsize == 1 else (0, 1)
        return rng.integers(low, high + 1, size=shape).astype(dtype)
    return rng.standard_normal(size=shape).astype(dtype)


def parse_shapes(entries: list[str]) -> dict[str, list[int]]:
    """``--shape NAME=1,3,224,224`` entries by input name; raises RunnerError for a malformed one."""
    shapes = {}
    for entry in entries:
        name, equals, dims = entry.rpartition("=")
        try:
            shape = [int(dim) for dim in dims.split(",")]
        except ValueError:
            shape = []
        if not (equals and name and shape and all(dim > 0 for dim in shape)):
            raise RunnerError(f"bad --shape {entry!r}: expected INPUT=1,3,224,224 (positive sizes)")
        shapes[name] = shape
    return shapes


def resolve_shapes(inputs: list[tuple[str, list]], shapes: dict[str, list[int]]) -> tuple[dict[str, list[int]], tuple[str, ...]]:
    """Each input's concrete shape: its ``--shape``, else its own with dynamic dimensions (None, names,
    -1, 0) set to 1; and the names of the inputs so guessed. Raises RunnerError for a ``--shape`` naming
    no input or of the wrong rank."""
    names = [name for name, _ in inputs]
    unknown = sorted(set(shapes) - set(names))
    if unknown:
        raise RunnerError(f"--shape names {unknown}, which the model does not have; its inputs: {names}")
    resolved, guessed = {}, []
    for name, dims in inputs:
        if name in shapes:
            if len(shapes[name]) != len(dims):
                raise RunnerError(f"--shape {name} has {len(shapes[name])} dimensions; the model's input has {len(dims)}")
            resolved[name] = shapes[name]
            continue
        resolved[name] = [dim if isinstance(dim, int) and dim > 0 else 1 for dim in dims]
        if resolved[name] != list(dims):
            guessed.append(name)
    return resolved, tuple(guessed)


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


# Sentence ends; XNNPACK's delegate messages arrive glued together ("...in XNNPACK delegateunsupported ...").
_SENTENCE_END = re.compile(r"\n+|(?<=[.!])\s+|(?<=[.!])(?=[A-Z])|(?<=delegate)\s*(?=[a-z])|(?<=\w)(?=(?:tflite|tensorflow)/)")
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|\d+(?:\.\d+)?(?:e-?\d+)?")


def one_line(message: str, limit: int = 400) -> str:
    """A runtime's error as one short line: a sentence it repeats for every tensor (only numbers and names
    differ) is said once with how many tensors it names, and the rest is cut at ``limit`` characters."""
    groups: dict[str, list[str]] = {}
    for part in _SENTENCE_END.split(message.strip()):
        if part.strip():
            groups.setdefault(_VARYING.sub("#", part.strip()), []).append(part.strip())
    said = [parts[0] + _repeats(parts) for parts in groups.values()]
    text = "; ".join(said) or message.strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _repeats(parts: list[str]) -> str:
    tensors = {number for part in parts for number in re.findall(r"tensor\s+'?([\w/:.]+)", part, re.IGNORECASE)}
    if len(tensors) > 1:
        return f" (the same for {len(tensors)} tensors)"
    return f" ({len(parts)} times)" if len(parts) > 1 else ""


# ---------------------------------------------------------------- runtimes


def import_onnxruntime() -> tuple:
    """The onnxruntime module and its facts; raises RunnerError if it is not installed."""
    try:
        import onnxruntime
    except ImportError as error:
        raise RunnerError("no ONNX runtime: pip install onnxruntime (or onnxruntime-gpu)") from error
    return onnxruntime, {"runtime": "onnxruntime", "runtime_version": onnxruntime.__version__}


def open_onnx(args: argparse.Namespace, ort) -> tuple:
    """Create an onnxruntime session and its inputs (providers: those actually used)."""
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
    inputs = session.get_inputs()
    shapes, guessed = resolve_shapes([(i.name, list(i.shape)) for i in inputs], parse_shapes(args.shape))
    specs = [(i.name, shapes[i.name], np.dtype(_ORT_TYPES.get(i.type, "float32")).type) for i in inputs]
    feeds = load_inputs(args.input, specs)

    def run_once() -> None:
        session.run(None, feeds)

    def predict(samples: np.ndarray) -> np.ndarray:
        first = specs[0]
        return session.run([session.get_outputs()[0].name], {**feeds, first[0]: samples.astype(first[2])})[0].astype(np.float32)

    # onnxruntime reports no memory figure of its own through its Python API.
    return OpenedModel(run_once, used, guessed=guessed, shapes=shapes, predict=predict)


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


def open_tflite(args: argparse.Namespace, module) -> OpenedModel:
    """Create a TFLite interpreter, resize its dynamic inputs and allocate it."""
    options = {"model_path": args.model, "num_threads": args.threads}
    if args.no_xnnpack:
        options["experimental_op_resolver_type"] = module.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    interpreter = module.Interpreter(**options)
    details = interpreter.get_input_details()
    declared = [(d["name"], [int(x) for x in d.get("shape_signature", d["shape"])]) for d in details]
    shapes, guessed = resolve_shapes(declared, parse_shapes(args.shape))
    for detail in details:
        if shapes[detail["name"]] != [int(x) for x in detail["shape"]]:
            # resize_tensor_input in both ai_edge_litert and tflite_runtime (no resize_input_tensor anywhere).
            interpreter.resize_tensor_input(detail["index"], shapes[detail["name"]])
    interpreter.allocate_tensors()
    details = interpreter.get_input_details()
    specs = [(d["name"], [int(x) for x in d["shape"]], d["dtype"]) for d in details]
    feeds = load_inputs(args.input, specs)
    indexed = [(d["index"], feeds[d["name"]]) for d in details]

    def run_once() -> None:
        for index, value in indexed:
            interpreter.set_tensor(index, value)
        interpreter.invoke()

    def predict(samples: np.ndarray) -> np.ndarray:
        first, output = details[0], interpreter.get_output_details()[0]
        interpreter.set_tensor(first["index"], quantized(samples, first))
        for index, value in indexed[1:]:
            interpreter.set_tensor(index, value)
        interpreter.invoke()
        return dequantized(interpreter.get_tensor(output["index"]), output)

    delegates = ["builtin"] if args.no_xnnpack else ["xnnpack"]
    memory = (tflite_tensor_mb(interpreter), "sum of the interpreter's tensor sizes")
    return OpenedModel(run_once, delegates, memory, guessed, {name: shape for name, shape, _ in specs}, predict)


def quantized(samples: np.ndarray, detail: dict) -> np.ndarray:
    """Float samples as the tensor type a TFLite input wants (int8/uint8 through its scale and zero-point)."""
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.floating) or not scale:
        return samples.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(samples / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantized(values: np.ndarray, detail: dict) -> np.ndarray:
    """A TFLite output as float32 (int8/uint8 through its scale and zero-point)."""
    scale, zero_point = detail["quantization"]
    if np.issubdtype(np.dtype(detail["dtype"]), np.floating) or not scale:
        return values.astype(np.float32)
    return ((values.astype(np.float32) - zero_point) * scale).astype(np.float32)


def tflite_tensor_mb(interpreter) -> float | None:
    """The bytes of every tensor the interpreter reports (weights and activations, before any arena
    sharing or delegate repacking), in MiB: the closest figure of its own LiteRT's Python API gives."""
    try:
        total = sum(int(np.prod(d["shape"])) * np.dtype(d["dtype"]).itemsize for d in interpreter.get_tensor_details())
    except Exception:  # a tensor type numpy cannot size (string, resource): no figure rather than a failure
        return None
    return total / (1024.0 * 1024.0)


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


def open_pte(args: argparse.Namespace, runtime) -> OpenedModel:
    """Load the program's ``forward`` on an ExecuTorch pool of ``--threads``."""
    global _paired_pool
    _paired_pool = EXECUTORCH_POOL
    set_executorch_threads(args.threads)
    method = runtime.Runtime.get().load_program(args.model).load_method("forward")
    meta = method.metadata
    declared, dtypes = [], {}
    for index in range(meta.num_inputs()):
        tensor = meta.input_tensor_meta(index)
        dtype = _ET_TYPES.get(int(tensor.dtype()))
        if dtype is None:
            raise RunnerError(f"{os.path.basename(args.model)}: input {index} has dtype {tensor.dtype()}, which the runner cannot feed")
        declared.append((f"input_{index}", list(tensor.sizes())))
        dtypes[f"input_{index}"] = np.dtype(dtype).type
    shapes, guessed = resolve_shapes(declared, parse_shapes(args.shape))
    feeds = load_inputs(args.input, [(name, shapes[name], dtypes[name]) for name, _ in declared])
    import torch  # executorch's Python runtime takes torch tensors

    tensors = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name, _ in declared]

    def run_once() -> None:
        method.execute(tensors)

    def predict(samples: np.ndarray) -> np.ndarray:
        first = torch.from_numpy(np.ascontiguousarray(samples.astype(dtypes["input_0"])))
        return method.execute([first, *tensors[1:]])[0].detach().numpy().astype(np.float32)

    backends = pte_backends(args.model, runtime.Runtime.get().backend_registry.registered_backend_names)
    return OpenedModel(run_once, backends, guessed=guessed, shapes=shapes, predict=predict)


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


def first_run(opened: OpenedModel) -> None:
    """The first inference; a failure on inputs whose dynamic dimensions were guessed says how to name them."""
    try:
        opened.run_once()
    except Exception as error:
        if not opened.guessed:
            raise
        hint = f"dynamic dimensions of {', '.join(opened.guessed)} were set to 1; give the real ones with --shape NAME=1,3,224,224"
        raise RunnerError(f"first inference failed ({one_line(str(error), 200)}); {hint}") from error


def open_baseline(args: argparse.Namespace) -> object:
    """The ``--baseline`` artefact's run_once, opened with the same settings as ``--model``."""
    import_runtime, open_runtime = runtime_for(args.baseline)
    return open_runtime(argparse.Namespace(**{**vars(args), "model": args.baseline, "shape": []}), import_runtime()[0]).run_once


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
    opened = open_runtime(args, module)
    init_ns = time.perf_counter_ns() - start
    start = time.perf_counter_ns()
    first_run(opened)
    first_run_ns = time.perf_counter_ns() - start
    run_once = opened.run_once
    run_baseline = open_baseline(args) if args.baseline else None
    for _ in range(args.warmup):
        run_once()
        if run_baseline:
            run_baseline()
    if run_baseline:
        latencies, baseline_latencies = paired_timed_loop(run_once, run_baseline, args.iterations, args.min_seconds)
    else:
        latencies = timed_loop(run_once, args.iterations, args.min_seconds)
    result = {
        "import_ms": import_ns / 1e6,
        "init_ms": init_ns / 1e6,
        "first_run_ms": first_run_ns / 1e6,
        **latency_stats(latencies),
        "warmup": args.warmup,
        "threads": args.threads,
        **memory_figures(rss_before_load, opened.runtime_memory),
        "input_shapes": opened.shapes,
        "guessed_shapes": list(opened.guessed),
        "pid": os.getpid(),
        "model": os.path.basename(args.model),
        "model_bytes": os.path.getsize(args.model),
        **runtime_facts,
        "providers": opened.providers,
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


def in_layout(samples: np.ndarray, shape: list[int]) -> tuple[np.ndarray, str]:
    """``samples`` (N, ...) as the model's first input takes them: as given, or NCHW images moved to channels-last."""
    if list(samples.shape[1:]) == list(shape):
        return samples, "as given"
    if samples.ndim == 4 and [samples.shape[2], samples.shape[3], samples.shape[1]] == list(shape):
        return samples.transpose(0, 2, 3, 1), "NCHW samples fed channels-last"
    given = list(samples.shape[1:])
    raise RunnerError(f"samples of shape {given} fit neither the model's input {list(shape)} nor their channels-last order")


def predictions(args: argparse.Namespace) -> dict:
    """Feed each of ``--samples`` to the model (one batch of its first input's size at a time, the last one padded),
    save the first output of each to ``--outputs`` as float32, and describe the run; nothing is timed but the whole."""
    if np is None:
        raise RunnerError("numpy is not installed for this Python: pip install numpy")
    import_runtime, open_runtime = runtime_for(args.model)
    module, runtime_facts = import_runtime()
    opened = open_runtime(args, module)
    shape = list(opened.shapes.values())[0]
    samples, layout = in_layout(np.load(args.samples), shape[1:])
    start, outputs = time.perf_counter_ns(), []
    for index in range(0, len(samples), shape[0]):
        chunk = samples[index : index + shape[0]]
        padded = np.concatenate([chunk, np.repeat(chunk[-1:], shape[0] - len(chunk), axis=0)]) if len(chunk) < shape[0] else chunk
        outputs.append(np.asarray(opened.predict(padded))[: len(chunk)])
    logits = np.concatenate(outputs).astype(np.float32)
    np.save(args.outputs, logits)
    return {
        "outputs": os.path.basename(args.outputs),
        "samples": int(len(samples)),
        "output_shape": list(logits.shape),
        "layout": layout,
        "seconds": (time.perf_counter_ns() - start) / 1e9,
        "model": os.path.basename(args.model),
        **runtime_facts,
        "providers": opened.providers,
        **host_facts(),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: print one JSON object on the real stdout; 0 on success, 2 on error."""
    sys.stdout.flush()
    real_stdout = os.dup(1)
    os.dup2(2, 1)  # native runtime chatter must not corrupt the JSON on stdout
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        result = predictions(args) if args.samples else benchmark(args)
        code = 0
    except Exception as error:  # every failure becomes one JSON line
        message = one_line(str(error) if isinstance(error, RunnerError) else f"{type(error).__name__}: {error}")
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
