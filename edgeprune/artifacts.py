"""Artefacts on disk: hashing, atomic writes and the manifest.

Nothing here writes a file in place: every file is written to a temporary
name in the same folder and renamed, so a reader (or a crashed build) never
sees half a file, and an output folder is swapped in whole.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgeprune import interrupts
from edgeprune.errors import EdgepruneError

MANIFEST = "manifest.json"
FILE_MODE, DIR_MODE = 0o644, 0o755


@dataclass(frozen=True)
class Artifact:
    """One file a stage produced. ``path`` is absolute; ``meta`` is JSON-safe."""

    name: str
    kind: str  # "model" (torch model file), "onnx", "tflite"
    path: Path
    sha256: str
    size_bytes: int
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_file(cls, name: str, kind: str, path: Path, **meta: Any) -> Artifact:
        path = Path(path)
        return cls(name, kind, path, sha256_of(path), path.stat().st_size, dict(meta))

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path.relative_to(relative_to) if relative_to else self.path)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path) -> Artifact:
        return cls(data["name"], data["kind"], base / data["path"], data["sha256"], data["size_bytes"], data["meta"])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def gzip_size(path: Path) -> int:
    """Bytes after gzip -9 with a zeroed timestamp: what an app store would ship."""
    return len(gzip.compress(Path(path).read_bytes(), compresslevel=9, mtime=0))


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename.

    Raises:
        EdgepruneError: the write failed (disk full, read-only, ...); no temporary file is left.
    """
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def write_json_atomic(path: Path, data: Any) -> None:
    write_bytes_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` to write to; rename it to ``path`` on success.

    For writers that want a file name (``torch.save``, ``onnx.save``, converters'
    ``export``). On failure the temporary file is removed and an OSError becomes
    an EdgepruneError saying what went wrong and where.
    """
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise write_error(error, path) from error
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)  # mkstemp creates 0600; artefacts are meant to be shared
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise write_error(error, path) from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_NO_SPACE = "free some space or write elsewhere (--out, --cache-dir)"
_NO_ACCESS = "write elsewhere (--out, --cache-dir)"
_WRITE_FAILURES = {  # errno -> (what happened, how to fix it)
    errno.ENOSPC: ("disk full (no space left on device)", _NO_SPACE),
    errno.EDQUOT: ("disk quota exceeded (no space left for this user)", _NO_SPACE),
    errno.EFBIG: ("file too large (the file size limit, ulimit -f, was reached)", "raise the limit or " + _NO_ACCESS),
    errno.EROFS: ("read-only file system", _NO_ACCESS),
    errno.EACCES: ("permission denied", _NO_ACCESS),
    errno.EPERM: ("permission denied", _NO_ACCESS),
}


def write_error(error: OSError, path: Path) -> EdgepruneError:
    """One line for a failed write: what happened, where, and how to fix it."""
    what, fix = _WRITE_FAILURES.get(error.errno, (error.strerror or str(error), ""))
    return EdgepruneError(f"{what} while writing {path}" + (f": {fix}" if fix else ""))


@contextlib.contextmanager
def staged_directory(final: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``final``; on success swap it in for ``final`` whole.

    On any failure (including KeyboardInterrupt, SIGTERM under
    ``interrupts.interruptible`` and a full disk) the temporary folder is removed
    and the previous ``final`` stays untouched. Two builds writing the same
    folder take turns (a lock on the parent folder), and debris a killed build
    left (``.NAME.staging-*``, ``.NAME.old-*``) is cleared first.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise EdgepruneError(f"cannot write to output folder {final}: {error.strerror}") from None
    with _folder_lock(final.parent):
        recover_output(final)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
            os.chmod(staging, DIR_MODE)
        except OSError as error:
            raise EdgepruneError(f"cannot write to output folder {final}: {error.strerror}") from None
        try:
            yield staging
            with interrupts.deferred():  # all renames or none, whatever signal arrives
                _swap_in(staging, final)
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(error, OSError):
                raise write_error(error, Path(str(error.filename or final).replace(str(staging), str(final)))) from error
            if type(error) is EdgepruneError and str(staging) in str(error):  # name the file the user will look for
                raise EdgepruneError(str(error).replace(str(staging), str(final))) from error
            raise


def recover_output(final: Path) -> list[Path]:
    """Clear what a build killed mid-write left beside ``final``; returns what was removed.

    A kill between the two renames of a swap leaves the previous output in
    ``.NAME.old-*/NAME`` and no ``final``: it is put back. Call under the
    folder's lock (``staged_directory`` does).
    """
    removed = []
    for retired in sorted(final.parent.glob(f".{final.name}.old-*")):
        if not final.exists() and (retired / final.name).is_dir():
            os.replace(retired / final.name, final)
        shutil.rmtree(retired, ignore_errors=True)
        removed.append(retired)
    for staging in sorted(final.parent.glob(f".{final.name}.staging-*")):
        shutil.rmtree(staging, ignore_errors=True)
        removed.append(staging)
    return removed


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself: no lock file is left in the output tree."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _swap_in(staging: Path, final: Path) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
    os.replace(final, retired / final.name)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(retired / final.name, final)  # put the previous good output back
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def copy_into(artifact: Artifact, folder: Path, filename: str) -> Artifact:
    """Copy an artefact into ``folder`` under ``filename`` and verify its hash."""
    target = folder / filename
    with atomic_path(target) as tmp:
        shutil.copyfile(artifact.path, tmp)
    copied = Artifact.from_file(artifact.name, artifact.kind, target, **artifact.meta)
    if copied.sha256 != artifact.sha256:
        raise EdgepruneError(f"copy of {artifact.path} to {target} is corrupt (sha256 differs)")
    return copied
