"""What a build tells the person or the CI log watching it.

In a terminal: rich progress bars. Elsewhere (CI, pipes): plain, line-oriented
messages, one per stage and, in a long loop, one line at most every 30 s with the
time spent and an estimate of what remains (so a CI log never goes silent for minutes,
and never fills with a line per step). ``quiet`` keeps only warnings; ``json_mode``
sends human messages to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


PLAIN_PROGRESS_INTERVAL_S = 30.0


def duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Reporter:
    """``progress_interval_s``: the least time between two plain progress lines of one loop."""

    def __init__(
        self,
        verbosity: int = 1,
        json_mode: bool = False,
        stream: TextIO | None = None,
        progress_interval_s: float = PLAIN_PROGRESS_INTERVAL_S,
    ) -> None:
        self.verbosity = verbosity
        self.stream = stream or (sys.stderr if json_mode else sys.stdout)
        self.interactive = self.stream.isatty() and verbosity > 0
        self.progress_interval_s = progress_interval_s

    def info(self, message: str) -> None:
        if self.verbosity >= 1:
            print(message, file=self.stream, flush=True)

    def detail(self, message: str) -> None:
        if self.verbosity >= 2:
            print(f"  {message}", file=self.stream, flush=True)

    def warn(self, message: str) -> None:
        print(f"warning: {message}", file=self.stream, flush=True)

    def stage(self, target: str, name: str, status: str, seconds: float, reason: str = "") -> None:
        why = f" ({reason})" if reason else ""
        self.info(f"[{target}] {name:<18} {status:<6} {seconds:7.2f}s{why}")

    def track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        """Iterate ``items`` with a progress bar (TTY) or a few plain progress lines."""
        if self.verbosity < 1 or total <= 0:
            yield from items
            return
        if self.interactive:
            yield from self._rich_track(items, total, description)
            return
        yield from self._plain_track(items, total, description)

    def _plain_track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        """One line at most every ``progress_interval_s`` (and one at the end of a loop that took that long)."""
        start = last = time.monotonic()
        for index, item in enumerate(items, 1):
            yield item
            now = time.monotonic()
            if now - last >= self.progress_interval_s or (index == total and now - start >= self.progress_interval_s):
                last = now
                elapsed = now - start
                remaining = elapsed / index * (total - index)
                self.info(
                    f"  {description}: {index}/{total} ({index / total:.0%}), {duration(elapsed)} elapsed, about {duration(remaining)} left"
                )

    def _rich_track(self, items: Iterable[T], total: int, description: str) -> Iterator[T]:
        from rich.console import Console
        from rich.progress import Progress

        # The bar goes to the reporter's stream: stderr under --json, so stdout stays machine-readable.
        with Progress(console=Console(file=self.stream), transient=True) as progress:
            task = progress.add_task(description, total=total)
            for item in items:
                yield item
                progress.advance(task)


SILENT = Reporter(verbosity=0)
