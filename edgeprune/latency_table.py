"""A per-device latency table: what each convolution costs, read from onnxruntime's per-node profiler.

Measuring every candidate of a pruning search on the device is what makes such searches slow. Instead,
one profiled run of a model (``SessionOptions.enable_profiling``: a JSON trace with each node's kernel
time) fills a table keyed by each convolution's and fully connected layer's *signature* (its input and
weight shapes): the layer costs as much on this device, runtime and thread count whatever model holds it,
so the table is reused across builds and models (``cached_table``). A candidate's latency is predicted
from its torch layers' signatures, without exporting it: ``predict_us`` adds

- each conv/linear layer's measured time (the median over the runs that saw its signature; an unseen
  signature from a least-squares fixed + per-MAC cost fitted to the layers of its kind, kernel and input size),
- the other nodes' time (adds, activations, pads, pooling, layout reorders) of the last profiled model,
  per residual block whose scope names them (a removed block's are gone) and for the rest of the graph,
- the session's per-run overhead (a run's total less its nodes').

On a remote device (adb, ssh) the table is read from TFLite's ``benchmark_model --enable_op_profiling``
instead (``read_op_profile``): its rows name no layer, so they are matched to the torch layers by position,
or where that fails each op type's time is shared among its layers by MACs.

The sum is in profiled microseconds; ``LatencyPredictor`` scales it to the p50 the device's benchmark
measures and records how far each prediction was from the measurement that confirmed it.

A stored table has a *lineage*: an id given when the table file is created, kept while builds add to it.
``table_lineage`` is what a stage's cache key holds: a table deleted, replaced by another file or of an
older format starts a new lineage, so a search result cached with the old table runs again; a table that
only grew does not (the cached result's speed-up was measured, not predicted, and a key that followed
every addition would make each search's own profiling invalidate it).
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgeprune.artifacts import write_json_atomic
from edgeprune.cache import cache_key

TABLE_FORMAT = "edgeprune-latency-table/3"  # 2: lineage; 3: a conv's output size in its signature
MAX_SAMPLES = 9  # per signature: the newest runs' medians are kept
CONV_OPS = {"Conv": "conv", "FusedConv": "conv", "NhwcFusedConv": "conv", "Gemm": "gemm", "FusedGemm": "gemm"}
TFLITE_OPS = {"CONV_2D": "conv", "DEPTHWISE_CONV_2D": "dwconv", "FULLY_CONNECTED": "gemm"}  # TFLite's builtin kernels


def signature(kind: str, input_shape: Iterable[int], weight_shape: Iterable[int], batch: int = 1, output_shape: Iterable[int] = ()) -> str:
    """A layer's cost key: ``conv:1x16x28x28:32x16x3x3:14x14`` (batch normalised to 1; the last field is the output's
    height x width, so a strided conv is not its stride-1 twin); ``gemm:49x64:192x64``, the rows one sample of
    ``batch`` feeds a linear layer (its tokens; 1 for a flat feature vector) by its input features: a transformer's
    linear layer over 49 tokens is 49 rows whether the graph keeps them 3-D (torch) or flattened (onnxruntime's
    Gemm)."""
    shape = list(input_shape)
    if kind == "gemm":
        dims = [max(1, int(np.prod(shape[:-1])) // max(batch, 1)), shape[-1]]
        return f"{kind}:{'x'.join(map(str, dims))}:{'x'.join(map(str, weight_shape))}"
    output = list(output_shape)[2:] or shape[2:]
    return f"{kind}:{'x'.join(map(str, [1, *shape[1:]]))}:{'x'.join(map(str, weight_shape))}:{'x'.join(map(str, output))}"


def signature_parts(sig: str) -> tuple[str, list[str], list[str], list[str]]:
    """A signature's kind, input dims, weight dims and output spatial dims (a linear layer's: its rows)."""
    kind, inputs, weights, *output = sig.split(":")
    in_dims = inputs.split("x")
    return kind, in_dims, weights.split("x"), output[0].split("x") if output else in_dims[:1] if kind == "gemm" else in_dims[2:]


def layer_macs(sig: str) -> int:
    """The weight's size times the output's pixels (a linear layer's rows): proportional to the layer's
    multiply-accumulates among layers of one class (``layer_class``: same kernel, input and output size), which is
    all the fitted cost compares."""
    _, _, weights, output = signature_parts(sig)
    return int(np.prod([int(v) for v in weights])) * int(np.prod([int(v) for v in output] or [1]))


def layer_class(sig: str) -> str:
    """Signatures whose costs are fitted together: same kind, kernel size, depthwise or not, input and output size."""
    kind, in_dims, w_dims, output = signature_parts(sig)
    depthwise = kind == "conv" and w_dims[1] == "1" and in_dims[1] != "1"
    return f"{kind}:{'x'.join(w_dims[2:])}:{'dw' if depthwise else 'dense'}:{'x'.join(in_dims[2:])}:{'x'.join(output)}"


@dataclass(frozen=True)
class ProfiledRun:
    """One profiled model: median kernel time (µs) per conv/linear signature, other nodes' time by name, the run total."""

    layers: dict[str, list[float]]
    others: dict[str, float]
    total_us: float

    def overhead_us(self) -> float:
        return max(0.0, self.total_us - sum(sum(times) for times in self.layers.values()) - sum(self.others.values()))


def profile_onnx(path: Path, threads: int, torch_layers: list[str] | None = None, runs: int = 50, warmup: int = 10) -> ProfiledRun:
    """Run ``path`` ``runs`` times under onnxruntime's profiler (``threads`` intra-op threads) and read its trace
    (``read_trace``: ``torch_layers`` are the signatures of the model it was exported from, in execution order)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="edgeprune-profile-") as folder:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.enable_profiling, options.profile_file_prefix = True, str(Path(folder) / "trace")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {item.name: np.zeros([d if isinstance(d, int) else 1 for d in item.shape], np.float32) for item in session.get_inputs()}
        for _ in range(warmup + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    return read_trace(events, skip=warmup, torch_layers=torch_layers)


def read_trace(events: list[dict[str, Any]], skip: int = 0, torch_layers: list[str] | None = None) -> ProfiledRun:
    """A ``ProfiledRun`` from onnxruntime's trace events (``cat`` Node ``*_kernel_time`` and Session ``model_run``),
    the first ``skip`` runs (warm-up) left out.

    onnxruntime reports the shapes of the graph it runs, not of the model: its blocked-layout (NCHWc) convolutions
    pad output channels to the vector width (an 8-channel conv is listed, and costs, as a 16-channel one on
    AVX-512). So when the trace's conv/linear nodes, in execution order, pair one to one with ``torch_layers`` (the
    exported model's signatures in forward order; same kind, kernel and input size, no fewer channels), their times
    are recorded under the torch signatures a prediction looks up; otherwise under the trace's own."""
    times: dict[str, list[float]] = {}
    nodes: dict[str, tuple[str, list[Any]]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            name = event["name"][: -len("_kernel_time")]
            times.setdefault(name, []).append(float(event["dur"]))
            args = event["args"]
            nodes[name] = (args.get("op_name", ""), args.get("input_type_shape", []) + args.get("output_type_shape", []))
    times = {name: durations[skip:] or durations for name, durations in times.items()}
    totals = [float(event["dur"]) for event in events if event.get("cat") == "Session" and event["name"] == "model_run"]
    totals = totals[skip:] or totals
    convs: list[tuple[str, float]] = []
    others: dict[str, float] = {}
    scope = ""
    for name, durations in times.items():  # in execution order: the first run's
        op, shapes = nodes[name]
        median = statistics.median(durations)
        dims = [next(iter(shape.values())) for shape in shapes if isinstance(shape, dict) and shape]
        if op in CONV_OPS and len(dims) >= 3:
            convs.append((layer_signature(CONV_OPS[op], dims), median))
        else:  # a node the runtime added (a layout reorder) has no scope: it goes with the node it follows
            others[name if "/" in name or not scope else f"{scope}/{name}"] = median
        scope = name.rpartition("/")[0] if "/" in name else scope
    keys = [sig for sig, _ in convs]
    if torch_layers and len(torch_layers) == len(keys) and all(map(same_layer, torch_layers, keys)):
        keys = list(torch_layers)
    layers: dict[str, list[float]] = {}
    for key, (_, median) in zip(keys, convs, strict=True):
        layers.setdefault(key, []).append(median)
    return ProfiledRun(layers, others, statistics.median(totals) if totals else 0.0)


def op_kind(node_type: str) -> str | None:
    """The layer kind a TFLite op-profile row times: ``conv``, ``dwconv`` (depthwise) or ``gemm``; None for the rest.
    TFLite's own kernels are named by their builtin (``CONV_2D``), the ops XNNPACK runs by its operators
    (``Convolution (NHWC, F32) IGEMM``, ``... DWConv``, ``Fully Connected (NC, QS8, QC8W) GEMM``)."""
    if node_type in TFLITE_OPS:
        return TFLITE_OPS[node_type]
    if node_type.startswith("Convolution ("):
        return "dwconv" if node_type.endswith("DWConv") else "conv"
    return "gemm" if node_type.startswith("Fully Connected (") else None


def torch_kind(sig: str) -> str:
    """A torch layer signature's kind in ``op_kind``'s terms."""
    kind, inputs, weights, _ = signature_parts(sig)
    depthwise = kind == "conv" and weights[1] == "1" and inputs[1] != "1"
    return "dwconv" if depthwise else kind


def read_op_profile(ops: list[dict[str, Any]], total_ms: float, torch_layers: list[str]) -> tuple[ProfiledRun, str] | None:
    """A ``ProfiledRun`` from a TFLite op profile (``runtimes.benchmark_model_output.run_order``: rows in the order
    they ran) of a model whose conv/linear signatures, in forward order, are ``torch_layers``; and how its rows were
    matched to them. None when no row times a conv or linear layer (an old XNNPACK that reports its whole
    subgraph as one row): no table can be read from it.

    Neither TFLite's tensor names nor XNNPACK's (``Delegate/Convolution (NHWC, F32) IGEMM:3``) name the model's
    layers, so the rows are matched by position: when the conv/linear rows, in order, have the kinds of the torch
    layers in order, each row's time is that layer's ("by position"). When they do not (a converter fused, split or
    reordered layers), each kind's total time is shared among its torch layers by their MACs ("by op type": the
    table then knows what a MAC of each kind costs on the device, not each layer's own cost)."""
    timed = [(kind, 1000.0 * float(op["avg_ms"])) for op in ops if (kind := op_kind(str(op["node_type"])))]
    if not timed:
        return None
    others = {str(op["name"]): 1000.0 * float(op["avg_ms"]) for op in ops if op_kind(str(op["node_type"])) is None}
    layers: dict[str, list[float]] = {}
    if [kind for kind, _ in timed] == [torch_kind(sig) for sig in torch_layers]:
        for sig, (_, micros) in zip(torch_layers, timed, strict=True):
            layers.setdefault(sig, []).append(micros)
        return ProfiledRun(layers, others, 1000.0 * total_ms), "by position"
    for kind in {kind for kind, _ in timed}:
        sigs = [sig for sig in torch_layers if torch_kind(sig) == kind]
        macs = sum(layer_macs(sig) for sig in sigs)
        spent = sum(micros for row_kind, micros in timed if row_kind == kind)
        for sig in sigs:
            layers.setdefault(sig, []).append(spent * layer_macs(sig) / max(macs, 1))
    return ProfiledRun(layers, others, 1000.0 * total_ms), "by op type"


def same_layer(torch_sig: str, trace_sig: str) -> bool:
    """Whether a trace node can be the torch layer: same kind, kernel, input and output size; channels padded, never
    fewer."""
    kind, inputs, weights, output = signature_parts(torch_sig)
    trace_kind, trace_inputs, trace_weights, trace_output = signature_parts(trace_sig)
    shape = (kind, inputs[2:], weights[2:], output, len(weights))
    if shape != (trace_kind, trace_inputs[2:], trace_weights[2:], trace_output, len(trace_weights)):
        return False
    return all(int(a) <= int(b) for a, b in zip(inputs[:2] + weights[:2], trace_inputs[:2] + trace_weights[:2], strict=True))


def layer_signature(kind: str, dims: list[list[int]]) -> str:
    """A profiled node's signature from its input and output shapes (``dims``: inputs, then the output). A Gemm's
    weight is pre-packed and not listed, so its (out, in) shape comes from the output's and the input's widths."""
    if kind == "gemm":
        return signature(kind, dims[0], (dims[-1][-1], dims[0][-1]))
    return signature(kind, dims[0], dims[1], output_shape=dims[-1])


def layer_signatures(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Per conv/linear module of ``model``: its signature for one ``example`` input (one forward pass, hooks removed after)."""
    found: dict[str, str] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            kind = "conv" if isinstance(module, nn.Conv2d) else "gemm"
            found[name] = signature(kind, args[0].shape, module.weight.shape, args[0].shape[0], getattr(output, "shape", ()))

        return record

    handles = [
        module.register_forward_hook(hook(name)) for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model.eval()(example)
    finally:
        for handle in handles:
            handle.remove()
    return found


@dataclass
class LatencyTable:
    """Measured kernel times per layer signature on one (device, runtime, threads), and which models filled it."""

    key: dict[str, Any]
    entries: dict[str, list[float]] = field(default_factory=dict)
    profiled: list[str] = field(default_factory=list)  # fingerprints of the models profiled into it
    lineage: str = field(default_factory=lambda: secrets.token_hex(8))  # kept while the stored table grows

    def add(self, run: ProfiledRun, fingerprint: str = "") -> None:
        for sig, times in run.layers.items():
            self.entries[sig] = (self.entries.get(sig, []) + [statistics.median(times)])[-MAX_SAMPLES:]
        if fingerprint and fingerprint not in self.profiled:
            self.profiled.append(fingerprint)

    def layer_us(self, sig: str) -> float:
        """The layer's measured time, or the fixed + per-MAC cost fitted to its class (every conv when its class is unseen)."""
        if sig in self.entries:
            return statistics.median(self.entries[sig])
        points = [(layer_macs(s), statistics.median(t)) for s, t in self.entries.items() if layer_class(s) == layer_class(sig)]
        if not points:
            kind = signature_parts(sig)[0]
            points = [(layer_macs(s), statistics.median(t)) for s, t in self.entries.items() if signature_parts(s)[0] == kind]
        return fitted_cost(points, layer_macs(sig))

    def to_dict(self) -> dict[str, Any]:
        return {"format": TABLE_FORMAT, "key": self.key, "entries": self.entries, "profiled": self.profiled, "lineage": self.lineage}


def fitted_cost(points: list[tuple[int, float]], macs: int) -> float:
    """Least-squares ``fixed + per_mac * macs`` through ``points`` (fixed and per-MAC cost at least 0); one point scales."""
    if not points:
        return 0.0
    if len({m for m, _ in points}) < 2:
        base_macs, base_us = points[0]
        return base_us * macs / max(base_macs, 1)
    x, y = np.array([m for m, _ in points], float), np.array([t for _, t in points], float)
    slope, fixed = np.polyfit(x, y, 1)
    if fixed < 0 or slope < 0:
        slope, fixed = max(float(np.dot(x, y) / np.dot(x, x)), 0.0), 0.0
    return float(fixed + slope * macs)


def block_of(node: str, modules: Iterable[str]) -> str:
    """The innermost of ``modules`` whose scope names ``node`` (TorchScript export scopes: ``/layer1/layer1.0/Add``),
    or "" (the rest of the graph) when none does."""
    scopes = set(node.split("/"))
    return max((module for module in modules if module and module in scopes), key=len, default="")


def table_path(cache_root: Path, key: dict[str, Any]) -> Path:
    """Where the table of a (device, runtime, threads) key lives in a cache folder."""
    return Path(cache_root) / "latency-tables" / f"{cache_key(key)}.json"


def cached_table(cache_root: Path | None, key: dict[str, Any]) -> LatencyTable:
    """The table stored for ``key`` under ``cache_root`` (a fresh one when none, unreadable, or no cache folder)."""
    if cache_root is None:
        return LatencyTable(key)
    return stored_table(table_path(cache_root, key), key) or LatencyTable(key)


def stored_table(path: Path, key: dict[str, Any]) -> LatencyTable | None:
    """The table in ``path`` when it is one of this format for ``key``; None when absent, unreadable or another."""
    try:
        data = json.loads(path.read_text())
        if data.get("format") == TABLE_FORMAT and data.get("key") == key and isinstance(data.get("lineage"), str):
            entries = {sig: [float(t) for t in times] for sig, times in data["entries"].items()}
            return LatencyTable(key, entries, list(data["profiled"]), data["lineage"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    return None


def table_lineage(cache_root: Path, key: dict[str, Any]) -> str:
    """The lineage of the table stored for ``key`` under ``cache_root``; when none is stored (or it is unreadable or of
    an older format), an empty table with a new lineage is stored first, so the build that fills it keeps its id.
    Two builds creating it at once agree: the first file linked into place wins."""
    path = table_path(cache_root, key)
    table = stored_table(path, key)
    if table is not None:
        return table.lineage
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = LatencyTable(key)
    staging = path.with_name(f".{path.name}.{fresh.lineage}.new")
    write_json_atomic(staging, fresh.to_dict())
    try:
        if path.exists():  # a damaged or older table: replaced by the fresh one
            os.replace(staging, path)
            return fresh.lineage
        os.link(staging, path)
    except FileExistsError:
        pass
    finally:
        staging.unlink(missing_ok=True)
    table = stored_table(path, key)
    return table.lineage if table is not None else fresh.lineage


def store_table(cache_root: Path | None, table: LatencyTable) -> None:
    """Write ``table`` into the cache folder (atomically: concurrent builds never read half a table)."""
    if cache_root is not None:
        path = table_path(cache_root, table.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, table.to_dict())
