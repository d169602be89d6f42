#!/usr/bin/env python3
"""Make the foreign-artefact corpus: small ONNX and TFLite files written by other converters and settings.

edgeprune benchmarks files it did not make: a Keras model with a dynamic batch, an old uint8
TFLite, an ONNX file at opset 7, a transformer taking int64 token ids. This script writes one small
file per such case with the converter that makes them in the wild (TensorFlow/Keras, the TF1
converter API, torch.onnx at several opsets, onnx.helper, onnxruntime.quantization, litert-torch),
then records each in ``corpus.json`` (who made it, the shapes its dynamic inputs need, whether a
runtime should load it). The files are committed under ``tests/fixtures/foreign/``, so the tests
need none of these tools. Nothing is downloaded: every weight is random and seeded.

The makers need different tools; each runs where its imports are available and is skipped
elsewhere, so run the script under both Pythons (TensorFlow has its own environment)::

    python3 -m venv /work/venvs/tf && /work/venvs/tf/bin/pip install tensorflow-cpu tf_keras
    /work/venvs/tf/bin/python scripts/make_foreign_artefacts.py          # the TensorFlow files
    .venv/bin/python scripts/make_foreign_artefacts.py                   # the torch / onnx files

``--only NAME`` remakes one file; ``--list`` prints the makers and what each needs.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "foreign"
SEED = 0


@dataclass(frozen=True)
class Maker:
    """One corpus file: ``make(path)`` writes it with the tool ``made_by`` names (``needs``: its import)."""

    file: str
    made_by: str
    needs: str
    make: Callable[[Path], None]
    shapes: tuple[str, ...] = ()  # --shape entries a benchmark needs (dynamic dims that 1 would not satisfy)
    loads: bool = True  # False: a runtime must refuse it (with one short line)


MAKERS: dict[str, Maker] = {}


def maker(file: str, made_by: str, needs: str, shapes: tuple[str, ...] = (), loads: bool = True):
    """Decorator: register ``make(path)`` as the maker of ``file``."""

    def register(make: Callable[[Path], None]) -> Callable[[Path], None]:
        MAKERS[file] = Maker(file, made_by, needs, make, shapes, loads)
        return make

    return register


def _rng() -> np.random.Generator:
    return np.random.default_rng(SEED)


# ---------------------------------------------------------------- TensorFlow / Keras


def _keras_cnn(keras):
    """A small image classifier with a dynamic batch (Keras adds it to every Input)."""
    keras.utils.set_random_seed(SEED)
    inputs = keras.Input(shape=(16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.DepthwiseConv2D(3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10, name="logits")(x))


def _representative(shape: tuple[int, ...]):
    def batches():
        rng = _rng()
        for _ in range(8):
            yield [rng.random(shape, dtype=np.float32)]

    return batches


def _tflite_from_keras(model, path: Path, setup: Callable | None = None) -> None:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if setup is not None:
        setup(converter, tf)
    path.write_bytes(converter.convert())


@maker("keras_dynamic_batch.tflite", "tf_keras -> TFLiteConverter.from_keras_model (float32, batch -1)", "tf_keras")
def keras_dynamic_batch(path: Path) -> None:
    import tf_keras

    _tflite_from_keras(_keras_cnn(tf_keras), path)


@maker("keras_int8_full_integer.tflite", "TFLiteConverter, full-integer int8 (int8 in/out, representative data)", "tf_keras")
def keras_int8(path: Path) -> None:
    import tf_keras

    _tflite_from_keras(_keras_cnn(tf_keras), path, _full_integer("int8"))


@maker("keras_uint8_io.tflite", "TFLiteConverter, int8 weights with uint8 in/out (the TF1 camera-model interface)", "tf_keras")
def keras_uint8(path: Path) -> None:
    import tf_keras

    _tflite_from_keras(_keras_cnn(tf_keras), path, _full_integer("uint8"))


def _full_integer(io_dtype: str):
    """A converter setup for full-integer int8 (representative data) with ``io_dtype`` ("int8"/"uint8") inputs and outputs."""

    def setup(converter, tf) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = _representative((1, 16, 16, 3))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = converter.inference_output_type = getattr(tf, io_dtype)

    return setup


@maker("keras_float16.tflite", "TFLiteConverter, float16 weights (Optimize.DEFAULT + supported_types float16)", "tf_keras")
def keras_float16(path: Path) -> None:
    import tf_keras

    def setup(converter, tf) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]

    _tflite_from_keras(_keras_cnn(tf_keras), path, setup)


@maker("keras_dynamic_range.tflite", "TFLiteConverter, dynamic-range int8 weights, float32 in/out", "tf_keras")
def keras_dynamic_range(path: Path) -> None:
    import tf_keras

    def setup(converter, tf) -> None:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]

    _tflite_from_keras(_keras_cnn(tf_keras), path, setup)


@maker("keras_token_ids_dynamic_sequence.tflite", "tf_keras Embedding over int32 token ids, batch and length -1", "tf_keras")
def keras_tokens(path: Path) -> None:
    import tf_keras

    tf_keras.utils.set_random_seed(SEED)
    tokens = tf_keras.Input(shape=(None,), dtype="int32", name="token_ids")
    x = tf_keras.layers.Embedding(100, 16)(tokens)
    x = tf_keras.layers.Dense(16, activation="relu")(x)
    x = tf_keras.layers.GlobalAveragePooling1D()(x)
    _tflite_from_keras(tf_keras.Model(tokens, tf_keras.layers.Dense(2)(x)), path)


@maker("keras_two_inputs_two_outputs.tflite", "tf_keras functional model, image + feature vector in, class + box out", "tf_keras")
def keras_multi_io(path: Path) -> None:
    import tf_keras

    tf_keras.utils.set_random_seed(SEED)
    image = tf_keras.Input(shape=(8, 8, 1), name="image")
    features = tf_keras.Input(shape=(4,), name="features")
    x = tf_keras.layers.Flatten()(tf_keras.layers.Conv2D(4, 3, activation="relu")(image))
    x = tf_keras.layers.Concatenate()([x, features])
    classes = tf_keras.layers.Dense(3, activation="softmax", name="classes")(x)
    box = tf_keras.layers.Dense(4, name="box")(x)
    _tflite_from_keras(tf_keras.Model([image, features], [classes, box]), path)


@maker("tf1_uint8_quantized.tflite", "tf.compat.v1 TFLiteConverter.from_session, uint8 inference_type (TF1 quantization)", "tensorflow")
def tf1_uint8(path: Path) -> None:
    import tensorflow as tf

    v1 = tf.compat.v1
    graph = tf.Graph()
    with graph.as_default(), v1.Session(graph=graph) as session:
        image = v1.placeholder(tf.float32, (1, 8, 8, 1), name="image")
        weights = tf.constant(_rng().standard_normal((3, 3, 1, 4)).astype(np.float32) * 0.3)
        x = tf.nn.relu6(tf.nn.conv2d(image, weights, strides=1, padding="SAME"))
        x = v1.fake_quant_with_min_max_args(x, min=0.0, max=6.0, num_bits=8)
        out = tf.identity(tf.reduce_mean(x, axis=[1, 2]), name="pooled")
        converter = v1.lite.TFLiteConverter.from_session(session, [image], [out])
        converter.inference_type = tf.uint8
        converter.quantized_input_stats = {"image": (128.0, 127.0)}
        converter.default_ranges_stats = (0.0, 6.0)
        path.write_bytes(converter.convert())


@maker("invalid_quantization.tflite", "keras int8 TFLite, every scale zeroed (tflite flatbuffer_utils)", "tf_keras", loads=False)
def invalid_quantization(path: Path) -> None:
    from tensorflow.lite.tools import flatbuffer_utils

    keras_int8(path)
    model = flatbuffer_utils.read_model(str(path))
    for subgraph in model.subgraphs:
        for tensor in subgraph.tensors:
            if tensor.quantization is not None and tensor.quantization.scale is not None:
                tensor.quantization.scale = [0.0] * len(tensor.quantization.scale)
    flatbuffer_utils.write_model(model, str(path))


# ---------------------------------------------------------------- onnx.helper (old opsets)


def _helper_cnn(opset: int, ir_version: int, path: Path, batch_norm_attrs: dict) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = _rng()

    def tensor(name: str, shape: tuple[int, ...], scale: float = 0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)

    initializers = [tensor("conv_w", (4, 1, 3, 3)), tensor("conv_b", (4,)), tensor("fc_w", (4, 10)), tensor("fc_b", (10,))]
    initializers += [numpy_helper.from_array(np.ones(4, np.float32), n) for n in ("bn_scale", "bn_var")]
    initializers += [numpy_helper.from_array(np.zeros(4, np.float32), n) for n in ("bn_bias", "bn_mean")]
    nodes = [
        helper.make_node("Conv", ["image", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["conv", "bn_scale", "bn_bias", "bn_mean", "bn_var"], ["bn"], **batch_norm_attrs),
        helper.make_node("Relu", ["bn"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"]),
    ]
    inputs = [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 12, 12])]
    if ir_version < 4:  # IR 3 lists every initializer among the graph inputs too
        inputs += [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in initializers]
    graph = helper.make_graph(
        nodes,
        f"opset{opset}",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onnx.helper")
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@maker("onnx_helper_opset7.onnx", "onnx.helper, opset 7, IR 3 (BatchNormalization with spatial=1)", "onnx")
def onnx_opset7(path: Path) -> None:
    _helper_cnn(7, 3, path, {"spatial": 1})


@maker("onnx_helper_opset8.onnx", "onnx.helper, opset 8, IR 3", "onnx")
def onnx_opset8(path: Path) -> None:
    _helper_cnn(8, 3, path, {})


# ---------------------------------------------------------------- torch.onnx


def _torch_models():
    """(torch, token classifier, two-input two-output net, small CNN), seeded; built here so the TensorFlow
    environment never imports torch."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(200, 16), nn.Linear(16, 3)

        def forward(self, token_ids, attention_mask):
            x = self.embed(token_ids) * attention_mask.unsqueeze(-1).float()
            return self.head(x.mean(dim=1))

    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4 + 5, 6)

        def forward(self, image, features):
            x = torch.relu(self.conv(image)).mean(dim=(2, 3))
            joined = torch.cat([x, features], dim=1)
            return self.fc(joined), torch.sigmoid(joined.sum(dim=1, keepdim=True))

    layers = [nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)]
    cnn = nn.Sequential(*layers)
    return torch, Tokens().eval(), TwoHeads().eval(), cnn.eval()


def _torch_onnx(model, args: tuple, path: Path, names: list[str], outputs: list[str], dynamic: dict, **options) -> None:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation notice
        torch.onnx.export(model, args, str(path), dynamo=False, input_names=names, output_names=outputs, dynamic_axes=dynamic, **options)


@maker("torch_opset9_dynamic_batch.onnx", "torch.onnx.export (TorchScript exporter), opset 9, dynamic batch", "torch")
def torch_opset9(path: Path) -> None:
    torch, _, _, cnn = _torch_models()
    _torch_onnx(cnn, (torch.randn(1, 3, 12, 12),), path, ["input"], ["logits"], {"input": {0: "batch"}}, opset_version=9)


@maker("torch_opset17_token_ids.onnx", "torch.onnx.export, opset 17, int64 token ids + mask, dynamic batch and sequence", "torch")
def torch_tokens(path: Path) -> None:
    torch, tokens, _, _ = _torch_models()
    ids, mask = torch.randint(0, 200, (1, 12)), torch.ones(1, 12, dtype=torch.int64)
    dynamic = {"token_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    _torch_onnx(tokens, (ids, mask), path, ["token_ids", "attention_mask"], ["logits"], dynamic, opset_version=17)


@maker("torch_opset18_two_inputs_two_outputs.onnx", "torch.onnx.export, opset 18, image + features in, two outputs", "torch")
def torch_multi_io(path: Path) -> None:
    torch, _, two_heads, _ = _torch_models()
    args = (torch.randn(1, 3, 10, 10), torch.randn(1, 5))
    dynamic = {"image": {0: "batch"}, "features": {0: "batch"}}
    _torch_onnx(two_heads, args, path, ["image", "features"], ["scores", "gate"], dynamic, opset_version=18)


@maker("torch_fp16_initializers_as_inputs.onnx", "torch.onnx.export of a .half() model, opset 11, keep_initializers_as_inputs", "torch")
def torch_fp16(path: Path) -> None:
    torch, _, _, cnn = _torch_models()
    half = cnn.half()
    _torch_onnx(
        half, (torch.randn(1, 3, 12, 12).half(),), path, ["input"], ["logits"], {}, opset_version=11, keep_initializers_as_inputs=True
    )


@maker("ort_qoperator_uint8.onnx", "onnxruntime.quantization.quantize_static, QOperator format (QLinearConv), uint8", "onnxruntime")
def ort_qoperator(path: Path) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_path = path.with_suffix(".float.onnx")
    _helper_cnn(13, 7, float_path, {})

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            rng = _rng()
            self.batches = iter([{"image": rng.standard_normal((1, 1, 12, 12)).astype(np.float32)} for _ in range(8)])

        def get_next(self):
            return next(self.batches, None)

    try:
        quantize_static(
            str(float_path), str(path), Reader(), quant_format=QuantFormat.QOperator,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QUInt8,
        )  # fmt: skip
    finally:
        float_path.unlink(missing_ok=True)


@maker("litert_torch_nchw_int8.tflite", "litert-torch with its PT2E quantizer (full-integer int8), NCHW input from PyTorch", "litert_torch")
def litert_nchw_int8(path: Path) -> None:
    import warnings

    from litert_torch import convert
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e import move_exported_model_to_eval, quantize_pt2e

    torch, _, _, cnn = _torch_models()
    example = torch.randn(1, 3, 12, 12)
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = quantize_pt2e.prepare_pt2e(torch.export.export(cnn, (example,)).module(), quantizer)
        for _ in range(4):
            prepared(torch.randn(1, 3, 12, 12))
        converted = move_exported_model_to_eval(quantize_pt2e.convert_pt2e(prepared, fold_quantize=False))
        convert(converted, (example,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(str(path))


# ---------------------------------------------------------------- the corpus file


def available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def record(out: Path, made: list[Maker]) -> Path:
    """Merge the files just made into ``out/corpus.json`` (other entries, made under another Python, stay)."""
    index_path = out / "corpus.json"
    entries = json.loads(index_path.read_text()) if index_path.is_file() else {}
    for item in made:
        data = (out / item.file).read_bytes()
        entries[item.file] = {
            "made_by": item.made_by,
            "loads": item.loads,
            "shapes": list(item.shapes),
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    index_path.write_text(json.dumps(dict(sorted(entries.items())), indent=2) + "\n")
    return index_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"corpus folder (default {DEFAULT_OUT})")
    parser.add_argument("--only", action="append", default=[], metavar="FILE", help="make only this file (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the makers and exit")
    args = parser.parse_args(argv)
    if args.list:
        for item in MAKERS.values():
            print(f"{item.file:<45} needs {item.needs:<12} {item.made_by}")
        return 0
    unknown = sorted(set(args.only) - set(MAKERS))
    if unknown:
        parser.error(f"unknown files {unknown}; see --list")
    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    for item in MAKERS.values():
        if (args.only and item.file not in args.only) or not available(item.needs):
            continue
        item.make(args.out / item.file)
        made.append(item)
        print(f"{item.file:<45} {(args.out / item.file).stat().st_size / 1024:7.1f} KiB  {item.made_by}")
    skipped = [item.file for item in MAKERS.values() if not available(item.needs) and (not args.only or item.file in args.only)]
    if skipped:
        print(f"skipped (their tool is not installed for {sys.executable}): {', '.join(skipped)}")
    print(f"recorded in {record(args.out, made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
