"""report.html: one self-contained page per build, viewable offline.

Plots are embedded as base64 PNG; the styles and a tiny script are inline; a
Content-Security-Policy forbids loading anything else, so the page renders the
same from a CI artefact, an e-mail or a laptop on a plane. Every string taken
from the manifest (layer names, reasons, paths, messages) is escaped with
``html.escape``. The script only counts the plots that rendered into
``#plots-rendered`` (a browser test reads it).
"""

from __future__ import annotations

import base64
import re
from html import escape
from typing import Any

from edgeprune.plots import Plot
from edgeprune.report import (
    DELEGATION_HEADER,
    DEVICE_PARITY_HEADER,
    PRIMARY_SELECTION_HEADER,
    QUANTIZATION_HEADER,
    SPEED_SEARCH_HEADER,
    benchmark_caveats,
    checkpoint_lines,
    delegation_rows,
    device_parity_rows,
    emulation_line,
    kib,
    left_unpruned_rows,
    primary_selection_line,
    primary_selection_rows,
    quantization_rows,
    speed_search_rows,
)

NUMBER = re.compile(r"^[-+]?[\d.,]+(e[-+]?\d+)?( %)?$")
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"
STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f3f3f3; }
.bad { color: #b00020; font-weight: 600; } .ok { color: #1b7f3a; font-weight: 600; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
code { background: #f5f5f5; padding: 0 3px; }
"""
COUNT_PLOTS = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.querySelectorAll("figure img"));
  var rendered = images.filter(function (img) { return img.complete && img.naturalWidth > 0; }).length;
  var out = document.getElementById("plots-rendered");
  out.textContent = rendered + " of " + images.length + " plots rendered";
  out.setAttribute("data-rendered", String(rendered));
  out.setAttribute("data-total", String(images.length));
});
"""


def html_report(manifest: dict[str, Any], plots: list[Plot]) -> str:
    """The whole page as a string (UTF-8)."""
    title = f"edgeprune build: {manifest['target']}"
    body = [
        f"<h1>{_e(title)}</h1>",
        *_summary(manifest),
        *_plots(plots),
        *_stages(manifest),
        *_artifacts(manifest),
        *_device_parity(manifest),
        *_delegation(manifest),
        *_quantization(manifest),
        *_primary_selection(manifest),
        *_loaded(manifest),
        *_speed_search(manifest),
    ]
    body += [*_budgets(manifest), *_reproduce(manifest)]
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>",
            *body,
            f'<p><small id="plots-rendered" data-rendered="0" data-total="{len(plots)}"></small></p>',
            f"<script>{COUNT_PLOTS}</script>",
            "</body></html>",
            "",
        ]
    )


def _summary(manifest: dict[str, Any]) -> list[str]:
    accuracy, model, primary = manifest["accuracy"], manifest["model"], manifest["primary_artifact"]
    entry = manifest["artifacts"].get(primary, {})
    speedup = manifest["speedups"].get(primary)
    items = [
        f"primary artefact <code>{_e(entry.get('file', primary))}</code>, {kib(entry.get('size_bytes'))} KiB",
        f"top-1 baseline {_pct(accuracy.get('baseline'))} → primary {_pct(accuracy.get('primary'))}"
        + (f" (drop {accuracy['drop']:.2f} points)" if "drop" in accuracy else ""),
        f"MACs {model['macs_dense']:,} → {model['macs']:,}; params {model['params_dense']:,} → {model['params']:,}",
        f"built {_e(manifest.get('created_at', '-'))} with edgeprune {_e(manifest['tools'].get('edgeprune', '-'))}",
    ]
    if emulation_line(manifest):
        items.append(f'<span class="bad">{_e(emulation_line(manifest))}</span>')
    if speedup:
        items.append(f"measured speed-up of {_e(primary)} on <code>{_e(manifest.get('benchmark_device'))}</code>: {speedup:.2f}×")
    return ["<ul>", *[f"<li>{item}</li>" for item in items], "</ul>"]


def _plots(plots: list[Plot]) -> list[str]:
    lines = ["<h2>Plots</h2>"]
    for plot in plots:
        data = base64.b64encode(plot.png).decode("ascii")
        lines.append(
            f'<figure><img alt="{_e(plot.title)}" src="data:image/png;base64,{data}"><figcaption>{_e(plot.title)}</figcaption></figure>'
        )
    return lines


def _stages(manifest: dict[str, Any]) -> list[str]:
    rows = [
        [
            stage["name"],
            "cached" if stage["cached"] else "ran",
            f"{stage['seconds']:.2f}",
            _pct(stage["metrics"].get("accuracy")),
            stage["reason"],
        ]
        for stage in manifest["stages"]
    ]
    return ["<h2>Stages</h2>", _table(["stage", "status", "seconds", "top-1 after", "why it ran"], rows)]


def _artifacts(manifest: dict[str, Any]) -> list[str]:
    rows = []
    for entry in manifest["artifacts"].values():
        parity, bench = entry.get("parity", {}), entry.get("benchmark", {})
        rows.append(
            [
                entry["file"],
                entry.get("precision", "-"),
                kib(entry["size_bytes"]),
                kib(entry["size_gzip_bytes"]),
                _pct(entry.get("accuracy")),
                _num(parity.get("max_abs_error")),
                _num(parity.get("top1_agreement")),
                _num(bench.get("latency_p50_ms")),
                _num(bench.get("latency_p90_ms")),
                _num(bench.get("peak_rss_mb")),
                _num(bench.get("model_memory_mb")),
                entry["sha256"][:16],
            ]
        )
    header = ["file", "precision", "KiB", "gzip KiB", "top-1", "max abs err", "top-1 agree", "p50 ms", "p90 ms", "runner peak RSS MB"]
    header += ["model MB", "sha256"]
    notes = [f"<li>{escape(line[2:])}</li>" for line in benchmark_caveats(manifest) if line.startswith("- ")]
    return ["<h2>Artefacts</h2>", _table(header, rows), *([f"<ul>{''.join(notes)}</ul>"] if notes else [])]


def _quantization(manifest: dict[str, Any]) -> list[str]:
    rows = quantization_rows(manifest)
    return ["<h2>Quantization accuracy budget</h2>", _table(QUANTIZATION_HEADER, rows)] if rows else []


def _primary_selection(manifest: dict[str, Any]) -> list[str]:
    line = primary_selection_line(manifest)
    if not line:
        return []
    table = _table(PRIMARY_SELECTION_HEADER, primary_selection_rows(manifest))
    return ["<h2>Primary artefact chosen by measurement</h2>", f"<p>{_e(line)}.</p>", table]


def _loaded(manifest: dict[str, Any]) -> list[str]:
    """The checkpoint's format and adaptations, and the layer groups left unpruned with the reason."""
    lines, rows = checkpoint_lines(manifest), left_unpruned_rows(manifest)
    adapted = [f"<li>{_e(item)}</li>" for item in lines[1:]]
    html = ["<h2>Checkpoint</h2>", f"<p>{_e(lines[0])}</p>", "<ul>", *adapted, "</ul>"] if lines else []
    return html + (["<h2>Layer groups not pruned</h2>", _table(["layer group", "why"], rows)] if rows else [])


def _device_parity(manifest: dict[str, Any]) -> list[str]:
    rows = device_parity_rows(manifest)
    return ["<h2>Parity on the device</h2>", _table(DEVICE_PARITY_HEADER, rows)] if rows else []


def _speed_search(manifest: dict[str, Any]) -> list[str]:
    verdict, rows = speed_search_rows(manifest)
    return ["<h2>Speed-up search</h2>", f"<p>{_e(verdict)}</p>", _table(SPEED_SEARCH_HEADER, rows)] if rows else []


def _delegation(manifest: dict[str, Any]) -> list[str]:
    rows = delegation_rows(manifest)
    return ["<h2>ExecuTorch delegation (XNNPACK)</h2>", _table(DELEGATION_HEADER, rows)] if rows else []


def _budgets(manifest: dict[str, Any]) -> list[str]:
    violations = manifest.get("budgets", {}).get("violations", [])
    unchecked = [f"<li>{_e(line)}</li>" for line in manifest.get("budgets", {}).get("unchecked", [])]
    if not violations:
        met = "All checked budgets met." if unchecked else "All budgets met."
        return ["<h2>Budgets</h2>", f'<p class="ok">{met}</p>', *(["<ul>", *unchecked, "</ul>"] if unchecked else [])]
    items = [f'<li><span class="bad">{_e(v["kind"])}</span>: {_e(v["message"])}</li>' for v in violations]
    return ["<h2>Budgets</h2>", "<ul>", *items, *unchecked, "</ul>"]


def _reproduce(manifest: dict[str, Any]) -> list[str]:
    inputs = manifest["inputs"]
    rows = [[key, "-" if value is None else value] for key, value in inputs.items()]
    rows += [
        ["seed", manifest["seed"]],
        ["profile_sha256", manifest.get("profile_sha256", "-")],
        ["content_sha256", manifest.get("content_sha256", "-")],
    ]
    rows += [[f"tool: {tool}", version] for tool, version in manifest["tools"].items()]
    pre = manifest["preprocessing"]
    return [
        "<h2>Preprocessing (a device app must repeat it)</h2>",
        f"<p><code>{_e(pre['formula'])}</code> with scale={pre['scale']:.6g}, mean={_e(pre['mean'])}, std={_e(pre['std'])}, "
        f"layout {_e(pre['layout'])}, input shape {_e(pre['input_shape'])}.</p>",
        "<h2>Reproducing this build</h2>",
        _table(["input", "value"], rows),
    ]


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(_cell(cell) for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value: Any) -> str:
    numeric = isinstance(value, (int, float)) or NUMBER.match(str(value))
    return f'<td class="n">{_e(value)}</td>' if numeric else f"<td>{_e(value)}</td>"


def _e(value: Any) -> str:
    return escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"
