"""parse_benchmark_model_output on a real benchmark_model log and on damaged copies."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeprune.errors import DeviceError
from edgeprune.runtimes import parse_benchmark_model_output

REAL_LOG = (Path(__file__).with_name("fixtures") / "mobilenet_v1_riscv64_op_profiling.txt").read_text()


def test_real_riscv_log_gives_exact_figures_in_ms():
    parsed = parse_benchmark_model_output(REAL_LOG)
    assert parsed["init_ms"] == pytest.approx(17.187)
    assert parsed["first_inference_ms"] == pytest.approx(3512.391)
    assert parsed["warmup_avg_ms"] == pytest.approx(3512.39)
    assert parsed["inference_avg_ms"] == pytest.approx(2950.34)
    assert parsed["inference_std_ms"] == pytest.approx(109.798)
    assert parsed["inference_min_ms"] == pytest.approx(2727.568)
    assert parsed["inference_max_ms"] == pytest.approx(3189.954)
    assert parsed["inference_count"] == 50
    assert parsed["memory_init_mb"] == pytest.approx(4.21094)
    assert parsed["memory_overall_mb"] == pytest.approx(46.0859)
    assert parsed["peak_memory_mb"] is None  # this tool version does not print it
    assert parsed["num_threads"] == 4


def test_real_riscv_log_op_profile():
    profile = parse_benchmark_model_output(REAL_LOG)["op_profile"]
    assert profile["nodes_executed"] == 31
    top = profile["top_ops"]
    assert len(top) == 10
    assert top[0] == {
        "node_type": "CONV_2D",
        "name": "[MobilenetV1/MobilenetV1/Conv2d_5_pointwise/Relu6]:10",
        "avg_ms": 277.374,
        "percent": 9.403,
    }
    assert [op["avg_ms"] for op in top[:3]] == [277.374, 249.023, 248.456]
    assert all(a["avg_ms"] >= b["avg_ms"] for a, b in zip(top, top[1:], strict=False))
    by_type = {row["node_type"]: row for row in profile["by_node_type"]}
    assert list(by_type) == ["CONV_2D", "DEPTHWISE_CONV_2D", "AVERAGE_POOL_2D", "SOFTMAX", "SQUEEZE"]
    assert by_type["CONV_2D"] == {"node_type": "CONV_2D", "count": 15, "avg_ms": 2651.853, "percent": 89.897}
    assert by_type["DEPTHWISE_CONV_2D"]["count"] == 13
    # AllocateTensors belongs to the initialization profile, not to the inference ops
    assert "AllocateTensors" not in {op["node_type"] for op in top}


def test_log_cut_after_the_timed_runs_keeps_latency():
    cut = REAL_LOG[: REAL_LOG.index("Inference timings in us")]
    parsed = parse_benchmark_model_output(cut)
    assert parsed["inference_avg_ms"] == pytest.approx(2950.34)  # from the count=50 line
    assert parsed["inference_count"] == 50
    assert parsed["first_inference_ms"] == pytest.approx(3512.391)  # the warmup's only run
    assert parsed["init_ms"] == pytest.approx(17.187)  # "Initialized session in 17.187ms."
    assert parsed["memory_overall_mb"] is None and parsed["op_profile"] is None


def test_summary_line_alone_is_enough():
    parsed = parse_benchmark_model_output(
        "Inference timings in us: Init: 1500, First inference: 9000, Warmup (avg): 8000, Inference (avg): 7250.5\n"
    )
    assert parsed["init_ms"] == 1.5 and parsed["first_inference_ms"] == 9.0
    assert parsed["warmup_avg_ms"] == 8.0 and parsed["inference_avg_ms"] == pytest.approx(7.2505)
    assert parsed["inference_std_ms"] is None and parsed["inference_count"] is None


def test_newer_tool_peak_memory_line():
    newer = REAL_LOG + "Overall peak memory footprint (MB) via periodic monitoring: 52.125\n"
    assert parse_benchmark_model_output(newer)["peak_memory_mb"] == pytest.approx(52.125)
    older = REAL_LOG + "Peak memory footprint (MB): 12.5\n"
    assert parse_benchmark_model_output(older)["peak_memory_mb"] == pytest.approx(12.5)


def test_garbled_lines_become_none_not_crashes():
    garbled = (
        REAL_LOG.replace("init=4.21094", "init=??")
        .replace("Num threads: [4]", "Num threads: [four]")
        .replace("#threads used for CPU inference: [4]", "")
        .replace("\t  2651.853\t", "\t  n/a\t")
    )
    parsed = parse_benchmark_model_output(garbled)
    assert parsed["memory_init_mb"] is None
    assert parsed["memory_overall_mb"] == pytest.approx(46.0859)
    assert parsed["num_threads"] is None
    assert "CONV_2D" not in {row["node_type"] for row in parsed["op_profile"]["by_node_type"]}
    assert parsed["inference_avg_ms"] == pytest.approx(2950.34)


def test_truncated_op_table_keeps_the_rows_read():
    row_6 = REAL_LOG.index("Conv2d_3_depthwise/Relu6]:5")
    cut = REAL_LOG[: REAL_LOG.rindex("\n", 0, row_6) + 1]  # the log ends after the 5th op row
    profile = parse_benchmark_model_output(cut)["op_profile"]
    assert [op["avg_ms"] for op in profile["top_ops"]] == [147.808, 135.911, 60.957, 49.87, 34.01]
    assert profile["by_node_type"] == [] and profile["nodes_executed"] is None


@pytest.mark.parametrize(
    "text",
    ["", "STARTING!\nLoaded model /data/local/tmp/m.tflite\n", REAL_LOG[: REAL_LOG.index("count=1 curr")], "Segmentation fault\n"],
)
def test_no_latency_at_all_is_a_device_error(text):
    with pytest.raises(DeviceError, match="benchmark_model printed no inference latency"):
        parse_benchmark_model_output(text)
