"""The ordered plan for a target, the cached runner and the cache keys.

The stage contract (``Stage``, ``StageContext``, ``StageOutput``) is in
``edgeprune.stages.base``. A stage's cache key is (name, version, its config
sections, the hashes of what it consumes, the data fingerprint and
preprocessing, the seed, tool versions, its ``fingerprint``, torch's
thread count when it ``trains``, and its ``shared_inputs``: what it reuses
from the cache folder across builds, e.g. a latency table's identity).

A stage's files only become a cache entry when it returns: Ctrl-C, SIGTERM
(see ``edgeprune.interrupts``), a full disk or a crash leave no entry behind,
so a rerun resumes after the last stage that finished.
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

import torch

from edgeprune import interrupts
from edgeprune.artifacts import Artifact, write_error
from edgeprune.cache import Cache, cache_key
from edgeprune.config import BuildConfig
from edgeprune.data import Dataset
from edgeprune.primary_selection import check_selectable
from edgeprune.progress import Reporter
from edgeprune.stages.base import PipelineResult, Stage, StageContext, StageOutput, StageRecord
from edgeprune.stages.baseline import Baseline
from edgeprune.stages.benchmark import Benchmark
from edgeprune.stages.export_onnx import ExportOnnx
from edgeprune.stages.export_pte import ExportPte
from edgeprune.stages.export_tflite import ExportTflite
from edgeprune.stages.finetune import Finetune
from edgeprune.stages.prune_structured import PruneStructured
from edgeprune.stages.prune_unstructured import PruneUnstructured
from edgeprune.stages.quantize import Quantize
from edgeprune.versions import tool_versions


def plan_for(config: BuildConfig) -> list[Stage]:
    """The ordered stages a target's config asks for."""
    plan: list[Stage] = [Baseline()]
    if config.prune.mode in ("structured", "both"):
        plan.append(PruneStructured())
    if config.prune.mode in ("unstructured", "both"):
        plan.append(PruneUnstructured())
    if config.prune.mode != "none" and config.finetune.epochs > 0:
        plan.append(Finetune())
    if "onnx" in config.export.formats:
        plan.append(ExportOnnx())
    if "tflite" in config.export.formats:
        plan.append(ExportTflite())
    if "pte" in config.export.formats:
        plan.append(ExportPte.checked(config))  # a missing extra fails here, before any stage runs
    if config.quantize.scheme != "none":
        plan.append(Quantize())
    check_selectable(config)  # quantize.select = "fastest" measures: fails here, before any stage runs
    if config.benchmark.enabled:
        plan.append(Benchmark())
    return plan


def key_components(
    stage: Stage, config: BuildConfig, dataset: Dataset, inputs: dict[str, Artifact], cache_root: Path | None = None
) -> dict[str, Any]:
    sections = config.to_dict()
    # What a stage reuses from the cache folder across builds (a speed-up search's latency table) joins its key.
    shared = stage.shared_inputs(config, cache_root) if hasattr(stage, "shared_inputs") else {}
    return {
        "stage": stage.name,
        "version": stage.version,
        "config": {section: sections[section] for section in stage.sections},
        "inputs": {name: inputs[name].sha256 for name in stage.consumes if name in inputs},
        "data": {"fingerprint": dataset.fingerprint, "preprocessing": sections["data"]},
        "seed": config.seed,
        "extra": stage.fingerprint(config),
        "tools": tool_versions(),
        # Training with 1 or 2 intra-op threads sums in another order: other weights, so another cache entry.
        **({"torch_threads": torch.get_num_threads()} if stage.trains else {}),
        **({"shared": shared} if shared else {}),
    }


def run_pipeline(
    config: BuildConfig,
    dataset: Dataset,
    cache: Cache,
    reporter: Reporter,
    force: bool = False,
    scope: str = "",
) -> PipelineResult:
    """Run (or reuse from the cache) every stage of the plan, in order.

    SIGTERM raises ``interrupts.Interrupted`` (a KeyboardInterrupt) meanwhile, so
    a terminated build cleans up like a Ctrl-C'd one.
    """
    artifacts: dict[str, Artifact] = {}
    records: list[StageRecord] = []
    with interrupts.interruptible():
        for stage in plan_for(config):
            record, produced = _run_stage(stage, config, dataset, artifacts, cache, reporter, force, scope or config.name)
            artifacts.update({artifact.name: artifact for artifact in produced})
            records.append(record)
    return PipelineResult(records, artifacts)


# A stage failing to write for one of these reasons is the machine's state, not a bug.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def _run_stage(stage, config, dataset, artifacts, cache, reporter, force, scope):
    components = key_components(stage, config, dataset, artifacts, cache.root)
    key = cache_key(components)
    started = time.perf_counter()
    with cache.entry_lock(stage.name, key):  # two builds never compute the same entry at once
        stored = None if force else cache.lookup(stage.name, key)
        if stored is not None:
            produced = [Artifact.from_dict(item, cache.entry(stage.name, key)) for item in stored["artifacts"]]
            seconds = time.perf_counter() - started
            reporter.stage(config.name, stage.name, "cached", seconds)
            cache.remember(scope, stage.name, components)
            names = tuple(a.name for a in produced)
            return StageRecord(stage.name, stage.version, key, True, "unchanged", seconds, stored["metrics"], names), produced
        reason = _why_it_runs(stage, key, components, cache, force, scope)
        reporter.info(f"[{config.name}] {stage.name:<18} run    ({reason})")
        with cache.new_entry(stage.name, key) as workdir:
            output = _run_in(stage, StageContext(config, dataset, dict(artifacts), workdir, reporter, key, cache.root))
            stored_artifacts = [artifact.to_dict(relative_to=workdir) for artifact in output.artifacts]
            cache.publish_result(workdir, {"artifacts": stored_artifacts, "metrics": output.metrics, "key": components})
        entry = cache.entry(stage.name, key)
        produced = [Artifact.from_dict(item, entry) for item in stored_artifacts]
    seconds = time.perf_counter() - started
    reporter.stage(config.name, stage.name, "done", seconds)
    cache.remember(scope, stage.name, components)
    return StageRecord(stage.name, stage.version, key, False, reason, seconds, output.metrics, tuple(a.name for a in produced)), produced


def _why_it_runs(stage, key, components, cache, force, scope) -> str:
    if force:
        return "--force"
    if cache.entry(stage.name, key).exists():
        return "cache entry damaged"
    return cache.explain(scope, stage.name, components)


def _run_in(stage: Stage, context: StageContext) -> StageOutput:
    """``stage.run``, with a failed write (disk full, read-only, ...) as one clear line."""
    try:
        return stage.run(context)
    except OSError as error:
        if error.errno not in WRITE_ERRNOS:
            raise
        raise write_error(error, Path(error.filename or context.workdir)) from error
