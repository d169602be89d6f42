"""Profiles, project files and --set overrides: layering and validation."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeprune.config import BuildConfig, merge_layers, parse_override
from edgeprune.errors import ConfigError
from edgeprune.targets import list_targets, resolve_config


def test_bundled_targets_cover_the_four_devices():
    names = {info.name for info in list_targets()}
    assert {"android", "rpi5", "cpu-x86", "nvidia-gpu"} <= names


@pytest.mark.parametrize("name", [info.name for info in list_targets()])
def test_every_bundled_profile_resolves(name):
    config = resolve_config(name)
    assert config.name == name
    assert config.export.formats


def test_profiles_say_what_the_devices_need():
    android = resolve_config("android")
    assert android.export.formats == ("tflite",) and android.quantize.scheme == "int8" and android.benchmark.threads == 4
    assert resolve_config("cpu-x86").export.formats == ("onnx",)
    gpu = resolve_config("nvidia-gpu")
    assert gpu.quantize.scheme == "fp16" and gpu.benchmark.device == "gpu"


def test_layers_override_in_order(tmp_path):
    project = tmp_path / "edgeprune.toml"
    project.write_text("[prune]\namount = 0.4\n[finetune]\nepochs = 2\n")
    config = resolve_config("android", project, overrides=("prune.amount=0.5", "benchmark.device=ssh://pi@host"))
    assert config.prune.amount == 0.5  # --set beats the project file
    assert config.finetune.epochs == 2  # project file beats the profile
    assert config.prune.round_to == 8  # the profile beats the defaults
    assert config.benchmark.device == "ssh://pi@host"


@pytest.mark.parametrize(
    "toml, message",
    [
        ("[prune]\namout = 0.3\n", "unknown key 'prune.amout'"),
        ("[prnue]\namount = 0.3\n", "unknown key 'prnue'"),
        ("[prune]\namount = 'lots'\n", "'prune.amount' must be a number"),
        ("[prune]\namount = 1.5\n", "'prune.amount' = 1.5 is out of range"),
        ("[prune]\nmode = 'sideways'\n", "'prune.mode' must be one of"),
        ("[finetune]\nepochs = 1.5\n", "'finetune.epochs' must be an integer"),
        ("[export]\nformats = 'onnx'\n", "'export.formats' must be a list"),
        ("[benchmark]\nenabled = 1\n", "'benchmark.enabled' must be true or false"),
        ("prune = 3\n", "'prune' must be a table"),
        ("[prune\namount = 0.3\n", "invalid TOML"),
    ],
)
def test_bad_project_files_name_file_and_key(tmp_path, toml, message):
    project = tmp_path / "edgeprune.toml"
    project.write_text(toml)
    with pytest.raises(ConfigError) as error:
        resolve_config("android", project)
    assert message in str(error.value)
    assert str(project) in str(error.value)


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown target 'iphone'.*android"):
        resolve_config("iphone")


def test_a_profile_file_path_works_as_target(tmp_path):
    profile = tmp_path / "mine.toml"
    profile.write_text('description = "mine"\n[export]\nformats = ["onnx", "tflite"]\n')
    config = resolve_config(str(profile))
    assert config.name == "mine" and config.export.formats == ("onnx", "tflite")


def test_override_values_are_toml_or_bare_words():
    assert parse_override("prune.amount=0.5") == {"prune": {"amount": 0.5}}
    assert parse_override('export.formats=["onnx"]') == {"export": {"formats": ["onnx"]}}
    assert parse_override("benchmark.device=adb://emulator-5554") == {"benchmark": {"device": "adb://emulator-5554"}}
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("prune.amount")


@settings(max_examples=150, deadline=None)
@given(
    section=st.sampled_from(["prune", "finetune", "quantize", "export", "benchmark", "budgets", "data", "bogus"]),
    key=st.sampled_from(["amount", "epochs", "scheme", "formats", "threads", "max_accuracy_drop", "scale", "mode", "nope"]),
    value=st.one_of(
        st.integers(-(10**6), 10**6),
        st.floats(allow_nan=True),
        st.text(max_size=8),
        st.booleans(),
        st.lists(st.text(max_size=4), max_size=3),
    ),
)
def test_loader_either_accepts_a_valid_config_or_raises_config_error(section, key, value):
    """Property: any single-key layer yields a valid BuildConfig or a ConfigError, never another exception."""
    try:
        config = merge_layers([("fuzz.toml", {section: {key: value}})])
    except ConfigError as error:
        assert "fuzz.toml" in str(error)
        return
    assert isinstance(config, BuildConfig)
    assert getattr(getattr(config, section), key) is not None


def test_an_unknown_key_with_a_newline_in_it_is_named_on_one_line(tmp_path):
    project = tmp_path / "edgeprune.toml"
    project.write_text('"bad\\nkey" = 1\n')  # a quoted TOML key may hold a newline escape
    with pytest.raises(ConfigError) as raised:
        resolve_config("android", project)
    message = str(raised.value)
    assert "\n" not in message and "unknown key 'bad\\nkey'" in message


# --------------------------------------------------------------------------- prune.round_to = "auto"

AVX512 = frozenset({"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma"})


@pytest.mark.parametrize(
    "machine, flags, environ, value, reason",
    [
        ("x86_64", AVX512, {}, 16, "host AVX512: 16 float32 lanes"),
        ("x86_64", AVX2, {}, 8, "host AVX2: 8 float32 lanes"),
        ("x86_64", frozenset({"sse4_2", "avx"}), {}, 8, "host AVX: 8"),
        ("x86_64", frozenset({"sse2"}), {}, 4, "host SSE: 4"),
        ("x86_64", AVX512, {"ATEN_CPU_CAPABILITY": "avx2"}, 8, "host AVX2 (the CPU has AVX512; ATEN_CPU_CAPABILITY=avx2 caps it)"),
        ("x86_64", AVX512, {"ATEN_CPU_CAPABILITY": "default"}, 4, "host SSE (the CPU has AVX512; ATEN_CPU_CAPABILITY=default caps it)"),
        ("x86_64", AVX2, {"ATEN_CPU_CAPABILITY": "avx512"}, 8, "host AVX2: 8"),  # a cap never raises what the CPU has
        ("x86_64", AVX2, {"ATEN_CPU_CAPABILITY": "bogus"}, 8, "host AVX2: 8"),  # PyTorch ignores an unknown value too
        ("aarch64", frozenset(), {}, 8, "XNNPACK's arm64 kernels tile output channels by 8"),
        ("riscv64", frozenset(), {}, 8, "host riscv64: no known vector width, 8 assumed"),
    ],
)
def test_the_auto_channel_multiple_is_the_hosts_float32_lanes(machine, flags, environ, value, reason):
    from edgeprune.simd import host_channel_multiple

    multiple = host_channel_multiple(machine, flags, environ)
    assert multiple.value == value and reason in multiple.reason


def test_round_to_auto_resolves_to_this_hosts_multiple_and_records_why():
    from edgeprune.simd import host_channel_multiple

    host = host_channel_multiple()
    config = resolve_config("cpu-x86")  # the profile says "auto"
    assert config.prune.round_to == host.value and config.prune.round_to_source == f"auto: {host.reason}"
    assert config.to_dict()["prune"]["round_to_source"] == f"auto: {host.reason}"  # what the manifest's config shows
    explicit = resolve_config("cpu-x86", overrides=("prune.round_to=32",))
    assert explicit.prune.round_to == 32 and explicit.prune.round_to_source == ""
    assert resolve_config("android").prune.round_to == 8  # a device target keeps its number
    assert resolve_config("android", overrides=("prune.round_to='auto'", "benchmark.device='local'")).prune.round_to == host.value


@pytest.mark.parametrize(
    "override, message",
    [
        ("prune.round_to='fast'", "'prune.round_to' must be an integer or 'auto', got 'fast'"),
        ("prune.round_to=true", "'prune.round_to' must be an integer or 'auto', got True"),
        ("prune.round_to=0", "'prune.round_to' = 0 is out of range [1, 1024]"),
        ("prune.round_to=-16", "'prune.round_to' = -16 is out of range [1, 1024]"),
        ("prune.round_to_source='mine'", "unknown key 'prune.round_to_source'"),
        ("benchmark.device='ssh://pi@board'", "prune.round_to = 'auto' reads this machine's vector width, but benchmark.device"),
    ],
)
def test_round_to_is_auto_or_a_positive_integer_and_auto_only_for_this_machine(override, message):
    with pytest.raises(ConfigError) as error:
        resolve_config("cpu-x86", overrides=(override,))
    assert message in str(error.value) and "\n" not in str(error.value)
