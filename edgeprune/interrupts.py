"""Interruptions: SIGTERM handled like Ctrl-C, and short sections no signal may cut in half.

Python turns Ctrl-C (SIGINT) into ``KeyboardInterrupt``, so ``finally`` blocks and
context managers clean up (a cache entry being built is removed, the previous
output folder stays). SIGTERM, what ``kill``, CI runners and container managers
send, kills the process outright by default. Inside ``interruptible()`` it raises
``Interrupted`` (a ``KeyboardInterrupt``) instead, so both take the same path.

``deferred()`` holds those signals for a few renames that must happen together
(swapping an output folder in) and delivers them right after.

Signal handlers can only be installed from the main thread; elsewhere both
context managers do nothing. Handlers are restored on exit.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType

TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
INTERRUPTING = (signal.SIGINT, *TERMINATING)
SIGINT_EXIT_CODE = 128 + signal.SIGINT


class Interrupted(KeyboardInterrupt):
    """A termination signal arrived; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


def exit_code(error: KeyboardInterrupt) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP."""
    return getattr(error, "exit_code", SIGINT_EXIT_CODE)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interruptible(signals: tuple[int, ...] = TERMINATING) -> Iterator[None]:
    """Within the block, ``signals`` raise ``Interrupted`` where they would have killed the process.

    Only signals still at their default action are taken over: a handler the
    caller installed (a server's own SIGTERM handling) is left alone.
    """
    if not _in_main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in signals}
    try:
        for signum, handler in previous.items():
            if handler == signal.SIG_DFL:
                signal.signal(signum, _raise_interrupted)
        yield
    finally:
        for signum, handler in previous.items():
            if handler == signal.SIG_DFL:
                signal.signal(signum, handler)


@contextlib.contextmanager
def deferred(signals: tuple[int, ...] = INTERRUPTING) -> Iterator[None]:
    """Hold ``signals`` until the block ends, then deliver them to the handlers they had.

    For a handful of renames that must all happen or none (never for long work:
    Ctrl-C would seem to do nothing).
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    held = {signum: handler for signum in signals if (handler := signal.getsignal(signum)) not in (signal.SIG_IGN, None)}
    try:
        for signum in held:
            signal.signal(signum, lambda received, frame: pending.append(received))
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)
