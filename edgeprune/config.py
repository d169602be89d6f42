"""Typed, frozen configuration: one dataclass per stage, loaded from TOML.

A build's configuration is layered, later layers winning:
built-in defaults < target profile (``targets/*.toml``) < project file
(``edgeprune.toml``) < ``--set section.key=value`` overrides.

Every layer is validated against the dataclasses below: an unknown section or
key, a value of the wrong type or one outside its range is a ``ConfigError``
naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgeprune.errors import ConfigError
from edgeprune.simd import host_channel_multiple


def _range(low: float, high: float) -> dict[str, Any]:
    return {"range": (low, high)}


DERIVED = {"derived": True}  # a field edgeprune fills in while resolving; not a key a user may set


@dataclass(frozen=True)
class ModelConfig:
    """Which network to build: a bundled one or the user's ``module:factory``."""

    source: str = "example:small_cnn"
    weights: str = ""
    trust_checkpoint: bool = False
    num_classes: int = field(default=10, metadata=_range(2, 100_000))


@dataclass(frozen=True)
class DataConfig:
    """Where the data comes from and the preprocessing a device app must repeat.

    Images are turned into model input as ``(pixel * scale - mean) / std`` per
    channel, in NCHW. ``layout`` is the layout of the *stored* images.
    """

    source: str = "example"
    layout: Literal["auto", "NCHW", "NHWC"] = "auto"
    scale: float = field(default=1 / 255, metadata=_range(0.0, 1e6))
    mean: tuple[float, ...] = (0.5,)
    std: tuple[float, ...] = (0.5,)
    calibration_samples: int = field(default=256, metadata=_range(1, 1_000_000))
    eval_samples: int = field(default=0, metadata=_range(0, 10_000_000))
    train_samples: int = field(default=0, metadata=_range(0, 10_000_000))


@dataclass(frozen=True)
class TrainConfig:
    """Baseline training, used only for the bundled example models."""

    epochs: int = field(default=6, metadata=_range(1, 1000))
    lr: float = field(default=5e-3, metadata=_range(1e-7, 10.0))
    batch_size: int = field(default=128, metadata=_range(1, 65536))


@dataclass(frozen=True)
class PruneConfig:
    """Structured and/or unstructured pruning settings.

    Structured pruning removes ``amount`` of each layer group's channels in ``steps``
    steps, with ``recover_epochs`` of (distilled) finetuning between them (and, in the speed-up search,
    when held-out top-1 on the way falls 15 points past the budget). Per-group
    ratios: ``ratios_from`` (a ``sensitivity.json`` from ``edgeprune analyze``) scales
    ``amount`` per group by its measured latency gain per point of accuracy lost, and
    ``layer_ratios`` (``["layer.name=0.5", ...]``) fixes single groups. With
    ``speedup`` > 0, pruning instead goes on in steps of ``speedup_step`` until the
    speed-up measured on the target's runtime reaches it (``budgets.max_accuracy_drop``
    checked after each step's recovery) or every group is at its cap (with ``ratios_from``
    the levels go on until the held-back groups reach theirs too) with ``speedup_moves = "uniform"``; by default
    (``"search"``) one greedy search weighs removing a residual block against narrowing one group by one rounding step and dropping one
    attention head, by latency saved per point of held-out top-1 lost, latency predicted from a per-device table
    (``edgeprune.speed_search``); ``"depth"`` and ``"width"`` restrict it to one kind of move. ``prune_num_heads`` removes whole
    attention heads instead of narrowing every head. ``recalibrate_batchnorm`` re-estimates BatchNorm statistics on training images
    after every structured step (the dense model's are stale once channels are gone), before the step's top-1 is measured and finetuning
    starts. ``round_to = "auto"`` (for a target benchmarked on this machine) takes the channel multiple from the host's vector width
    (``edgeprune.simd``: 16 with AVX-512, 8 with AVX2/AVX); the resolved number replaces it and ``round_to_source`` records why.

    Depth pruning removes whole residual blocks before any channel goes (``edgeprune.depth_pruning``): the blocks
    named in ``drop_blocks``, then ``drop_block_count`` more, those whose removal alone costs least top-1 on
    held-out training images. Every operator of a removed block is gone, which narrowing channels cannot do.

    ``analysis_seconds`` bounds each analysis that grows with the graph (the dependency analysis, each step's
    verification and bisection of untracked couplings, residual-block detection and ranking): past it the
    analysis stops, what it has not resolved is kept whole (not pruned, not removed) and reported.
    """

    mode: Literal["none", "structured", "unstructured", "both"] = "structured"
    amount: float = field(default=0.3, metadata=_range(0.0, 0.95))
    importance: Literal["l1", "l2", "bn_scale", "taylor"] = "l2"
    global_pruning: bool = False
    round_to: int | Literal["auto"] = field(default=8, metadata=_range(1, 1024))
    round_to_source: str = field(default="", metadata=DERIVED)  # set when "auto" is resolved, never by the user
    ignored_layers: tuple[str, ...] = ()
    steps: int = field(default=1, metadata=_range(1, 100))
    recover_epochs: int = field(default=1, metadata=_range(0, 100))
    layer_ratios: tuple[str, ...] = ()
    ratios_from: str = ""
    speedup: float = field(default=0.0, metadata=_range(0.0, 100.0))
    speedup_step: float = field(default=0.1, metadata=_range(0.01, 0.5))
    speedup_moves: Literal["search", "depth", "width", "uniform"] = "search"
    prune_num_heads: bool = False
    recalibrate_batchnorm: bool = True
    drop_blocks: tuple[str, ...] = ()
    drop_block_count: int = field(default=0, metadata=_range(0, 10_000))
    analysis_seconds: float = field(default=120.0, metadata=_range(0.001, 86_400.0))


@dataclass(frozen=True)
class SparsityConfig:
    """Unstructured pruning (``prune.mode`` = unstructured or both): weights zeroed, for size or for GPUs.

    ``amount`` is the final fraction of zero conv/linear weights, ranked by magnitude across
    all layers (``scope = "global"``), within each (``"layer"``), or across all layers by
    layer-adaptive magnitude (``"lamp"``, Lee et al. 2021: a weight's square over the sum of the
    squares of the weights at least as large in its layer, so small layers are not emptied by one
    threshold that large layers set). ``schedule = "cubic"``
    reaches it gradually over ``schedule_steps`` steps (Zhu & Gupta) spread over the first
    ``schedule_end`` fraction of finetuning. ``pattern = "2:4"`` keeps 2 of every 4 weights
    along the input dimension of eligible layers instead (``amount``/``scope``/``schedule`` unused).
    """

    amount: float = field(default=0.5, metadata=_range(0.0, 0.99))
    scope: Literal["global", "layer", "lamp"] = "global"
    schedule: Literal["oneshot", "cubic"] = "oneshot"
    schedule_steps: int = field(default=8, metadata=_range(1, 10_000))
    schedule_end: float = field(default=0.6, metadata=_range(0.0, 1.0))
    pattern: Literal["unstructured", "2:4"] = "unstructured"


@dataclass(frozen=True)
class FinetuneConfig:
    """Accuracy recovery after pruning, optionally distilled from the unpruned model.

    ``processes`` > 1 trains with DistributedDataParallel on that many local processes (gloo
    backend, CPU; under ``torchrun`` the launcher's world is used): the same batches and
    schedule, results within about a point of one process (BatchNorm sees per-rank slices).
    """

    epochs: int = field(default=3, metadata=_range(0, 1000))
    lr: float = field(default=3e-3, metadata=_range(1e-7, 10.0))
    batch_size: int = field(default=128, metadata=_range(1, 65536))
    distill: bool = True
    distill_alpha: float = field(default=0.5, metadata=_range(0.0, 1.0))
    temperature: float = field(default=4.0, metadata=_range(0.1, 100.0))
    processes: int = field(default=1, metadata=_range(1, 256))  # > 1: DDP on that many local processes (gloo)


@dataclass(frozen=True)
class QuantizeConfig:
    """Post-training quantization of the exported artefacts.

    ``int8``: static, calibrated on ``data.calibration_samples`` training images (ONNX QDQ /
    full-integer TFLite); ``dynamic``: int8 weights, activations quantized at run time;
    ``fp16``: ONNX only. ``activation_type`` is for ONNX (``float``: weight-only int8, the
    weights stored int8 behind DequantizeLinear, activations and compute float: the
    smallest file and no activation rounding, for size targets); ``minify_names`` gives
    the ONNX int8 file short internal tensor names once it is verified (fewer bytes;
    the float fallback's layer names in the manifest are the unminified ones); ``float_constants
    = "float16"`` stores what weight-only int8 leaves float (biases, scales, norm parameters,
    embeddings) as float16 cast back to float32 at load, where each tensor survives that rounding
    (half the bytes, compute unchanged). ``tflite_io`` is the TFLite model's
    input/output type (``int8``: scale/zero-point in the manifest; ``float``: a Quantize and a
    Dequantize op at the ends). The accuracy budget: an int8/dynamic artefact may lose at most
    ``max_accuracy_drop`` top-1 points against its fp32 sibling on the test split, or more while
    McNemar's paired test (one-sided, level ``significance``; 0 = off) calls the loss noise;
    ``min_top1_agreement`` > 0 also gates the fraction of identical predictions. When missed, the
    search (``edgeprune.quantization.search``) tries percentile ranges, 16-bit activations and float
    layers (at most ``max_float_layers``) on the noisiest tensors for up to ``max_search_seconds``;
    ``refine_candidates`` re-ranks that many top tensors by their rounding's effect alone on the
    logits (slower). A budget still missed is written with its verdict and fails the build (exit 10).
    ``select``: which file of the first export format is the primary artefact: ``quantized`` the
    ``scheme``'s; ``fastest`` the fastest on ``benchmark.device`` among its fp32 and quantized files
    within the accuracy budget, timed side by side (``edgeprune.primary_selection``); a quantized file
    left out for a missed budget then fails no build.
    """

    scheme: Literal["none", "int8", "fp16", "dynamic"] = "int8"
    select: Literal["quantized", "fastest"] = "quantized"
    calibration: Literal["minmax", "entropy", "percentile"] = "minmax"
    per_channel: bool = True
    activation_type: Literal["int8", "uint8", "float"] = "int8"
    minify_names: bool = False
    float_constants: Literal["float32", "float16"] = "float32"
    tflite_io: Literal["int8", "float"] = "int8"
    max_accuracy_drop: float = field(default=0.5, metadata=_range(0.0, 100.0))
    min_top1_agreement: float = field(default=0.0, metadata=_range(0.0, 1.0))
    significance: float = field(default=0.05, metadata=_range(0.0, 0.5))
    max_float_layers: int = field(default=8, metadata=_range(0, 10_000))
    max_search_seconds: float = field(default=300.0, metadata=_range(0.0, 86_400.0))
    refine_candidates: int = field(default=0, metadata=_range(0, 1_000))


@dataclass(frozen=True)
class ExportConfig:
    """Which files to produce and how.

    ONNX: ``opset``, onnxsim ``simplify`` (the unsimplified graph is kept when onnxsim
    fails), ``dynamic_batch`` (a symbolic batch dimension instead of 1). TFLite:
    ``tflite_channels_last`` gives the file NHWC input, what Android camera pipelines
    feed; ``tflite_converter`` = ``auto`` uses litert-torch and falls back to
    ONNX → onnx2tf (``pip install "edgeprune[tensorflow]"``) for ops it cannot lower.
    ``pte``: an ExecuTorch program lowered to XNNPACK (``pip install "edgeprune[executorch]"``).
    """

    formats: tuple[Literal["onnx", "tflite", "pte"], ...] = ("onnx",)
    opset: int = field(default=17, metadata=_range(13, 23))
    simplify: bool = True
    dynamic_batch: bool = False
    tflite_channels_last: bool = False
    tflite_converter: Literal["auto", "litert-torch", "onnx2tf"] = "auto"


@dataclass(frozen=True)
class ParityConfig:
    """How closely an artefact must reproduce its PyTorch parent's logits on ``samples`` test images.

    fp32 and fp16: max abs logit error and top-1 agreement; int8: top-1 agreement only,
    against the parent and against the fp32 artefact it was quantized from.
    """

    samples: int = field(default=512, metadata=_range(1, 1_000_000))
    fp32_max_abs: float = field(default=1e-3, metadata=_range(0.0, 1e6))
    fp16_max_abs: float = field(default=5e-2, metadata=_range(0.0, 1e6))
    # a floor that catches a broken int8 file (a converter's damage leaves a fraction of the predictions); what rounding costs is
    # judged by quantize.max_accuracy_drop, so near-tied predictions of a briefly trained model must not fail the build here
    int8_min_top1_agreement: float = field(default=0.9, metadata=_range(0.0, 1.0))
    fp32_min_top1_agreement: float = field(default=0.999, metadata=_range(0.0, 1.0))
    fp16_min_top1_agreement: float = field(default=0.99, metadata=_range(0.0, 1.0))


@dataclass(frozen=True)
class BenchmarkConfig:
    """Where and how latency is measured."""

    enabled: bool = True
    device: str = "local"
    required: bool = True
    threads: int = field(default=2, metadata=_range(1, 256))
    warmup: int = field(default=10, metadata=_range(0, 100_000))
    iterations: int = field(default=50, metadata=_range(1, 1_000_000))
    repeats: int = field(default=3, metadata=_range(1, 100))
    use_xnnpack: bool = True
    max_spread_pct: float = field(default=10.0, metadata=_range(0.0, 1000.0))  # more repeats above it; 0: never
    spread_time_limit_s: float = field(default=60.0, metadata=_range(0.0, 3600.0))
    threads_beyond_cores: bool = False  # local: run `threads` even on a host with fewer cores


@dataclass(frozen=True)
class BudgetConfig:
    """Limits a release build must respect; 0 means "no limit"."""

    max_accuracy_drop: float = field(default=0.0, metadata=_range(0.0, 100.0))
    max_latency_p50_ms: float = field(default=0.0, metadata=_range(0.0, 1e9))
    max_latency_p90_ms: float = field(default=0.0, metadata=_range(0.0, 1e9))
    max_size_kb: float = field(default=0.0, metadata=_range(0.0, 1e12))
    min_speedup: float = field(default=0.0, metadata=_range(0.0, 1e6))


@dataclass(frozen=True)
class BuildConfig:
    """Everything one build of one target needs; each stage reads its own section."""

    name: str = "custom"
    description: str = ""
    seed: int = field(default=0, metadata=_range(0, 2**31))
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    prune: PruneConfig = PruneConfig()
    sparsity: SparsityConfig = SparsityConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    quantize: QuantizeConfig = QuantizeConfig()
    export: ExportConfig = ExportConfig()
    parity: ParityConfig = ParityConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    budgets: BudgetConfig = BudgetConfig()

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-safe dict (tuples become lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# --------------------------------------------------------------------------- loading


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file, turning syntax and I/O errors into ConfigError."""
    try:
        return tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read: {error}") from None
    except ValueError as error:  # TOMLDecodeError, or an integer past Python's 4300-digit limit
        raise ConfigError(f"{path}: invalid TOML: {error}") from None


def merge_layers(layers: list[tuple[str, dict[str, Any]]]) -> BuildConfig:
    """Build a validated BuildConfig from (origin, mapping) layers, later ones winning.

    Each layer is validated on its own, so an error names the file it came from.
    """
    merged: dict[str, Any] = {}
    for origin, mapping in layers:
        _check_keys(BuildConfig, mapping, origin, prefix="")
        for key, value in mapping.items():
            if isinstance(value, dict) and isinstance(merged.get(key), dict):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
    origins = " + ".join(origin for origin, _ in layers) or "defaults"
    return resolve_round_to(_build(BuildConfig, merged, origins, prefix=""))


def config_from_dict(resolved: dict[str, Any], origin: str) -> BuildConfig:
    """A configuration rebuilt from ``BuildConfig.to_dict()`` (in a child process, say): its derived fields
    (``prune.round_to_source``) are taken as they were resolved, which no user layer may set."""
    return resolve_round_to(_build(BuildConfig, resolved, origin, prefix=""))


def resolve_round_to(config: BuildConfig) -> BuildConfig:
    """``prune.round_to = "auto"`` replaced by this host's channel multiple, the reason in ``prune.round_to_source``.

    Only a target benchmarked here can read its vector width from this machine: for another
    device "auto" is a ConfigError asking for a number.
    """
    if config.prune.round_to != "auto":
        return config
    if config.benchmark.device != "local":
        raise ConfigError(
            f"prune.round_to = 'auto' reads this machine's vector width, but benchmark.device = {config.benchmark.device!r} "
            "is another device: set prune.round_to to that device's channel multiple (e.g. 8 or 16)"
        )
    multiple = host_channel_multiple()
    prune = dataclasses.replace(config.prune, round_to=multiple.value, round_to_source=f"auto: {multiple.reason}")
    return dataclasses.replace(config, prune=prune)


def parse_override(text: str) -> dict[str, Any]:
    """Turn ``section.key=value`` into ``{section: {key: value}}``; the value is TOML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except ValueError:  # TOMLDecodeError, or an integer past Python's 4300-digit limit
        value = raw.strip()  # a bare word such as tflite or ssh://pi@host
    parts = key.split(".")
    nested: dict[str, Any] = {parts[-1]: value}
    for part in reversed(parts[:-1]):
        nested = {part: nested}
    return nested


def _check_keys(cls: type, mapping: dict[str, Any], origin: str, prefix: str) -> None:
    derived = {spec.name for spec in dataclasses.fields(cls) if spec.metadata.get("derived")}
    hints = {name: hint for name, hint in typing.get_type_hints(cls).items() if name not in derived}
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if key not in hints:
            known = ", ".join(sorted(hints))
            raise ConfigError(f"{origin}: unknown key {where!r} (known: {known})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{where}' must be a table")
            _check_keys(hints[key], value, origin, prefix=f"{where}.")


def _build(cls: type, mapping: dict[str, Any], origin: str, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for spec in dataclasses.fields(cls):
        if spec.name not in mapping:
            continue
        where = f"{prefix}{spec.name}"
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            values[spec.name] = _build(hint, mapping[spec.name], origin, prefix=f"{where}.")
        else:
            value = _coerce(hint, mapping[spec.name], origin, where)
            _check_range(spec, value, origin, where)
            values[spec.name] = value
    return cls(**values)


def _coerce(hint: Any, value: Any, origin: str, where: str) -> Any:
    origin_type = typing.get_origin(hint)
    if origin_type is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{origin}: '{where}' must be one of {list(choices)}, got {value!r}")
        return value
    if origin_type is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{origin}: '{where}' must be a list, got {value!r}")
        item_hint = typing.get_args(hint)[0]
        return tuple(_coerce(item_hint, item, origin, f"{where}[{i}]") for i, item in enumerate(value))
    if origin_type in (typing.Union, types.UnionType):
        return _coerce_either(typing.get_args(hint), value, origin, where)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{origin}: '{where}' must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{origin}: '{where}' must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{origin}: '{where}' must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            raise ConfigError(f"{origin}: '{where}' is too large for a number") from None
        if number != number:
            raise ConfigError(f"{origin}: '{where}' must be a number, got nan")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{origin}: '{where}' must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config type {hint!r} at {where}")


def _coerce_either(options: tuple[Any, ...], value: Any, origin: str, where: str) -> Any:
    """``value`` as the first of ``options`` (``int``, ``Literal[...]``) it fits, else one error naming them all."""
    for option in options:
        try:
            return _coerce(option, value, origin, where)
        except ConfigError:
            continue
    expected = " or ".join(_describe_type(option) for option in options)
    raise ConfigError(f"{origin}: '{where}' must be {expected}, got {value!r}")


def _describe_type(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(repr(choice) for choice in typing.get_args(hint))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(hint, str(hint))


def _check_range(spec: dataclasses.Field, value: Any, origin: str, where: str) -> None:
    bounds = spec.metadata.get("range")
    if bounds is None or isinstance(value, str):  # a range bounds the numbers of an `int | Literal[...]` field
        return
    low, high = bounds
    if not low <= value <= high:
        raise ConfigError(f"{origin}: '{where}' = {value!r} is out of range [{low}, {high}]")
