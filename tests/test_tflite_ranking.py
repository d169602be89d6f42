"""TFLite int8 through litert-torch: concat-heavy models convert without damage, and the two-run ranking on the files finds damage."""

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.config import QuantizeConfig
from edgeprune.errors import ExportError
from edgeprune.export.tflite import convert_tflite
from edgeprune.models.registry import create_model
from edgeprune.parity import artifact_logits
from edgeprune.quant_sensitivity import added_noise_db, sqnr_db
from edgeprune.quantization import tflite
from edgeprune.quantization.budget import quantize_within_budget
from edgeprune.quantization.pt2e import unfoldable_shared_convs
from edgeprune.quantization.tflite import TfliteQuantizer
from edgeprune.quantization.tflite_ranking import module_locations, tflite_tensor_errors
from edgeprune.training import TrainSettings, train
from tests.test_quantize import ScriptedQuantizer, scripted_logits  # noqa: F401 - the fixture is used by name

DAMAGED_CONV = "transition.0.2"  # the 1x1 conv between densenet_mini's dense blocks


@pytest.fixture(scope="module")
def densenet(example_data, tmp_path_factory):
    """densenet_mini trained as the architecture tests train it, its fp32 .tflite and the quantizer of its int8 one (``int8.tflite``)."""
    torch.manual_seed(0)
    settings = TrainSettings(epochs=1, lr=5e-3, batch_size=128, seed=0)
    model = train(create_model("densenet_mini"), example_data.x_train[:2000], example_data.y_train[:2000], settings).eval()
    folder = tmp_path_factory.mktemp("densenet")
    convert_tflite(model, torch.from_numpy(example_data.x_test[:1].copy()), folder / "fp32.tflite")
    quantizer = int8_file(model, example_data, folder / "int8.tflite", folder / "fp32.tflite")
    return model, folder, quantizer


def int8_file(model, data, path: Path, float_path: Path) -> TfliteQuantizer:
    calibration = data.calibration_batches(64, seed=0)
    quantizer = TfliteQuantizer(model, torch.from_numpy(data.x_test[:1].copy()), calibration, QuantizeConfig(), float_path=float_path)
    quantizer.quantize(path, {})
    return quantizer


@pytest.mark.slow
def test_densenet_concats_share_one_grid_and_the_int8_tflite_keeps_to_the_float_one(densenet, example_data, monkeypatch):
    model, folder, _ = densenet
    images = example_data.x_test[:500]
    reference = artifact_logits(folder / "fp32.tflite", images, layout="NCHW")
    fixed = artifact_logits(folder / "int8.tflite", images, layout="NCHW")
    # litert-torch 0.10 as it stands under torch 2.13: no concat or average pool annotated, the converter picks one grid per concat
    monkeypatch.setattr(tflite, "restore_source_functions", lambda model: model)
    monkeypatch.setattr(tflite, "annotate_grid_keeping_ops", lambda model, config, quantizes: model)
    int8_file(model, example_data, folder / "unshared.tflite", folder / "fp32.tflite")
    unshared = artifact_logits(folder / "unshared.tflite", images, layout="NCHW")
    agreement = lambda logits: float(np.mean(logits.argmax(1) == reference.argmax(1)))  # noqa: E731
    assert sqnr_db(reference, fixed) > 20 and agreement(fixed) >= 0.97
    assert sqnr_db(reference, unshared) < 10 and agreement(unshared) < 0.6  # the damage the shared grid removes


def test_the_file_ranking_puts_a_tensor_given_a_wrong_grid_first(densenet, example_data):
    model, folder, _ = densenet
    damaged, clean_bytes = folder / "damaged.tflite", (folder / "int8.tflite").read_bytes()
    damaged.write_bytes(narrowed_conv_input(clean_bytes, DAMAGED_CONV))
    assert damaged.read_bytes() != clean_bytes
    images = example_data.calibration_batches(64, seed=0)[:16]

    clean = tflite_tensor_errors(folder / "fp32.tflite", folder / "int8.tflite", images, "NCHW", model)
    broken = tflite_tensor_errors(folder / "fp32.tflite", damaged, images, "NCHW", model)
    assert len(broken) == len(clean) > 20  # every int8 tensor of both files found its float twin
    worst = broken[0]
    assert worst.tensor.endswith("quantize transition.0.1") and DAMAGED_CONV in worst.layers  # the ReLU output the conv reads
    assert worst.sqnr_db < 10  # the damage stands out ...
    assert min(item.sqnr_db for item in clean) > 25  # ... and is not there in the file as converted
    downstream = [item for item in broken if item.tensor != worst.tensor and item.model_sqnr_db < 15]
    assert downstream and all(item.sqnr_db > worst.sqnr_db for item in downstream)  # inherited error is not charged to them


def test_a_search_on_tflite_ranks_the_converted_files_when_it_has_the_fp32_one(densenet):
    _, _, quantizer = densenet
    errors = quantizer.tensor_errors()
    conv = next(item for item in errors if item.tensor.startswith("CONV_2D") and DAMAGED_CONV in item.layers)
    assert quantizer.keep_float({conv.tensor: "float"})[0] == DAMAGED_CONV  # the float rung leaves that conv out of the annotation


class RefusingQuantizer(ScriptedQuantizer):
    """The converter refuses act_b at a percentile range or 16 bits (litert-torch's same-scale check); act_b float fixes it."""

    def quantize(self, path: Path, mix) -> None:
        if mix.get("act_b") in ("percentile", "int16"):
            self.calls.append(dict(mix))
            raise ExportError("litert-torch cannot convert the model: 'tfl.concatenation' op quantization parameters violate ...")
        super().quantize(path, mix)


def test_a_candidate_the_converter_refuses_is_a_round_not_a_failed_build(tmp_path, scripted_logits):  # noqa: F811 - the imported fixture
    fake_logits, fp32, labels = scripted_logits
    fake_logits.quantizer = quantizer = RefusingQuantizer({"act_b": {"float"}})
    _, meta = quantize_within_budget("tflite_int8", "tflite_fp32", quantizer, tmp_path / "q.tflite", fp32, fp32, labels, QuantizeConfig())
    rounds = meta["search"]["rounds"]
    assert [r["mix"] for r in rounds] == ["plain int8", "percentile on 1", "int16 on 1", "float on 1"]
    assert rounds[1]["failed"].startswith("litert-torch cannot convert") and "accuracy_drop" not in rounds[1]
    assert meta["quant_mix"] == {"act_b": "float"} and meta["budget"]["passed"]
    assert (tmp_path / "q.tflite").stat().st_size == 110  # the float candidate's bytes, not a refused one's


class StemThenDenseLayer(torch.nn.Module):
    """DenseNet-BC's start: the stem conv's output is both normalized by the first dense layer and concatenated raw."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.bn, self.conv = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 3, padding=1)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-1, 1), self.bn.running_var.uniform_(0.2, 2), self.bn.weight.uniform_(0.5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return torch.cat([self.conv(torch.relu(self.bn(x))), x], 1)


def test_a_batchnorm_is_not_folded_into_a_conv_whose_output_others_read_too():
    from litert_torch.quantize import pt2e_quantizer
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    model, images = StemThenDenseLayer().eval(), torch.randn(4, 1, 8, 8)
    quantizer = tflite.keep_float_quantizer(pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True), ())
    with torch.no_grad():
        expected = model(images)
        folded = prepare_pt2e(torch.export.export(model, (images,)).module(), quantizer)(images)
        kept = prepare_pt2e(unfoldable_shared_convs(torch.export.export(model, (images,)).module()), quantizer)(images)
    assert torch.allclose(kept, expected, atol=1e-5)  # observers only watch: the prepared model computes the same function
    assert (folded[:, 2:] - expected[:, 2:]).abs().max() > 0.1  # torchao's fold hands the concat the normalized stem output


def test_module_locations_name_the_modules_litert_torch_writes_into_tensor_names():
    locations = module_locations(create_model("densenet_mini"))
    prefix = "edgeprune.models.densenet.DenseNetMini/edgeprune.models.densenet.DenseBlock_block1/torch.nn.modules.container.Sequential_0"
    assert locations[f"{prefix}/torch.nn.modules.conv.Conv2d_2"] == "block1.layers.0.2"  # the ModuleList is never called: not in the name
    assert locations["edgeprune.models.densenet.DenseNetMini/edgeprune.models.densenet.DenseBlock_block1"] == "block1"


def test_own_noise_is_what_the_inputs_did_not_bring():
    assert added_noise_db(30.0, [200.0]) == pytest.approx(30.0)
    assert added_noise_db(30.0, [30.0]) == 200.0  # all of it came from upstream
    assert added_noise_db(27.0, [30.0]) == pytest.approx(30.0, abs=0.05)  # half the noise power is its own


def narrowed_conv_input(model_bytes: bytes, module: str) -> bytes:
    """The file with the int8 input of ``module``'s CONV_2D on a grid 8x finer: its QUANTIZE saturates past an eighth of the range."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(model_bytes), 0)
    graph = model.subgraphs[0]
    location = {path: location for location, path in module_locations(create_model("densenet_mini")).items()}[module]
    for op in graph.operators:
        name = (graph.tensors[op.outputs[0]].name or b"").decode()
        if model.operatorCodes[op.opcodeIndex].builtinCode == schema.BuiltinOperator.CONV_2D and location in name:
            rounded = graph.tensors[op.inputs[0]].quantization
            rounded.scale = [scale / 8 for scale in rounded.scale]
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())
