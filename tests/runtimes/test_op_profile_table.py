"""The latency table read from TFLite's ``benchmark_model --enable_op_profiling`` on a remote device.

Two logs: the real RISC-V MobileNet v1 log (TFLite's own kernels, the older column layout with ``[start]``) and
an XNNPACK log in the layout of today's releases (no ``[start]`` column, rows named ``Delegate/<operator>:<n>``).
The rows name no layer, so they are matched to the torch layers by position, or per op type by MACs."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from edgeprune.config import BuildConfig, PruneConfig
from edgeprune.errors import DeviceError
from edgeprune.latency_table import layer_macs, layer_signatures, read_op_profile, torch_kind
from edgeprune.runtimes import BenchSettings, profile_ops, profiles_ops
from edgeprune.runtimes.adb import AdbAdapter
from edgeprune.runtimes.benchmark_model_output import parse_benchmark_model_output, run_order
from edgeprune.speed_search import open_table, profile_model, table_key
from tests.runtimes.test_runtime_adb import FAKE_ADB, FAKE_BENCHMARK_MODEL, SERIAL, _executable

FIXTURES = Path(__file__).with_name("fixtures")
RISCV_LOG = (FIXTURES / "mobilenet_v1_riscv64_op_profiling.txt").read_text()
XNNPACK_FIXTURE = FIXTURES / "xnnpack_small_resnet_op_profiling.txt"
XNNPACK_LOG = XNNPACK_FIXTURE.read_text()


def mobilenet_v1() -> nn.Module:
    """MobileNet v1 1.0/224 as the RISC-V log ran it: a stem, 13 depthwise/pointwise pairs, a 1x1 conv classifier."""
    widths = [32, 64, 128, 128, 256, 256, 512, 512, 512, 512, 512, 512, 1024, 1024]
    strides = [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, strides[0], 1), nn.ReLU6()]
    for index in range(1, 14):
        before = widths[index - 1]
        layers += [
            nn.Conv2d(before, before, 3, strides[index], 1, groups=before),
            nn.ReLU6(),
            nn.Conv2d(before, widths[index], 1),
            nn.ReLU6(),
        ]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(1024, 1001, 1), nn.Flatten()]
    return nn.Sequential(*layers).eval()


class SmallResNet(nn.Module):
    """The network of the XNNPACK log: a stem, two residual blocks, a depthwise and a pointwise conv, a linear head."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=1)) for _ in range(2)
        )
        self.depthwise, self.pointwise = nn.Conv2d(width, width, 3, padding=1, groups=width), nn.Conv2d(width, 2 * width, 1)
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        for block in self.blocks:
            x = torch.relu(x + block(x))
        x = self.pointwise(self.depthwise(x))
        return self.head(x.mean((2, 3)))


def signatures(model: nn.Module, shape: tuple[int, ...]) -> list[str]:
    return list(layer_signatures(model, torch.zeros(shape)).values())


def test_each_rows_time_is_read_from_its_column_in_either_layout():
    riscv, xnnpack = run_order(RISCV_LOG), run_order(XNNPACK_LOG)
    assert len(riscv) == 31 and riscv[0] == {"node_type": "CONV_2D", "name": "[MobilenetV1/MobilenetV1/Conv2d_0/Relu6]:0", "avg_ms": 60.957}
    assert len(xnnpack) == 12 and [row["avg_ms"] for row in xnnpack[:3]] == [0.019, 0.104, 0.221]  # [avg ms], not [%]
    profile = parse_benchmark_model_output(XNNPACK_LOG)["op_profile"]
    assert profile["top_ops"][0] == {
        "node_type": "Convolution (NHWC, F32) IGEMM",
        "name": "Delegate/Convolution (NHWC, F32) IGEMM:6",
        "avg_ms": 0.226,
        "percent": 19.483,
    }
    by_type = {row["node_type"]: row for row in profile["by_node_type"]}
    assert by_type["Convolution (NHWC, F32) IGEMM"]["count"] == 5 and by_type["Add (ND, F32)"]["avg_ms"] == 0.033
    assert run_order(RISCV_LOG.split("Operator-wise")[0]) == []  # no regular-run profile


def test_tflites_own_kernels_are_matched_to_the_torch_layers_by_position():
    layers = signatures(mobilenet_v1(), (1, 3, 224, 224))
    assert len(layers) == 28 and [torch_kind(sig) for sig in layers[:3]] == ["conv", "dwconv", "conv"]
    parsed = parse_benchmark_model_output(RISCV_LOG)
    profiled, matched = read_op_profile(run_order(RISCV_LOG), parsed["inference_avg_ms"], layers)
    assert matched == "by position"
    assert profiled.layers[layers[0]] == [60957.0] and profiled.layers[layers[1]] == [49870.0]  # Conv2d_0, Conv2d_1_depthwise
    assert profiled.layers[layers[-1]] == [12185.0]  # the 1x1 classifier conv
    # Conv2d_7..11_pointwise have one shape: five times under one signature, in the log's order
    assert profiled.layers[layers[14]] == [230753.0, 249023.0, 243619.0, 248456.0, 242949.0]
    assert sum(len(times) for times in profiled.layers.values()) == 28
    assert set(profiled.others) == {
        "[MobilenetV1/Logits/AvgPool_1a/AvgPool]:27",
        "[MobilenetV1/Logits/SpatialSqueeze]:29",
        "[MobilenetV1/Predictions/Reshape_1]:30",
    }
    rows_us = 1000 * sum(row["avg_ms"] for row in run_order(RISCV_LOG))
    assert profiled.total_us == pytest.approx(2950340.0) and profiled.overhead_us() == pytest.approx(2950340.0 - rows_us)


def test_rows_that_do_not_line_up_with_the_layers_share_each_kinds_time_by_macs():
    layers = signatures(mobilenet_v1(), (1, 3, 224, 224))[:-1]  # one conv fewer than the log's rows
    profiled, matched = read_op_profile(run_order(RISCV_LOG), 2950.34, layers)
    assert matched == "by op type"
    conv_layers = [sig for sig in layers if torch_kind(sig) == "conv"]
    conv_rows_us = 1000 * sum(row["avg_ms"] for row in run_order(RISCV_LOG) if row["node_type"] == "CONV_2D")
    assert sum(sum(profiled.layers[sig]) for sig in set(conv_layers)) == pytest.approx(conv_rows_us)  # all of CONV_2D's time
    first, second = conv_layers[0], conv_layers[1]
    assert profiled.layers[first][0] / profiled.layers[second][0] == pytest.approx(layer_macs(first) / layer_macs(second))


def test_xnnpack_operators_are_matched_by_position_and_the_rest_is_other_nodes():
    model = SmallResNet()
    layers = signatures(model, (1, 1, 8, 8))
    profiled, matched = read_op_profile(run_order(XNNPACK_LOG), 1.1834, layers)
    assert matched == "by position"
    assert profiled.layers[layers[0]] == [104.0]  # the stem
    assert profiled.layers[layers[1]] == [221.0, 224.0, 218.0, 226.0]  # four 16x16 3x3 convs share a signature
    assert profiled.layers[layers[5]] == [38.0] and profiled.layers[layers[6]] == [61.0] and profiled.layers[layers[7]] == [5.0]
    assert profiled.others["Delegate/Add (ND, F32):4"] == pytest.approx(17.0) and len(profiled.others) == 4


def test_a_profile_that_times_the_whole_graph_as_one_delegate_row_gives_no_table():
    start = XNNPACK_LOG.index("INFO: Operator-wise")
    header = XNNPACK_LOG[start:].splitlines()[2]
    one_row = (
        "\t" + "TfLiteXNNPackDelegate".rjust(40) + "\t    1.150\t    1.160\t100.000%\t100.000%\t     0.000\t             1\t[Identity]:0"
    )
    old = XNNPACK_LOG[:start] + "\n".join(
        ["INFO: Operator-wise Profiling Info for Regular Benchmark Runs:", "=" * 30 + " Run Order " + "=" * 30, header, one_row, ""]
    )
    assert len(run_order(old)) == 1 and read_op_profile(run_order(old), 1.16, signatures(SmallResNet(), (1, 1, 8, 8))) is None


@pytest.fixture
def phone_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fake ``adb`` on PATH and a fake benchmark_model printing the XNNPACK log: the device URL to use."""
    device_tmp = tmp_path / "phone" / "data" / "local" / "tmp"
    device_tmp.mkdir(parents=True)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _executable(bin_dir / "adb", FAKE_ADB.format(python=sys.executable, root=str(tmp_path / "phone"), serial=SERIAL))
    binary = _executable(tmp_path / "benchmark_model", FAKE_BENCHMARK_MODEL.format(log=XNNPACK_FIXTURE))
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    return f"adb://{SERIAL}?benchmark_model={binary}"


def test_the_adb_adapter_runs_benchmark_model_with_op_profiling(tmp_path: Path, phone_on_path: str):
    model = tmp_path / "step1.tflite"
    model.write_bytes(b"TFL3")
    binary = Path(phone_on_path.split("benchmark_model=")[1])
    adapter = AdbAdapter(SERIAL, benchmark_model=binary)
    try:
        measured = adapter.profile_ops(model, BenchSettings(threads=2, warmup=10, iterations=50))
    finally:
        adapter.cleanup()
    calls = next((tmp_path / "phone").rglob("calls.txt")).read_text().split()
    assert "--enable_op_profiling=true" in calls and "--num_threads=2" in calls
    assert measured["inference_avg_ms"] == pytest.approx(1.1834) and len(measured["run_order"]) == 12
    with pytest.raises(DeviceError, match="op profiling runs TFLite's benchmark_model"):
        AdbAdapter(SERIAL).profile_ops(model, BenchSettings())


def test_a_search_on_an_adb_phone_fills_its_table_from_the_phones_op_profile(tmp_path: Path, phone_on_path: str):
    assert (
        profiles_ops(phone_on_path, "tflite") and not profiles_ops(phone_on_path, "onnx") and not profiles_ops(f"adb://{SERIAL}", "tflite")
    )
    key = table_key("tflite", phone_on_path, 2)
    assert key == {"device": phone_on_path, "runtime": "tflite benchmark_model --enable_op_profiling", "threads": 2}
    assert table_key("tflite", f"adb://{SERIAL}", 2) is None  # no benchmark_model: latency from MACs

    def export(model: nn.Module, stem: Path) -> Path:  # the fake benchmark_model reads no file: any bytes do
        path = stem.with_name(f"{stem.name}.tflite")
        path.write_bytes(b"TFL3")
        return path

    probe = SimpleNamespace(
        fmt="tflite", device=phone_on_path, settings=BenchSettings(threads=2, repeats=1), export=export, describe=lambda: "phone"
    )
    model = SmallResNet()
    profiled, how = profile_model(probe, export(model, tmp_path / "m"), signatures(model, (1, 1, 8, 8)))  # type: ignore[arg-type]
    assert "layers matched by position" in how and profiled.layers[signatures(model, (1, 1, 8, 8))[0]] == [104.0]
    run = SimpleNamespace(
        model=model,
        dataset=SimpleNamespace(x_test=torch.zeros(4, 1, 8, 8).numpy()),
        config=BuildConfig(prune=PruneConfig(round_to=8)),
        plan=SimpleNamespace(widths={}),
    )
    table, note = open_table(run, probe, tmp_path / "cache", tmp_path)  # type: ignore[arg-type]
    assert table is not None and table.key == key and table.entries[signatures(model, (1, 1, 8, 8))[6]] == [61.0] * 3  # three profiles
    assert "benchmark_model's op profile on adb://" in note


@pytest.mark.slow
def test_an_ssh_board_with_benchmark_model_profiles_a_tflite_over_ssh(start_sshd, tiny_artifacts, tmp_path: Path):
    server = start_sshd()
    binary = _executable(tmp_path / "benchmark_model", f'#!/bin/sh\necho "$@" > {tmp_path}/calls.txt\ncat {XNNPACK_FIXTURE}\n')
    device = f"{server.device(sys.executable)}&benchmark_model={binary}"
    assert profiles_ops(device, "tflite") and table_key("tflite", device, 1)["device"] == device
    measured = profile_ops(tiny_artifacts["tflite"], device, BenchSettings(threads=1, warmup=2, iterations=20, timeout_s=60.0))
    assert len(measured["run_order"]) == 12 and measured["inference_avg_ms"] == pytest.approx(1.1834)
    calls = (tmp_path / "calls.txt").read_text().split()
    assert "--enable_op_profiling=true" in calls and calls[0].endswith("/two_conv.tflite")  # the copied artefact
    assert server.remote_dirs() == []  # cleaned up
