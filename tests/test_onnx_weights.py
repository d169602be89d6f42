"""Weight-only int8 and name minification of ONNX files (``edgeprune.onnx_weights``): real files, real runs."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.onnx_weights import int8_weight, minify_names, quantize_weights


def run(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


@pytest.fixture
def sparse_onnx(tmp_path):
    """A conv + linear net with 80 % of its weights zeroed, exported to ONNX (opset 17)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 24 * 24, 10)
    )
    with torch.no_grad():
        for module in model:
            if hasattr(module, "weight"):
                module.weight[torch.rand_like(module.weight) < 0.8] = 0
                module.weight[0] = 0  # one output channel pruned whole: its scale must not divide by zero
    path = tmp_path / "fp32.onnx"
    torch.onnx.export(
        model.eval(),
        torch.randn(1, 1, 28, 28),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        opset_version=17,
        dynamic_axes={"input": {0: "batch"}},
        dynamo=False,
    )
    return path, model


def test_int8_weight_is_symmetric_per_output_channel_and_keeps_zeros_zero() -> None:
    weight = np.array([[0.5, -1.0, 0.0], [0.0, 0.0, 0.0], [2.54, 0.02, -0.01]], dtype=np.float32)
    values, scale = int8_weight(weight, axis=0)
    assert scale.tolist() == pytest.approx([1.0 / 127, 1.0, 2.54 / 127])  # the all-zero row gets scale 1
    assert values.tolist() == [[64, -127, 0], [0, 0, 0], [127, 1, 0]]
    values, scale = int8_weight(weight, axis=None)
    assert scale.shape == () and float(scale) == pytest.approx(2.54 / 127) and values[0].tolist() == [25, -50, 0]


def test_weight_only_int8_file_is_about_four_times_smaller_keeps_sparsity_and_its_logits(sparse_onnx, tmp_path) -> None:
    import onnx
    from onnx import TensorProto, numpy_helper

    fp32, model = sparse_onnx
    int8 = tmp_path / "int8.onnx"
    assert quantize_weights(fp32, int8, per_channel=True) == 3
    graph = onnx.load(str(int8)).graph
    assert [node.op_type for node in graph.node].count("DequantizeLinear") == 3 and not any(
        n.op_type == "QuantizeLinear" for n in graph.node
    )
    weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.data_type == TensorProto.INT8 and t.name.endswith("_int8")}
    originals = {name: module.weight.detach().numpy() for name, module in model.named_children() if hasattr(module, "weight")}
    assert len(weights) == len(originals) == 3
    for name, original in originals.items():
        values = weights[f"{name}.weight_int8"]
        assert values.shape == original.shape and (values[original == 0] == 0).all()  # every pruned weight is exactly int8 0
    assert fp32.stat().st_size / int8.stat().st_size > 3.5
    images = np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32)
    reference, quantized = run(fp32, images), run(int8, images)
    assert np.abs(reference - quantized).max() < 0.02 * np.abs(reference).max()
    assert (reference.argmax(1) == quantized.argmax(1)).mean() >= 0.95


def test_a_node_kept_float_keeps_its_float_weight(sparse_onnx, tmp_path) -> None:
    import onnx

    fp32, _ = sparse_onnx
    gemm = next(node.name for node in onnx.load(str(fp32)).graph.node if node.op_type == "Gemm")
    int8 = tmp_path / "int8.onnx"
    assert quantize_weights(fp32, int8, per_channel=True, keep_float=(gemm,)) == 2
    dequantized = {node.output[0] for node in onnx.load(str(int8)).graph.node if node.op_type == "DequantizeLinear"}
    gemm_weight = next(node.input[1] for node in onnx.load(str(int8)).graph.node if node.op_type == "Gemm")
    assert gemm_weight not in dequantized


def test_minified_names_give_the_same_logits_in_fewer_compressed_bytes(sparse_onnx, tmp_path) -> None:
    import onnx

    fp32, _ = sparse_onnx
    int8, small = tmp_path / "int8.onnx", tmp_path / "small.onnx"
    quantize_weights(fp32, int8, per_channel=True)
    assert minify_names(int8, small) is True
    graph = onnx.load(str(small)).graph
    assert [value.name for value in graph.input] == ["input"] and [value.name for value in graph.output] == ["logits"]
    assert all(len(tensor.name) <= 2 for tensor in graph.initializer) and all(not node.name for node in graph.node)
    images = np.random.default_rng(1).standard_normal((8, 1, 28, 28)).astype(np.float32)
    assert np.array_equal(run(int8, images), run(small, images))
    compressed = [len(gzip.compress(path.read_bytes(), 9, mtime=0)) for path in (int8, small)]
    assert compressed[1] < compressed[0]
