"""Other libraries' output off the terminal: into a log file beside the build output.

Converters and runtimes print from Python (warnings, ``logging``, ``print``) and from native code
(absl and TFLite INFO lines, torchao's shared-library load failures) straight to file descriptors
1 and 2, where no Python setting reaches them. While a build runs, both descriptors point at the log
file; the reporter alone keeps a copy of the terminal, so our own progress looks as it always did.
Both descriptors are restored on the way out, whatever happened; nothing in ``os.environ`` changes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from edgeprune.progress import Reporter

STANDARD_DESCRIPTORS = (1, 2)


def log_path_for(out: Path) -> Path:
    """Where a build into ``out`` keeps other libraries' output: ``<out>.log`` beside the folder (the folder
    itself is swapped in whole at the end)."""
    return out.with_name(out.name + ".log")


@contextlib.contextmanager
def library_output_to(log_path: Path, reporter: Reporter) -> Iterator[Path]:
    """Send everything written to stdout and stderr (Python and native) to ``log_path`` (appended) while inside;
    ``reporter`` keeps writing where it wrote before."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in STANDARD_DESCRIPTORS}
    previous_stream, terminal = reporter.stream, _terminal_copy(reporter, saved)
    try:
        with open(log_path, "a", buffering=1, encoding="utf-8") as log, _python_output_to(log):
            for fd in STANDARD_DESCRIPTORS:
                os.dup2(log.fileno(), fd)
            if terminal is not None:
                reporter.stream = terminal
            yield log_path
    finally:
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        reporter.stream = previous_stream
        if terminal is not None:
            terminal.close()


@contextlib.contextmanager
def _python_output_to(log: TextIO) -> Iterator[None]:
    """``sys.stdout``, ``sys.stderr`` and ``warnings`` to ``log`` too: under Jupyter or a test runner they are not
    file descriptors 1 and 2."""

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        log.write(warnings.formatwarning(message, category, filename, lineno, line))

    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), warnings.catch_warnings():
        warnings.showwarning = show
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()


def _terminal_copy(reporter: Reporter, saved: dict[int, int]):
    """A stream on a copy of the descriptor the reporter writes to, or None when it writes elsewhere (a StringIO)."""
    try:
        descriptor = reporter.stream.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if descriptor not in saved:
        return None
    reporter.stream.flush()
    return os.fdopen(os.dup(saved[descriptor]), "w", buffering=1, encoding=getattr(reporter.stream, "encoding", None))


@contextlib.contextmanager
def build_log(out: Path, reporter: Reporter) -> Iterator[None]:
    """A build into ``out``: other libraries' output into ``<out>.log`` (kept when not empty, and said so), unless the
    reporter is verbose (then it stays on the terminal).

    The log is written in the temp folder and moved beside the output only when the build returns, so a failed
    build leaves nothing in the output folder; its log, when not empty, stays in the temp folder and is named.
    """
    if reporter.verbosity >= 2:
        yield
        return
    descriptor, scratch = tempfile.mkstemp(prefix=f"edgeprune-{out.name}-", suffix=".log")
    os.close(descriptor)
    scratch_path, log_path = Path(scratch), log_path_for(out)
    try:
        with library_output_to(scratch_path, reporter):
            yield
    except BaseException:
        if scratch_path.stat().st_size:
            reporter.info(f"[{out.name}] other libraries' warnings and logs of the failed build: {scratch_path}")
        else:
            scratch_path.unlink()
        raise
    if not scratch_path.stat().st_size:
        scratch_path.unlink()
        log_path.unlink(missing_ok=True)
        return
    log_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(scratch_path, log_path)
    reporter.info(f"[{out.name}] other libraries' warnings and logs: {log_path} (--verbose shows them here)")
