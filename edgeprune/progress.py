"""What a build tells the person or the CI log watching it.

In a terminal: rich progress bars. Elsewhere (CI, pipes): plain, line-oriented
messages, one per stage and a few per long loop. ``quiet`` keeps only warnings;
``json_mode`` sends human messages to stderr so stdout stays machine-readable.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")


class Reporter:
    def __init__(self, verbosity: int = 1, json_mode: bool = False, stream: TextIO | None = None) -> None:
        self.verbosity = verbosity
        self.stream = stream or (sys.stderr if json_mode else sys.stdout)
        self.interactive = self.stream.isatty() and verbosity > 0

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
        start, marks = time.monotonic(), {total * k // 4 for k in (1, 2, 3)}
        for index, item in enumerate(items, 1):
            yield item
            if index in marks or index == total:
                self.detail(f"{description}: {index}/{total} ({time.monotonic() - start:.1f}s)")

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
