"""The content-addressed stage cache.

An entry lives at ``<cache>/<stage>/<key>/`` and holds the stage's output files
plus ``result.json`` (artefacts and metrics). The key hashes the stage's name,
version, its config, its input artefacts' hashes, the data fingerprint and the
tool versions. Entries are built in a temporary folder and renamed into
place, so a reader never sees half an entry; a lookup re-hashes the entry's
files, so a damaged one is rebuilt, never served. A temporary folder left by a
killed build (``<stage>/.<key>.*``) is removed by the next ``Cache`` opened on
the folder, once no live build holds that entry's lock.

Like doit, the cache remembers the key *components* of the last run of each
stage of each target, so it can say why a stage re-ran ("prune.amount
changed: 0.3 -> 0.5").
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgeprune import interrupts
from edgeprune.artifacts import sha256_of, write_error, write_json_atomic
from edgeprune.errors import EdgepruneError

RESULT_FILE = "result.json"


def cache_key(components: dict[str, Any]) -> str:
    """A stable sha256 over JSON-serialised key components."""
    blob = json.dumps(components, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


class Cache:
    """A folder of finished stage outputs, safe to share between concurrent builds."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        try:
            (self.root / "index").mkdir(parents=True, exist_ok=True)
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise EdgepruneError(f"cannot create cache folder {self.root}: {error.strerror}") from None
        self.clear_debris()

    def entry(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def entry_lock(self, stage: str, key: str) -> contextlib.AbstractContextManager[bool]:
        """The lock a build holds while it looks up, computes and publishes one entry."""
        return self.lock(f"{stage}/{key}")

    def lookup(self, stage: str, key: str) -> dict[str, Any] | None:
        """The stored result of a finished, intact entry, or None.

        Every artefact file is checked against the size and sha256 recorded when
        the entry was published: a damaged entry is rebuilt, never served.
        """
        folder = self.entry(stage, key)
        try:
            result = json.loads((folder / RESULT_FILE).read_text())
            intact = all(_intact(folder / item["path"], item["size_bytes"], item["sha256"]) for item in result["artifacts"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return result if intact else None

    @contextlib.contextmanager
    def new_entry(self, stage: str, key: str) -> Iterator[Path]:
        """Yield a temporary folder for a stage to write into; publish it on success.

        Call under ``entry_lock``. A damaged (or ``--force``d) entry already in
        place is replaced; on any failure the temporary folder is removed.
        """
        staging: Path | None = None
        try:
            with interrupts.deferred():  # a Ctrl-C lands after ``staging`` is known, so it is removed
                staging = self._staging_folder(stage, key)
            yield staging
            with interrupts.deferred():
                self._publish(staging, self.entry(stage, key))
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise

    def _staging_folder(self, stage: str, key: str) -> Path:
        try:
            (self.root / stage).mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f".{key}.", dir=self.root / stage))
        except OSError as error:
            raise write_error(error, self.root / stage) from error

    def _publish(self, staging: Path, final: Path) -> None:
        if not final.exists():
            os.replace(staging, final)
            return
        replaced = Path(tempfile.mkdtemp(prefix=f"{staging.name}-replaced", dir=final.parent))
        os.replace(final, replaced / final.name)
        os.replace(staging, final)
        shutil.rmtree(replaced, ignore_errors=True)

    def clear_debris(self) -> list[Path]:
        """Remove temporary entry folders no live build is writing (left by a killed one)."""
        removed = []
        for folder in sorted(self.root.glob("*/.*")):
            key = folder.name[1:].split(".", 1)[0]
            if not folder.is_dir() or folder.parent.name in ("index", "locks"):
                continue
            with self.lock(f"{folder.parent.name}/{key}", blocking=False) as acquired:
                if acquired:
                    shutil.rmtree(folder, ignore_errors=True)
                    removed.append(folder)
        return removed

    def publish_result(self, folder: Path, result: dict[str, Any]) -> None:
        write_json_atomic(folder / RESULT_FILE, result)

    # ------------------------------------------------------------------ why it re-ran

    def explain(self, scope: str, stage: str, components: dict[str, Any]) -> str:
        """Why ``stage`` of ``scope`` must run: "first run" or the changed components."""
        previous = self._index(scope).get(stage)
        if previous is None:
            return "first run"
        changes = sorted(_diff(previous, components))
        if not changes:
            return "cache entry missing"
        shown = "; ".join(changes[:3])
        return f"{shown}{'; …' if len(changes) > 3 else ''}"

    def remember(self, scope: str, stage: str, components: dict[str, Any]) -> None:
        with self.lock(f"index-{scope}"):
            index = self._index(scope)
            index[stage] = json.loads(json.dumps(components, default=str))
            write_json_atomic(self._index_path(scope), index)

    def _index_path(self, scope: str) -> Path:
        safe = hashlib.sha256(scope.encode()).hexdigest()[:16]
        return self.root / "index" / f"{safe}.json"

    def _index(self, scope: str) -> dict[str, Any]:
        path = self._index_path(scope)
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    # ------------------------------------------------------------------ locking

    @contextlib.contextmanager
    def lock(self, name: str, blocking: bool = True) -> Iterator[bool]:
        """An exclusive inter-process lock (flock), released on exit or process death.

        Yields whether the lock is held: always True when ``blocking``, False when
        another process holds it and ``blocking`` is False.
        """
        safe = hashlib.sha256(name.encode()).hexdigest()[:16]
        with open(self.root / "locks" / f"{safe}.lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _intact(path: Path, size_bytes: int, sha256: str) -> bool:
    return path.is_file() and path.stat().st_size == size_bytes and sha256_of(path) == sha256


def _diff(old: Any, new: Any, path: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        changes: list[str] = []
        for key in sorted(set(old) | set(new)):
            changes += _diff(old.get(key), new.get(key), f"{path}.{key}" if path else key)
        return changes
    if json.dumps(old, sort_keys=True, default=str) != json.dumps(new, sort_keys=True, default=str):
        return [f"{path} changed: {_short(old)} -> {_short(new)}"]
    return []


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 24 else text[:12] + "…"
