"""Every registered reference architecture goes through a whole build: trained, pruned, finetuned,
exported to ONNX and TFLite with parity, and its pruned model file rebuilt without pickles.

The loop is over ``list_models()``, so a newly registered architecture is covered without a new test.
Settings are tiny (a few hundred images, one epoch): this proves the pipeline, not accuracy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeprune import api
from edgeprune.modelio import load_model
from edgeprune.models import ModelSpec, list_models
from edgeprune.parity import artifact_logits
from edgeprune.training import predict_logits

TINY = (
    "train.epochs=1",
    "data.train_samples=256",
    "data.eval_samples=200",
    "parity.samples=200",
    "finetune.epochs=1",
    "prune.amount=0.3",
    "prune.round_to=8",  # cpu-x86 rounds to 16, which leaves the narrowest groups of some models whole at 0.3
    "export.formats=['onnx', 'tflite']",
    "quantize.scheme='none'",
    "benchmark.enabled=false",
)


@pytest.mark.slow
@pytest.mark.parametrize("spec", list_models(), ids=[spec.name for spec in list_models()])
def test_reference_architecture_prunes_finetunes_exports_and_passes_parity(spec: ModelSpec, workdir: Path, example_data) -> None:
    result = api.build("cpu-x86", model=f"example:{spec.name}", overrides=TINY, out=workdir / "out", cache_dir=workdir / "cache")
    manifest = result.manifest
    stages = {stage["name"]: stage["metrics"] for stage in manifest["stages"]}
    assert list(stages) == ["baseline", "prune_structured", "finetune", "export_onnx", "export_tflite"]
    assert manifest["model"]["macs"] < 0.85 * manifest["model"]["macs_dense"]  # channels were physically removed
    for name in ("onnx_fp32", "tflite_fp32"):
        parity = manifest["artifacts"][name]["parity"]
        assert parity["max_abs_error"] < 1e-3 and parity["top1_agreement"] >= 0.999 and parity["samples"] == 200

    untracked = [item["layer"] for item in stages["prune_structured"]["untracked_coupling"]]
    assert untracked == (["stem.0"] if spec.untracked_coupling else [])  # the padded/sliced residual stream is left whole
    kept_whole = stages["prune_structured"]["dependency_analysis"]["kept_whole"]
    if spec.name == "shufflenet_mini":  # the groups coupled through the reshape channel shuffle, found before any pruning
        assert kept_whole and all("channel-mixing" in item["reason"] for item in kept_whole)
    else:
        assert kept_whole == []

    # model.pt is architecture + plan + weights: it rebuilds with weights_only loading and matches the shipped ONNX
    rebuilt = load_model(workdir / "out" / "model.pt")
    images = example_data.x_test[:64]
    onnx_logits = artifact_logits(workdir / "out" / "model_fp32.onnx", images)
    assert np.abs(predict_logits(rebuilt, images) - onnx_logits).max() < 1e-3
