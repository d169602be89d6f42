"""Bad inputs through the real command line: one clear line on stderr, a non-zero exit, no traceback.

Each row runs ``python -m edgeprune`` in a fresh folder, as a user would. A row
names what is wrong, the files it needs, and what the error line must say.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
TINY = "tests.user_models:tiny_cnn"
# Fails before any real work for the error rows; keeps the rows that do run short.
QUICK = ("finetune.epochs=1", "benchmark.enabled=false", "data.train_samples=512", "data.eval_samples=256", "parity.samples=256")

# Runs the CLI on a "disk" that is full below $FULL_DISK: every write there
# stores half its bytes, then fails with ENOSPC, as a real full disk does.
FULL_DISK_SHIM = """
import builtins, errno, io, os, sys

FULL = os.path.realpath(os.environ["FULL_DISK"]) + os.sep
real_open = builtins.open


class FullDiskFile:
    def __init__(self, handle, name):
        self._handle, self._name = handle, name

    def write(self, data):
        self._handle.write(data[: len(data) // 2])
        self._handle.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._name)

    def fileno(self):  # no sendfile shortcut around write()
        raise io.UnsupportedOperation("fileno")

    def __getattr__(self, name):
        return getattr(self._handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handle.close()


def full_disk_open(file, mode="r", *args, **kwargs):
    handle = real_open(file, mode, *args, **kwargs)
    writing = isinstance(file, (str, os.PathLike)) and ("w" in mode or "x" in mode)
    if writing and os.path.realpath(file).startswith(FULL):
        return FullDiskFile(handle, os.fspath(file))
    return handle


builtins.open = full_disk_open
from edgeprune.cli import main

sys.exit(main(sys.argv[1:]))
"""


def cli_env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key != "EDGEPRUNE_CACHE_DIR"}
    return {**env, "PYTHONPATH": str(REPO)}


def run_cli(args: list[str], cwd: Path, preexec_fn=None, prefix: tuple[str, ...] = ("-m", "edgeprune"), env: dict | None = None):
    """``python -m edgeprune ARGS`` in ``cwd``, the way a user runs it."""
    return subprocess.run(
        [sys.executable, *prefix, *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
        env={**cli_env(), **(env or {})},
        preexec_fn=preexec_fn,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``edgeprune: error:`` line, after checking there is exactly one and no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and "\n  File " not in result.stderr, result.stderr
    return lines[0]


# --------------------------------------------------------------------------- input files


def write_npz(path: Path, **changes: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
        "y_train": np.arange(40) % 10,
        "x_test": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8),
        "y_test": np.arange(20) % 10,
    }
    np.savez(path, **{**arrays, **changes})


def save_checkpoint(path: Path, num_classes: int = 10, nan: bool = False) -> None:
    import torch

    from tests.user_models import TinyCnn

    torch.manual_seed(0)
    state = TinyCnn(num_classes=num_classes).state_dict()
    if nan:
        state["features.0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, path)


class Evil:
    """A pickle that runs ``touch pwned`` when loaded (never, without --trust-checkpoint)."""

    def __reduce__(self):
        return (os.system, ("touch pwned",))


def save_evil(path: Path) -> None:
    import torch

    torch.save({"state_dict": Evil()}, path)


def save_object(value: object, path: Path) -> None:
    import torch

    torch.save(value, path)


def truncate(path: Path) -> None:
    save_checkpoint(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def unexportable_net():
    """A model torch runs but ONNX cannot express (aten::cummax has no ONNX op)."""
    import torch
    from torch import nn

    class CumulativeMax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(28 * 28, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cummax(self.linear(torch.flatten(x, 1)), dim=1).values

    torch.manual_seed(0)
    return CumulativeMax()


def broken_factory():
    raise ValueError("layers must be positive")


# --------------------------------------------------------------------------- the matrix


@dataclass(frozen=True)
class Row:
    args: tuple[str, ...]
    message: str
    files: dict = field(default_factory=dict)  # name -> text, or a function writing the path
    exit_code: int = 2


def build(*args: str) -> tuple[str, ...]:
    return ("build", "--target", "cpu-x86", *args)


ROWS = {
    # configuration: profiles, project files, --set
    "unknown target": Row(("build", "--target", "iphone"), "unknown target 'iphone' (known: android, android-executorch, cpu-x86"),
    "bad TOML in a project file": Row(build("--project", "bad.toml"), "bad.toml: invalid TOML", {"bad.toml": "[prune\n"}),
    "missing project file": Row(build("--project", "nope.toml"), "nope.toml: file not found"),
    "unknown key in a profile": Row(
        ("build", "--target", "mine.toml"), "mine.toml: unknown key 'prune.amont'", {"mine.toml": "[prune]\namont = 0.3\n"}
    ),
    "wrong type in a project file": Row(
        build("--project", "p.toml"),
        "p.toml: 'finetune.epochs' must be an integer, got 'three'",
        {"p.toml": "[finetune]\nepochs = 'three'\n"},
    ),
    "out-of-range value in a profile": Row(
        ("build", "--target", "mine.toml"),
        "mine.toml: 'prune.amount' = 7.0 is out of range [0.0, 0.95]",
        {"mine.toml": "[prune]\namount = 7\n"},
    ),
    "wrong type in --set": Row(build("--set", "export.opset=seventeen"), "'export.opset' must be an integer, got 'seventeen'"),
    # checkpoints
    "missing checkpoint": Row(build("--model", TINY, "--weights", "missing.pt"), "checkpoint not found: missing.pt"),
    "corrupt checkpoint": Row(build("--model", TINY, "--weights", "c.pt"), "c.pt: corrupt or truncated checkpoint", {"c.pt": "garbage"}),
    "truncated checkpoint": Row(build("--model", TINY, "--weights", "t.pt"), "t.pt: corrupt or truncated checkpoint", {"t.pt": truncate}),
    "checkpoint of another architecture": Row(
        build("--model", TINY, "--weights", "o.pt"),
        "o.pt: shape mismatch at classifier.weight: checkpoint (5, 64) vs model (10, 64) (a classifier of another size",
        {"o.pt": lambda path: save_checkpoint(path, num_classes=5)},
    ),
    "checkpoint with NaN weights": Row(
        build("--model", TINY, "--weights", "n.pt"),
        "n.pt: checkpoint has NaN/inf weights in features.0.weight",
        {"n.pt": lambda path: save_checkpoint(path, nan=True)},
    ),
    "checkpoint holding a pickled object": Row(
        build("--model", TINY, "--weights", "evil.pt"), "evil.pt: the checkpoint holds pickled objects", {"evil.pt": save_evil}
    ),
    "checkpoint that is not a state_dict": Row(
        build("--model", TINY, "--weights", "j.pt"), "j.pt: not a state_dict", {"j.pt": lambda path: save_object({"epoch": 3}, path)}
    ),
    # models
    "model rejects the input shape": Row(
        build("--model", "tests.user_models:tiny_cnn_rgb"), "the model rejects inputs of shape (2, 1, 28, 28) from the data"
    ),
    "model factory not importable": Row(build("--model", "tests.nothing_here:net"), "model.source 'tests.nothing_here:net': cannot import"),
    "model factory raises": Row(
        build("--model", "tests.test_bad_inputs:broken_factory"), "the factory raised ValueError: layers must be positive"
    ),
    "model that cannot be exported": Row(
        build("--model", "tests.test_bad_inputs:unexportable_net", "--set", "prune.mode='none'", *[f"--set={s}" for s in QUICK]),
        "Exporting the operator 'aten::cummax' to ONNX opset version 17 is not supported",
        exit_code=3,
    ),
    # data
    "missing data file": Row(build("--data", "nothing.npz"), "data file not found: nothing.npz"),
    "corrupt data file": Row(build("--data", "d.npz"), "d.npz: not a readable .npz file", {"d.npz": "not a zip"}),
    "empty dataset": Row(
        build("--data", "d.npz"),
        "d.npz: x_train is empty",
        {"d.npz": lambda path: write_npz(path, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.int64))},
    ),
    "labels beyond the classes": Row(
        build("--data", "d.npz"),
        "d.npz: y_train labels span [0, 12] but model.num_classes = 10",
        {"d.npz": lambda path: write_npz(path, y_train=np.arange(40) % 13)},
    ),
    "one-hot labels": Row(
        build("--data", "d.npz"),
        "d.npz: y_train must be 1-D class indices, got shape (40, 10)",
        {"d.npz": lambda path: write_npz(path, y_train=np.eye(10, dtype=np.int64)[np.arange(40) % 10])},
    ),
    "fewer labels than images": Row(
        build("--data", "d.npz"),
        "d.npz: x_test has 20 images but y_test has 19 labels",
        {"d.npz": lambda path: write_npz(path, y_test=np.arange(19) % 10)},
    ),
    "images of the wrong dtype": Row(
        build("--data", "d.npz"),
        "d.npz: x_train must hold pixel values (uint8 or float), got dtype <U1",
        {"d.npz": lambda path: write_npz(path, x_train=np.full((40, 28, 28), "a"))},
    ),
    "images of the wrong shape": Row(
        build("--data", "d.npz"),
        "d.npz: x_train must be (N,H,W), (N,C,H,W) or (N,H,W,C), got (40, 784)",
        {"d.npz": lambda path: write_npz(path, x_train=np.zeros((40, 784), np.uint8))},
    ),
    "NaN in the images": Row(
        build("--data", "d.npz"),
        "d.npz: x_test contains NaN or infinite values",
        {"d.npz": lambda path: write_npz(path, x_test=np.full((20, 28, 28), np.nan, np.float32))},
    ),
    # environment
    "output path is a file": Row(build("--out", "taken"), "output path taken exists and is not a folder", {"taken": "x"}),
}


@pytest.mark.parametrize("row", list(ROWS.values()), ids=list(ROWS))
def test_bad_input_gives_one_line_and_a_non_zero_exit(tmp_path, row):
    for name, content in row.files.items():
        if callable(content):
            content(tmp_path / name)
        else:
            (tmp_path / name).write_text(content)
    result = run_cli(list(row.args), tmp_path)
    assert result.returncode == row.exit_code, result.stderr
    assert row.message in error_line(result)
    assert not (tmp_path / "pwned").exists()  # no pickle ran
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_debug_shows_the_traceback_of_a_bad_input(tmp_path):
    (tmp_path / "c.pt").write_text("garbage")
    result = run_cli([*build("--model", TINY, "--weights", "c.pt"), "--debug"], tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr
    assert "corrupt or truncated checkpoint" in result.stderr


def test_unwritable_output_folder_is_refused_before_any_work(tmp_path):
    with read_only_folder(tmp_path / "ro"):
        result = run_cli([*build("--out", "ro/out")], tmp_path)
    assert result.returncode == 2, result.stderr
    assert "output folder ro/out is not writable (choose another with --out)" in error_line(result)
    assert not (tmp_path / ".edgeprune-cache").exists()  # refused before the cache or any stage


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder this user cannot write to; for root (who may write anywhere) an immutable one."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i is not allowed: no folder is read-only to this user")
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_a_profile_name_cannot_point_the_output_outside_dist(tmp_path):
    (tmp_path / "evil.toml").write_text('name = "../../escaped"\n')
    result = run_cli(["targets", "show", "evil.toml"], tmp_path)  # a build would write to ../../escaped
    assert result.returncode == 2
    assert "evil.toml: 'name' must be letters, digits" in error_line(result)


@pytest.mark.slow
def test_disk_full_while_writing_an_artefact_names_the_file_and_leaves_nothing_half_written(tmp_path):
    save_checkpoint(tmp_path / "w.pt")
    (tmp_path / "full_disk.py").write_text(FULL_DISK_SHIM)
    cache = tmp_path / "cache"
    args = [*build("--model", TINY, "--weights", "w.pt", "--cache-dir", "cache"), *[f"--set={s}" for s in QUICK]]
    result = run_cli(args, tmp_path, prefix=("full_disk.py",), env={"FULL_DISK": str(cache)})
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "disk full (no space left on device) while writing cache/baseline/" in line and line.endswith(
        "model.pt: free some space or write elsewhere (--out, --cache-dir)"
    )
    assert [p for p in cache.rglob("*") if p.is_file() and p.parent.name != "locks"] == []  # no half file, no entry
    assert not (tmp_path / "dist").exists()


@pytest.mark.slow
def test_file_size_limit_reached_while_writing_is_one_line(tmp_path):
    """A real kernel refusal: RLIMIT_FSIZE makes the first artefact write fail with EFBIG."""
    save_checkpoint(tmp_path / "w.pt")
    limit = 64 * 1024  # the unpruned model file is ~100 KiB

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    args = [*build("--model", TINY, "--weights", "w.pt", "--cache-dir", "cache"), *[f"--set={s}" for s in QUICK]]
    result = run_cli(args, tmp_path, preexec_fn=limit_file_size)
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert "file too large (the file size limit, ulimit -f, was reached) while writing cache/baseline/" in line
    assert not [p for p in (tmp_path / "cache").rglob("*.pt*")]
