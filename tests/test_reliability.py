"""Interrupted, killed and concurrent builds; damaged and half-written cache entries; hostile text in reports.

The end-to-end tests run real ``python -m edgeprune build`` processes and stop
them mid-stage with SIGINT, SIGTERM or SIGKILL: the previous output folder must
survive byte for byte, nothing half-written may remain, and a rerun must resume
from the last stage that finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edgeprune import interrupts
from edgeprune.artifacts import Artifact, recover_output, sha256_of, staged_directory
from edgeprune.cache import Cache
from tests.test_bad_inputs import FULL_DISK_SHIM, TINY, cli_env, error_line, run_cli, save_checkpoint

SETTINGS = (
    "finetune.epochs=1",
    "data.train_samples=1500",
    "data.eval_samples=500",
    "parity.samples=500",
    "quantize.scheme='none'",
    "benchmark.enabled=false",
    "budgets.max_accuracy_drop=0.0",
)
CHANGED = ("prune.amount=0.4",)  # prune_structured and every later stage re-run; the baseline stays cached
PLAN = ["baseline", "prune_structured", "finetune", "export_onnx"]
INTERRUPTED_MESSAGE = "edgeprune: interrupted; finished stages are cached, rerun to resume"


def build_args(weights: Path, *extra: str) -> list[str]:
    args = ["build", "--target", "cpu-x86", "--model", TINY, "--weights", str(weights), "--cache-dir", "cache"]
    return args + [f"--set={setting}" for setting in (*SETTINGS, *extra)]


@pytest.fixture(scope="module")
def previous_build(tmp_path_factory) -> Path:
    """A finished build (dist/ + cache/) to copy; its checkpoint path stays the same, so its cache keys hold."""
    folder = tmp_path_factory.mktemp("previous")
    save_checkpoint(folder / "w.pt")
    result = run_cli(build_args(folder / "w.pt"), folder)
    assert result.returncode == 0, result.stderr
    return folder


def copy_of(build: Path, work: Path) -> Path:
    for name in ("dist", "cache"):
        shutil.copytree(build / name, work / name)
    return work


def snapshot(folder: Path) -> dict[str, str]:
    return {str(path.relative_to(folder)): sha256_of(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def debris(work: Path) -> list[Path]:
    """Staging or retired folders beside the output, temporary entries in the cache."""
    return sorted([*(work / "dist").glob(".*"), *(work / "cache").glob("*/.*")])


def as_from_a_terminal() -> None:
    """In the child: default SIGINT/SIGTERM and no blocked signals, as a shell starts it. The pytest process's
    signal state, which libraries loaded by earlier tests may change, is not what is under test."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


class RunningBuild:
    """A ``python -m edgeprune build`` in the background; stdout read line by line."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.stderr_path = cwd / f"stderr-{time.monotonic_ns()}.txt"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "edgeprune", *args],
                cwd=cwd,
                env=cli_env(),
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                preexec_fn=as_from_a_terminal,
            )
        self.lines: list[str] = []

    def wait_for(self, text: str) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            if text in line:
                return
        raise AssertionError(f"the build ended before printing {text!r}: {''.join(self.lines)}{self.stderr_path.read_text()}")

    def finish(self, timeout: float = 300) -> int:
        out, _ = self.process.communicate(timeout=timeout)
        self.lines += out.splitlines(keepends=True)
        return self.process.returncode

    @property
    def stdout(self) -> str:
        return "".join(self.lines)

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()


def stage_line(stage: str, status: str) -> str:
    return f"[cpu-x86] {stage:<18} {status}"


def cached_stages(work: Path) -> dict[str, bool]:
    manifest = json.loads((work / "dist/cpu-x86/manifest.json").read_text())
    return {stage["name"]: stage["cached"] for stage in manifest["stages"]}


# --------------------------------------------------------------------------- interrupted builds


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum, stage, exit_codes",
    [
        (signal.SIGINT, "finetune", {130}),
        # a SIGTERM that killed the process outright would give -15
        (signal.SIGTERM, "export_onnx", {143}),
    ],
    ids=["SIGINT", "SIGTERM"],
)
def test_an_interrupted_build_keeps_the_previous_output_and_a_rerun_resumes(previous_build, tmp_path, signum, stage, exit_codes):
    work = copy_of(previous_build, tmp_path)
    before = snapshot(work / "dist/cpu-x86")
    build = RunningBuild(build_args(previous_build / "w.pt", *CHANGED), work)
    build.wait_for(stage_line(stage, "run"))
    build.process.send_signal(signum)
    assert build.finish() in exit_codes, build.stderr
    assert INTERRUPTED_MESSAGE in build.stderr and "Traceback" not in build.stderr
    assert stage_line(stage, "done") not in build.stdout  # stopped mid-stage
    finished = PLAN[: PLAN.index(stage)]
    assert stage_line(finished[-1], "done") in build.stdout  # the killed build finished the stage before
    assert snapshot(work / "dist/cpu-x86") == before
    assert debris(work) == []

    rerun = run_cli(build_args(previous_build / "w.pt", *CHANGED), work)
    assert rerun.returncode == 0, rerun.stderr
    assert cached_stages(work) == {name: name in finished for name in PLAN}
    assert json.loads((work / "dist/cpu-x86/manifest.json").read_text())["config"]["prune"]["amount"] == 0.4
    assert debris(work) == []


@pytest.mark.slow
def test_a_hard_killed_build_leaves_debris_that_the_next_build_clears(previous_build, tmp_path):
    work = copy_of(previous_build, tmp_path)
    before = snapshot(work / "dist/cpu-x86")
    build = RunningBuild(build_args(previous_build / "w.pt", *CHANGED), work)
    build.wait_for(stage_line("finetune", "run"))
    deadline = time.monotonic() + 60
    while not list((work / "cache/finetune").glob(".*")) and time.monotonic() < deadline:
        time.sleep(0.01)  # the stage's temporary folder is made just after that line
    build.process.kill()
    assert build.finish() == -signal.SIGKILL
    assert snapshot(work / "dist/cpu-x86") == before
    leftovers = debris(work)
    assert [path.parent.name for path in leftovers] == ["finetune"]  # the entry being written when it died

    rerun = run_cli(build_args(previous_build / "w.pt", *CHANGED), work)
    assert rerun.returncode == 0, rerun.stderr
    assert cached_stages(work) == {"baseline": True, "prune_structured": True, "finetune": False, "export_onnx": False}
    assert debris(work) == []


@pytest.mark.slow
def test_disk_full_while_writing_the_output_keeps_the_previous_output(previous_build, tmp_path):
    work = copy_of(previous_build, tmp_path)
    before = snapshot(work / "dist/cpu-x86")
    (work / "full_disk.py").write_text(FULL_DISK_SHIM)
    result = run_cli(build_args(previous_build / "w.pt"), work, prefix=("full_disk.py",), env={"FULL_DISK": str(work / "dist")})
    assert result.returncode == 2, result.stderr
    line = error_line(result)
    assert line.endswith(
        "disk full (no space left on device) while writing dist/cpu-x86/model.pt: free some space or write elsewhere (--out, --cache-dir)"
    )
    assert snapshot(work / "dist/cpu-x86") == before
    assert debris(work) == []


# --------------------------------------------------------------------------- concurrent builds


@pytest.mark.slow
def test_two_concurrent_builds_into_one_folder_and_cache_take_turns(tmp_path):
    save_checkpoint(tmp_path / "w.pt")
    smaller = ("data.train_samples=500", "data.eval_samples=300", "parity.samples=300")
    builds = [RunningBuild(build_args(tmp_path / "w.pt", *smaller), tmp_path) for _ in range(2)]
    assert [build.finish() for build in builds] == [0, 0], [build.stderr for build in builds]
    statuses = [dict(re.findall(r"^\[cpu-x86\] (\w+)\s+(done|cached)", build.stdout, flags=re.MULTILINE)) for build in builds]
    # one build did every stage's work, the other waited and was served all of it from the cache
    assert sorted(statuses, key=str) == [dict.fromkeys(PLAN, "cached"), dict.fromkeys(PLAN, "done")]
    manifest = json.loads((tmp_path / "dist/cpu-x86/manifest.json").read_text())
    assert [stage["name"] for stage in manifest["stages"]] == PLAN and all(stage["cached"] for stage in manifest["stages"])
    assert set(manifest["artifacts"]) == {"model", "onnx_fp32"}
    for entry in manifest["artifacts"].values():
        path = tmp_path / "dist/cpu-x86" / entry["file"]
        assert sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["size_bytes"]
    assert debris(tmp_path) == []


# --------------------------------------------------------------------------- the cache


KEY = "0" * 32


def publish(cache: Cache, payload: bytes, before_publish=lambda: None) -> None:
    """What the pipeline does for one stage: under the entry lock, write a file and publish the entry."""
    with cache.entry_lock("stage", KEY), cache.new_entry("stage", KEY) as folder:
        (folder / "model.bin").write_bytes(payload[: len(payload) // 2])
        before_publish()
        (folder / "model.bin").write_bytes(payload)
        artifact = Artifact.from_file("model", "model", folder / "model.bin")
        cache.publish_result(folder, {"artifacts": [artifact.to_dict(relative_to=folder)], "metrics": {}})


def test_the_cache_never_serves_an_entry_being_written(tmp_path):
    cache = Cache(tmp_path)
    halfway, finish = threading.Event(), threading.Event()
    writer = threading.Thread(target=publish, args=(cache, b"weights" * 100, lambda: (halfway.set(), finish.wait(10))))
    writer.start()
    try:
        assert halfway.wait(10)
        assert cache.lookup("stage", KEY) is None
        with cache.lock(f"stage/{KEY}", blocking=False) as acquired:
            assert not acquired  # a second build would wait here, then find the finished entry
        assert Cache(tmp_path).clear_debris() == []  # a live build's temporary folder is not debris
    finally:
        finish.set()
        writer.join(10)
    stored = cache.lookup("stage", KEY)
    assert stored["artifacts"][0]["sha256"] == hashlib.sha256(b"weights" * 100).hexdigest()
    assert sorted(path.name for path in (tmp_path / "stage").iterdir()) == [KEY]


def test_a_damaged_entry_is_rebuilt_not_served(tmp_path):
    cache = Cache(tmp_path)
    publish(cache, b"good weights")
    model = cache.entry("stage", KEY) / "model.bin"
    model.write_bytes(b"bad weights!")  # same size, other bytes
    assert cache.lookup("stage", KEY) is None
    model.unlink()
    assert cache.lookup("stage", KEY) is None
    publish(cache, b"good weights")
    assert cache.lookup("stage", KEY)["artifacts"][0]["sha256"] == hashlib.sha256(b"good weights").hexdigest()
    (cache.entry("stage", KEY) / "result.json").write_text('{"artifacts": [')  # cut short
    assert cache.lookup("stage", KEY) is None


def test_temporary_entries_of_a_killed_build_are_cleared_on_the_next_open(tmp_path):
    cache = Cache(tmp_path)
    dead = tmp_path / "finetune" / f".{KEY}.k1ll3d"
    live_key = "1" * 32
    live = tmp_path / "finetune" / f".{live_key}.w0rk1ng"
    for folder in (dead, live):
        folder.mkdir(parents=True)
        (folder / "model.pt").write_bytes(b"half")
    with cache.lock(f"finetune/{live_key}"):  # another build is writing this one
        Cache(tmp_path)
        assert not dead.exists() and live.exists()
    assert cache.clear_debris() == [live]  # that build died too
    assert not live.exists()


def test_a_swap_killed_between_its_renames_is_undone_by_the_next_build(tmp_path):
    final = tmp_path / "dist" / "cpu-x86"
    retired = tmp_path / "dist" / ".cpu-x86.old-x1" / "cpu-x86"
    retired.mkdir(parents=True)
    (retired / "manifest.json").write_text("previous")
    (tmp_path / "dist" / ".cpu-x86.staging-y2").mkdir()
    assert len(recover_output(final)) == 2
    assert (final / "manifest.json").read_text() == "previous"
    assert sorted(path.name for path in (tmp_path / "dist").iterdir()) == ["cpu-x86"]
    (tmp_path / "dist" / ".cpu-x86.staging-z3").mkdir()  # a later kill, and the next build
    with staged_directory(final) as staging:
        (staging / "manifest.json").write_text("new")
    assert (final / "manifest.json").read_text() == "new"
    assert sorted(path.name for path in (tmp_path / "dist").iterdir()) == ["cpu-x86"]


# --------------------------------------------------------------------------- signals


def test_sigterm_becomes_an_interrupt_inside_interruptible_only():
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    with pytest.raises(interrupts.Interrupted) as caught, interrupts.interruptible():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert caught.value.exit_code == 143 and interrupts.exit_code(caught.value) == 143
    assert interrupts.exit_code(KeyboardInterrupt()) == 130
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.fixture
def python_default_sigint():
    """SIGINT as Python sets it up at start (handler and mask), whatever earlier tests' libraries left; restored after."""
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
    yield
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    signal.signal(signal.SIGINT, handler)


def test_deferred_signals_arrive_after_the_critical_section(python_default_sigint):
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts.deferred():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
            steps.append("second rename")
        steps.append("after the block")
    assert steps == ["second rename"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------- hostile text


HOSTILE = "<script>alert(1)</script> | x"


@pytest.mark.slow
def test_markdown_report_escapes_text_taken_from_inputs(previous_build, tmp_path):
    """A profile's name and description and a weights path full of HTML and table pipes."""
    from edgeprune.report import markdown_report

    manifest = json.loads((previous_build / "dist/cpu-x86/manifest.json").read_text())
    manifest["target"] = manifest["config"]["name"] = HOSTILE
    manifest["config"]["description"] = HOSTILE
    manifest["inputs"].update(model_source=HOSTILE, weights=HOSTILE, data_source=HOSTILE)
    manifest["benchmark_device"] = manifest["config"]["benchmark"]["device"] = HOSTILE
    manifest["speedups"] = {manifest["primary_artifact"]: 1.5}
    for stage in manifest["stages"]:
        stage["reason"] = HOSTILE
    for row in manifest["model"].get("channels", []):
        row["layer"] = HOSTILE
    manifest["budgets"]["violations"] = [{"kind": "size", "message": HOSTILE}]
    report = markdown_report(manifest)
    assert "<script" not in report and "</script" not in report
    for table in re.findall(r"((?:^\|.*\|\n)+)", report, flags=re.MULTILINE):
        widths = {len(re.findall(r"(?<!\\)\|", row)) for row in table.splitlines()}
        assert len(widths) == 1, table  # an input's "|" never adds a column
