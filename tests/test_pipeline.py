"""The whole build, end to end, through the API: stages, cache, outputs, budgets."""

import json
import time

import pytest

from edgeprune import api
from edgeprune.artifacts import sha256_of
from edgeprune.errors import ParityError
from edgeprune.pruning import rounded_width
from edgeprune.simd import host_channel_multiple
from tests.conftest import FAST, TINY_INT8_GATE, USER_MODEL, onnx_op_types, split_accuracy_is_real


def build(target, checkpoint, *overrides, **kwargs):
    return api.build(target, model=USER_MODEL, weights=str(checkpoint), overrides=FAST + overrides, **kwargs)


@pytest.mark.numerics
def test_cpu_x86_build_produces_verified_artefacts(workdir, user_checkpoint):
    result = build("cpu-x86", user_checkpoint)
    manifest = json.loads((workdir / "dist/cpu-x86/manifest.json").read_text())
    assert manifest == json.loads(json.dumps(result.manifest))
    assert manifest["primary_artifact"] == "onnx_int8"
    for entry in manifest["artifacts"].values():
        path = workdir / "dist/cpu-x86" / entry["file"]
        assert sha256_of(path) == entry["sha256"] and path.stat().st_size == entry["size_bytes"]
    accuracy = manifest["accuracy"]
    assert accuracy["baseline"] > 60  # the checkpoint really was loaded
    assert all(split_accuracy_is_real(value, 2000) for value in accuracy["artifacts"].values())
    fp32, int8 = manifest["artifacts"]["onnx_fp32"], manifest["artifacts"]["onnx_int8"]
    assert abs(fp32["accuracy"] - int8["accuracy"]) <= 1.0
    assert fp32["parity"]["max_abs_error"] < 1e-4 and fp32["parity"]["top1_agreement"] == 1.0
    assert int8["parity"]["top1_agreement"] >= 0.97
    assert {"QuantizeLinear", "DequantizeLinear"} <= onnx_op_types(workdir / "dist/cpu-x86/model_int8.onnx")
    assert manifest["model"]["macs"] < manifest["model"]["macs_dense"]  # channels were physically removed
    # amount 0.3 to the nearest multiple of cpu-x86's round_to ("auto": this host's float32 lanes), at least one:
    # with 16 (AVX-512) 16 → 16, 32 → 22.4 → 16, 64 → 44.8 → 48; with 8 (AVX2) 8, 24, 48
    multiple = host_channel_multiple()
    assert manifest["config"]["prune"]["round_to"] == multiple.value
    assert manifest["config"]["prune"]["round_to_source"] == f"auto: {multiple.reason}"
    # a group no wider than one multiple keeps its width
    expected = [width if width <= multiple.value else rounded_width(width * 0.7, width, multiple.value) for width in (16, 32, 64)]
    assert [row["channels_after"] for row in manifest["model"]["channels"]][:3] == expected
    bench = int8["benchmark"]
    assert 0 < bench["latency_p50_ms"] <= bench["latency_p90_ms"] <= bench["latency_p99_ms"]
    assert bench["peak_rss_mb"] > 10
    assert manifest["speedups"]["onnx_int8"] > 0
    benchmark_stage = next(stage["metrics"] for stage in manifest["stages"] if stage["name"] == "benchmark")
    assert benchmark_stage["speedup_method"] == "paired in one process"  # local: each ratio from runs alternating in one process
    assert manifest["preprocessing"]["mean"] == [0.5] and manifest["tools"]["torch"].startswith("2.")
    assert (workdir / "dist/cpu-x86/report.md").read_text().startswith("# edgeprune build: cpu-x86")


def test_unchanged_rerun_is_served_from_the_cache_and_a_change_reruns_only_what_it_affects(workdir, user_checkpoint):
    started = time.perf_counter()
    first = build("cpu-x86", user_checkpoint)
    first_seconds = time.perf_counter() - started
    started = time.perf_counter()
    second = build("cpu-x86", user_checkpoint)
    second_seconds = time.perf_counter() - started
    assert all(stage["cached"] for stage in second.manifest["stages"])
    assert first_seconds / second_seconds >= 10
    hashes = [{name: a["sha256"] for name, a in build.manifest["artifacts"].items()} for build in (first, second)]
    assert hashes[0] == hashes[1]

    changed = build("cpu-x86", user_checkpoint, "quantize.calibration='percentile'")
    status = {stage["name"]: stage for stage in changed.manifest["stages"]}
    assert [name for name, stage in status.items() if not stage["cached"]] == ["quantize", "benchmark"]
    assert "quantize.calibration changed" in status["quantize"]["reason"]

    forced = build("cpu-x86", user_checkpoint, force=True)
    assert not any(stage["cached"] for stage in forced.manifest["stages"])


def test_budget_violations_are_reported_not_hidden(workdir, user_checkpoint):
    result = build(
        "cpu-x86", user_checkpoint, "budgets.max_accuracy_drop=100.0", "budgets.max_size_kb=1.0", "budgets.max_latency_p50_ms=0.000001"
    )
    kinds = sorted(v.kind for v in result.violations)
    assert kinds == ["latency", "size"]
    manifest = json.loads((workdir / "dist/cpu-x86/manifest.json").read_text())
    assert manifest["budgets"]["passed"] is False and len(manifest["budgets"]["violations"]) == 2


def test_a_failed_build_leaves_the_previous_output_intact(workdir, user_checkpoint):
    build("cpu-x86", user_checkpoint)
    before = (workdir / "dist/cpu-x86/manifest.json").read_bytes()
    with pytest.raises(ParityError, match=r"onnx_fp32: fp32 parity failed: max abs error .* > 0.0"):
        build("cpu-x86", user_checkpoint, "parity.fp32_max_abs=0.0")
    assert (workdir / "dist/cpu-x86/manifest.json").read_bytes() == before
    assert sorted(p.name for p in (workdir / "dist").iterdir()) == ["cpu-x86"]  # no staging debris


def test_a_build_that_exports_nothing_ships_the_pruned_model_file_as_its_primary_artefact(workdir, user_checkpoint):
    # export.formats=[] once crashed at the manifest (IndexError) after every stage had run
    result = build("cpu-x86", user_checkpoint, "export.formats=[]", "benchmark.enabled=false")
    manifest = result.manifest
    assert manifest["primary_artifact"] == "model" and list(manifest["artifacts"]) == ["model"]
    assert manifest["model"]["macs"] < manifest["model"]["macs_dense"]
    assert "- primary artefact: `model.pt`" in (workdir / "dist/cpu-x86/report.md").read_text()


def test_unstructured_and_structured_combine(workdir, user_checkpoint):
    result = build("cpu-x86", user_checkpoint, "prune.mode='both'", "sparsity.amount=0.6", "benchmark.enabled=false")
    stages = {stage["name"]: stage["metrics"] for stage in result.manifest["stages"]}
    assert stages["prune_unstructured"]["global_sparsity"] == pytest.approx(0.6, abs=0.01)
    assert stages["finetune"]["global_sparsity"] == pytest.approx(0.6, abs=0.01)  # masks held during finetune
    assert result.manifest["model"]["macs"] < result.manifest["model"]["macs_dense"]


@pytest.mark.slow
def test_android_build_ships_full_integer_tflite(workdir, user_checkpoint):
    result = build("android", user_checkpoint, "benchmark.threads=2", TINY_INT8_GATE)
    artifacts = result.manifest["artifacts"]
    assert result.manifest["primary_artifact"] == "tflite_int8"
    model_input = artifacts["tflite_int8"]["io"]["inputs"][0]
    assert model_input["dtype"] == "int8" and model_input["quantization"]["scale"][0] > 0
    assert abs(artifacts["tflite_fp32"]["accuracy"] - artifacts["tflite_int8"]["accuracy"]) <= 1.0
    assert artifacts["tflite_fp32"]["parity"]["max_abs_error"] < 1e-3
    assert artifacts["tflite_int8"]["benchmark"]["latency_p50_ms"] > 0
    assert artifacts["tflite_int8"]["size_bytes"] < artifacts["tflite_fp32"]["size_bytes"]


def test_fp16_gpu_profile_builds_and_skips_the_gpu_benchmark_without_cuda(workdir, user_checkpoint):
    pytest.importorskip("onnxruntime")
    import onnxruntime

    result = build("nvidia-gpu", user_checkpoint)
    fp16 = result.manifest["artifacts"]["onnx_fp16"]
    assert fp16["parity"]["max_abs_error"] < 5e-2 and fp16["size_bytes"] < result.manifest["artifacts"]["onnx_fp32"]["size_bytes"]
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        assert "skipped" in fp16["benchmark"]
