"""Where a build's independent work runs: in this process, or as Ray tasks on a cluster.

An ``Executor`` maps a function over items and returns, in order, each result or the
exception its call raised. ``LocalExecutor`` runs the calls one after another in this
process (the default; needs nothing installed). ``RayExecutor`` ships each call as a Ray
task, to a Ray runtime it starts on this machine or to an existing cluster (``address``).
Ray is an optional extra (``pip install 'edgeprune[ray]'``), imported only when a
``RayExecutor`` is opened.

``sweep`` maps a function over labelled points and raises the first failure, naming its point.
This module knows nothing of builds: ``edgeprune.api`` maps a matrix's targets through an
executor, ``edgeprune.analysis`` the layer groups of a sensitivity analysis.

A task runs in the driver's working folder, with the driver's ``sys.path`` and torch thread
count (restored afterwards), so relative paths and ``--model package.module:factory``
resolve as they would locally and training computes the same weights; on a cluster the
folder and the modules must exist on every node.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from edgeprune.errors import ConfigError, EdgepruneError, InputError, StageError

Item = TypeVar("Item")
Result = TypeVar("Result")
EXECUTORS = ("local", "ray")


class Executor(Protocol):
    name: str

    def map(self, function: Callable[[Item], Result], items: Sequence[Item]) -> list[Result | Exception]:
        """``function(item)`` for every item, in order: its result, or the exception it raised."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Every call in this process, one after another."""

    name = "local"

    def map(self, function: Callable[[Item], Result], items: Sequence[Item]) -> list[Result | Exception]:
        results: list[Result | Exception] = []
        for item in items:
            try:
                results.append(function(item))
            except Exception as error:  # handed back: the caller decides what a failure means
                results.append(error)
        return results

    def close(self) -> None:
        pass


class RayExecutor:
    """Every call as a Ray task (one CPU each).

    ``address`` None starts a local Ray runtime with ``num_cpus`` CPUs (default: all) and
    stops it on ``close``; otherwise it connects to a running cluster (``auto``,
    ``ray://head:10001``, ``head:6379``). A Ray session this process had already opened is
    reused and left open.

    Raises:
        ConfigError: Ray is not installed, or ``num_cpus`` is given with an ``address``.
        EdgepruneError: the cluster cannot be reached.
    """

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        try:
            import ray  # an optional extra, imported when a Ray executor is opened
        except ImportError:
            raise ConfigError("--executor ray needs Ray: pip install 'edgeprune[ray]' (or use --executor local)") from None
        if address and num_cpus is not None:
            raise ConfigError("num_cpus is for a local Ray runtime; a cluster at --ray-address has its own CPUs")
        self._ray = ray
        self.started = not ray.is_initialized()
        self._handlers = _signal_handlers()  # ray.init installs its own SIGTERM/SIGINT handlers
        if self.started:
            _init_ray(ray, address, num_cpus)
        self._task = ray.remote(_run_call)

    def map(self, function: Callable[[Item], Result], items: Sequence[Item]) -> list[Result | Exception]:
        ray = self._ray
        # Pickled here and unpickled inside the task, after the driver's sys.path is in place:
        # a function from the user's (or the tests') modules must import there as it does here.
        shipped = ray.put(ray.cloudpickle.dumps(function))
        driver = DriverContext.capture()
        refs = [self._task.remote(shipped, ray.cloudpickle.dumps(item), driver) for item in items]
        try:
            return [self._result(ref) for ref in refs]
        except KeyboardInterrupt:
            for ref in refs:
                ray.cancel(ref, force=True)
            raise

    def _result(self, ref: Any) -> Any:
        ray = self._ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as error:
            # A user-facing error comes back as itself (one line); a bug keeps Ray's wrapper, which
            # carries the remote traceback.
            return error.cause if isinstance(error.cause, EdgepruneError) else error
        except ray.exceptions.RayError as error:  # a worker or node died, out of memory, ...
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            return StageError(f"Ray task lost ({reason}); rerun, or use --executor local")

    def close(self) -> None:
        if self.started and self._ray.is_initialized():
            self._ray.shutdown()
            _restore_signal_handlers(self._handlers)  # Ctrl-C and SIGTERM mean again what they meant before Ray
        self.started = False


def _signal_handlers() -> dict[int, Any]:
    """This process's SIGINT/SIGTERM handlers (only the main thread may change them)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}


def _restore_signal_handlers(handlers: dict[int, Any]) -> None:
    for signum, handler in handlers.items():
        if handler is not None:  # None: installed from C, cannot be put back from Python
            signal.signal(signum, handler)


def _init_ray(ray: Any, address: str | None, num_cpus: int | None) -> None:
    try:
        if address:
            ray.init(address=address, ignore_reinit_error=True)
        else:
            ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as error:
        where = f"at {address}" if address else "on this machine"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EdgepruneError(f"cannot start or reach Ray {where}: {first} (check --ray-address, or use --executor local)") from None


@contextlib.contextmanager
def open_executor(kind: str = "local", address: str | None = None, num_cpus: int | None = None) -> Iterator[Executor]:
    """The executor named ``kind`` (``local`` or ``ray``), closed on exit.

    Raises:
        ConfigError: an unknown kind, or an ``address`` without ``kind="ray"``.
    """
    if kind not in EXECUTORS:
        raise ConfigError(f"unknown executor {kind!r}: use one of {', '.join(EXECUTORS)}")
    if kind == "local" and address:
        raise ConfigError(f"--ray-address {address} needs --executor ray")
    executor: Executor = LocalExecutor() if kind == "local" else RayExecutor(address, num_cpus)
    try:
        yield executor
    finally:
        executor.close()


# --------------------------------------------------------------------------- inside a task


@dataclass(frozen=True)
class DriverContext:
    """The driver's working folder, import path and torch thread count, applied to a task while it runs.

    The thread count matters for more than speed: training on 1 thread and on 2 gives
    slightly different weights, so a task trains with the driver's count (Ray would
    give it 1) to build what a local build would.
    """

    cwd: str
    python_path: tuple[str, ...]
    torch_threads: int

    @classmethod
    def capture(cls) -> DriverContext:
        import torch  # on use: importing edgeprune (the CLI's start-up) must not import torch

        return cls(os.getcwd(), tuple(sys.path), torch.get_num_threads())

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Run in the driver's folder, with its import path and thread count; the worker's own are restored after.

        Raises:
            InputError: the driver's folder does not exist on this node.
        """
        import torch  # on use: importing edgeprune (the CLI's start-up) must not import torch

        if not os.path.isdir(self.cwd):
            raise InputError(
                f"working folder {self.cwd} does not exist on Ray node {socket.gethostname()}: "
                "run from a folder every node mounts at the same path (NFS)"
            )
        cwd, path, threads = os.getcwd(), list(sys.path), torch.get_num_threads()
        os.chdir(self.cwd)
        sys.path[:0] = [entry for entry in self.python_path if entry not in path]
        torch.set_num_threads(self.torch_threads)
        try:
            yield
        finally:
            torch.set_num_threads(threads)
            os.chdir(cwd)
            sys.path[:] = path


def _run_call(shipped_function: bytes, shipped_item: bytes, driver: DriverContext) -> Any:
    """The body of every Ray task: unpickle and call under the driver's context."""
    with driver.applied():
        function, item = pickle.loads(shipped_function), pickle.loads(shipped_item)
        return function(item)


# --------------------------------------------------------------------------- sweeps


def sweep(
    function: Callable[[Item], Result], items: Sequence[Item], executor: Executor, labels: Sequence[str] | None = None
) -> list[Result]:
    """``function(item)`` for every item through ``executor``; results in order.

    Raises:
        EdgepruneError: the first failed item's error, of the same class, its message
            prefixed with the item's label (``labels[i]``, default ``repr(item)``).
        Exception: a bug in ``function``, as raised.
    """
    names = list(labels) if labels is not None else [repr(item) for item in items]
    if len(names) != len(items):
        raise ValueError(f"sweep: {len(names)} labels for {len(items)} items")
    outcomes = executor.map(function, items)
    for name, outcome in zip(names, outcomes, strict=True):
        if isinstance(outcome, EdgepruneError):
            raise type(outcome)(f"{name}: {outcome}") from outcome
        if isinstance(outcome, Exception):
            raise outcome
    return outcomes  # type: ignore[return-value]  # no exceptions left
