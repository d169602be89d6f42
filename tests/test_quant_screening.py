"""The budget search's screen (candidates run on the test images they are likeliest to change first) and the mix's cost."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeprune.config import ExportConfig, QuantizeConfig
from edgeprune.export.onnx import export_onnx
from edgeprune.quantization import budget as quantize
from edgeprune.quantization.cost import mix_cost_figures
from edgeprune.quantization.gate import judge_logits, judge_screened, screening_images
from edgeprune.quantization.onnx import OnnxQuantizer
from tests.test_quantize import ScriptedQuantizer

SPLIT = 2000


def test_the_screen_holds_plain_int8s_disagreements_then_its_closest_calls_and_gives_its_exact_verdict():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, SPLIT)
    fp32 = rng.normal(size=(SPLIT, 10)).astype(np.float32)
    fp32[np.arange(SPLIT), labels] += 2.5
    plain = fp32 + rng.normal(scale=0.25, size=fp32.shape).astype(np.float32)
    disagreeing = np.flatnonzero(fp32.argmax(1) != plain.argmax(1))
    assert 50 < len(disagreeing) < 250
    index = screening_images(fp32, plain)
    assert len(index) == 500 and set(disagreeing) <= set(index) and np.all(np.diff(index) > 0)  # a quarter of the split, in order
    top_two = np.sort(plain, axis=1)[:, -2:]
    margin = top_two[:, 1] - top_two[:, 0]
    agreeing_picked = np.setdiff1d(index, disagreeing)
    assert margin[agreeing_picked].max() <= margin[np.setdiff1d(np.arange(SPLIT), index)].min()  # then the closest calls
    # Plain int8 screened on its own disagreements: its exact whole-split figures.
    assert judge_screened(fp32, plain[index], index, labels, 0.5) == judge_logits(fp32, plain, labels, 0.5)
    # A candidate that breaks images outside the screen is not seen there: the screen is an estimate, never a verdict.
    broken = plain.copy()
    outside = np.setdiff1d(np.arange(SPLIT), index)[:100]
    broken[outside] = np.roll(broken[outside], 1, axis=1)
    assert judge_screened(fp32, broken[index], index, labels, 0.5).lost < judge_logits(fp32, broken, labels, 0.5).lost
    assert screening_images(fp32[:999], plain[:999]) is None  # a small split is judged whole every time
    noisy = np.roll(fp32, 1, axis=1)
    noisy[:1200] = fp32[:1200]  # 800 disagreements: a screen of 1600 images would save little
    assert screening_images(fp32, noisy) is None


class WrongWhere(ScriptedQuantizer):
    """A scripted quantizer whose model, a file holding its mix, gets the images ``wrong(mix)`` (a mask over the split) wrong."""

    def __init__(self, wrong) -> None:
        super().__init__({})
        self.wrong = wrong

    def quantize(self, path: Path, mix) -> None:
        self.calls.append(dict(mix))
        size = 1000 + sum({"percentile": 0, "int16": 5, "float": 10}[rung] for rung in mix.values())
        path.write_bytes(json.dumps(dict(mix)).encode().ljust(size))


@pytest.fixture
def split_logits(monkeypatch):
    """artifact_logits of a WrongWhere artefact for the images it is given (each image is its index); the image counts run."""
    labels = np.arange(SPLIT) % 10
    fp32 = (np.eye(10)[labels] * (1 + np.arange(SPLIT)[:, None] / SPLIT)).astype(np.float32)  # later images: surer calls
    images = np.arange(SPLIT, dtype=np.float32)[:, None]

    def fake_logits(path, batch, layout=None):
        rows = batch[:, 0].astype(int)
        fake_logits.runs.append(len(rows))
        wrong = fake_logits.quantizer.wrong(json.loads(Path(path).read_bytes()))[rows]
        return np.where(wrong[:, None], np.roll(fp32[rows], 1, axis=1), fp32[rows])

    monkeypatch.setattr(quantize, "artifact_logits", fake_logits)
    fake_logits.runs = []
    return fake_logits, fp32, images, labels


def test_a_candidate_missing_on_the_screen_is_never_run_whole_and_the_passing_one_is_judged_on_every_image(tmp_path, split_logits):
    fake_logits, fp32, images, labels = split_logits
    every_tenth = np.arange(SPLIT) % 10 == 0

    def wrong(mix):  # plain int8 misses every 10th image; act_b at percentile more; act_b at int16 fixes it
        if mix.get("act_b") == "int16":
            return np.zeros(SPLIT, bool)
        return every_tenth | (np.arange(SPLIT) % 10 == 1) if mix else every_tenth

    fake_logits.quantizer = quantizer = WrongWhere(wrong)
    config = QuantizeConfig()
    logits, meta = quantize.quantize_within_budget("onnx_int8", "onnx_fp32", quantizer, tmp_path / "q.onnx", fp32, images, labels, config)
    assert quantizer.calls == [{}, {"act_b": "percentile"}, {"act_b": "int16"}]
    # plain int8 on the whole split; both candidates on the 500 screened images; the passing one on the other 1,500 too.
    assert fake_logits.runs == [SPLIT, 500, 500, SPLIT - 500]
    rounds = meta["search"]["rounds"]
    assert rounds[1]["screened_images"] == 500 and not rounds[1]["passed"] and rounds[1]["accuracy_drop"] > 10
    assert "screened_images" not in rounds[2] and rounds[2]["passed"] and meta["budget"]["passed"]
    assert meta["plain_int8"]["accuracy_drop"] == 10.0 and meta["quant_mix"] == {"act_b": "int16"}
    assert np.array_equal(logits, fp32)  # the screened and the remaining images' logits put back in order


def test_with_nothing_passing_the_best_screened_candidate_is_judged_whole_and_shipped(tmp_path, split_logits):
    fake_logits, fp32, images, labels = split_logits
    every_tenth, every_twentieth = np.arange(SPLIT) % 10 == 0, np.arange(SPLIT) % 20 == 0

    def wrong(mix):  # act_b at int16 halves plain int8's loss and nothing else helps
        return every_twentieth if mix.get("act_b") == "int16" else every_tenth

    fake_logits.quantizer = quantizer = WrongWhere(wrong)
    config = QuantizeConfig(max_float_layers=1)
    logits, meta = quantize.quantize_within_budget("onnx_int8", "onnx_fp32", quantizer, tmp_path / "q.onnx", fp32, images, labels, config)
    rounds = meta["search"]["rounds"]
    assert all("screened_images" in item for item in rounds[1:-1]) and "screened_images" not in rounds[-1]
    assert rounds[-1]["mix"] == "int16 on 1" and rounds[-1]["accuracy_drop"] == 5.0  # the best screen, judged on the whole split
    assert meta["quant_mix"] == {"act_b": "int16"} and not meta["budget"]["passed"] and meta["budget"]["accuracy_drop"] == 5.0
    assert meta["budget"]["verdict"].startswith("missed budget (")
    assert (tmp_path / "q.onnx").stat().st_size == 1005 and np.array_equal(logits.argmax(1) != labels, every_twentieth)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["q.onnx"]  # no copy left behind


class Wide(torch.nn.Sequential):
    def __init__(self) -> None:
        torch.manual_seed(0)
        super().__init__(torch.nn.Conv2d(1, 64, 3), torch.nn.ReLU(), torch.nn.Conv2d(64, 64, 3), torch.nn.ReLU(),
                         torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(64, 10))  # fmt: skip


def test_the_mix_cost_is_the_three_files_sizes_and_p50s_timed_in_turns(tmp_path):
    images = np.random.default_rng(0).standard_normal((32, 1, 16, 16)).astype(np.float32)
    export_onnx(Wide().eval(), torch.from_numpy(images[:1]), tmp_path / "fp32.onnx", ExportConfig())
    quantizer = OnnxQuantizer(tmp_path / "fp32.onnx", images, QuantizeConfig(activation_type="uint8"), tmp_path)
    try:
        quantizer.quantize(tmp_path / "plain.onnx", {})
        conv = next(item.tensor for item in quantizer.tensor_errors() if item.layers)
        quantizer.quantize(tmp_path / "mix.onnx", {conv: "float"})
    finally:
        quantizer.close()
    files = {"fp32": tmp_path / "fp32.onnx", "plain_int8": tmp_path / "plain.onnx", "mix": tmp_path / "mix.onnx"}
    cost = mix_cost_figures(files, seconds=0.3)
    assert cost["size_bytes"] == {key: path.stat().st_size for key, path in files.items()}
    assert cost["size_bytes"]["fp32"] > 2.5 * cost["size_bytes"]["plain_int8"]  # 37k float weights against int8 ones
    assert cost["size_bytes"]["plain_int8"] < cost["size_bytes"]["mix"] < cost["size_bytes"]["fp32"]  # a float layer costs bytes
    assert list(cost["latency_p50_ms"]) == list(files) and all(0 < value < 100 for value in cost["latency_p50_ms"].values())
    assert cost["threads"] == 1 and cost["images_per_run"] == 1
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    broken = mix_cost_figures({**files, "mix": tmp_path / "broken.onnx"}, seconds=0.3)
    assert broken["size_bytes"]["mix"] == 11 and broken["latency_p50_ms"] is None  # a size always, a latency only where measured
    assert broken["latency_error"] and "\n" not in broken["latency_error"]
    kib = " / ".join(f"{size / 1024:.1f}" for size in cost["size_bytes"].values())
    line = quantize.cost_line(cost)
    assert line.startswith(f"fp32 / plain int8 / mix: {kib} KiB, ") and line.endswith(" ms p50 (in-build, 1 thread)")
    assert quantize.cost_line(broken).endswith("KiB, p50 not measured")


def test_onnx_ranking_reports_the_cosine_of_the_worst_tensors(tmp_path):
    images = np.random.default_rng(0).standard_normal((16, 1, 16, 16)).astype(np.float32)
    export_onnx(Wide().eval(), torch.from_numpy(images[:1]), tmp_path / "fp32.onnx", ExportConfig())
    quantizer = OnnxQuantizer(tmp_path / "fp32.onnx", images, QuantizeConfig(), tmp_path)
    try:
        quantizer.quantize(tmp_path / "plain.onnx", {})
        ranking = quantizer.tensor_errors()
    finally:
        quantizer.close()
    assert [item.sqnr_db for item in ranking] == sorted(item.sqnr_db for item in ranking)
    assert len(ranking) >= 5 and all(0.9 < item.cosine <= 1.0 + 1e-6 for item in ranking[:5])
