"""Release jobs: matrix builds, budgets on the command line, reproducible builds, `edgeprune diff`."""

import contextlib
import io
import json
from pathlib import Path

import pytest

from edgeprune.api import resolve
from edgeprune.artifacts import sha256_of
from edgeprune.cli import main
from edgeprune.config import DataConfig
from edgeprune.data import EXAMPLE_DATA, load_dataset
from edgeprune.diff import Thresholds, diff_manifests
from edgeprune.errors import ConfigError
from edgeprune.manifest import VOLATILE_FIELDS, content_sha256, strip_volatile
from edgeprune.progress import Reporter
from tests.conftest import FAST, TINY_INT8_GATE, USER_MODEL

MATRIX = ("android", "cpu-x86")
# Every kind of shipped artefact; the two targets together produce all of them.
SHIPPED_KINDS = {"model", "onnx_fp32", "onnx_int8", "tflite_fp32", "tflite_int8"}
ACCURACY_BUDGET = "10"  # points: the FAST builds drop about 4, the worse build about 24
WORSE_PROFILE = """
name = "cpu-x86"
description = "cpu-x86, deliberately worse: pruned much harder"
[prune]
mode = "structured"
amount = 0.7
round_to = 8
[quantize]
scheme = "int8"
activation_type = "uint8"
[export]
formats = ["onnx"]
"""


def cli(*args: str) -> tuple[int, dict]:
    """Run the CLI in-process with --json; return the exit code and the parsed stdout."""
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*args, "--json"])
    return code, json.loads(stdout.getvalue())


def matrix_build(targets, checkpoint: Path, out: Path, cache: Path) -> tuple[int, dict]:
    args = [arg for target in targets for arg in ("--target", str(target))]
    args += ["--model", USER_MODEL, "--weights", str(checkpoint), "--out", str(out), "--cache-dir", str(cache)]
    # one round_to for both (cpu-x86 alone rounds to this host's vector width): the targets prune alike, sharing the pruned model
    overrides = (*FAST, TINY_INT8_GATE, "prune.round_to=8")
    args += ["--max-accuracy-drop", ACCURACY_BUDGET] + [arg for override in overrides for arg in ("--set", override)]
    return cli("build", *args)


def manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def twin_builds(tmp_path_factory, user_checkpoint):
    """The same two-target matrix built twice from cold, separate caches."""
    root = tmp_path_factory.mktemp("release")
    runs = [matrix_build(MATRIX, user_checkpoint, root / f"dist{i}", root / f"cache{i}") for i in (1, 2)]
    return root, runs


@pytest.mark.slow
def test_matrix_build_shares_common_stages_and_sums_up(twin_builds):
    root, runs = twin_builds
    code, report = runs[0]
    assert code == 0 and report["exit_code"] == 0 and report["failures"] == {}
    assert [build["target"] for build in report["builds"]] == list(MATRIX)
    cpu = manifest(root / "dist1/cpu-x86")
    ran = [stage["name"] for stage in cpu["stages"] if not stage["cached"]]
    assert ran == ["export_onnx", "quantize", "benchmark"]  # baseline, pruning and finetune came from android's run
    android = manifest(root / "dist1/android")
    assert android["budgets"]["limits"]["max_accuracy_drop"] == 10.0 and android["budgets"]["passed"] is True
    # its sign is the model's to decide (pruned and finetuned, a tiny CNN can gain a point): the drop is the shipped file's
    accuracy = android["accuracy"]
    assert accuracy["primary"] == android["artifacts"][android["primary_artifact"]]["accuracy"]
    assert accuracy["drop"] == pytest.approx(accuracy["baseline"] - accuracy["primary"]) and accuracy["drop"] < 10
    for target in MATRIX:
        assert (root / "dist1" / target / "report.html").stat().st_size > 10_000


@pytest.mark.slow
def test_identical_builds_give_identical_manifests_and_artefacts(twin_builds, user_checkpoint):
    root, runs = twin_builds
    assert runs[0][0] == runs[1][0] == 0
    kinds = set()
    for target in MATRIX:
        first, second = manifest(root / "dist1" / target), manifest(root / "dist2" / target)
        assert strip_volatile(first) == strip_volatile(second)
        assert first["content_sha256"] == second["content_sha256"] == content_sha256(first)
        assert first["stages"][0]["cache_key"] == second["stages"][0]["cache_key"]  # stripping keeps the cache keys
        for name, entry in first["artifacts"].items():
            kinds.add(name)
            assert entry["sha256"] == second["artifacts"][name]["sha256"], f"{target}/{entry['file']} is not reproducible"
            assert (root / "dist1" / target / entry["file"]).read_bytes() == (root / "dist2" / target / entry["file"]).read_bytes()
    assert kinds == SHIPPED_KINDS
    stripped = strip_volatile(first)
    assert "benchmark" not in stripped["artifacts"]["onnx_int8"] and "created_at" not in stripped
    assert stripped["artifacts"]["onnx_int8"]["accuracy"] == first["artifacts"]["onnx_int8"]["accuracy"]
    assert first["volatile_fields"] == list(VOLATILE_FIELDS)


@pytest.mark.slow
def test_manifest_records_what_is_needed_to_reproduce(twin_builds, user_checkpoint):
    root, _ = twin_builds
    recorded = manifest(root / "dist1/android")
    inputs = recorded["inputs"]
    assert inputs["weights_sha256"] == sha256_of(user_checkpoint)
    assert inputs["data_sha256"] == sha256_of(EXAMPLE_DATA)
    assert inputs["data_fingerprint"] == load_dataset(DataConfig(), 10).fingerprint
    assert inputs["model_source_sha256"] == sha256_of(Path(__file__).with_name("user_models.py"))
    overrides = (*FAST, TINY_INT8_GATE, "budgets.max_accuracy_drop=10.0")
    assert recorded["config"] == resolve("android", overrides=overrides, model=USER_MODEL, weights=str(user_checkpoint)).to_dict()
    assert recorded["seed"] == 0 and recorded["tools"]["torch"].startswith("2.") and recorded["tools"]["litert-torch"] != "not installed"


@pytest.mark.slow
def test_worse_build_fails_with_the_named_violation_and_diff_flags_it(twin_builds, user_checkpoint, capsys):
    root, _ = twin_builds
    worse = root / "worse-cpu-x86.toml"
    worse.write_text(WORSE_PROFILE)
    capsys.readouterr()
    code, report = matrix_build(["android", worse], user_checkpoint, root / "worse", root / "cache1")
    assert code == 10 and report["exit_code"] == 10  # accuracy: the worst (and only) violation of the matrix
    violations = {build["target"]: build["violations"] for build in report["builds"]}
    assert violations["android"] == []
    (violation,) = violations["cpu-x86"]
    assert violation["kind"] == "accuracy" and violation["budget"] == "max_accuracy_drop" and violation["value"] > 15
    assert "cpu-x86: budget violated (accuracy): accuracy drop of onnx_int8" in capsys.readouterr().err

    assert main(["diff", str(root / "dist1/cpu-x86"), str(root / "worse/cpu-x86"), "--max-latency-increase-pct", "inf"]) == 10
    text = capsys.readouterr().out
    assert "2 regression(s)" in text and "| onnx_int8 | top-1 |" in text and "**accuracy regression**" in text
    code, diff = cli(
        "diff", str(root / "dist1/cpu-x86/manifest.json"), str(root / "worse/cpu-x86/manifest.json"), "--max-latency-increase-pct", "inf"
    )
    assert code == 10 and sorted(change["scope"] for change in diff["regressions"]) == ["onnx_fp32", "onnx_int8"]
    assert {change["regression"] for change in diff["regressions"]} == {"accuracy"}
    shrunk = [c for c in diff["changes"] if c["scope"] == "onnx_int8" and c["metric"] == "size_kib"][0]
    assert shrunk["delta"] < 0 and not shrunk["regression"]  # pruned harder: smaller, not flagged

    code, same = cli("diff", str(root / "dist1/android"), str(root / "worse/android"))
    assert code == 0 and same["regressions"] == [] and any("same content_sha256" in note for note in same["notes"])


# --------------------------------------------------------------------------- diff on small manifests (fast)


def small_manifest() -> dict:
    def artefact(name, accuracy, size, p50):
        bench = {"latency_p50_ms": p50, "latency_p90_ms": p50 * 1.2}
        return {
            "file": name,
            "sha256": "ab" * 32,
            "size_bytes": size,
            "size_gzip_bytes": size // 2,
            "accuracy": accuracy,
            "benchmark": bench,
        }

    artifacts = {
        "onnx_fp32": artefact("model_fp32.onnx", 73.7, 32_000, 0.06),
        "onnx_int8": artefact("model_int8.onnx", 73.55, 18_000, 0.08),
    }
    artifacts["model"] = {"file": "model.pt", "sha256": "cd" * 32, "size_bytes": 39_000, "size_gzip_bytes": 31_000}
    return {
        "target": "cpu-x86",
        "artifacts": artifacts,
        "accuracy": {"baseline": 77.65, "primary": 73.55},
        "model": {"macs": 621_730, "params": 7_586},
        "speedups": {"onnx_fp32": 0.84, "onnx_int8": 0.63},
    }


def scale(artifact: str, key: str, factor: float):
    def edit(data):
        entry = data["artifacts"][artifact]
        holder = entry["benchmark"] if key.startswith("latency") else entry
        holder[key] = holder[key] * factor

    return edit


def minus(points: float, artifact: str = "onnx_int8"):
    return lambda data: data["artifacts"][artifact].update(accuracy=data["artifacts"][artifact]["accuracy"] - points)


@pytest.mark.parametrize(
    "edits, code, kinds",
    [
        ([scale("onnx_int8", "latency_p50_ms", 1.5)], 11, {"latency"}),
        ([scale("onnx_fp32", "latency_p90_ms", 1.26)], 11, {"latency"}),
        ([scale("onnx_fp32", "size_bytes", 1.06)], 12, {"size"}),
        ([minus(1.5)], 10, {"accuracy"}),
        ([minus(30.0), scale("model", "size_bytes", 2.0)], 14, {"accuracy", "size"}),
        (
            [
                minus(0.9),
                scale("onnx_int8", "latency_p50_ms", 1.2),
                scale("onnx_int8", "size_bytes", 1.04),
                scale("onnx_int8", "size_gzip_bytes", 3),
            ],
            0,
            set(),
        ),
        ([scale("onnx_int8", "latency_p50_ms", 0.5), scale("onnx_int8", "size_bytes", 0.5), minus(-5.0)], 0, set()),
    ],
    ids=["latency-p50+50%", "latency-p90+26%", "size+6%", "accuracy-1.5", "several-kinds", "within-thresholds", "improvements"],
)
def test_diff_flags_each_regression_kind_with_its_exit_code(tmp_path, edits, code, kinds):
    new = small_manifest()
    for edit in edits:
        edit(new)
    (tmp_path / "old.json").write_text(json.dumps(small_manifest()))
    (tmp_path / "new.json").write_text(json.dumps(new))
    result = diff_manifests(tmp_path / "old.json", tmp_path / "new.json", Thresholds(1.0, 25.0, 5.0))
    assert result.exit_code == code and {change.regression for change in result.regressions} == kinds
    assert len(result.changes) == 4 + 3 * 6  # the build's metrics, then six per artefact present in both


def test_diff_refuses_what_is_not_a_manifest(tmp_path, capsys):
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert main(["diff", str(tmp_path / "other.json"), str(tmp_path / "missing")]) == 2
    assert "is not an edgeprune manifest" in capsys.readouterr().err
    assert main(["diff", str(tmp_path / "nothing"), str(tmp_path / "other.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="diff thresholds must be >= 0"):
        Thresholds(max_size_increase_pct=-1)


def test_matrix_configs_are_checked_before_any_work(tmp_path, capsys):
    assert main(["build", "--target", "android", "--target", "iphone", "--out", str(tmp_path / "dist")]) == 2
    assert "unknown target 'iphone'" in capsys.readouterr().err
    (tmp_path / "twin.toml").write_text('name = "android"\n')
    assert main(["build", "--target", "android", "--target", str(tmp_path / "twin.toml"), "--out", str(tmp_path / "dist")]) == 2
    assert "would both write" in capsys.readouterr().err
    assert not (tmp_path / "dist").exists()


def test_progress_bars_stay_off_stdout_under_json(capsys):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    reporter = Reporter(verbosity=1, json_mode=True, stream=terminal)  # the CLI's --json reporter in a terminal
    assert reporter.interactive and list(reporter.track(range(40), 40, "calibrate tflite int8")) == list(range(40))
    assert "calibrate tflite int8" in terminal.getvalue()
    assert capsys.readouterr().out == ""  # stdout carries only the JSON document
