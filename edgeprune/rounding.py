"""What a target's ``round_to`` lets each layer group become, and the groups it keeps whole.

A group of ``w`` channels pruned under ``round_to = r`` keeps a multiple of ``r`` below ``w``; a group of
``r`` channels or fewer has none, so the rounding keeps it whole whatever the pruning amount. A profile
whose rounding is wider than a model's narrow stages (cpu-x86's 16 on a CIFAR ResNet's 16-channel stage)
must say so, and reach its target through the groups that can move (or through depth pruning).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from edgeprune.pruning import LayerGroup


@dataclass(frozen=True)
class KeptWhole:
    """A group structured pruning leaves at its full width, and why (a one-line reason a user can act on)."""

    layer: str
    channels: int
    reason: str

    def to_dict(self) -> dict[str, object]:
        return {"layer": self.layer, "channels": self.channels, "reason": self.reason}


def allowed_widths(channels: int, round_to: int) -> list[int]:
    """The widths a group of ``channels`` can be pruned to under ``round_to`` (its full width last)."""
    if round_to <= 1:
        return list(range(1, channels + 1))
    return [width for width in range(round_to, channels, round_to)] + [channels]


def kept_whole_by_rounding(groups: Iterable[LayerGroup], round_to: int) -> list[KeptWhole]:
    """The groups ``round_to`` cannot narrow: no multiple of it lies below their width."""
    return [
        KeptWhole(group.name, group.channels, f"{group.channels} channels: prune.round_to = {round_to} allows no narrower width")
        for group in groups
        if len(allowed_widths(group.channels, round_to)) == 1
    ]


def first_names(names: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``names``, comma-separated, and how many more there are: a log line stays one line."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def rounding_warning(kept: list[KeptWhole], round_to: int) -> str:
    """One line naming the groups the rounding keeps whole and what to do about it."""
    names = first_names([item.layer for item in kept])
    narrowest, widest = min(item.channels for item in kept), max(item.channels for item in kept)
    span = f"{narrowest}" if narrowest == widest else f"{narrowest}-{widest}"
    return (
        f"prune_structured: {len(kept)} layer groups of {span} channels are kept whole "
        f"by prune.round_to = {round_to} ({names}); the other groups and removable residual blocks carry the reduction "
        f"(lower prune.round_to, e.g. {max(1, round_to // 2)}, or set prune.drop_block_count to reach them)"
    )
