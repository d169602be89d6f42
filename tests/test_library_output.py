"""Other libraries' output goes to the build log; ours stays on the terminal; CI logs get paced progress lines."""

from __future__ import annotations

import io
import os
import warnings

from edgeprune.library_output import build_log, library_output_to, log_path_for
from edgeprune.progress import Reporter, duration


def test_native_and_python_library_output_goes_to_the_log_and_ours_does_not(tmp_path, capfd):
    ours = io.StringIO()
    reporter = Reporter(verbosity=1, stream=ours)
    log_path = tmp_path / "android.log"
    with library_output_to(log_path, reporter):
        os.write(2, b"I0000 absl native INFO line\n")  # what TFLite's C++ logging does
        os.write(1, b"fully_quantize: 0, inference_type: 6\n")
        print("a library's print")
        warnings.warn("torch.onnx constant folding", UserWarning, stacklevel=1)
        reporter.info("[android] export_tflite      run")
    os.write(2, b"after\n")
    log = log_path.read_text()
    for line in ("absl native INFO", "fully_quantize", "a library's print", "constant folding"):
        assert line in log
    assert "export_tflite" not in log and ours.getvalue() == "[android] export_tflite      run\n"
    captured = capfd.readouterr()
    assert captured.err == "after\n" and "absl" not in captured.out  # both descriptors are back


def test_a_build_keeps_a_log_only_when_something_was_written_and_verbose_keeps_the_terminal(tmp_path, capfd):
    out = tmp_path / "dist" / "android"
    with build_log(out, Reporter(verbosity=1, stream=io.StringIO())):
        pass
    assert not log_path_for(out).exists()
    said = io.StringIO()
    with build_log(out, Reporter(verbosity=1, stream=said)):
        os.write(2, b"W0000 noise\n")
    assert log_path_for(out) == tmp_path / "dist" / "android.log" and "noise" in log_path_for(out).read_text()
    assert "android.log" in said.getvalue()
    with build_log(out, Reporter(verbosity=2, stream=io.StringIO())):
        os.write(2, b"shown when verbose\n")
    assert "shown when verbose" in capfd.readouterr().err


def test_plain_progress_lines_carry_elapsed_time_and_an_estimate():
    stream = io.StringIO()
    reporter = Reporter(verbosity=1, stream=stream, progress_interval_s=0.0)
    assert list(reporter.track(range(4), 4, "finetune")) == [0, 1, 2, 3]
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[0].startswith("  finetune: 1/4 (25%), 0s elapsed, about 0s left")
    assert lines[-1].startswith("  finetune: 4/4 (100%)")


def test_plain_progress_is_paced():
    stream = io.StringIO()
    reporter = Reporter(verbosity=1, stream=stream)  # 30 s between lines: a fast loop prints nothing
    assert list(reporter.track(range(1000), 1000, "finetune")) == list(range(1000))
    assert stream.getvalue() == ""


def test_durations_read_like_a_clock():
    assert [duration(s) for s in (4.4, 65, 3725)] == ["4s", "1m05s", "1h02m"]
