"""The report's plots, drawn with matplotlib from a manifest alone, as PNG bytes.

Figures are made with the object-oriented API on an Agg canvas
(``Figure`` + ``FigureCanvasAgg``): no pyplot, no global backend switch, so a
user's notebook or GUI backend is left as it was. Each plot is skipped when the
manifest lacks its figures (e.g. no benchmark, no pruning). Drawing costs about
a second, so an unchanged rebuild reuses the PNGs already in its output folder
(``plots/plots.json`` records the hash of the figures they were drawn from).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DPI = 96
VERSION = "1"  # bump when a plot changes, so reused PNGs are redrawn
INDEX = "plots.json"
STAGE_ORDER = ("baseline", "prune_structured", "prune_unstructured", "finetune")


@dataclass(frozen=True)
class Plot:
    name: str  # file stem: plots/<name>.png
    title: str
    png: bytes


def render_plots(manifest: dict[str, Any]) -> list[Plot]:
    """Every plot the manifest has figures for, in report order."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    plots = []
    for name, title, draw in PLOTS:
        figure = Figure(figsize=(8, 3.6), dpi=DPI)  # fixed margins: constrained layout doubles the drawing time
        figure.subplots_adjust(left=0.08, right=0.98, top=0.9, bottom=0.22, wspace=0.25)
        FigureCanvasAgg(figure)
        if draw(figure, manifest) is False:
            continue
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", metadata={"Software": None})  # no version string: same figures, same bytes
        plots.append(Plot(name, title, buffer.getvalue()))
    return plots


def plots_key(manifest: dict[str, Any]) -> str:
    """A hash of everything the plots are drawn from (not timestamps or stage timings)."""
    stages = [[stage["name"], stage["metrics"]] for stage in manifest["stages"]]
    figures = [
        VERSION,
        manifest["accuracy"],
        manifest["artifacts"],
        manifest["model"],
        manifest["speedups"],
        manifest.get("benchmark_device"),
        stages,
    ]
    return hashlib.sha256(json.dumps(figures, sort_keys=True, default=str).encode()).hexdigest()


def reuse_plots(folder: Path, key: str) -> list[Plot] | None:
    """The plots in ``folder`` (a previous output's plots/) when drawn from the same figures, else None."""
    try:
        index = json.loads((folder / INDEX).read_text())
        if index["key"] != key:
            return None
        return [Plot(name, title, (folder / f"{name}.png").read_bytes()) for name, title in index["plots"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plots_index(key: str, plots: list[Plot]) -> dict[str, Any]:
    return {"key": key, "plots": [[plot.name, plot.title] for plot in plots]}


def _accuracy_by_stage(figure, manifest: dict[str, Any]) -> bool:
    after = manifest["accuracy"].get("after_stage", {})
    stages = [name for name in STAGE_ORDER if name in after]
    artifacts = manifest["accuracy"].get("artifacts", {})
    labels = stages + list(artifacts)
    values = [after[name] for name in stages] + list(artifacts.values())
    if not values:
        return False
    axes = figure.add_subplot()
    colors = ["#4c72b0"] * len(stages) + ["#dd8452"] * len(artifacts)
    bars = axes.bar(range(len(values)), values, color=colors)
    axes.bar_label(bars, labels=[f"{value:.1f}" for value in values], fontsize=8)
    axes.set_xticks(range(len(values)), labels, rotation=20, ha="right", fontsize=8)
    axes.set_ylabel("top-1 on the test split (%)")
    axes.set_ylim(0, max(100.0, max(values) * 1.08))
    axes.set_title("Accuracy after each stage (blue) and of each artefact (orange)", fontsize=10)
    return True


def _latency_and_size(figure, manifest: dict[str, Any]) -> bool:
    artifacts = {name: entry for name, entry in manifest["artifacts"].items() if entry.get("kind") != "model"}
    if not artifacts:
        return False
    names = list(artifacts)
    size_axes, latency_axes = figure.subplots(1, 2)
    positions = range(len(names))
    size_axes.bar([p - 0.2 for p in positions], [artifacts[n]["size_bytes"] / 1024 for n in names], 0.4, label="file")
    size_axes.bar([p + 0.2 for p in positions], [artifacts[n]["size_gzip_bytes"] / 1024 for n in names], 0.4, label="gzip -9")
    size_axes.set_xticks(list(positions), names, rotation=20, ha="right", fontsize=8)
    size_axes.set_ylabel("KiB")
    size_axes.set_title("Size per artefact", fontsize=10)
    size_axes.legend(fontsize=8)
    measured = [n for n in names if "latency_p50_ms" in artifacts[n].get("benchmark", {})]
    if measured:
        p50 = [artifacts[n]["benchmark"]["latency_p50_ms"] for n in measured]
        p90 = [artifacts[n]["benchmark"].get("latency_p90_ms", 0) for n in measured]
        latency_axes.bar([p - 0.2 for p in range(len(measured))], p50, 0.4, label="p50")
        latency_axes.bar([p + 0.2 for p in range(len(measured))], p90, 0.4, label="p90")
        latency_axes.set_xticks(list(range(len(measured))), measured, rotation=20, ha="right", fontsize=8)
        latency_axes.legend(fontsize=8)
    else:
        latency_axes.text(0.5, 0.5, "not benchmarked", ha="center", va="center", transform=latency_axes.transAxes)
    latency_axes.set_ylabel("ms")
    latency_axes.set_title(f"Latency per artefact on {manifest.get('benchmark_device') or '-'}", fontsize=10)
    return True


def _accuracy_vs_compression(figure, manifest: dict[str, Any]) -> bool:
    stages = {stage["name"]: stage["metrics"] for stage in manifest["stages"]}
    if "prune_structured" not in stages and "prune_unstructured" not in stages:
        return False
    steps_axes, speed_axes = figure.subplots(1, 2)
    reduction = stages.get("prune_structured", {}).get("mac_reduction", 1.0)
    points = [("baseline", 1.0, stages["baseline"].get("accuracy"))]
    for name in ("prune_structured", "prune_unstructured", "finetune"):
        if name in stages and "accuracy" in stages[name]:
            sparsity = stages[name].get("global_sparsity")
            step = " after step 1" if name == "prune_unstructured" and stages[name].get("schedule", {}).get("targets", [0])[1:] else ""
            label = f"{name} (sparsity {sparsity:.0%}{step})" if sparsity else name
            points.append((label, reduction, stages[name]["accuracy"]))
    for label, x, y in points:
        steps_axes.scatter([x], [y], s=40)
        steps_axes.annotate(label, (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
    steps_axes.margins(x=0.2, y=0.12)
    steps_axes.set_xlabel("MAC reduction (×, dense / pruned)")
    steps_axes.set_ylabel("top-1 (%)")
    steps_axes.set_title("Accuracy through the pruning steps", fontsize=10)
    accuracy, speedups = manifest["accuracy"].get("artifacts", {}), manifest.get("speedups", {})
    shared = [name for name in speedups if name in accuracy]
    for name in shared:
        speed_axes.scatter([speedups[name]], [accuracy[name]], s=40)
        speed_axes.annotate(name, (speedups[name], accuracy[name]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    if not shared:
        speed_axes.text(0.5, 0.5, "no measured speed-up", ha="center", va="center", transform=speed_axes.transAxes)
    speed_axes.margins(x=0.3, y=0.3)
    speed_axes.axvline(1.0, color="grey", lw=0.8, ls="--")
    speed_axes.set_xlabel("measured speed-up over the dense fp32 export (×)")
    speed_axes.set_title("Accuracy vs measured speed-up", fontsize=10)
    return True


def _layers(figure, manifest: dict[str, Any]) -> bool:
    channels, sparsity = manifest["model"].get("channels"), manifest["model"].get("sparsity")
    sparsity = sparsity if sparsity and any(row["sparsity"] for row in sparsity) else None  # a dense model has no panel
    panels = [panel for panel in (channels, sparsity) if panel]
    if not panels:
        return False
    heights = [0.26 * len(panel) + 0.9 for panel in panels]  # inches: one row per layer plus title and axis
    figure.set_figheight(sum(heights))
    longest = max(len(row["layer"]) for panel in panels for row in panel)
    left = min(0.45, 0.03 + 0.0065 * longest)  # room for the layer names (7 pt, about 5 px a character)
    figure.subplots_adjust(left=left, right=0.85, top=1 - 0.3 / sum(heights), bottom=0.45 / sum(heights), hspace=1.3 / max(heights))
    axes = iter(figure.subplots(len(panels), 1, squeeze=False, gridspec_kw={"height_ratios": heights})[:, 0])
    if channels:
        ax = next(axes)
        rows = range(len(channels))
        ax.barh([r + 0.2 for r in rows], [row["channels_before"] for row in channels], 0.4, label="before", color="#bbbbbb")
        ax.barh([r - 0.2 for r in rows], [row["channels_after"] for row in channels], 0.4, label="after", color="#4c72b0")
        ax.set_yticks(list(rows), [row["layer"] for row in channels], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("output channels / features", fontsize=8)
        ax.set_title("Channels per layer (structured pruning)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if sparsity:
        ax = next(axes)
        ax.barh(range(len(sparsity)), [row["sparsity"] * 100 for row in sparsity], color="#55a868")
        ax.set_yticks(list(range(len(sparsity))), [row["layer"] for row in sparsity], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("zero weights (%)", fontsize=8)
        ax.set_title("Sparsity per layer (zeros counted in model.pt)", fontsize=10)
    return True


PLOTS: tuple[tuple[str, str, Callable[..., bool]], ...] = (
    ("accuracy", "Accuracy after each stage", _accuracy_by_stage),
    ("latency_size", "Latency and size per artefact", _latency_and_size),
    ("accuracy_compression", "Accuracy vs compression and speed-up", _accuracy_vs_compression),
    ("layers", "Per-layer channels and sparsity", _layers),
)
