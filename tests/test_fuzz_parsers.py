"""Property-based tests of everything that parses text we did not write.

Project files and profiles (whole random TOML documents), TFLite's
``benchmark_model`` output and the runner's JSON lines: whatever comes in, the
result is a parsed value or the project's own error (ConfigError, DeviceError),
never another exception.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import typing
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgeprune.config import BuildConfig
from edgeprune.errors import ConfigError, DeviceError
from edgeprune.runtimes.base import BenchResult
from edgeprune.runtimes.benchmark_model_output import parse_benchmark_model_output
from edgeprune.runtimes.commands import parse_runner_stdout
from edgeprune.targets import resolve_config

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REAL_LOG = (Path(__file__).parent / "runtimes/fixtures/mobilenet_v1_riscv64_op_profiling.txt").read_text()
INT64 = st.integers(-(2**63), 2**63 - 1)  # TOML's integers

# --------------------------------------------------------------------------- TOML documents

HINTS = typing.get_type_hints(BuildConfig)
SECTIONS = {name: [spec.name for spec in dataclasses.fields(hint)] for name, hint in HINTS.items() if dataclasses.is_dataclass(hint)}
TOP_LEVEL = [name for name in HINTS if name not in SECTIONS]
text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)  # TOML strings cannot hold lone surrogates
scalars = st.one_of(INT64, st.floats(), text, st.booleans(), st.sampled_from(["onnx", "tflite", "int8", "l2", "local", "NHWC"]))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(text, scalars, max_size=3))
keys = st.one_of(st.sampled_from(TOP_LEVEL), text)


@st.composite
def toml_documents(draw) -> dict[str, typing.Any]:
    """Mostly-real sections and keys with values of any TOML type, plus unknown names and nested tables."""
    document: dict[str, typing.Any] = draw(st.dictionaries(keys, values, max_size=3))
    for section in draw(st.lists(st.one_of(st.sampled_from(sorted(SECTIONS)), text), max_size=4, unique=True)):
        known = SECTIONS.get(section, []) or ["x"]
        document[section] = draw(st.dictionaries(st.one_of(st.sampled_from(known), text), values, max_size=5))
    return document


def to_toml(document: dict[str, typing.Any]) -> str:
    """Emit TOML: scalars and arrays first, then one ``[table]`` per mapping (deeper mappings inline)."""
    lines = [f"{json.dumps(key)} = {toml_value(value)}" for key, value in document.items() if not isinstance(value, dict)]
    for key, table in document.items():
        if isinstance(table, dict):
            lines += [f"[{json.dumps(key)}]"] + [f"{json.dumps(name)} = {toml_value(value)}" for name, value in table.items()]
    return "\n".join(lines) + "\n"


def toml_value(value: typing.Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value)  # JSON's numbers and escapes are TOML's too
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{json.dumps(key)} = {toml_value(item)}" for key, item in value.items()) + "}"


@pytest.fixture(scope="module")
def project_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "edgeprune.toml"


@FUZZ
@given(document=toml_documents())
def test_any_project_file_gives_a_config_with_its_values_or_a_config_error(project_file, document):
    project_file.write_text(to_toml(document))
    try:
        config = resolve_config("cpu-x86", project_file).to_dict()
    except ConfigError as error:
        assert str(project_file) in str(error) and "\n" not in str(error)
        return
    for key, value in document.items():
        if isinstance(value, dict):
            for name, item in value.items():
                assert same_value(config[key][name], item), (key, name)
        elif key != "name":  # the target names the build, not the project file
            assert same_value(config[key], value), key


def same_value(loaded: typing.Any, given_value: typing.Any) -> bool:
    """Equal after the loader's coercions (integers to floats, arrays to tuples, then lists in to_dict)."""
    if isinstance(given_value, list):
        return isinstance(loaded, list) and len(loaded) == len(given_value) and all(map(same_value, loaded, given_value))
    return loaded == given_value and isinstance(loaded, bool) == isinstance(given_value, bool)


@FUZZ
@given(document=st.text(max_size=300))
def test_any_text_as_a_profile_gives_a_config_or_a_config_error(project_file, document):
    profile = project_file.with_name("profile.toml")
    profile.write_text(document, encoding="utf-8", errors="surrogatepass")
    try:
        resolve_config(str(profile))
    except ConfigError as error:
        assert "\n" not in str(error)


@pytest.mark.parametrize("digits", [400, 5000], ids=["beyond float", "beyond int parsing"])
def test_an_integer_too_large_is_a_config_error(project_file, digits):
    project_file.write_text("[prune]\namount = " + "9" * digits + "\n")  # tomllib accepts integers beyond TOML's 64 bits
    with pytest.raises(ConfigError, match=str(project_file)):
        resolve_config("cpu-x86", project_file)


# --------------------------------------------------------------------------- benchmark_model output


def parse_or_device_error(output: str) -> dict | None:
    try:
        parsed = parse_benchmark_model_output(output)
    except DeviceError as error:
        assert "\n" not in str(error)
        return None
    assert isinstance(parsed["inference_avg_ms"], float)
    for key, value in parsed.items():
        assert value is None or isinstance(value, (int, float, dict)), key
    return parsed


LINES = REAL_LOG.splitlines()
NODES_LINE = max(i for i, line in enumerate(LINES) if line.startswith("Number of nodes executed"))
THREADS_LINE = next(i for i, line in enumerate(LINES) if line.startswith("#threads used"))
REGULAR_RUNS_LINE = max(i for i, line in enumerate(LINES) if line.startswith("count="))
numbers = st.sampled_from(["", "-", "nan", "1e-999", "0", "00", "1.2.3", "9" * 30, "\t", "=", "%", "-1", "1e5"])
mutations = st.lists(
    st.tuples(st.sampled_from(["drop", "repeat", "cut", "number", "insert"]), st.integers(0, len(LINES) - 1), st.integers(0, 200), numbers),
    max_size=12,
)


def mutate(lines: list[str], edits: list[tuple[str, int, int, str]]) -> str:
    lines = list(lines)
    for operation, index, position, token in edits:
        index %= max(len(lines), 1)
        if not lines:
            break
        line = lines[index]
        if operation == "drop":
            del lines[index]
        elif operation == "repeat":
            lines.insert(index, line)
        elif operation == "cut":
            lines[index] = line[: position % (len(line) + 1)]
        elif operation == "number":  # replace the n-th number of the line with a garbled one
            parts = re.split(r"(\d+(?:\.\d+)?)", line)
            numeric = [i for i, part in enumerate(parts) if part[:1].isdigit()]
            if numeric:
                parts[numeric[position % len(numeric)]] = token
            lines[index] = "".join(parts)
        else:
            lines.insert(index, token)
    return "\n".join(lines)


@FUZZ
@given(output=st.text(max_size=400))
@example(output="")
@example(output="Running benchmark for at least 1 iterations\ncount=")
def test_benchmark_model_parser_on_any_text(output):
    parse_or_device_error(output)


@FUZZ
@given(output=st.binary(max_size=400))
def test_benchmark_model_parser_on_any_bytes(output):
    for encoding in ("utf-8", "latin-1"):
        parse_or_device_error(output.decode(encoding, errors="replace"))


@FUZZ
@given(edits=mutations)
def test_benchmark_model_parser_on_damaged_real_logs(edits):
    parse_or_device_error(mutate(LINES, edits))


@pytest.mark.parametrize("line", [NODES_LINE, THREADS_LINE, REGULAR_RUNS_LINE], ids=["nodes", "threads", "count"])
def test_a_count_beyond_float_range_is_not_a_crash(line):
    parse_or_device_error(mutate(LINES, [("number", line, 0, "1e999")]))


def test_the_mutations_really_reach_the_parser():
    """The fuzz above is only worth something if damaged logs still parse, and change figures."""
    assert parse_or_device_error(REAL_LOG)["inference_count"] == 50
    timings = next(i for i, line in enumerate(LINES) if line.startswith("Inference timings in us"))
    damaged = parse_or_device_error(mutate(LINES, [("number", timings, 4, "1.5")]))
    assert damaged["inference_avg_ms"] == pytest.approx(1500.0)  # 2.95034e+06 us became 1.5e+06 us


# --------------------------------------------------------------------------- the runner's JSON


RUNNER_JSON = {
    "latency_p50_ms": 1.25,
    "latency_p90_ms": 1.5,
    "latency_p99_ms": 2.0,
    "latency_mean_ms": 1.3,
    "latency_std_ms": 0.1,
    "latency_min_ms": 1.0,
    "iterations": 50,
    "threads": 2,
    "peak_rss_mb": 80.5,
    "rss_before_load_mb": 60.0,
    "init_ms": 4.0,
    "first_run_ms": 3.0,
    "runtime": "onnxruntime",
    "runtime_version": "1.23.0",
    "providers": ["CPUExecutionProvider"],
    "cpu_affinity": [0, 1],
    "python_version": "3.11.7",
    "platform": "Linux",
    "machine": "x86_64",
    "cpu_model": "x",
}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(text, children, max_size=3),
    max_leaves=8,
)
runner_jsons = st.builds(
    lambda dropped, replaced: {
        **{key: value for key, value in RUNNER_JSON.items() if key not in dropped},
        **replaced,
    },
    st.sets(st.sampled_from(sorted(RUNNER_JSON)), max_size=4),
    st.dictionaries(st.sampled_from(sorted(RUNNER_JSON)), json_values, max_size=3),
)


def completed(stdout: str) -> subprocess.CompletedProcess:
    return subprocess.CompletedProcess(["runner"], 0, stdout=stdout, stderr="")


@FUZZ
@given(stdout=st.text(max_size=300), run=runner_jsons, junk=st.text(max_size=40), cut=st.integers(0, 400))
def test_runner_stdout_gives_a_json_object_or_a_device_error(stdout, run, junk, cut):
    for output in (stdout, f"{junk}\n{json.dumps(run)}\n", json.dumps(run)[:cut], "{" + stdout):
        try:
            parsed = parse_runner_stdout(completed(output), "local: run repeat 1/1")
        except DeviceError:
            continue
        assert isinstance(parsed, dict)


@FUZZ
@given(runs=st.lists(runner_jsons, min_size=1, max_size=3))
@example(runs=[{key: value for key, value in RUNNER_JSON.items() if key != "latency_mean_ms"}])
def test_runner_json_aggregates_or_raises_a_device_error(runs):
    try:
        result = BenchResult.from_runner_json(runs, "local", "model.onnx")
    except DeviceError as error:
        assert "\n" not in str(error)
        return
    assert isinstance(result, BenchResult) and len(result.repeats) == len(runs)


def test_runner_json_of_real_repeats_aggregates():
    result = BenchResult.from_runner_json([RUNNER_JSON, {**RUNNER_JSON, "latency_p50_ms": 1.75}], "local", "model.onnx")
    assert result.latency_p50_ms == pytest.approx(1.5) and result.iterations == 100
