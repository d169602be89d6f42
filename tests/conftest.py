"""Shared fixtures: a user checkpoint trained once per session, and fast build settings."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.config import DataConfig
from edgeprune.data import load_dataset
from edgeprune.simd import cpu_flags, host_channel_multiple
from edgeprune.training import TrainSettings, train
from tests.user_models import tiny_cnn

# Settings that keep a whole build to seconds while staying real: every stage runs.
FAST = (
    "finetune.epochs=1",
    "benchmark.repeats=2",
    "benchmark.iterations=20",
    "benchmark.warmup=3",
    "data.calibration_samples=64",
)
USER_MODEL = "tests.user_models:tiny_cnn"
# tiny_cnn after a few epochs has logit margins finer than one step of an int8 model *output*
# (android/rpi5 ship int8 I/O) on ~1.5 % of the test images: its int8 TFLite agrees with fp32 on
# ~98.5 %. The bundled example (small_cnn) agrees on 99.6 % under the default 0.99.
TINY_INT8_GATE = "quantize.min_top1_agreement=0.97"

# onnxruntime's x86 int8 kernels sum u8 x s8 products exactly with VNNI; without it (AVX2 alone, as on
# AMD EPYC before Zen 4) VPMADDUBSW adds pairs in saturating int16 (microsoft/onnxruntime#6004), so a
# uint8-activation model loses more there and its budget needs more float layers. No environment
# variable makes onnxruntime emulate that path: the tests that count float layers check it on VNNI hosts.
ONNXRUNTIME_INT8_EXACT = bool({"avx512_vnni", "avx_vnni"} & cpu_flags())


@pytest.fixture(scope="session")
def example_data():
    return load_dataset(DataConfig(), num_classes=10)


@pytest.fixture(scope="session")
def user_checkpoint(tmp_path_factory, example_data) -> Path:
    """tiny_cnn trained for 2 epochs on the bundled data, saved as a bare state_dict."""
    model = tiny_cnn()
    train(model, example_data.x_train, example_data.y_train, TrainSettings(epochs=2, lr=1e-2, batch_size=128, seed=0))
    path = tmp_path_factory.mktemp("checkpoints") / "tiny_cnn.pt"
    torch.save(model.state_dict(), path)
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh folder so dist/ and the cache land in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def onnx_op_types(path: Path) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(str(path)).graph.node}


def split_accuracy_is_real(value: float, samples: int) -> bool:
    """A top-1 measured on ``samples`` images is a multiple of 100/samples."""
    return bool(np.isclose(value * samples / 100, round(value * samples / 100), atol=1e-6))


def pytest_report_header(config) -> list[str]:
    """The CPU the numbers came from: vector ISA, what PyTorch dispatches to, and any ISA cap in force."""
    flags = cpu_flags()
    vector = sorted(flag for flag in flags if flag.startswith(("avx", "amx")) or flag in ("fma", "f16c"))
    switches = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")
    caps = [f"{name}={os.environ[name]}" for name in switches if os.environ.get(name)]
    return [
        f"cpu: {' '.join(vector) or 'no x86 vector flags'}",
        f"torch kernels: {torch.backends.cpu.get_cpu_capability()}; caps: {', '.join(caps) or 'none'}; "
        f"prune.round_to auto: {host_channel_multiple().value}",
    ]
