"""Every file of the foreign-artefact corpus (tests/fixtures/foreign, made by scripts/make_foreign_artefacts.py with
other converters) is benchmarked with inputs of its own dtypes and shapes, or refused in one short line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeprune import api
from edgeprune.errors import DeviceError
from edgeprune.runtimes import runner

CORPUS = Path(__file__).resolve().parents[1] / "fixtures" / "foreign"
ENTRIES = json.loads((CORPUS / "corpus.json").read_text())
TINY = dict(threads=1, iterations=2, warmup=0, repeats=1)


def test_the_corpus_index_lists_exactly_the_files_and_stays_small():
    files = {path.name for path in CORPUS.iterdir() if path.suffix in (".onnx", ".tflite")}
    assert files == set(ENTRIES) and len(files) >= 12
    assert {Path(name).suffix for name in files} == {".onnx", ".tflite"}
    assert sum((CORPUS / name).stat().st_size for name in files) < 2 * 1024 * 1024


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_each_corpus_file_is_benchmarked_or_refused_in_one_line(name):
    entry = ENTRIES[name]
    pytest.importorskip("onnxruntime" if name.endswith(".onnx") else "ai_edge_litert")
    if not entry["loads"]:
        with pytest.raises(DeviceError) as refused:
            api.bench(CORPUS / name, shapes=tuple(entry["shapes"]), **TINY)
        message = str(refused.value)
        assert "\n" not in message and len(message) < 600, message
        return
    result = api.bench(CORPUS / name, shapes=tuple(entry["shapes"]), **TINY)
    assert result["latency_p50_ms"] > 0 and result["iterations"] == 2
    assert result["peak_rss_mb"] > result["model_memory_mb"] > 0
    shapes = result["repeats"][0]["input_shapes"]
    assert shapes and all(dim > 0 for shape in shapes.values() for dim in shape)


def test_a_dynamic_batch_is_set_from_shape():
    result = api.bench(CORPUS / "keras_dynamic_batch.tflite", shapes=("serving_default_image:0=4,16,16,3",), **TINY)
    assert result["repeats"][0]["input_shapes"] == {"serving_default_image:0": [4, 16, 16, 3]}
    assert result["repeats"][0]["guessed_shapes"] == []


def test_token_id_inputs_get_valid_ids_and_a_sequence_length_from_shape():
    shapes = ("token_ids=2,32", "attention_mask=2,32")
    result = api.bench(CORPUS / "torch_opset17_token_ids.onnx", shapes=shapes, **TINY)
    assert result["repeats"][0]["input_shapes"] == {"token_ids": [2, 32], "attention_mask": [2, 32]}


def test_inputs_follow_each_files_dtypes():
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(CORPUS / "torch_fp16_initializers_as_inputs.onnx"), providers=["CPUExecutionProvider"])
    specs = [(i.name, [1, 3, 12, 12], np.dtype(runner._ORT_TYPES[i.type]).type) for i in session.get_inputs()]
    feeds = runner.load_inputs(None, specs)
    assert [value.dtype for value in feeds.values()] == [np.float16]
    session.run(None, feeds)


def test_the_invalid_quantization_error_says_its_cause_once():
    with pytest.raises(DeviceError, match="unsupported scale value") as refused:
        api.bench(CORPUS / "invalid_quantization.tflite", **TINY)
    assert str(refused.value).count("unsupported scale value") == 1
