"""ExecuTorch .pte: every reference architecture exported fp32 and int8 with parity, the float fallback,
a build through the CLI, and the one-line error without the extra.

The loop is over ``list_models()``, so a newly registered architecture is covered without a new test.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.cli import main
from edgeprune.config import QuantizeConfig
from edgeprune.models import ModelSpec, create_model, list_models
from edgeprune.parity import artifact_logits, parity_report
from edgeprune.training import TrainSettings, predict_logits, train

pytest.importorskip("executorch")
from edgeprune.export.executorch import export_pte  # noqa: E402 - needs the extra
from edgeprune.quantization.budget import quantize_within_budget  # noqa: E402
from edgeprune.quantization.pte import PteQuantizer  # noqa: E402

PARITY_IMAGES = 200
# A loose budget: this proves the int8 path on briefly trained models, not their accuracy (the float
# fallback has its own test); 0.9 agreement is what every architecture here reaches without it.
LOOSE = QuantizeConfig(max_accuracy_drop=5.0, min_top1_agreement=0.9, max_float_layers=2)


def briefly_trained(name: str, data) -> torch.nn.Module:
    """One epoch on 2000 images: real logit margins. (On 256 images ShuffleNet stays at chance, its logits near-tied, and
    int8 agreement with such a model measures rounding ties, not the int8 path: 0.715 on one build, 0.9 on another.)"""
    torch.manual_seed(0)
    return train(create_model(name), data.x_train[:2000], data.y_train[:2000], TrainSettings(1, 5e-3, 128, 0)).eval()


@pytest.mark.slow
@pytest.mark.parametrize("spec", list_models(), ids=[spec.name for spec in list_models()])
def test_reference_architecture_exports_pte_fp32_and_int8_with_parity(spec: ModelSpec, example_data, tmp_path: Path) -> None:
    model = briefly_trained(spec.name, example_data)
    images, labels = example_data.x_test[:PARITY_IMAGES], example_data.y_test[:PARITY_IMAGES]
    parent, example = predict_logits(model, images), torch.from_numpy(images[:1].copy())

    fp32 = export_pte(model, example, tmp_path / "fp32.pte")
    fp32_logits = artifact_logits(tmp_path / "fp32.pte", images)
    fp32_parity = parity_report(parent, fp32_logits, labels)
    assert fp32_parity["max_abs_error"] < 1e-3 and fp32_parity["top1_agreement"] >= 0.995
    assert fp32["delegated_operators"] >= 3 and fp32["delegated_share"] >= 0.5
    assert fp32["portable_operators"] == sum(fp32["portable_kernels"].values())

    quantizer = PteQuantizer(model, example, example_data.calibration_batches(64, seed=0), LOOSE)
    try:
        int8_logits, meta = quantize_within_budget(
            "pte_int8", "pte_fp32", quantizer, tmp_path / "int8.pte", fp32_logits, images, labels, LOOSE
        )
    finally:
        quantizer.close()
    assert np.allclose(int8_logits, artifact_logits(tmp_path / "int8.pte", images))  # the budget judged the file that ships
    assert parity_report(parent, int8_logits, labels)["top1_agreement"] >= 0.9 and meta["budget"]["passed"]
    assert meta["delegated_operators"] > fp32["delegated_operators"]  # the quantize/dequantize pairs went into XNNPACK too
    assert (tmp_path / "int8.pte").stat().st_size < 0.6 * (tmp_path / "fp32.pte").stat().st_size


def test_layers_kept_float_are_left_out_of_the_quantizer(example_data, tmp_path: Path) -> None:
    model = briefly_trained("small_cnn", example_data)
    example, calibration = torch.from_numpy(example_data.x_test[:1].copy()), example_data.calibration_batches(32, seed=0)
    quantizer = PteQuantizer(model, example, calibration, QuantizeConfig())
    quantizer.quantize(tmp_path / "all.pte", {})
    all_int8, all_errors = dict(quantizer.delegation), quantizer.tensor_errors()
    weight = {item.tensor: "float" for item in all_errors if item.layers == ("head.1",)}  # the classifier's weight and output
    quantizer.quantize(tmp_path / "head.pte", weight)  # its Linear kept float
    kept, errors, cost = quantizer.delegation, quantizer.tensor_errors(), quantizer.mix_cost(weight)
    quantizer.close()
    assert "head.1.weight" in weight and cost["float_layers"] == ["head.1"] and 0 < cost["macs_off_int8"]["float"] < 0.1
    float_weights = model.head[1].weight.numel() * 3  # float32 instead of int8: 3 more bytes a weight
    grown = (tmp_path / "head.pte").stat().st_size - (tmp_path / "all.pte").stat().st_size
    assert 0.9 * float_weights < grown < 1.1 * float_weights + 4096
    assert kept["delegated_operators"] < all_int8["delegated_operators"]  # its quantize/dequantize ops are gone
    assert 0 < len(errors) < len(all_errors) and not set(weight) & {item.tensor for item in errors}  # its weight is not rounded any more


@pytest.mark.slow
def test_build_android_executorch_through_the_cli(workdir: Path, capsys) -> None:
    args = ["build", "-t", "android-executorch", "--out", "out", "--cache-dir", "cache", "--json"]
    for setting in ("train.epochs=1", "data.train_samples=512", "finetune.epochs=1", "data.calibration_samples=64",
                    "benchmark.repeats=1", "benchmark.iterations=10", "benchmark.warmup=2", "benchmark.threads=2",
                    "quantize.min_top1_agreement=0.97"):  # fmt: skip
        args += ["--set", setting]
    assert main(args) == 0
    manifest = json.loads((workdir / "out" / "manifest.json").read_text())
    assert manifest["primary_artifact"] == "pte_int8" and manifest["tools"]["executorch"] == "1.5.1"
    assert sorted(path.name for path in (workdir / "out").glob("*.pte")) == ["model_fp32.pte", "model_int8.pte"]
    for name in ("pte_fp32", "pte_int8"):
        entry = manifest["artifacts"][name]
        assert entry["delegated_share"] == 1.0 and entry["portable_kernels"] == {}  # small_cnn lowers whole to XNNPACK
        assert entry["benchmark"]["runtime"] == "executorch" and entry["benchmark"]["threads"] == 2
        assert "XnnpackBackend" in entry["benchmark"]["providers"] and entry["benchmark"]["latency_p50_ms"] > 0
    assert manifest["artifacts"]["pte_fp32"]["parity"]["max_abs_error"] < 1e-4
    assert manifest["artifacts"]["pte_int8"]["versus_fp32"]["top1_agreement"] >= 0.97
    assert "pte_int8" in manifest["speedups"]
    assert "## ExecuTorch delegation (XNNPACK)" in (workdir / "out" / "report.md").read_text()
    assert "<h2>ExecuTorch delegation (XNNPACK)</h2>" in (workdir / "out" / "report.html").read_text()


def test_pte_without_the_extra_is_one_line(workdir: Path, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "executorch", None)  # what an environment without the wheel looks like to an import
    assert main(["build", "-t", "android-executorch", "--out", "out", "--cache-dir", "cache"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and 'pip install "edgeprune[executorch]"' in error
    assert not (workdir / "out").exists() and not (workdir / "cache" / "baseline").exists()  # it failed before any stage


def test_quantize_settings_without_a_pte_form_are_refused(workdir: Path, capsys) -> None:
    assert main(["build", "-t", "android-executorch", "--set", "quantize.scheme='dynamic'", "--out", "out"]) == 2
    assert "quantize.scheme = 'dynamic' has no ExecuTorch form" in capsys.readouterr().err
