"""The one entry point for the CLI and for library users.

``build`` resolves a target's configuration, runs the cached pipeline and
swaps a complete output folder (artefacts, manifest.json, report.md,
report.html, plots/) into place; a failed or interrupted build leaves the
previous output untouched. ``build_matrix`` builds several targets in one call,
as one task each through an executor (this process, or Ray tasks), sharing every
stage they have in common through the cache. ``analyze`` runs the sensitivity
analysis (``edgeprune.analysis``); ``diff`` compares two builds' manifests;
``bench`` measures one artefact.

What a configuration is resolved from, besides the target, is one typed value,
``BuildInputs``: every entry point takes its keys as keyword arguments.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from edgeprune import executors
from edgeprune.artifacts import MANIFEST, Artifact, copy_into, staged_directory, write_bytes_atomic, write_json_atomic
from edgeprune.budgets import Violation, check_budgets, exit_code, unchecked_budgets
from edgeprune.cache import Cache
from edgeprune.config import BuildConfig
from edgeprune.data import Dataset, load_dataset
from edgeprune.diff import ManifestDiff, Thresholds, diff_manifests
from edgeprune.errors import ConfigError, EdgepruneError, InputError
from edgeprune.html_report import html_report
from edgeprune.library_output import build_log
from edgeprune.manifest import SHIPPED, make_manifest, seal
from edgeprune.plots import INDEX, plots_index, plots_key, render_plots, reuse_plots
from edgeprune.progress import Reporter
from edgeprune.report import PLOTS_DIR, markdown_report
from edgeprune.runtimes import BenchSettings, benchmark
from edgeprune.runtimes.device_locks import DeviceSerializedCache
from edgeprune.stages.base import PipelineResult
from edgeprune.targets import TargetInfo, list_targets, resolve_config
from edgeprune.verify import Verification, check_output, verify_output

if TYPE_CHECKING:
    from edgeprune.analysis import SensitivityResult

DEFAULT_CACHE = ".edgeprune-cache"


class BuildInputs(TypedDict, total=False):
    """What a target's configuration is resolved from, besides the target itself (every key optional).

    ``project_file``: a project TOML (default ``./edgeprune.toml`` when present); ``overrides``:
    ``section.key=value`` settings, applied last; ``model``: ``package.module:factory`` or
    ``example:NAME``; ``weights``: a checkpoint; ``data``: a ``.npz`` or ``module:function``;
    ``trust_checkpoint``: allow a checkpoint holding pickled objects.
    """

    project_file: Path | None
    overrides: tuple[str, ...]
    model: str | None
    weights: str | None
    data: str | None
    trust_checkpoint: bool


@dataclass
class BuildResult:
    target: str
    out: Path
    manifest: dict[str, Any]
    violations: list[Violation] = field(default_factory=list)


@dataclass
class MatrixResult:
    """The builds of a matrix in order, and the targets that failed (target name -> error)."""

    builds: list[BuildResult] = field(default_factory=list)
    failures: dict[str, EdgepruneError] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        """The worst outcome: a failed target's error code, else the budget code of every violation together."""
        if self.failures:
            return max(error.exit_code for error in self.failures.values())
        return exit_code(violation for build in self.builds for violation in build.violations)


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGEPRUNE_CACHE_DIR", DEFAULT_CACHE))


def targets() -> list[TargetInfo]:
    """The bundled target profiles."""
    return list_targets()


def resolve(target: str, **inputs: Unpack[BuildInputs]) -> BuildConfig:
    """The validated configuration a build of ``target`` would use."""
    extra: dict[str, Any] = {}
    if inputs.get("model"):
        extra.setdefault("model", {})["source"] = inputs["model"]
    if inputs.get("weights"):
        extra.setdefault("model", {})["weights"] = inputs["weights"]
    if inputs.get("trust_checkpoint"):
        extra.setdefault("model", {})["trust_checkpoint"] = True
    if inputs.get("data"):
        extra.setdefault("data", {})["source"] = inputs["data"]
    return resolve_config(target, inputs.get("project_file"), tuple(inputs.get("overrides", ())), extra)


def build(
    target: str,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    **inputs: Unpack[BuildInputs],
) -> BuildResult:
    """Build one target. Raises EdgepruneError subclasses for user-facing failures.

    Budget violations do not raise: they are in ``BuildResult.violations`` and
    in the manifest, and the caller decides (the CLI exits non-zero).
    """
    return build_config(resolve(target, **inputs), out=out, cache_dir=cache_dir, force=force, reporter=reporter)


def build_matrix(
    targets: list[str],
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    **inputs: Unpack[BuildInputs],
) -> MatrixResult:
    """Build several targets, in order, each into ``<out or dist>/<name>``.

    Every configuration is resolved first, so a bad one fails before any work
    (ConfigError). Stages with the same inputs and settings (typically the
    baseline, pruning and finetuning) run once and are served from the cache
    to the other targets. A target that fails does not stop the others: its
    error is in ``MatrixResult.failures``. ``executor="ray"`` (optionally with
    ``ray_address``) runs the targets as Ray tasks sharing the cache folder.
    """
    configs = [resolve(target, **inputs) for target in targets]
    outs = [Path(out or "dist") / config.name for config in configs]
    for index, folder in enumerate(outs):
        if folder in outs[:index]:
            raise ConfigError(
                f"targets '{targets[outs.index(folder)]}' and '{targets[index]}' are both named '{configs[index].name}' "
                f"and would both write {folder}: give one profile another name"
            )
    with executors.open_executor(executor, ray_address) as runner:
        root, cache = Path(out or "dist"), Path(cache_dir or default_cache_dir())
        return build_configs(configs, runner, root, cache, force=force, reporter=reporter)


@dataclass(frozen=True)
class TargetBuild:
    """One target of a matrix, as shipped to a task: plain, picklable data."""

    config: BuildConfig
    out: Path
    cache_dir: Path
    force: bool = False
    verbosity: int = 1


def build_configs(
    configs: list[BuildConfig],
    executor: executors.Executor,
    out_root: Path,
    cache_dir: Path,
    *,
    force: bool = False,
    reporter: Reporter | None = None,
) -> MatrixResult:
    """Build every config into ``out_root/<name>`` as one call of ``build_target`` each through ``executor``, sharing
    ``cache_dir``: whose per-entry locks mean a stage the targets have in common is computed once and served from the
    cache to the others, and whose per-device locks make benchmarks on one device take turns.

    A target that fails does not stop the others: its error is in ``MatrixResult.failures`` under the target's name.
    Configs are resolved and checked by the caller. In this process the targets share the caller's reporter and
    each dataset is loaded once.
    """
    reporter = reporter or Reporter()
    jobs = [TargetBuild(config, Path(out_root) / config.name, Path(cache_dir), force, reporter.verbosity) for config in configs]
    in_process = executor.name == "local"
    task = functools.partial(build_target, reporter=reporter, datasets={}) if in_process else build_target
    matrix = MatrixResult()
    for job, outcome in zip(jobs, executor.map(task, jobs), strict=True):
        if isinstance(outcome, EdgepruneError):
            matrix.failures[job.config.name] = outcome
            reporter.warn(f"[{job.config.name}] build failed: {outcome}")
        elif isinstance(outcome, Exception):
            raise outcome  # a bug: its traceback matters more than the other targets
        else:
            matrix.builds.append(outcome)
    return matrix


def build_target(job: TargetBuild, reporter: Reporter | None = None, datasets: dict[str, Dataset] | None = None) -> BuildResult:
    """Build one resolved target of a matrix, its benchmark under its device's lock (``datasets``: loaded ones, by data key)."""
    config = job.config
    key = repr((config.data, config.model.num_classes))
    cache = DeviceSerializedCache(job.cache_dir, config.benchmark.device)
    check_writable(job.out)
    datasets = {} if datasets is None else datasets
    if key not in datasets:
        datasets[key] = load_dataset(config.data, config.model.num_classes)
    return _build_into(config, job.out, cache, reporter or Reporter(verbosity=job.verbosity), datasets[key], job.force)


def analyze(
    target: str,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    ratios: tuple[float, ...] | None = None,
    reporter: Reporter | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    force: bool = False,
    **inputs: Unpack[BuildInputs],
) -> SensitivityResult:
    """Sensitivity analysis of ``target``'s model: each prunable layer group pruned alone at ``ratios``,
    top-1 and p50 measured on the target's runtime; writes sensitivity.json/.md/.png into
    ``out`` (default ``dist/<target>-analysis``). ``prune.ratios_from`` in a later build reads the JSON.
    ``executor="ray"`` runs the groups as Ray tasks sharing the cache folder.
    """
    # Imported on use: the analysis imports torch, and importing edgeprune (the CLI's start-up) must not.
    from edgeprune.analysis import DEFAULT_RATIOS, run_analysis

    config = resolve(target, **inputs)
    folder = Path(out) if out is not None else Path("dist") / f"{config.name}-analysis"
    check_writable(folder)
    with executors.open_executor(executor, ray_address) as runner:
        return run_analysis(
            config,
            out=folder,
            cache_dir=Path(cache_dir or default_cache_dir()),
            ratios=tuple(ratios or DEFAULT_RATIOS),
            reporter=reporter,
            executor=runner,
            force=force,
        )


def inspect(config: BuildConfig, *, reporter: Reporter | None = None, timeout_s: float = 300.0) -> dict[str, Any]:
    """What ``edgeprune inspect`` reports for ``config``'s model and checkpoint (see ``edgeprune.inspection``)."""
    # Imported on use: the inspection imports torch, and importing edgeprune (the CLI's start-up) must not.
    from edgeprune.inspection import inspect_model

    dataset = load_dataset(config.data, config.model.num_classes)
    return inspect_model(config, dataset, reporter or Reporter(verbosity=0), timeout_s)


def build_config(
    config: BuildConfig,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build one resolved configuration."""
    out = Path(out) if out is not None else Path("dist") / config.name
    check_writable(out)
    cache = Cache(cache_dir or default_cache_dir())
    return _build_into(config, out, cache, reporter or Reporter(), load_dataset(config.data, config.model.num_classes), force)


def _build_into(config: BuildConfig, out: Path, cache: Cache, reporter: Reporter, dataset: Dataset, force: bool) -> BuildResult:
    """Run the pipeline and write the output folder, under the folder's lock (two builds into one folder are serialized),
    other libraries' output going to the build log beside it."""
    # Imported on use: the pipeline imports the stages and torch, and importing edgeprune (the CLI's start-up) must not.
    from edgeprune.pipeline import run_pipeline

    with cache.lock(f"out:{out.resolve()}"), build_log(out, reporter):
        result = run_pipeline(config, dataset, cache, reporter, force=force)
        manifest, violations = write_output(config, dataset, result, out)
    return BuildResult(config.name, out, manifest, violations)


def write_output(config: BuildConfig, dataset: Dataset, result: PipelineResult, out: Path) -> tuple[dict[str, Any], list[Violation]]:
    """Copy the shipped artefacts, then write manifest.json, report.md, report.html and plots/, all swapped in at once."""
    with staged_directory(out) as staging:
        shipped: dict[str, Artifact] = {}
        for name, filename in SHIPPED.items():
            if name in result.artifacts:
                shipped[name] = copy_into(result.artifacts[name], staging, filename)
        manifest = make_manifest(config, dataset, result, shipped)
        violations = check_budgets(config.budgets, manifest)
        limits = config.to_dict()["budgets"]
        manifest["budgets"] = {"limits": limits, "violations": [v.to_dict() for v in violations], "passed": not violations}
        manifest["budgets"]["unchecked"] = unchecked_budgets(config.budgets, manifest)
        write_json_atomic(staging / MANIFEST, seal(manifest))
        write_reports(manifest, staging, previous=out)
        check_output(staging)  # never publish a manifest its files contradict
    return manifest, violations


def write_reports(manifest: dict[str, Any], folder: Path, previous: Path | None = None) -> None:
    """report.md, report.html and plots/ into ``folder``; plots drawn from the same figures are reused from ``previous``."""
    key = plots_key(manifest)
    plots = (reuse_plots(previous / PLOTS_DIR, key) if previous else None) or render_plots(manifest)
    (folder / PLOTS_DIR).mkdir(exist_ok=True)
    for plot in plots:
        write_bytes_atomic(folder / PLOTS_DIR / f"{plot.name}.png", plot.png)
    write_json_atomic(folder / PLOTS_DIR / INDEX, plots_index(key, plots))
    write_bytes_atomic(folder / "report.md", markdown_report(manifest, [(plot.name, plot.title) for plot in plots]).encode())
    write_bytes_atomic(folder / "report.html", html_report(manifest, plots).encode())


def check_writable(out: Path) -> None:
    """Fail early, before any work, when the output folder cannot be written."""
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise EdgepruneError(f"output folder {out} is not writable (choose another with --out)")
    if out.exists() and not out.is_dir():
        raise EdgepruneError(f"output path {out} exists and is not a folder")


def diff(old: Path, new: Path, thresholds: Thresholds | None = None) -> ManifestDiff:
    """Compare two builds' manifests (files or output folders); see ``edgeprune.diff``."""
    return diff_manifests(Path(old), Path(new), thresholds or Thresholds())


def verify(folder: Path, *, parity: bool = False, data: Path | None = None) -> Verification:
    """Derive every figure an output folder's manifest states about its files again and compare (``edgeprune.verify``)."""
    return verify_output(Path(folder), parity=parity, data=Path(data) if data is not None else None)


def bench(
    artifact: Path,
    device: str = "local",
    threads: int = 2,
    iterations: int = 50,
    repeats: int = 3,
    warmup: int = 10,
    shapes: tuple[str, ...] = (),
    max_spread_pct: float = 0.0,
) -> dict[str, Any]:
    """Benchmark one artefact on one device; returns the runner's figures. ``shapes`` (``INPUT=1,3,224,224``)
    fix dynamic input dimensions; above ``max_spread_pct`` (0: never) more repeats are taken (see BenchSettings)."""
    if not Path(artifact).is_file():
        raise InputError(f"artefact not found: {artifact}")
    settings = BenchSettings(
        threads=threads, warmup=warmup, iterations=iterations, repeats=repeats, input_shapes=shapes, max_spread_pct=max_spread_pct
    )
    return benchmark(Path(artifact), device, settings).to_dict()
