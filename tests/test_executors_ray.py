"""Executors: a local Ray runtime runs a two-target build and a pruning sweep with the local executor's results;
benchmarks on one device take turns while different devices run at once."""

import contextlib
import functools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune import api
from edgeprune.api import build_configs as build_matrix
from edgeprune.errors import ConfigError, InputError
from edgeprune.executors import LocalExecutor, open_executor, sweep
from edgeprune.manifest import strip_volatile
from edgeprune.runtimes.device_locks import device_slot, physical_device
from tests.conftest import FAST, USER_MODEL
from tests.user_models import tiny_cnn

TARGETS = ["cpu-x86", "nvidia-gpu"]  # share the baseline; nvidia-gpu's benchmark is skipped without CUDA
# The weak, briefly finetuned model sits near the int8 quality gate; the gate is not what is tested here.
SMALL = (
    *FAST,
    "data.train_samples=512",
    "quantize.min_top1_agreement=0.9",
    "quantize.max_accuracy_drop=5.0",
    "parity.int8_min_top1_agreement=0.9",
)


@pytest.fixture(scope="module")
def ray_executor():
    pytest.importorskip("ray")
    with open_executor("ray", num_cpus=2) as executor:
        yield executor


# --------------------------------------------------------------------------- without Ray


def test_importing_edgeprune_imports_neither_ray_nor_torch():
    code = "import sys, edgeprune, edgeprune.api, edgeprune.executors; print('ray' in sys.modules, 'torch' in sys.modules)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["False", "False"]


def test_local_executor_hands_back_results_and_errors_in_order():
    def invert(value: int) -> float:
        if value == 0:
            raise InputError("zero has no inverse")
        return 1 / value

    outcomes = LocalExecutor().map(invert, [4, 0, 2])
    assert outcomes[0] == 0.25 and outcomes[2] == 0.5
    assert isinstance(outcomes[1], InputError)
    with pytest.raises(InputError, match=r"^point b: zero has no inverse$"):
        sweep(invert, [4, 0], LocalExecutor(), labels=["point a", "point b"])


def test_open_executor_rejects_unknown_kinds_and_stray_addresses():
    with pytest.raises(ConfigError, match="unknown executor 'dask'"):
        with open_executor("dask"):
            pass
    with pytest.raises(ConfigError, match="needs --executor ray"):
        with open_executor("local", address="auto"):
            pass


def test_physical_device_qualifies_this_machines_devices_by_host():
    assert physical_device("local").startswith("local@") and physical_device(" gpu ").startswith("gpu@")
    assert physical_device("ssh://pi@raspberrypi.local") == "ssh://pi@raspberrypi.local"


# --------------------------------------------------------------------------- build matrix


@pytest.mark.slow
def test_ray_matrix_build_gives_the_local_manifests_and_builds_shared_stages_once(ray_executor, user_checkpoint, tmp_path):
    common = dict(model=USER_MODEL, weights=str(user_checkpoint), overrides=SMALL)
    local = api.build_matrix(TARGETS, **common, out=tmp_path / "local", cache_dir=tmp_path / "cache-local")
    configs = [api.resolve(target, **common) for target in TARGETS]
    remote = build_matrix(configs, ray_executor, tmp_path / "ray", tmp_path / "cache-ray")

    assert not local.failures and not remote.failures
    assert [build.target for build in remote.builds] == TARGETS
    for built_locally, built_on_ray in zip(local.builds, remote.builds, strict=True):
        assert strip_volatile(built_on_ray.manifest) == strip_volatile(built_locally.manifest)
        for entry in built_on_ray.manifest["artifacts"].values():
            assert (built_on_ray.out / entry["file"]).is_file()
    # The two targets ran at once on one cache: the baseline they share was computed by one of them.
    baselines = [next(s for s in build.manifest["stages"] if s["name"] == "baseline") for build in remote.builds]
    assert sorted(stage["cached"] for stage in baselines) == [False, True]
    assert baselines[0]["cache_key"] == baselines[1]["cache_key"]
    cpu = remote.builds[0].manifest
    assert cpu["artifacts"]["onnx_int8"]["benchmark"]["latency_p50_ms"] > 0  # measured inside a Ray task


# --------------------------------------------------------------------------- sweep


def prune_and_evaluate(point: tuple[str, float], checkpoint: Path, images: np.ndarray, labels: np.ndarray) -> dict:
    """Remove ``ratio`` of one conv layer's filters (lowest L1 first, with everything coupled to them); top-1 on the split."""
    import torch_pruning as tp

    from edgeprune.training import evaluate

    layer, ratio = point
    model = tiny_cnn()
    model.load_state_dict(torch.load(checkpoint, weights_only=True))
    conv = model.get_submodule(layer)
    if ratio > 0:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.from_numpy(images[:1]))
        weakest = conv.weight.detach().abs().sum(dim=(1, 2, 3)).argsort()[: round(conv.out_channels * ratio)]
        graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=weakest.tolist()).prune()
    return {"layer": layer, "ratio": ratio, "channels": conv.out_channels, "accuracy": evaluate(model, images, labels)}


def fail_on_point(point: tuple[str, float]) -> float:
    if point[1] < 0:
        raise InputError("ratio must be >= 0")
    if point[1] > 1:
        raise ValueError("a bug")
    return point[1]


@pytest.mark.slow
def test_ray_sweep_gives_the_local_results(ray_executor, user_checkpoint, example_data):
    points = [(layer, ratio) for layer in ("features.0", "features.4", "features.8") for ratio in (0.0, 0.5, 0.75)]
    evaluate_point = functools.partial(
        prune_and_evaluate, checkpoint=user_checkpoint, images=example_data.x_test[:1000], labels=example_data.y_test[:1000]
    )
    local = sweep(evaluate_point, points, LocalExecutor())
    remote = sweep(evaluate_point, points, ray_executor)

    assert remote == local
    widths = {"features.0": 16, "features.4": 32, "features.8": 64}
    for result in remote:
        assert result["channels"] == widths[result["layer"]] - round(widths[result["layer"]] * result["ratio"])
    dense = {result["accuracy"] for result in remote if result["ratio"] == 0.0}
    assert len(dense) == 1 and dense.pop() > 50.0
    assert min(result["accuracy"] for result in remote) < max(result["accuracy"] for result in remote) - 1.0


@pytest.mark.slow
def test_ray_task_errors_come_back_as_edgeprune_errors_named_by_point(ray_executor):
    with pytest.raises(InputError, match=r"^conv9 at -0.5: ratio must be >= 0$"):
        sweep(fail_on_point, [("conv1", 0.5), ("conv9", -0.5)], ray_executor, labels=["conv1 at 0.5", "conv9 at -0.5"])
    outcomes = ray_executor.map(fail_on_point, [("conv1", 0.5), ("conv2", 2.0)])
    assert outcomes[0] == 0.5
    assert isinstance(outcomes[1], Exception) and "ValueError: a bug" in str(outcomes[1])  # a bug keeps its remote traceback


ANALYSIS = (*FAST, "data.train_samples=1000", "data.eval_samples=500", "benchmark.iterations=20", "benchmark.repeats=1")


@pytest.mark.slow
def test_ray_analyze_gives_the_local_sensitivity_analysis(ray_executor, user_checkpoint, tmp_path):
    """``edgeprune analyze``'s layer groups as Ray tasks: the same groups, widths, accuracies and MACs as locally."""
    options = dict(overrides=ANALYSIS, model=USER_MODEL, weights=str(user_checkpoint), cache_dir=tmp_path / "cache", ratios=(0.5,))
    local = api.analyze("cpu-x86", out=tmp_path / "local", **options)
    with pytest.MonkeyPatch.context() as patch:  # the API opens its own executor: hand it the module's Ray runtime
        patch.setattr("edgeprune.executors.open_executor", lambda kind, address=None: contextlib.nullcontext(ray_executor))
        remote = api.analyze("cpu-x86", out=tmp_path / "ray", executor="ray", **options)

    def measured(data: dict) -> list[tuple]:
        return [
            (group["layer"], group["channels"], row["channels"], row["accuracy"], round(row["mac_reduction"], 6))
            for group in data["groups"]
            for row in group["results"]
        ]

    assert measured(remote.data) == measured(local.data)
    assert [row[0] for row in measured(remote.data)] == ["features.0", "features.4", "features.8"]
    assert all(row["latency_p50_ms"] > 0 for group in remote.data["groups"] for row in group["results"])
    assert remote.data["dense"]["accuracy"] == local.data["dense"]["accuracy"] > 50
    assert (tmp_path / "ray/sensitivity.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.slow
def test_closing_a_ray_runtime_gives_back_the_signal_handlers_it_replaced():
    pytest.importorskip("ray")
    code = (
        "import signal\n"
        "from edgeprune.executors import open_executor\n"
        "before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)\n"
        "with open_executor('ray', num_cpus=1):\n"
        "    during = signal.getsignal(signal.SIGTERM)\n"
        "after = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)\n"
        "print(during is not before[0], after == before)\n"
    )
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert shown.stdout.split() == ["True", "True"], shown.stderr[-2000:]


# --------------------------------------------------------------------------- device exclusivity


def hold_device(job: tuple[str, str, Path, int, float]) -> tuple[float, float, bool]:
    """Once all ``expected`` tasks have started, hold ``device``'s slot until all are seen inside theirs, or ``seconds``.

    Returns (entered, left, whether every task was inside its slot at one moment).
    """
    name, device, folder, expected, seconds = job
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"started-{name}").touch()
    _wait_until(lambda: _count(folder, "started-") >= expected, timeout=60.0)
    with device_slot(device, folder / "cache"):
        entered = time.monotonic()
        (folder / f"in-{name}").touch()
        seen = folder / "all-inside"  # the first task to see everyone inside says so; the others stop waiting
        together = _wait_until(lambda: seen.exists() or _count(folder, "in-") - _count(folder, "out-") >= expected, timeout=seconds)
        if together:
            seen.touch()
        (folder / f"out-{name}").touch()
        return entered, time.monotonic(), together


def _count(folder: Path, prefix: str) -> int:
    return len(list(folder.glob(f"{prefix}*")))


def _wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.slow
def test_one_device_benchmarks_one_task_at_a_time_and_different_devices_run_at_once(ray_executor, tmp_path):
    same = ray_executor.map(hold_device, [(name, "ssh://pi@board", tmp_path / "same", 2, 1.5) for name in ("a", "b")])
    (first_in, first_out, met_a), (second_in, second_out, met_b) = sorted(same)
    assert second_in >= first_out  # time.monotonic is system-wide on Linux: comparable across processes
    assert not met_a and not met_b

    devices = [("a", "ssh://pi@board"), ("b", "adb://PHONE1")]
    apart = ray_executor.map(hold_device, [(name, device, tmp_path / "apart", 2, 30.0) for name, device in devices])
    assert all(together for _, _, together in apart)  # both held their device's slot at the same moment
    (first_in, first_out, _), (second_in, _, _) = sorted(apart)
    assert second_in < first_out
