"""The pruning plan a profile describes: per-group ratios as a function of one level.

``prune.amount`` prunes every layer group alike; ``prune.layer_ratios`` fixes a group's
ratio; ``prune.ratios_from`` reads a ``sensitivity.json`` (written by ``edgeprune analyze``,
``edgeprune.analysis``) whose per-group ``weight`` scales the level for that group, capped
at the largest ratio the analysis measured for it. The structured-pruning stage and the
speed-up search raise the level; this module only says what each level means.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.config import PruneConfig
from edgeprune.errors import ConfigError, InputError
from edgeprune.pruning import MAX_RATIO, LayerGroup, rounded_width

SENSITIVITY_FORMAT = "edgeprune-sensitivity/1"  # the "format" of a sensitivity.json
MAX_LEVEL_SPAN = 4.0  # a weighted plan's levels go up to this many times MAX_RATIO


@dataclass(frozen=True)
class GroupPlan:
    """Per-group pruning ratios as a function of one *level* in [0, MAX_RATIO].

    Group ``g`` is pruned to ``min(weights[g] * level, caps[g])`` of its original
    channels (``widths``), or to ``fixed[g]`` when the profile fixes it. Uniform pruning
    is every weight 1 and every cap MAX_RATIO; ``prune.ratios_from`` supplies measured
    weights, and caps each group at the largest ratio its analysis measured (a plan does
    not extrapolate a group's cost past what was measured).
    """

    widths: dict[str, int]
    weights: dict[str, float]
    fixed: dict[str, float]
    caps: dict[str, float] = field(default_factory=dict)

    @classmethod
    def from_config(cls, groups: list[LayerGroup], config: PruneConfig) -> GroupPlan:
        if config.global_pruning and (config.layer_ratios or config.ratios_from):
            raise ConfigError(
                "prune.global_pruning ranks channels across all groups; it cannot be combined with prune.layer_ratios or prune.ratios_from"
            )
        widths = {group.name: group.channels for group in groups}
        weights, caps = dict.fromkeys(widths, 1.0), {}
        if config.ratios_from:
            measured = group_sensitivity(Path(config.ratios_from), list(widths))
            weights.update({name: weight for name, (weight, _) in measured.items()})
            caps = {name: min(cap, MAX_RATIO) for name, (_, cap) in measured.items()}
        return cls(widths, weights, parse_layer_ratios(config.layer_ratios, widths), caps)

    def cap(self, name: str) -> float:
        return self.caps.get(name, MAX_RATIO)

    def ratio(self, name: str, level: float) -> float:
        return self.fixed.get(name, min(self.weights[name] * level, self.cap(name)))

    def max_level(self) -> float:
        """The level at which every group it scales reaches its cap: MAX_RATIO when uniform, higher when
        measured weights hold the sensitive groups back (at most ``MAX_LEVEL_SPAN`` times MAX_RATIO)."""
        scaled = [self.cap(name) / weight for name, weight in self.weights.items() if name not in self.fixed and weight > 0]
        return min(max(scaled), MAX_RATIO * MAX_LEVEL_SPAN) if scaled else MAX_RATIO

    def targets(self, level: float, round_to: int = 1) -> dict[str, int]:
        """Channels each group keeps at ``level``: the nearest multiple of ``round_to``, at least one multiple."""
        return {name: rounded_width(width * (1 - self.ratio(name, level)), width, round_to) for name, width in self.widths.items()}


def partial_moves(current: dict[str, int], targets: dict[str, int], weights: dict[str, float]) -> list[dict[str, int]]:
    """Widths from ``current`` towards ``targets``, one more narrowed group each time, the highest ``weights`` first
    (ties in the given order); the last move, which is ``targets`` itself, is left out."""
    order = sorted((name for name in targets if targets[name] < current[name]), key=lambda name: -weights.get(name, 1.0))
    moves, widths = [], dict(current)
    for name in order[:-1]:
        widths[name] = targets[name]
        moves.append(dict(widths))
    return moves


def parse_layer_ratios(entries: tuple[str, ...], widths: dict[str, int]) -> dict[str, float]:
    """``("layer=0.5", ...)`` → ``{"layer": 0.5}``; ConfigError for a bad entry, an unknown group or a ratio out of range."""
    ratios = {}
    for entry in entries:
        name, sep, value = entry.partition("=")
        try:
            ratio = float(value)
        except ValueError:
            ratio = -1.0
        if not sep or not 0.0 <= ratio <= MAX_RATIO:
            raise ConfigError(f"prune.layer_ratios: {entry!r} must be 'layer.name=RATIO' with RATIO in [0, {MAX_RATIO}]")
        if name.strip() not in widths:
            known = ", ".join(widths) or "none"
            raise ConfigError(f"prune.layer_ratios: '{name.strip()}' is not a prunable layer group (groups: {known})")
        ratios[name.strip()] = ratio
    return ratios


def group_sensitivity(path: Path, groups: list[str]) -> dict[str, tuple[float, float]]:
    """Per group of ``groups`` that a ``sensitivity.json`` covers: (weight, the largest ratio it measured).

    Raises InputError for a missing or unreadable file, ConfigError when it names none of ``groups``
    (an analysis of another model).
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        if data.get("format") != SENSITIVITY_FORMAT:
            raise InputError(f"prune.ratios_from: {path} is not an edgeprune sensitivity file (write one with 'edgeprune analyze')")
        measured = {group["layer"]: (float(group["weight"]), largest_ratio(group)) for group in data["groups"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"prune.ratios_from: cannot read {path} ({error})") from None
    known = {name: (max(weight, 0.0), cap) for name, (weight, cap) in measured.items() if name in groups}
    if not known:
        raise ConfigError(f"prune.ratios_from: {path} names none of this model's layer groups ({', '.join(groups)}); analyze this model")
    return known


def largest_ratio(group: dict[str, Any]) -> float:
    """The largest ratio a group's analysis measured (1.0, no limit, for a group without results)."""
    return max((float(result["ratio"]) for result in group["results"]), default=1.0)
