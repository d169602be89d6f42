"""``edgeprune diff``: what changed between two builds, and whether it is a regression.

Compares two manifest.json files metric by metric (top-1, size, gzip size,
latency p50/p90, speed-up per artefact; MACs and params of the model) and flags
a regression when a change passes its threshold:

- accuracy: an artefact's top-1 falls by more than ``max_accuracy_drop`` points;
- latency: an artefact's p50 or p90 grows by more than ``max_latency_increase_pct`` %;
- size: an artefact's file grows by more than ``max_size_increase_pct`` %.

A threshold of 0 flags any worsening; ``inf`` turns the check off. The exit
code uses the budget codes of the flagged kinds (10 accuracy, 11 latency, 12
size, 14 several). Latency is only compared when both builds measured it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.budgets import exit_code
from edgeprune.errors import ConfigError, InputError


@dataclass(frozen=True)
class Thresholds:
    """How much worse a metric may get before ``edgeprune diff`` calls it a regression."""

    max_accuracy_drop: float = 1.0  # top-1 points
    max_latency_increase_pct: float = 25.0  # shared CI machines are noisy; a real regression is larger
    max_size_increase_pct: float = 5.0

    def __post_init__(self) -> None:
        negative = [f"{name}={value:g}" for name, value in asdict(self).items() if not value >= 0]
        if negative:
            raise ConfigError(f"diff thresholds must be >= 0 (0 flags any worsening, inf none): {', '.join(negative)}")


@dataclass(frozen=True)
class Change:
    """One metric of one artefact (or of the whole ``build``) in both manifests."""

    scope: str
    metric: str
    old: float | None
    new: float | None
    regression: str = ""  # the regression kind when flagged, else ""
    why: str = ""

    @property
    def delta(self) -> float | None:
        return None if self.old is None or self.new is None else self.new - self.old

    @property
    def delta_pct(self) -> float | None:
        return None if self.delta is None or not self.old else 100.0 * self.delta / self.old

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "delta": self.delta, "delta_pct": self.delta_pct}


@dataclass
class ManifestDiff:
    old_path: str
    new_path: str
    targets: tuple[str, str]
    thresholds: Thresholds
    changes: list[Change] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [change for change in self.changes if change.regression]

    @property
    def exit_code(self) -> int:
        return exit_code(change.regression for change in self.regressions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old": self.old_path,
            "new": self.new_path,
            "targets": list(self.targets),
            "thresholds": asdict(self.thresholds),
            "changes": [c.to_dict() for c in self.changes],
            "regressions": [c.to_dict() for c in self.regressions],
            "notes": self.notes,
            "exit_code": self.exit_code,
        }


# (metric key, label, unit, how to read it from a manifest artefact entry)
ARTIFACT_METRICS = (
    ("accuracy", "top-1", "%", lambda entry, _: entry.get("accuracy")),
    ("size_kib", "size", "KiB", lambda entry, _: _kib(entry.get("size_bytes"))),
    ("size_gzip_kib", "gzip size", "KiB", lambda entry, _: _kib(entry.get("size_gzip_bytes"))),
    ("latency_p50_ms", "latency p50", "ms", lambda entry, _: entry.get("benchmark", {}).get("latency_p50_ms")),
    ("latency_p90_ms", "latency p90", "ms", lambda entry, _: entry.get("benchmark", {}).get("latency_p90_ms")),
    ("speedup", "speed-up", "×", lambda entry, speedup: speedup),
)
BUILD_METRICS = (
    ("accuracy_baseline", "top-1 baseline", "%", ("accuracy", "baseline")),
    ("accuracy_primary", "top-1 primary", "%", ("accuracy", "primary")),
    ("macs", "MACs", "", ("model", "macs")),
    ("params", "params", "", ("model", "params")),
)
TIMED_METRICS = ("latency_p50_ms", "latency_p90_ms", "speedup")
UNITS = {key: unit for key, _, unit, _ in ARTIFACT_METRICS + BUILD_METRICS}
LABELS = {key: label for key, label, _, _ in ARTIFACT_METRICS + BUILD_METRICS}


def load_manifest(path: Path) -> dict[str, Any]:
    """A manifest from ``path`` (the file, or an output folder holding manifest.json)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"manifest not found: {path} (pass a manifest.json or a build's output folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"cannot read manifest {path}: {error}") from None
    if not isinstance(manifest, dict) or not {"target", "artifacts", "accuracy"} <= set(manifest):
        raise InputError(f"{path} is not an edgeprune manifest (no target/artifacts/accuracy)")
    return manifest


def diff_manifests(old_path: Path, new_path: Path, thresholds: Thresholds = Thresholds()) -> ManifestDiff:
    """Every metric change between two builds, regressions flagged."""
    old, new = load_manifest(old_path), load_manifest(new_path)
    result = ManifestDiff(str(old_path), str(new_path), (old["target"], new["target"]), thresholds)
    if old["target"] != new["target"]:
        result.notes.append(f"comparing different targets: {old['target']} → {new['target']}")
    if old.get("content_sha256") and old.get("content_sha256") == new.get("content_sha256"):
        result.notes.append("same content_sha256: the new build reproduces the old one (only volatile fields differ)")
    for key, _, _, (section, name) in BUILD_METRICS:
        result.changes.append(Change("build", key, old.get(section, {}).get(name), new.get(section, {}).get(name)))
    timed = bool(old.get("benchmark_emulated")) == bool(new.get("benchmark_emulated"))
    if not timed:
        emulated = old if old.get("benchmark_emulated") else new
        result.notes.append(
            f"timings not compared: {emulated['benchmark_device']} is emulated ({emulated['benchmark_emulated']}), "
            "the other build's device is not"
        )
    for name in list(old["artifacts"]) + [n for n in new["artifacts"] if n not in old["artifacts"]]:
        result.changes += _artifact_changes(name, old, new, thresholds, result.notes, timed)
    return result


def _artifact_changes(
    name: str, old: dict[str, Any], new: dict[str, Any], thresholds: Thresholds, notes: list[str], timed: bool = True
) -> list[Change]:
    before, after = old["artifacts"].get(name), new["artifacts"].get(name)
    if before is None or after is None:
        notes.append(f"{name}: {'added' if before is None else 'removed'} in the new build")
        return []
    if before.get("sha256") != after.get("sha256"):
        notes.append(f"{name}: file changed (sha256 {str(before.get('sha256'))[:12]} → {str(after.get('sha256'))[:12]})")
    changes = []
    for key, _, _, read in ARTIFACT_METRICS:
        if not timed and key in TIMED_METRICS:
            continue
        change = Change(name, key, read(before, old.get("speedups", {}).get(name)), read(after, new.get("speedups", {}).get(name)))
        changes.append(_flag(change, thresholds))
    return changes


def _flag(change: Change, thresholds: Thresholds) -> Change:
    if change.delta is None:
        return change
    if change.metric == "accuracy" and -change.delta > thresholds.max_accuracy_drop:
        return _flagged(change, "accuracy", f"top-1 fell {-change.delta:.2f} points (threshold {thresholds.max_accuracy_drop:g})")
    growth = change.delta_pct
    if growth is None:
        return change
    if change.metric in ("latency_p50_ms", "latency_p90_ms") and growth > thresholds.max_latency_increase_pct:
        return _flagged(
            change, "latency", f"{LABELS[change.metric]} grew {growth:.1f} % (threshold {thresholds.max_latency_increase_pct:g} %)"
        )
    if change.metric == "size_kib" and growth > thresholds.max_size_increase_pct:
        return _flagged(change, "size", f"size grew {growth:.1f} % (threshold {thresholds.max_size_increase_pct:g} %)")
    return change


def _flagged(change: Change, kind: str, why: str) -> Change:
    return Change(change.scope, change.metric, change.old, change.new, kind, f"{change.scope}: {why}")


def markdown(result: ManifestDiff) -> str:
    """A Markdown comment for a pull request: verdict, regressions, then every metric."""
    old_target, new_target = result.targets
    title = old_target if old_target == new_target else f"{old_target} → {new_target}"
    t = result.thresholds
    lines = [f"### edgeprune diff: {_md(title)}", "", f"`{_md(result.old_path)}` → `{_md(result.new_path)}`", ""]
    limits = f"accuracy drop > {t.max_accuracy_drop:g} points, latency > +{t.max_latency_increase_pct:g} %, "
    limits += f"size > +{t.max_size_increase_pct:g} %"
    if result.regressions:
        lines += [f"**{len(result.regressions)} regression(s)** ({limits}):", ""]
        lines += [f"- **{change.regression}** — {_md(change.why)}" for change in result.regressions]
    else:
        lines += [f"No regression ({limits})."]
    lines += [""] + [f"- {_md(note)}" for note in result.notes] + ([""] if result.notes else [])
    lines += ["| artefact | metric | old | new | change | |", "|---|---|---:|---:|---:|---|"]
    for change in result.changes:
        if change.old is None and change.new is None:
            continue
        flag = f"**{change.regression} regression**" if change.regression else ""
        values = f"{_value(change, change.old)} | {_value(change, change.new)} | {_delta(change)}"
        lines.append(f"| {_md(change.scope)} | {LABELS[change.metric]} | {values} | {flag} |")
    return "\n".join(lines) + "\n"


def _value(change: Change, value: float | None) -> str:
    if value is None:
        return "-"
    unit = UNITS[change.metric]
    if unit == "":
        return f"{int(value):,}"
    if unit == "ms":
        return f"{value:.4g} ms"
    return f"{value:.2f} {unit}" if unit != "×" else f"{value:.2f}×"


def _delta(change: Change) -> str:
    if change.delta is None:
        return "-"
    if UNITS[change.metric] == "%":
        return f"{change.delta:+.2f} points"
    pct = change.delta_pct
    return "0" if change.delta == 0 else (f"{pct:+.1f} %" if pct is not None else f"{change.delta:+.4g}")


def _kib(size: int | None) -> float | None:
    return None if size is None else size / 1024


def _md(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
