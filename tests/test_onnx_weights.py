"""Weight-only int8 and name minification of ONNX files (``edgeprune.onnx_compaction``): real files, real runs."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
from torch import nn

from edgeprune.onnx_compaction import float16_constants, int8_weight, minify_names, quantize_weights, survives_float16


def run(path, images: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images})[0]


def export(model: nn.Module, path) -> None:
    """``model`` on a 1x28x28 input to ONNX opset 17 with a dynamic batch."""
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
    export(model, path)
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


class PositionEmbedded(nn.Module):
    """A ViT-like table added to the tokens, a LayerNorm and a head: constants that are not Conv/Gemm/MatMul weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 32)
        self.position = nn.Parameter(torch.randn(1, 49, 32) * 0.02)
        self.norm = nn.LayerNorm(32)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x.reshape(x.shape[0], 49, 16)) + self.position
        return self.head(self.norm(tokens).mean(dim=1))


def test_an_added_position_table_is_an_int8_weight_per_embedding_column(tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    torch.manual_seed(0)
    model, fp32, int8 = PositionEmbedded(), tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export(model, fp32)
    assert quantize_weights(fp32, int8, per_channel=True) == 3  # embed, position (1,568 values) and head; not the 32-value biases
    graph = onnx.load(str(int8)).graph
    tables = [
        node
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and numpy_helper.to_array(next(t for t in graph.initializer if t.name == node.input[0])).ndim == 3
    ]
    assert len(tables) == 1 and next(a.i for a in tables[0].attribute if a.name == "axis") == 2  # one scale per embedding column
    images = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    reference, quantized = run(fp32, images), run(int8, images)
    assert np.abs(reference - quantized).max() < 0.02 * np.abs(reference).max()


def test_float16_constants_halve_the_float_bytes_and_keep_the_logits(tmp_path) -> None:
    import onnx
    from onnx import TensorProto

    torch.manual_seed(0)
    model, fp32, int8, small = PositionEmbedded(), tmp_path / "fp32.onnx", tmp_path / "int8.onnx", tmp_path / "small.onnx"
    with torch.no_grad():
        model.norm.bias[0] = 1e-6  # would fall into float16's subnormals: this tensor stays float32
    export(model, fp32)
    quantize_weights(fp32, int8, per_channel=True)
    converted = float16_constants(int8, small)
    graph = onnx.load(str(small)).graph
    halves = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT16]
    singles = [t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT]
    casts = [node for node in graph.node if node.op_type == "Cast"]
    # embed's bias and scales, the position table's scales, the norm's weight; the head's 10 values are too few to pay a Cast
    assert converted == len(halves) == len(casts) == 4
    assert "norm.bias" in singles
    images = np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32)
    reference, compact = run(int8, images), run(small, images)
    assert np.abs(reference - compact).max() < 1e-3 * np.abs(reference).max()
    floats_before = sum(4 * int(np.prod(t.dims)) for t in onnx.load(str(int8)).graph.initializer if t.data_type == TensorProto.FLOAT)
    floats_after = sum(2 * int(np.prod(t.dims)) for t in halves) + sum(
        4 * int(np.prod(t.dims)) for t in graph.initializer if t.data_type == TensorProto.FLOAT
    )
    halved = sum(2 * int(np.prod(t.dims)) for t in halves)
    assert floats_after == floats_before - halved and halved >= 0.35 * floats_before  # 256 of 720 bytes here


def test_a_value_survives_float16_only_within_its_normal_rounding() -> None:
    assert survives_float16(np.array([0.0, 1.0, -3.14159, 60000.0], np.float32))
    assert not survives_float16(np.array([70000.0], np.float32))  # overflows to inf
    assert not survives_float16(np.array([1e-6], np.float32))  # a subnormal: 3 % off


def test_the_noise_ranking_rounds_each_weight_exactly_as_weight_only_int8_stores_it(tmp_path) -> None:
    import onnx
    from onnx import numpy_helper

    from edgeprune.quant_sensitivity import onnx_rounded_weights

    torch.manual_seed(0)
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export(PositionEmbedded(), fp32)
    quantize_weights(fp32, int8, per_channel=True)
    graph = onnx.load(str(int8)).graph
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in graph.initializer}
    stored = {}
    for node in (node for node in graph.node if node.op_type == "DequantizeLinear"):
        values, scale = constants[node.input[0]], constants[node.input[1]]
        axis = next(attribute.i for attribute in node.attribute if attribute.name == "axis")
        stored[node.output[0]] = values * scale.reshape([-1 if index == axis else 1 for index in range(values.ndim)])
    rounded = onnx_rounded_weights(fp32, per_channel=True, stored_axes=True)
    assert set(rounded) == set(stored) and len(stored) == 3
    for name, weight in stored.items():
        assert np.array_equal(rounded[name], weight), name
    by_rows = onnx_rounded_weights(fp32, per_channel=True)  # the dynamic quantizer's rows: not what weight-only ships
    assert "position" not in " ".join(by_rows) and any(not np.array_equal(by_rows[name], stored[name]) for name in by_rows)
