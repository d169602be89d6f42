"""A time budget that really interrupts: Python code past its deadline is stopped where it runs.

Torch-Pruning's dependency analysis is synchronous pure Python; on some graphs it never ends
(``edgeprune.dependency``). A budget that is only checked between calls cannot stop one such
call, so ``Deadline`` arms a timer that, once the time is up, raises ``AnalysisTimeout``
asynchronously in the thread that armed it (``PyThreadState_SetAsyncExc``): the exception
surfaces at the next Python bytecode the library runs, however deep in its loop. A single
long-running C call (one huge convolution) finishes first; the analyses bounded here are
Python loops over the graph.
"""

from __future__ import annotations

import ctypes
import math
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType

REPEAT_SECONDS = 0.2  # after the deadline, how often the interruption is raised again until the block ends


class AnalysisTimeout(BaseException):
    """The time budget of an analysis ran out.

    A BaseException (like KeyboardInterrupt): an interruption, not an error, so a library's
    ``except Exception`` cannot swallow it and keep looping.
    """


@dataclass
class Budget:
    """``seconds`` of wall-clock time from creation, shared by the steps of one analysis."""

    seconds: float = math.inf
    start: float = field(default_factory=time.monotonic)

    def remaining(self) -> float:
        return max(0.0, self.seconds - (time.monotonic() - self.start))

    def expired(self) -> bool:
        return self.remaining() <= 0.0

    def deadline(self) -> Deadline:
        """A context that raises AnalysisTimeout inside its block once this budget runs out."""
        return Deadline(self.remaining())


class Deadline:
    """``with Deadline(seconds): ...`` raises AnalysisTimeout in the block after ``seconds`` (at once when <= 0)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._lock = threading.Lock()
        self._armed = False
        self._fired = False
        self._thread_id = 0
        self._timer: threading.Timer | None = None

    def __enter__(self) -> Deadline:
        if self.seconds <= 0:
            raise AnalysisTimeout("no time left")
        self._thread_id = threading.get_ident()
        if math.isfinite(self.seconds):
            self._armed = True
            self._start_timer(self.seconds)
        return self

    def _start_timer(self, seconds: float) -> None:
        self._timer = threading.Timer(seconds, self._interrupt)
        self._timer.daemon = True
        self._timer.start()

    def _interrupt(self) -> None:
        with self._lock:
            if self._armed:
                self._fired = True
                _set_async_exception(self._thread_id, AnalysisTimeout)
                # Raised again until the block ends: a library's bare ``except:`` may swallow one.
                self._start_timer(REPEAT_SECONDS)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        with self._lock:
            self._armed = False
            if self._timer is not None:
                self._timer.cancel()
            if self._fired:
                # The block may have ended between the timer firing and the exception being delivered: withdraw it
                # (a no-op when it was delivered).
                _set_async_exception(self._thread_id, None)


def _set_async_exception(thread_id: int, kind: type[BaseException] | None) -> None:
    exception = ctypes.py_object(kind) if kind is not None else None
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), exception)
