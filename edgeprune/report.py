"""report.md: a person-readable account of what the build did and measured.

Plots are PNG files beside it (``plots/<name>.png``, linked by relative path);
report.html carries the same content self-contained (see ``html_report``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from edgeprune.budgets import shipped_speedup_meets
from edgeprune.runtimes.figures import caveats

PLOTS_DIR = "plots"


def markdown_report(manifest: dict[str, Any], plots: Iterable[tuple[str, str]] = ()) -> str:
    """The report; ``plots`` are (file stem, title) pairs of PNGs written to ``plots/``."""
    lines = [f"# edgeprune build: {_escape(manifest['target'])}", ""]
    lines += _summary(manifest) + _plots(plots) + _stages(manifest) + _artifacts(manifest) + _device_parity(manifest)
    lines += _delegation(manifest) + _quantization(manifest) + _primary_selection(manifest)
    lines += _loaded(manifest) + _left_unpruned(manifest) + _speed_search(manifest) + _channels(manifest) + _budgets(manifest)
    lines += [
        "## Preprocessing (a device app must repeat it)",
        "",
        f"`{manifest['preprocessing']['formula']}` with "
        f"scale={manifest['preprocessing']['scale']:.6g}, mean={manifest['preprocessing']['mean']}, "
        f"std={manifest['preprocessing']['std']}, layout {manifest['preprocessing']['layout']}, "
        f"input shape {manifest['preprocessing']['input_shape']}.",
        "",
    ]
    return "\n".join(lines)


def _summary(manifest: dict[str, Any]) -> list[str]:
    accuracy, model = manifest["accuracy"], manifest["model"]
    primary = manifest["primary_artifact"]
    speedup = manifest["speedups"].get(primary)
    lines = [
        f"- primary artefact: `{manifest['artifacts'].get(primary, {}).get('file', primary)}`",
        f"- top-1 (test split): baseline {_pct(accuracy.get('baseline'))} → primary {_pct(accuracy.get('primary'))}"
        + (f" (drop {accuracy['drop']:.2f} points)" if "drop" in accuracy else ""),
        f"- MACs {model['macs_dense']:,} → {model['macs']:,} ({model['macs_dense'] / max(model['macs'], 1):.2f}× fewer); "
        f"params {model['params_dense']:,} → {model['params']:,}",
    ]
    lines += _sparsity(manifest)
    if emulation_line(manifest):
        lines.append(f"- **{_escape(emulation_line(manifest))}**")
    if speedup:
        device = _escape(manifest["benchmark_device"])
        lines.append(f"- measured speed-up of {primary} over the dense fp32 export on {device}: {speedup:.2f}×")
    return lines + [""]


def _sparsity(manifest: dict[str, Any]) -> list[str]:
    """Weight sparsity counted in the shipped files: the primary artefact's and the PyTorch model's."""
    artifacts = manifest["artifacts"]
    entries = [artifacts.get(manifest["primary_artifact"], {}), artifacts.get("model", {})]
    counted = dict((entry["file"], entry["weights"]["global_sparsity"]) for entry in entries if "weights" in entry)
    if not any(counted.values()):
        return []
    shown = ", ".join(f"`{name}` {value * 100:.1f} %" for name, value in counted.items())
    return [f"- weight sparsity (zeros counted in the shipped file): {shown}"]


def _plots(plots: Iterable[tuple[str, str]]) -> list[str]:
    images = [line for name, title in plots for line in (f"![{_escape(title)}]({PLOTS_DIR}/{name}.png)", "")]
    return ["## Plots", "", *images] if images else []


def _stages(manifest: dict[str, Any]) -> list[str]:
    lines = ["## Stages", "", "| stage | status | seconds | top-1 after | why it ran |", "|---|---|---:|---:|---|"]
    for stage in manifest["stages"]:
        status = "cached" if stage["cached"] else "ran"
        accuracy = stage["metrics"].get("accuracy")
        lines.append(f"| {stage['name']} | {status} | {stage['seconds']:.2f} | {_pct(accuracy)} | {_escape(stage['reason'])} |")
    return lines + [""]


def _artifacts(manifest: dict[str, Any]) -> list[str]:
    lines = [
        "## Artefacts",
        "",
        "| file | precision | size KiB | gzip KiB | top-1 | max abs err | top-1 agree | p50 ms | p90 ms | p99 ms | runner peak RSS MB "
        "| model MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for entry in manifest["artifacts"].values():
        parity, bench = entry.get("parity", {}), entry.get("benchmark", {})
        lines.append(
            f"| {entry['file']} | {entry.get('precision', '-')} | {entry['size_bytes'] / 1024:.1f} | {entry['size_gzip_bytes'] / 1024:.1f} "
            f"| {_pct(entry.get('accuracy'))} | {_num(parity.get('max_abs_error'))} | {_num(parity.get('top1_agreement'))} "
            f"| {_num(bench.get('latency_p50_ms'))} | {_num(bench.get('latency_p90_ms'))} | {_num(bench.get('latency_p99_ms'))} "
            f"| {_num(bench.get('peak_rss_mb'))} | {_num(bench.get('model_memory_mb'))} |"
        )
    return lines + [""] + benchmark_caveats(manifest)


def emulation_line(manifest: dict[str, Any]) -> str | None:
    """What the report says when the benchmark device was emulated (None when it was not)."""
    emulated = manifest.get("benchmark_emulated")
    if not emulated:
        return None
    return (
        f"benchmark device {manifest['benchmark_device']} is emulated ({emulated}): its timings are not representative of "
        "the device and feed no speed-up and no latency or speed-up budget"
    )


DEVICE_PARITY_HEADER = ["file", "device", "machine", "CPU", "runtime", "top-1 agree", "max abs err", "samples", "emulated"]


def device_parity_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One row per artefact and device its parity was measured on (the device's own runtime against PyTorch)."""
    rows = []
    for entry in manifest["artifacts"].values():
        for device, run in entry.get("parity_on_device", {}).items():
            if "skipped" in run:
                rows.append([entry["file"], device, "-", "-", "-", "-", "-", "-", f"skipped: {run['skipped']}"])
                continue
            runtime = f"{run.get('runtime')} {run.get('runtime_version')}"
            where = [entry["file"], device, str(run.get("machine")), str(run.get("cpu_model")), runtime]
            figures = [_num(run["top1_agreement"]), _num(run["max_abs_error"]), str(run["samples"])]
            rows.append([*where, *figures, "yes" if run.get("emulated") else "no"])
    return rows


def _device_parity(manifest: dict[str, Any]) -> list[str]:
    rows = device_parity_rows(manifest)
    if not rows:
        return []
    lines = ["## Parity on the device", "", "| " + " | ".join(DEVICE_PARITY_HEADER) + " |", "|---|---|---|---|---|---:|---:|---:|---|"]
    return lines + ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows] + [""]


def benchmark_caveats(manifest: dict[str, Any]) -> list[str]:
    """A line per artefact whose benchmark figures need a caveat (fewer threads than asked, a spread that stayed high)."""
    notes = [f"- {entry['file']}: {'; '.join(caveats(entry['benchmark']))}" for entry in manifest["artifacts"].values()
             if caveats(entry.get("benchmark", {}))]  # fmt: skip
    return ["Benchmark caveats:", "", *notes, ""] if notes else []


QUANTIZATION_HEADER = [
    "artefact",
    "vs",
    "top-1 drop (points)",
    "top-1 agreement",
    "budget (drop / agreement)",
    "verdict",
    "tensors changed",
    "layers kept float",
    "MACs off int8 %",
    "KiB fp32 / plain int8 / this",
    "p50 ms fp32 / plain int8 / this (in-build, paired)",
    "p50 ms benchmarked (fp32 parent)",
]


def quantization_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One row per quantized artefact: the accuracy budget's figures and verdict, the per-tensor mix and its cost.

    MACs off int8 is the share of the model's multiply-accumulates in 16-bit or float layers. The
    mix's cost: the sizes of the fp32 parent, of plain int8 and of this file, and, where the search
    chose a mix other than plain int8, the three files' p50 measured in turns during the build (1
    thread, 1 image: ``quantization/cost.py``); then this file's and its parent's p50 from the
    benchmark stage, where it ran. Measured, never estimated: "-" where there is no figure.
    """
    artifacts, rows = manifest["artifacts"], []
    for entry in artifacts.values():
        budget = entry.get("budget")
        if budget is None:
            continue
        parent = artifacts.get(entry.get("parent", ""), {})
        p50, parent_p50 = entry.get("benchmark", {}).get("latency_p50_ms"), parent.get("benchmark", {}).get("latency_p50_ms")
        layers, mix = entry.get("float_layers", []), entry.get("quant_mix", {})
        by_rung = {rung: sum(1 for value in mix.values() if value == rung) for rung in dict.fromkeys(mix.values())}
        off_int8 = entry.get("macs_off_int8", {})
        cost = entry.get("mix_cost", {})
        sizes = cost.get("size_bytes") or {
            "fp32": parent.get("size_bytes"),
            "plain_int8": entry.get("plain_int8", {}).get("size_bytes"),
            "mix": entry.get("size_bytes"),
        }
        latencies = cost.get("latency_p50_ms") or {}
        rows.append(
            [
                entry["file"],
                parent.get("file", entry.get("parent", "-")),
                f"{budget['accuracy_drop']:+.2f}",
                f"{budget['top1_agreement']:.4f}",
                f"{budget['max_accuracy_drop']:g} / {budget['min_top1_agreement']:g}",
                "pass" if budget.get("passed", True) else "MISSED",
                ", ".join(f"{count} {rung}" for rung, count in by_rung.items()) or "none",
                ", ".join(layers) if layers else "none",
                " / ".join(f"{rung} {100 * share:.1f}" for rung, share in off_int8.items()) or "-",
                " / ".join(kib(sizes.get(key)) for key in ("fp32", "plain_int8", "mix")),
                " / ".join(_num(latencies.get(key)) for key in ("fp32", "plain_int8", "mix")) if latencies else "-",
                f"{_num(p50)} ({_num(parent_p50)})",
            ]
        )
    return rows


def _quantization(manifest: dict[str, Any]) -> list[str]:
    return _section(
        "Quantization accuracy budget",
        QUANTIZATION_HEADER,
        "|---|---|---:|---:|---|---|---|---|---|---:|---:|---:|",
        quantization_rows(manifest),
    )


def _section(title: str, header: list[str], rule: str, rows: list[list[str]]) -> list[str]:
    """A Markdown section holding one table; nothing when there are no rows."""
    if not rows:
        return []
    lines = [f"## {title}", "", "| " + " | ".join(header) + " |", rule]
    return lines + ["| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows] + [""]


def delegation_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One row per ExecuTorch artefact: operators XNNPACK took, those left to portable kernels (by name), the share."""
    rows = []
    for entry in manifest["artifacts"].values():
        if "delegated_share" not in entry:
            continue
        portable = ", ".join(f"{name} ×{count}" for name, count in entry.get("portable_kernels", {}).items()) or "none"
        share = f"{entry['delegated_share'] * 100:.1f} %"
        rows.append([entry["file"], str(entry["delegated_operators"]), str(entry["portable_operators"]), share, portable])
    return rows


DELEGATION_HEADER = ["file", "operators delegated", "on portable kernels", "delegated share", "portable kernels"]


def _delegation(manifest: dict[str, Any]) -> list[str]:
    return _section("ExecuTorch delegation (XNNPACK)", DELEGATION_HEADER, "|---|---:|---:|---:|---|", delegation_rows(manifest))


def checkpoint_lines(manifest: dict[str, Any]) -> list[str]:
    """The user's checkpoint: its format, then each adaptation made to load it (empty without a checkpoint)."""
    checkpoint = manifest["model"].get("checkpoint")
    return [f"Format: {checkpoint['format']}.", *checkpoint["adapted"]] if checkpoint else []


def left_unpruned_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One (layer group, why) row per group structured pruning left at its full width."""
    return [[row["layer"], row["reason"]] for row in manifest["model"].get("left_unpruned", [])]


def _loaded(manifest: dict[str, Any]) -> list[str]:
    lines = checkpoint_lines(manifest)
    if not lines:
        return []
    return ["## Checkpoint", "", _escape(lines[0]), "", *[f"- {_escape(item)}" for item in lines[1:]], ""]


def _left_unpruned(manifest: dict[str, Any]) -> list[str]:
    rows = left_unpruned_rows(manifest)
    if not rows:
        return []
    lines = ["## Layer groups not pruned", "", "| layer group | why |", "|---|---|"]
    return lines + [f"| `{_escape(layer)}` | {_escape(reason)} |" for layer, reason in rows] + [""]


PRIMARY_SELECTION_HEADER = ["candidate", "p50 ms", "speed-up over fp32", "top-1", "within the accuracy budget"]


def primary_selection_line(manifest: dict[str, Any]) -> str:
    """``quantize.select = "fastest"``: which file won and by how much, in one sentence ("" without a selection)."""
    selection = manifest.get("primary_selection")
    if not selection:
        return ""
    winner, rows = selection["selected"], selection["candidates"]
    p50 = rows[winner]["latency_p50_ms"]
    chose = f"quantize.select = 'fastest' chose {winner}" + (f" at {p50:.3f} ms p50" if p50 else "")
    where = f" on {selection['device']} (timed {selection['method']})"
    other = selection.get("runner_up")
    if other and selection.get("margin"):
        other_p50 = rows[other]["latency_p50_ms"]
        return f"{chose}, {selection['margin']:.2f}× faster than {other}" + (f" ({other_p50:.3f} ms)" if other_p50 else "") + where
    left_out = [name for name, values in rows.items() if not values["within_budget"]]
    return f"{chose}, the only file measured" + (f" ({', '.join(left_out)} out of the accuracy budget)" if left_out else "") + where


def primary_selection_rows(manifest: dict[str, Any]) -> list[list[str]]:
    """One row per candidate of the fastest-artefact choice: p50, speed-up over fp32, top-1, budget (or why not)."""
    rows = []
    for name, values in manifest.get("primary_selection", {}).get("candidates", {}).items():
        speedup = values["speedup_vs_fp32"]
        budget = "yes" if values["within_budget"] else f"no: {values['reason']}"
        rows.append([name, _num(values["latency_p50_ms"]), "-" if speedup is None else f"{speedup:.2f}x", _pct(values["accuracy"]), budget])
    return rows


def _primary_selection(manifest: dict[str, Any]) -> list[str]:
    line = primary_selection_line(manifest)
    if not line:
        return []
    table = _section("", PRIMARY_SELECTION_HEADER, "|---|---:|---:|---:|---|", primary_selection_rows(manifest))[2:]
    return ["## Primary artefact chosen by measurement", "", _escape(line) + ".", "", *table]


SPEED_SEARCH_HEADER = ["step", "move", "predicted ms", "measured ms", "speed-up", "held-out top-1", "test top-1 after recovery"]


def speed_search_rows(manifest: dict[str, Any]) -> tuple[str, list[list[str]]]:
    """The speed-up search's verdict and one row per accepted move ("" and no rows without a search)."""
    stage = next((stage["metrics"] for stage in manifest["stages"] if stage["name"] == "prune_structured"), {})
    if "speed_search" not in stage:
        return "", []
    rows = [
        [str(row["step"]), row.get("move", "start"), _num(row.get("predicted_ms")), _num(row["latency_p50_ms"])]
        + [f"{row['speedup']:.2f}x", f"{row['held_out_accuracy']:.2f} %", _recovered(row)]
        for row in stage["trajectory"]
    ]
    search = stage["speed_search"]
    error = search["prediction_error_pct"]
    note = (
        ""
        if error["mean_abs"] is None
        else f" The latency table's mean prediction error on the accepted steps: {error['mean_abs']:.1f} % of p50"
    )
    if note and error.get("paired_mean_abs") is not None:
        note += (
            f", {error['paired_mean_abs']:.1f} % of the paired speed-up ({error['within_10_pct']} of {error['steps']} steps within 10 %)"
        )
    note += "." if note else ""
    if not search["reached"] and shipped_speedup_meets(manifest, search["target"]):
        shipped = manifest["speedups"][manifest["primary_artifact"]]
        note += f" The benchmark stage measured the shipped {manifest['primary_artifact']} at {shipped:.2f}x, which meets prune.speedup."
    return search["verdict"] + "." + note, rows


def _recovered(row: dict[str, Any]) -> str:
    """A step the search recovered to judge it: its test top-1 and the epochs it took; "-" for the rest."""
    if "accuracy_after_recovery" not in row:
        return "-"
    return f"{row['accuracy_after_recovery']:.2f} % ({row['recovery_epochs']} epochs)"


def _speed_search(manifest: dict[str, Any]) -> list[str]:
    verdict, rows = speed_search_rows(manifest)
    if not rows:
        return []
    table = _section("", SPEED_SEARCH_HEADER, "|---:|---|---:|---:|---:|---:|---:|", rows)[2:]
    return ["## Speed-up search", "", _escape(verdict), "", *table]


def _channels(manifest: dict[str, Any]) -> list[str]:
    channels = manifest["model"].get("channels")
    if not channels:
        return []
    lines = ["## Channels per layer (structured pruning)", ""]
    removed = manifest["model"].get("blocks_removed")
    if removed:
        names = ", ".join(f"`{_escape(name)}`" for name in removed)
        lines += [f"Blocks removed whole (residual blocks and bypassable branches; their layers show 0 after): {names}.", ""]
    lines += ["| layer | before | after |", "|---|---:|---:|"]
    lines += [f"| {_escape(row['layer'])} | {row['channels_before']} | {row['channels_after']} |" for row in channels]
    return lines + [""]


def _budgets(manifest: dict[str, Any]) -> list[str]:
    budgets = manifest.get("budgets", {})
    unchecked = [f"- {_escape(line)}" for line in budgets.get("unchecked", [])]
    if not budgets.get("violations"):
        return ["## Budgets", "", "All checked budgets met.", *unchecked, ""] if unchecked else ["## Budgets", "", "All budgets met.", ""]
    return ["## Budgets", ""] + [f"- **{v['kind']}**: {_escape(v['message'])}" for v in budgets["violations"]] + unchecked + [""]


def summary_table(manifests: list[dict[str, Any]], failures: dict[str, str] | None = None) -> str:
    """One Markdown row per target of a matrix build: primary artefact, top-1, size, latency, speed-up, budgets."""
    lines = ["| target | primary artefact | top-1 | drop | KiB | p50 ms | speed-up | budgets |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for manifest in manifests:
        primary = manifest["primary_artifact"]
        entry, accuracy = manifest["artifacts"].get(primary, {}), manifest["accuracy"]
        speedup = manifest["speedups"].get(primary)
        violations = manifest.get("budgets", {}).get("violations", [])
        verdict = "ok" if not violations else "violated: " + ", ".join(sorted({v["kind"] for v in violations}))
        p50 = entry.get("benchmark", {}).get("latency_p50_ms")
        lines.append(
            f"| {_escape(manifest['target'])} | {entry.get('file', primary)} | {_pct(accuracy.get('primary'))} "
            f"| {_num(accuracy.get('drop'))} | {entry.get('size_bytes', 0) / 1024:.1f} | {_num(p50)} "
            f"| {'-' if speedup is None else f'{speedup:.2f}×'} | {verdict} |"
        )
    for target, error in (failures or {}).items():
        lines.append(f"| {_escape(target)} | - | - | - | - | - | - | failed: {_escape(error)} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def kib(size_bytes: int | None) -> str:
    """Bytes as KiB with one decimal; "-" for no figure."""
    return "-" if size_bytes is None else f"{size_bytes / 1024:.1f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _escape(text: str) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
