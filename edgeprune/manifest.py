"""manifest.json: everything a release job or a device app needs to know about a build.

A manifest records what is needed to reproduce the build (the resolved profile,
the seed, tool versions, hashes of the weights, data and model code) and what was
measured. Two builds from the same inputs on the same kind of machine give the
same manifest except for the ``VOLATILE_FIELDS`` (timestamps, wall-clock times,
cache history and benchmark measurements); ``content_sha256`` hashes the rest.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from edgeprune.artifact_facts import artifact_facts
from edgeprune.artifacts import Artifact, sha256_of
from edgeprune.config import BuildConfig
from edgeprune.data import EXAMPLE_DATA, Dataset
from edgeprune.stages.base import PipelineResult
from edgeprune.versions import tool_versions

MANIFEST_VERSION = 3  # 2: reproducibility inputs, content_sha256, volatile fields; 3: figures read from the shipped files
# Which process a benchmark's memory figures belong to: the runner that loaded and ran the artefact, never the build.
MEMORY_SCOPE = "benchmark runner process (loads and runs only this artefact), not the build"
# Fields that differ between two builds of the same inputs: when and how long it ran,
# whether a stage came from the cache and why it ran, and every benchmark measurement
# (latency, memory, speed-ups, and the budget verdicts that follow from them).
# "*" matches every key of a table or every item of a list.
VOLATILE_FIELDS = (
    "created_at",
    "content_sha256",
    "stages.*.seconds",
    "stages.*.cached",
    "stages.*.reason",
    "stages.*.metrics.results",
    "stages.*.metrics.speedups",
    "stages.*.metrics.parity_on_device.*.seconds",
    "artifacts.*.parity_on_device.*.seconds",
    "stages.*.metrics.dependency_analysis.seconds",
    "artifacts.*.benchmark",
    "parity_data.path",
    "speedups",
    "primary_selection",
    "stages.*.metrics.primary_selection",
    "budgets.violations",
    "budgets.passed",
)
SHIPPED = {  # artefact name in the pipeline -> file name in the output folder
    "model": "model.pt",
    "onnx_fp32": "model_fp32.onnx",
    "onnx_int8": "model_int8.onnx",
    "onnx_fp16": "model_fp16.onnx",
    "tflite_fp32": "model_fp32.tflite",
    "tflite_int8": "model_int8.tflite",
    "pte_fp32": "model_fp32.pte",
    "pte_int8": "model_int8.pte",
}


def primary_artifact(config: BuildConfig, benchmark: dict[str, Any] | None = None) -> str:
    """The artefact the target ships to its device: first export format, target precision (the PyTorch model file
    when the profile exports nothing); with ``quantize.select = "fastest"``, the file the benchmark chose."""
    selection = (benchmark or {}).get("primary_selection")
    if selection:
        return selection["selected"]
    if not config.export.formats:
        return "model"
    precision = "fp32" if config.quantize.scheme == "none" else config.quantize.scheme
    return f"{config.export.formats[0]}_{precision}"


def make_manifest(config: BuildConfig, dataset: Dataset, result: PipelineResult, shipped: dict[str, Artifact]) -> dict[str, Any]:
    stages = {record.name: record for record in result.records}
    benchmark = stages["benchmark"].metrics if "benchmark" in stages else {}
    primary = primary_artifact(config, benchmark)
    artifacts = {name: describe_artifact(artifact, benchmark) for name, artifact in shipped.items()}  # read from the files
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "target": config.name,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "primary_artifact": primary,
        **({"primary_selection": benchmark["primary_selection"]} if "primary_selection" in benchmark else {}),
        "artifacts": artifacts,
        "accuracy": accuracy_summary(stages, artifacts, primary),
        "model": model_summary(stages, artifacts),
        "speedups": benchmark.get("speedups", {}),
        "benchmark_device": benchmark.get("device"),
        "benchmark_emulated": benchmark.get("emulated"),
        "preprocessing": preprocessing(config, dataset),
        "inputs": input_hashes(config, dataset),
        "parity_data": parity_data(config, dataset),
        "stages": [stage_entry(record) for record in result.records],
        "config": config.to_dict(),
        "profile_sha256": _json_sha256(config.to_dict()),
        "seed": config.seed,
        "tools": tool_versions(),
        "environment": {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()},
        "volatile_fields": list(VOLATILE_FIELDS),
    }
    return manifest


def seal(manifest: dict[str, Any]) -> dict[str, Any]:
    """Add ``content_sha256``: the hash of everything but the volatile fields. Call last."""
    manifest["content_sha256"] = content_sha256(manifest)
    return manifest


def content_sha256(manifest: dict[str, Any]) -> str:
    return _json_sha256(strip_volatile(manifest))


def strip_volatile(manifest: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``manifest`` without the ``VOLATILE_FIELDS``: what a rebuild must reproduce."""
    stripped = copy.deepcopy(manifest)
    for pattern in VOLATILE_FIELDS:
        _drop(stripped, pattern.split("."))
    return stripped


def _drop(node: Any, path: list[str]) -> None:
    head, rest = path[0], path[1:]
    if head == "*":
        children = list(node.values()) if isinstance(node, dict) else node if isinstance(node, list) else []
    elif isinstance(node, dict) and head in node:
        if not rest:
            del node[head]
            return
        children = [node[head]]
    else:
        return
    for child in children:
        if rest:
            _drop(child, rest)


def _json_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def input_hashes(config: BuildConfig, dataset: Dataset) -> dict[str, Any]:
    """What went in, by content: the weights file, the data (file and preprocessed arrays), the model code."""
    weights = Path(config.model.weights) if config.model.weights else None
    return {
        "model_source": config.model.source,
        "model_source_sha256": _module_file_sha256(config.model.source),
        "weights": config.model.weights,
        "weights_sha256": sha256_of(weights) if weights and weights.is_file() else None,
        "data_source": config.data.source,
        "data_sha256": _data_file_sha256(config.data.source),
        "data_fingerprint": dataset.fingerprint,
    }


def _data_file_sha256(source: str) -> str | None:
    path = EXAMPLE_DATA if source == "example" else Path(source)
    if path.suffix == ".npz" and path.is_file():
        return sha256_of(path)
    return _module_file_sha256(source)


def _module_file_sha256(source: str) -> str | None:
    """The hash of the Python file defining ``module:function`` (bundled examples: None, see tools)."""
    if ":" not in source or source.startswith("example:"):
        return None
    module_name = source.partition(":")[0]
    module = sys.modules.get(module_name)
    origin = getattr(module, "__file__", None)
    if origin is None:
        try:
            spec = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            return None
        origin = spec.origin if spec else None
    return sha256_of(Path(origin)) if origin and Path(origin).is_file() else None


def describe_artifact(artifact: Artifact, benchmark: dict[str, Any]) -> dict[str, Any]:
    """The manifest entry of a shipped file: what its stages measured (accuracy, parity, budget, ...), then every
    figure derivable from the file itself (``artifact_facts``), which wins over a stage's figure of the same name."""
    facts = artifact_facts(artifact.path, artifact.kind)
    entry = {"file": artifact.path.name, "kind": artifact.kind, **artifact.meta, **facts}
    measured = benchmark.get("results", {}).get(artifact.name)
    if measured is not None:  # without the cache path the runner measured, which means nothing to a reader
        entry["benchmark"] = {key: value for key, value in measured.items() if key != "artifact"}
        entry["benchmark"]["memory_measured_in"] = MEMORY_SCOPE
    on_device = benchmark.get("parity_on_device", {}).get(artifact.name)
    if on_device is not None:  # keyed by device: the same artefact's parity on each device it ran on
        entry["parity_on_device"] = {benchmark["device"]: on_device}
    return entry


def accuracy_summary(stages: dict[str, Any], artifacts: dict[str, Any], primary: str) -> dict[str, Any]:
    """Top-1 (percent, real test split) after every stage and of every artefact."""
    summary: dict[str, Any] = {"after_stage": {}}
    for name, record in stages.items():
        if "accuracy" in record.metrics:
            summary["after_stage"][name] = record.metrics["accuracy"]
    summary["artifacts"] = {name: entry["accuracy"] for name, entry in artifacts.items() if "accuracy" in entry}
    baseline = summary["after_stage"].get("baseline")
    summary["baseline"] = baseline
    summary["primary"] = summary["artifacts"].get(primary)
    if baseline is not None and summary["primary"] is not None:
        summary["drop"] = baseline - summary["primary"]
    return summary


def left_unpruned(prune_metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Every layer group structured pruning left at full width, with its reason: coupled through a channel-mixing
    op (the dependency analysis), too narrow for ``round_to``, or breaking the model when pruned (each step's checks)."""
    return [
        *prune_metrics.get("dependency_analysis", {}).get("kept_whole", []),
        *prune_metrics.get("kept_whole_by_rounding", []),
        *prune_metrics.get("untracked_coupling", []),
    ]


def model_summary(stages: dict[str, Any], artifacts: dict[str, Any]) -> dict[str, Any]:
    """The shipped PyTorch model's figures, read from model.pt (``model_facts``), beside the unpruned baseline's
    (``macs_dense``/``params_dense``, the baseline stage's own figures) and the dense widths before pruning."""
    baseline = stages["baseline"].metrics
    summary = {"macs_dense": baseline["macs"], "params_dense": baseline["params"]}
    if "model" not in artifacts:
        return {**summary, "macs": baseline["macs"], "params": baseline["params"]}
    summary.update(model_facts(artifacts["model"]))
    pruned = stages.get("prune_structured")
    if pruned is not None:
        summary["channels"] = channel_rows(pruned.metrics["layers"], summary["widths"])
        summary["left_unpruned"] = left_unpruned(pruned.metrics)
    if "checkpoint" in baseline:
        summary["checkpoint"] = baseline["checkpoint"]
    return summary


def model_facts(entry: dict[str, Any]) -> dict[str, Any]:
    """The torch-side figures of model.pt's manifest entry, as ``manifest["model"]`` states them."""
    weights = entry["weights"]
    facts = {key: entry[key] for key in ("macs", "params", "widths", "blocks_removed")}
    return {**facts, "global_sparsity": weights["global_sparsity"], "sparsity": weights["sparsity"]}


def channel_rows(dense_layers: list[dict[str, Any]], widths: dict[str, int]) -> list[dict[str, Any]]:
    """Channels per layer before pruning (the structured stage's figure) and in the shipped model (0: removed)."""
    return [
        {"layer": row["layer"], "channels_before": row["channels_before"], "channels_after": widths.get(row["layer"], 0)}
        for row in dense_layers
    ]


def parity_data(config: BuildConfig, dataset: Dataset) -> dict[str, Any]:
    """Where the test split the parity checks ran on comes from, so ``edgeprune verify --parity`` can find it again:
    the source as given, the absolute path of a data file (volatile: it differs between machines), the
    preprocessing (``config.data``) and the fingerprint of the preprocessed arrays."""
    source = config.data.source
    path = Path(source)
    return {
        "source": source,
        "path": str(path.resolve()) if source != "example" and path.is_file() else None,
        "config": config.to_dict()["data"],
        "num_classes": config.model.num_classes,
        "fingerprint": dataset.fingerprint,
        "test_images": int(len(dataset.x_test)),
    }


def preprocessing(config: BuildConfig, dataset: Dataset) -> dict[str, Any]:
    """What a device app must do to a raw image before feeding the model."""
    return {
        "formula": "input = (pixel * scale - mean[c]) / std[c]",
        "layout": "NCHW",
        "input_shape": [1, *dataset.input_shape],
        "scale": config.data.scale,
        "mean": list(config.data.mean),
        "std": list(config.data.std),
    }


def stage_entry(record) -> dict[str, Any]:
    return {
        "name": record.name,
        "version": record.version,
        "cache_key": record.key,
        "cached": record.cached,
        "reason": record.reason,
        "seconds": round(record.seconds, 3),
        "metrics": record.metrics,
    }
