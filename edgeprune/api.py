"""The one entry point for the CLI and for library users.

``build`` resolves a target's configuration, runs the cached pipeline and
swaps a complete output folder (artefacts, manifest.json, report.md,
report.html, plots/) into place; a failed or interrupted build leaves the
previous output untouched. ``build_matrix`` builds several targets in one call,
sharing every stage they have in common through the cache. ``diff`` compares
two builds' manifests.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgeprune.artifacts import MANIFEST, Artifact, copy_into, staged_directory, write_bytes_atomic, write_json_atomic
from edgeprune.budgets import Violation, check_budgets, exit_code
from edgeprune.config import BuildConfig
from edgeprune.errors import ConfigError, EdgepruneError
from edgeprune.progress import Reporter
from edgeprune.targets import TargetInfo, list_targets, resolve_config

if TYPE_CHECKING:
    from edgeprune.data import Dataset
    from edgeprune.diff import ManifestDiff, Thresholds
    from edgeprune.sensitivity import SensitivityResult
    from edgeprune.verify import Verification

DEFAULT_CACHE = ".edgeprune-cache"


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


def resolve(
    target: str,
    project_file: Path | None = None,
    overrides: tuple[str, ...] = (),
    model: str | None = None,
    weights: str | None = None,
    data: str | None = None,
    trust_checkpoint: bool = False,
) -> BuildConfig:
    """The validated configuration a build of ``target`` would use."""
    extra: dict[str, Any] = {}
    if model:
        extra.setdefault("model", {})["source"] = model
    if weights:
        extra.setdefault("model", {})["weights"] = weights
    if trust_checkpoint:
        extra.setdefault("model", {})["trust_checkpoint"] = True
    if data:
        extra.setdefault("data", {})["source"] = data
    return resolve_config(target, project_file, overrides, extra)


def build(
    target: str,
    *,
    project_file: Path | None = None,
    overrides: tuple[str, ...] = (),
    model: str | None = None,
    weights: str | None = None,
    data: str | None = None,
    trust_checkpoint: bool = False,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
) -> BuildResult:
    """Build one target. Raises EdgepruneError subclasses for user-facing failures.

    Budget violations do not raise: they are in ``BuildResult.violations`` and
    in the manifest, and the caller decides (the CLI exits non-zero).
    """
    config = resolve(target, project_file, overrides, model, weights, data, trust_checkpoint)
    return build_config(config, out=out, cache_dir=cache_dir, force=force, reporter=reporter)


def build_matrix(
    targets: list[str],
    *,
    project_file: Path | None = None,
    overrides: tuple[str, ...] = (),
    model: str | None = None,
    weights: str | None = None,
    data: str | None = None,
    trust_checkpoint: bool = False,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    executor: str = "local",
    ray_address: str | None = None,
) -> MatrixResult:
    """Build several targets, in order, each into ``<out or dist>/<name>``.

    Every configuration is resolved first, so a bad one fails before any work
    (ConfigError). Stages with the same inputs and settings (typically the
    baseline, pruning and finetuning) run once and are served from the cache
    to the other targets. A target that fails does not stop the others: its
    error is in ``MatrixResult.failures``. ``executor="ray"`` (optionally with
    ``ray_address``) runs the targets as Ray tasks sharing the cache folder.
    """
    configs = [resolve(target, project_file, overrides, model, weights, data, trust_checkpoint) for target in targets]
    outs = [Path(out or "dist") / config.name for config in configs]
    for index, folder in enumerate(outs):
        if folder in outs[:index]:
            raise ConfigError(
                f"targets '{targets[outs.index(folder)]}' and '{targets[index]}' are both named '{configs[index].name}' "
                f"and would both write {folder}: give one profile another name"
            )
    if executor != "local" or ray_address:
        from edgeprune import executors

        with executors.open_executor(executor, ray_address) as runner:
            root, cache = Path(out or "dist"), Path(cache_dir or default_cache_dir())
            return executors.build_matrix(configs, runner, root, cache, force=force, reporter=reporter)
    result, datasets = MatrixResult(), {}
    for config, folder in zip(configs, outs, strict=True):
        try:
            key = _data_key(config)
            if key not in datasets:
                datasets[key] = _load_data(config)
            result.builds.append(
                build_config(config, out=folder, cache_dir=cache_dir, force=force, reporter=reporter, dataset=datasets[key])
            )
        except EdgepruneError as error:
            result.failures[config.name] = error
            (reporter or Reporter()).warn(f"[{config.name}] build failed: {error}")
    return result


def analyze(
    target: str,
    *,
    project_file: Path | None = None,
    overrides: tuple[str, ...] = (),
    model: str | None = None,
    weights: str | None = None,
    data: str | None = None,
    trust_checkpoint: bool = False,
    out: Path | None = None,
    cache_dir: Path | None = None,
    ratios: tuple[float, ...] | None = None,
    reporter: Reporter | None = None,
    executor: str = "local",
    ray_address: str | None = None,
    force: bool = False,
) -> SensitivityResult:
    """Sensitivity analysis of ``target``'s model: each prunable layer group pruned alone at ``ratios``,
    top-1 and p50 measured on the target's runtime; writes sensitivity.json/.md/.png into
    ``out`` (default ``dist/<target>-analysis``). ``prune.ratios_from`` in a later build reads the JSON.
    ``executor="ray"`` runs the groups as Ray tasks sharing the cache folder.
    """
    from edgeprune import executors
    from edgeprune.sensitivity import DEFAULT_RATIOS, run_analysis

    config = resolve(target, project_file, overrides, model, weights, data, trust_checkpoint)
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
    from edgeprune.inspection import inspect_model

    return inspect_model(config, _load_data(config), reporter or Reporter(verbosity=0), timeout_s)


def _data_key(config: BuildConfig) -> str:
    return repr((config.data, config.model.num_classes))


def _load_data(config: BuildConfig) -> Dataset:
    from edgeprune.data import load_dataset

    return load_dataset(config.data, config.model.num_classes)


def build_config(
    config: BuildConfig,
    *,
    out: Path | None = None,
    cache_dir: Path | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
) -> BuildResult:
    """Build one resolved configuration (``dataset``: an already loaded one, for matrix builds)."""
    from edgeprune.cache import Cache
    from edgeprune.library_output import build_log
    from edgeprune.pipeline import run_pipeline

    reporter = reporter or Reporter()
    out = Path(out) if out is not None else Path("dist") / config.name
    check_writable(out)
    cache = Cache(cache_dir or default_cache_dir())
    dataset = dataset if dataset is not None else _load_data(config)
    with cache.lock(f"out:{out.resolve()}"):  # two builds into one folder are serialized
        with build_log(out, reporter):
            result = run_pipeline(config, dataset, cache, reporter, force=force)
            manifest, violations = write_output(config, dataset, result, out)
    return BuildResult(config.name, out, manifest, violations)


def write_output(config, dataset, result, out: Path) -> tuple[dict[str, Any], list[Violation]]:
    """Copy the shipped artefacts, then write manifest.json, report.md, report.html and plots/, all swapped in at once."""
    from edgeprune.manifest import SHIPPED, make_manifest, seal
    from edgeprune.verify import check_output

    with staged_directory(out) as staging:
        shipped: dict[str, Artifact] = {}
        for name, filename in SHIPPED.items():
            if name in result.artifacts:
                shipped[name] = copy_into(result.artifacts[name], staging, filename)
        manifest = make_manifest(config, dataset, result, shipped)
        violations = check_budgets(config.budgets, manifest)
        limits = config.to_dict()["budgets"]
        manifest["budgets"] = {"limits": limits, "violations": [v.to_dict() for v in violations], "passed": not violations}
        write_json_atomic(staging / MANIFEST, seal(manifest))
        write_reports(manifest, staging, previous=out)
        check_output(staging)  # never publish a manifest its files contradict
    return manifest, violations


def write_reports(manifest: dict[str, Any], folder: Path, previous: Path | None = None) -> None:
    """report.md, report.html and plots/ into ``folder``; plots drawn from the same figures are reused from ``previous``."""
    from edgeprune.html_report import html_report
    from edgeprune.plots import INDEX, plots_index, plots_key, render_plots, reuse_plots
    from edgeprune.report import PLOTS_DIR, markdown_report

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


def clean_cache(cache_dir: Path | None = None) -> Path:
    """Remove the stage cache folder."""
    root = cache_dir or default_cache_dir()
    shutil.rmtree(root, ignore_errors=True)
    return root


def diff(old: Path, new: Path, thresholds: Thresholds | None = None) -> ManifestDiff:
    """Compare two builds' manifests (files or output folders); see ``edgeprune.diff``."""
    from edgeprune.diff import Thresholds, diff_manifests

    return diff_manifests(Path(old), Path(new), thresholds or Thresholds())


def verify(folder: Path, *, parity: bool = False, data: Path | None = None) -> Verification:
    """Derive every figure an output folder's manifest states about its files again and compare (``edgeprune.verify``)."""
    from edgeprune.verify import verify_output

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
    from edgeprune.errors import InputError
    from edgeprune.runtimes.base import BenchSettings, benchmark

    if not Path(artifact).is_file():
        raise InputError(f"artefact not found: {artifact}")
    settings = BenchSettings(
        threads=threads, warmup=warmup, iterations=iterations, repeats=repeats, input_shapes=shapes, max_spread_pct=max_spread_pct
    )
    return benchmark(Path(artifact), device, settings).to_dict()
