"""The command line: help, listing, JSON output, one-line errors and exit codes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgeprune.cli import main
from tests.conftest import FAST, USER_MODEL


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_help_everywhere():
    for command in ([], ["build"], ["analyze"], ["export"], ["targets"], ["bench"], ["diff"]):
        result = run_cli(*command, "--help")
        assert result.returncode == 0 and "usage: edgeprune" in result.stdout


def test_targets_list_and_show_json(capsys):
    assert main(["targets", "--json"]) == 0
    names = [entry["name"] for entry in json.loads(capsys.readouterr().out)]
    assert {"android", "rpi5", "cpu-x86", "nvidia-gpu"} <= set(names)
    assert main(["targets", "show", "android", "--json", "--set", "prune.amount=0.4"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["prune"]["amount"] == 0.4 and resolved["export"]["formats"] == ["tflite"]
    assert main(["targets", "show", "rpi5"]) == 0
    assert "[benchmark]\n" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, files, message",
    [
        (["build", "--target", "iphone"], {}, "unknown target 'iphone'"),
        (["build", "--target", "cpu-x86", "--project", "bad.toml"], {"bad.toml": "[prune\n"}, "bad.toml: invalid TOML"),
        (["build", "--target", "cpu-x86", "--set", "prune.amont=0.3"], {}, "unknown key 'prune.amont'"),
        (["build", "--target", "cpu-x86", "--set", "prune.amount=7"], {}, "'prune.amount' = 7.0 is out of range"),
        (["build", "--target", "cpu-x86", "--model", USER_MODEL, "--weights", "missing.pt"], {}, "checkpoint not found: missing.pt"),
        (
            ["build", "--target", "cpu-x86", "--model", USER_MODEL, "--weights", "corrupt.pt"],
            {"corrupt.pt": "garbage"},
            "corrupt or truncated checkpoint",
        ),
        (
            ["build", "--target", "cpu-x86", "--model", "tests.user_models:tiny_cnn_rgb"],
            {},
            "the model rejects inputs of shape (2, 1, 28, 28)",
        ),
        (["build", "--target", "cpu-x86", "--data", "nothing.npz"], {}, "data file not found: nothing.npz"),
        (
            ["build", "--target", "cpu-x86", "--set", "prune.drop_blocks=['features']", "--set", "train.epochs=1"],
            {},
            "prune.drop_blocks: 'features' is not a residual block that can be removed (removable: none)",
        ),
        (["bench", "nothing.onnx"], {}, "artefact not found: nothing.onnx"),
        (["analyze", "--target", "cpu-x86", "--ratios", "0.5,0.95"], {}, "analyze: ratios must lie in (0, 0.9], got [0.5, 0.95]"),
        (["analyze", "--target", "cpu-x86", "--set", "export.formats=[]"], {}, "analyze needs an export format"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, files, message):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    result = subprocess.run([sys.executable, "-m", "edgeprune", *args], capture_output=True, text=True, cwd=tmp_path, timeout=300, env=env)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("edgeprune: error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("build", "--target", "iphone", "--debug", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_budget_violation_exit_code_names_the_violation(workdir, user_checkpoint, capsys):
    args = ["build", "--target", "cpu-x86", "--model", USER_MODEL, "--weights", str(user_checkpoint), "--json"]
    for override in (*FAST, "budgets.max_accuracy_drop=100.0", "budgets.max_size_kb=1.0"):
        args += ["--set", override]
    assert main(args) == 12
    captured = capsys.readouterr()
    report = json.loads(captured.out)  # --json keeps stdout machine-readable
    assert report["violations"][0]["kind"] == "size"
    assert "budget violated (size): artefact size of onnx_int8" in captured.err
