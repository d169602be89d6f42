"""Every figure in the manifest describes the file that ships, and ``edgeprune verify`` proves it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeprune import api
from edgeprune.artifact_facts import artifact_facts
from edgeprune.cli import main
from edgeprune.errors import StageError
from tests.conftest import FAST

PROFILES = ("android", "rpi5", "cpu-x86", "size", "nvidia-gpu")
# The cheapest settings that still run every stage of every profile (the size profile's cubic schedule included).
CHEAP = (*FAST, "train.epochs=1", "data.train_samples=2000", "data.eval_samples=500", "benchmark.iterations=5", "benchmark.repeats=1")


# --------------------------------------------------------------------------- figures read from a file


def _onnx_with_int8_weight(path: Path) -> np.ndarray:
    """A Conv whose int8 weight (per-channel zero-points 0 and 3) sits behind DequantizeLinear, and a Gemm whose
    float16 weight is cast to float32; returns the int8 weight."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    # channel 0 (zero-point 0): -4..3, one zero; channel 1 (zero-point 3): 0..7, one 3 (its stored 0 is the value -0.6)
    quantized = np.concatenate([np.arange(-4, 4), np.arange(0, 8)]).astype(np.int8).reshape(2, 2, 2, 2)
    gemm = np.array([[0.0, 1.0], [0.0, 0.0], [2.0, 0.0]], dtype=np.float16)  # 4 zeros of 6
    initializers = [
        numpy_helper.from_array(quantized, "w_q"),
        numpy_helper.from_array(np.array([0.1, 0.2], dtype=np.float32), "w_scale"),
        numpy_helper.from_array(np.array([0, 3], dtype=np.int8), "w_zero"),
        numpy_helper.from_array(gemm, "g16"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=0),
        helper.make_node("Conv", ["input", "w"], ["conv"], name="conv0"),
        helper.make_node("Flatten", ["conv"], ["flat"]),
        helper.make_node("Cast", ["g16"], ["g"], to=TensorProto.FLOAT),
        helper.make_node("Gemm", ["flat", "g"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 2, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return quantized


def test_onnx_figures_count_zeros_behind_dequantize_and_casts(tmp_path):
    path = tmp_path / "tiny.onnx"
    _onnx_with_int8_weight(path)
    facts = artifact_facts(path, "onnx")
    rows = {row["layer"]: row for row in facts["weights"]["sparsity"]}
    assert rows["conv0"] == {"layer": "conv0", "weights": 16, "zeros": 2, "sparsity": 0.125}  # q == its channel's zero-point
    assert rows["fc"] == {"layer": "fc", "weights": 6, "zeros": 4, "sparsity": round(4 / 6, 6)}
    assert facts["weights"]["global_sparsity"] == round(6 / 22, 6)
    assert facts["io"] == {
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 2, 2, 2]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 3]}],
    }
    assert facts["tensor_mix"] == {
        "float16": {"tensors": 1, "elements": 6},
        "float32": {"tensors": 1, "elements": 2},
        "int8": {"tensors": 2, "elements": 18},
    }
    assert facts["opset"] == 17 and facts["size_bytes"] == path.stat().st_size
    assert facts["size_gzip_bytes"] < facts["size_zip_bytes"]  # the zip adds its headers around the same deflate stream
    assert facts["compression_ratio_gzip"] == round(facts["size_bytes"] / facts["size_gzip_bytes"], 6)


def test_onnx_integer_ops_count_zeros_against_their_weight_zero_point(tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.array([[0, 2], [5, 2], [0, 0]], dtype=np.int8)  # column 0 (zero-point 0): two zeros; column 1 (zero-point 2): two 2s
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["input", "b", "", "b_zero"], ["logits"], name="mm")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.INT8, [1, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.INT32, [1, 2])],
        [numpy_helper.from_array(weight, "b"), numpy_helper.from_array(np.array([0, 2], dtype=np.int8), "b_zero")],
    )
    path = tmp_path / "integer.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    facts = artifact_facts(path, "onnx")
    assert facts["weights"]["sparsity"] == [{"layer": "mm", "weights": 6, "zeros": 4, "sparsity": round(4 / 6, 6)}]
    assert facts["io"]["inputs"] == [{"name": "input", "dtype": "int8", "shape": [1, 3]}]


def test_a_damaged_file_is_one_line_naming_it(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is no protobuf of a model")
    with pytest.raises(Exception, match=r"broken.onnx: cannot read it as onnx"):
        artifact_facts(path, "onnx")


def test_verify_refuses_a_folder_without_a_manifest_or_with_an_older_one(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert "no manifest.json here" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text(json.dumps({"manifest_version": 2, "artifacts": {}}))
    assert main(["verify", str(tmp_path)]) == 2
    assert "manifest version 2 predates figures read from the files (3); rebuild" in capsys.readouterr().err


# --------------------------------------------------------------------------- every bundled profile, built and verified


@pytest.fixture(scope="module")
def profile_builds(tmp_path_factory) -> dict[str, Path]:
    """Every bundled profile built once on the bundled example, sharing one cache (the baseline trains once)."""
    root = tmp_path_factory.mktemp("verify")
    result = api.build_matrix(list(PROFILES), overrides=CHEAP, out=root / "dist", cache_dir=root / "cache")
    assert not result.failures, {name: str(error) for name, error in result.failures.items()}
    return {build.target: build.out for build in result.builds}


def verify_cli(folder: Path, *options: str) -> tuple[int, dict]:
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main(["verify", str(folder), "--json", *options])
    return code, json.loads(stdout.getvalue())


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_verifies(profile_builds, profile):
    folder = profile_builds[profile]
    code, report = verify_cli(folder)
    assert code == 0 and report["passed"], report["mismatches"]
    manifest = json.loads((folder / "manifest.json").read_text())
    checked = set(report["checked"])
    for name, entry in manifest["artifacts"].items():
        for figure in ("sha256", "size_bytes", "size_gzip_bytes", "size_zip_bytes", "compression_ratio_gzip", "weights.global_sparsity"):
            assert f"artifacts.{name}.{figure}" in checked
        if entry["kind"] != "model":
            assert f"artifacts.{name}.io.inputs[0].shape[0]" in checked and any(
                f.startswith(f"artifacts.{name}.tensor_mix") for f in checked
            )
    assert {"model.macs", "model.params", "model.global_sparsity", "content_sha256"} <= checked


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["cpu-x86", "android"])
def test_parity_is_measured_again_on_the_data_the_manifest_names(profile_builds, profile):
    code, report = verify_cli(profile_builds[profile], "--parity")
    assert code == 0, report["mismatches"]
    primary = json.loads((profile_builds[profile] / "manifest.json").read_text())["primary_artifact"]
    assert {f"artifacts.{primary}.accuracy", f"artifacts.{primary}.parity.top1_agreement", "parity_data.fingerprint"} <= set(
        report["checked"]
    )


@pytest.mark.slow
def test_one_changed_byte_of_an_artefact_is_named(profile_builds, tmp_path, capsys):
    import onnx

    folder = shutil.copytree(profile_builds["cpu-x86"], tmp_path / "tampered")
    path = folder / "model_int8.onnx"
    data = bytearray(path.read_bytes())
    weight = max(onnx.load(str(path)).graph.initializer, key=lambda tensor: len(tensor.raw_data)).raw_data
    nonzero = next(index for index, value in enumerate(weight) if value not in (0, 128))  # a non-zero weight (int8 or uint8)
    data[data.find(weight) + nonzero] = 0 if data[data.find(weight) + nonzero] != 0 else 1
    path.write_bytes(bytes(data))
    assert main(["verify", str(folder)]) == 3
    lines = capsys.readouterr().err.splitlines()
    assert any(line.startswith("edgeprune: mismatch: artifacts.onnx_int8.sha256: manifest says") for line in lines)
    assert all("model_int8.onnx gives" in line for line in lines if "artifacts.onnx_int8" in line)
    assert not any("artifacts.onnx_fp32" in line or "artifacts.model" in line for line in lines)  # only the edited file


@pytest.mark.slow
def test_one_changed_number_of_the_manifest_is_named(profile_builds, tmp_path):
    folder = shutil.copytree(profile_builds["size"], tmp_path / "tampered")
    manifest = json.loads((folder / "manifest.json").read_text())
    counted = manifest["model"]["global_sparsity"]
    manifest["model"]["global_sparsity"] = 0.297  # the figure of the first schedule step
    (folder / "manifest.json").write_text(json.dumps(manifest))
    code, report = verify_cli(folder)
    assert code == 3
    figures = {mismatch["figure"]: mismatch for mismatch in report["mismatches"]}
    assert set(figures) == {"model.global_sparsity", "content_sha256"}
    assert figures["model.global_sparsity"]["manifest"] == 0.297 and figures["model.global_sparsity"]["derived"] == counted
    assert figures["model.global_sparsity"]["source"] == "model.pt"


def _count_onnx_weight_zeros(path: Path) -> tuple[int, int]:
    """Zeros and weights of the int8 conv/linear weights of a weight-only int8 ONNX, counted without edgeprune."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    arrays = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    zeros = total = 0
    for node in graph.node:
        if node.op_type == "DequantizeLinear" and arrays.get(node.input[0], np.zeros(0)).ndim in (2, 4):
            values = arrays[node.input[0]]
            zero_point = arrays.get(node.input[2], np.zeros(1)) if len(node.input) > 2 else np.zeros(1)
            assert not np.any(zero_point)  # symmetric per-channel: a pruned weight is exactly int8 0
            zeros, total = zeros + int((values == 0).sum()), total + values.size
    return zeros, total


@pytest.mark.slow
def test_size_profile_states_the_sparsity_of_its_shipped_file(profile_builds):
    import torch

    folder = profile_builds["size"]
    manifest = json.loads((folder / "manifest.json").read_text())
    zeros, total = _count_onnx_weight_zeros(folder / "model_int8.onnx")
    shipped = manifest["artifacts"]["onnx_int8"]["weights"]
    assert (shipped["zeros_counted"], shipped["weights_counted"]) == (zeros, total)
    assert shipped["global_sparsity"] == round(zeros / total, 6) and shipped["global_sparsity"] == pytest.approx(0.9, abs=1e-3)
    state = torch.load(folder / "model.pt", weights_only=True)["state_dict"]
    weights = [value for key, value in state.items() if key.endswith(".weight") and value.ndim in (2, 4)]
    torch_zeros = sum(int((weight == 0).sum()) for weight in weights) / sum(weight.numel() for weight in weights)
    assert manifest["model"]["global_sparsity"] == pytest.approx(torch_zeros, abs=1e-6) and torch_zeros == pytest.approx(0.9, abs=1e-3)
    assert zeros >= round(torch_zeros * total)  # int8 rounding can only add zeros to the ones pruning made
    first_step = next(stage for stage in manifest["stages"] if stage["name"] == "prune_unstructured")["metrics"]
    assert first_step["global_sparsity"] < 0.5 and first_step["describes"].startswith("the model after pruning step 1 of")
    report = (folder / "report.md").read_text()
    assert f"`model_int8.onnx` {shipped['global_sparsity'] * 100:.1f} %" in report


@pytest.mark.slow
def test_a_build_never_publishes_a_manifest_its_files_contradict(profile_builds, monkeypatch, tmp_path):
    from edgeprune import manifest as manifest_module

    folder = profile_builds["cpu-x86"]
    before = {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}
    real = manifest_module.artifact_facts
    monkeypatch.setattr(manifest_module, "artifact_facts", lambda path, kind: {**real(path, kind), "size_bytes": 1})
    config = api.resolve("cpu-x86", overrides=CHEAP)
    with pytest.raises(StageError, match=r"contradicts its manifest.*artifacts\.\w+\.size_bytes: manifest says 1, .* gives \d+"):
        api.build_config(config, out=folder, cache_dir=folder.parent.parent / "cache")
    assert {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()} == before
    assert not list(folder.parent.glob(".cpu-x86.staging-*"))
