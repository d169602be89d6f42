"""``edgeprune`` command line: parse arguments → call api → print. No logic lives here.

Exit codes: 0 success; 2 bad input or configuration; 3 a stage failed
(export, parity); 4 a benchmark device failed; 10-14 budget violations
(10 accuracy, 11 latency, 12 size, 13 speed-up, 14 several kinds; see
edgeprune.budgets); 130 interrupted. A matrix build exits with its worst
outcome: a failed target's code, else the code of all its violations together.
``edgeprune diff`` exits 10/11/12/14 when it flags an accuracy/latency/size
regression (several kinds: 14). ``edgeprune verify`` exits 3 when the files of an
output folder contradict its manifest.

A command is an ``_add_NAME(commands)`` function (its arguments) and a
handler ``_NAME(args) -> exit code``; add both and list the first in COMMANDS.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgeprune import api, interrupts
from edgeprune.budgets import BUDGET_FLAGS, budget_overrides, exit_code
from edgeprune.diff import Thresholds, markdown
from edgeprune.errors import EdgepruneError
from edgeprune.progress import Reporter
from edgeprune.report import summary_table
from edgeprune.runtimes.figures import bench_line, caveats, device_text, memory_text
from edgeprune.versions import __version__


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        with interrupts.interruptible():  # SIGTERM/SIGHUP clean up like Ctrl-C
            return args.handler(args)
    except EdgepruneError as error:
        if args.debug:
            traceback.print_exc()
        print(f"edgeprune: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt as error:
        print("edgeprune: interrupted; finished stages are cached, rerun to resume", file=sys.stderr)
        return interrupts.exit_code(error)  # 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeprune", description="Prune, quantize, export and benchmark PyTorch models for devices.")
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    parser.set_defaults(debug=False)
    commands = parser.add_subparsers(title="commands")
    for add_command in COMMANDS:
        add_command(commands)
    return parser


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.add_argument("--quiet", "-q", action="store_true", help="print only warnings and errors")
    parser.add_argument("--verbose", "-v", action="store_true", help="print progress details")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")


def _inputs(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="package.module:factory returning the torch.nn.Module (default: the bundled example)")
    parser.add_argument("--weights", help="checkpoint (state_dict) to load, with torch.load(weights_only=True)")
    parser.add_argument(
        "--trust-checkpoint", action="store_true", help="allow a checkpoint holding pickled objects (runs code from the file)"
    )
    parser.add_argument("--data", help="dataset: a .npz (x_train, y_train, x_test, y_test) or module:function returning loaders")
    parser.add_argument("--project", type=Path, help="project file (default: ./edgeprune.toml when present)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a setting, e.g. prune.amount=0.5 (repeatable)",
    )
    parser.add_argument("--cache-dir", type=Path, help="stage cache folder (default: $EDGEPRUNE_CACHE_DIR or .edgeprune-cache)")
    parser.add_argument("--force", action="store_true", help="rerun every stage, ignoring the cache")


def _add_build(commands) -> None:
    parser = commands.add_parser(
        "build",
        help="run the whole pipeline for one or more target profiles",
        description="Run prune → finetune → export → quantize → benchmark for each target and write its artefacts, manifest.json, "
        "report.md and report.html. Several --target options build a matrix, sharing the stages they have in common.",
    )
    parser.add_argument(
        "--target",
        "-t",
        action="append",
        required=True,
        help="a bundled profile name (see 'edgeprune targets') or a path to a .toml profile (repeatable: a matrix build)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: dist/<target>); with several targets, the parent of one folder per target"
    )
    parser.add_argument(
        "--executor",
        choices=["local", "ray"],
        default="local",
        help="where a matrix's targets run: this process, or Ray tasks (pip install 'edgeprune[ray]')",
    )
    parser.add_argument("--ray-address", help="an existing Ray cluster (auto, ray://head:10001); default: start Ray on this machine")
    budgets = parser.add_argument_group("budgets (shorthand for --set budgets.KEY=VALUE; 0 = no limit)")
    for flag, key, help_text in BUDGET_FLAGS:
        budgets.add_argument(flag, dest=f"budget_{key}", type=float, metavar="N", help=help_text)
    _inputs(parser)
    _common(parser)
    parser.set_defaults(handler=_build)


def _add_export(commands) -> None:
    parser = commands.add_parser(
        "export",
        help="convert a checkpoint to ONNX/TFLite with parity checks, no pruning",
        description="Export a model to ONNX and/or TFLite and check parity against PyTorch; no pruning, no benchmark.",
    )
    parser.add_argument("--format", action="append", choices=["onnx", "tflite", "pte"], help="output format (repeatable; default onnx)")
    parser.add_argument("--precision", choices=["fp32", "int8", "fp16"], default="fp32", help="also write a quantized artefact")
    parser.add_argument("--target", "-t", default="cpu-x86", help="profile supplying defaults (default cpu-x86)")
    parser.add_argument("--out", type=Path, default=Path("dist/export"), help="output folder (default dist/export)")
    _inputs(parser)
    _common(parser)
    parser.set_defaults(handler=_export)


def _add_analyze(commands) -> None:
    parser = commands.add_parser(
        "analyze",
        help="sensitivity analysis: prune each layer group alone, measure accuracy and latency",
        description="Prune each prunable layer group of the target's model alone at a few ratios (no finetuning) and measure "
        "top-1 on the test split and p50 latency on the target's runtime adapter. Writes sensitivity.json (use it in a build with "
        "--set prune.ratios_from=PATH), sensitivity.md and sensitivity.png.",
    )
    parser.add_argument("--target", "-t", required=True, help="profile whose model, export format and benchmark device to use")
    parser.add_argument("--out", type=Path, help="output folder (default dist/<target>-analysis)")
    parser.add_argument("--ratios", type=_ratios, help="comma-separated pruning ratios per group, each in (0, 0.9] (default 0.25,0.5,0.75)")
    parser.add_argument("--executor", choices=["local", "ray"], default="local", help="run the groups here or as Ray tasks")
    parser.add_argument("--ray-address", help="an existing Ray cluster (auto, ray://head:10001); default: start Ray on this machine")
    _inputs(parser)
    _common(parser)
    parser.set_defaults(handler=_analyze)


def _add_inspect(commands) -> None:
    parser = commands.add_parser(
        "inspect",
        help="look at a model before a build: layers, MACs, prunable groups, removable blocks, what converts",
        description="Load the model (and checkpoint) as a build would and print its layers, MACs/params, the layer groups structured "
        "pruning can narrow with the widths the target's round_to allows, the groups kept whole and why, the residual blocks depth "
        "pruning can remove, the checkpoint's format and what was adapted to load it, and whether it exports to ONNX, int8 and TFLite "
        "(checked by converting, in a child process bounded by --timeout).",
    )
    parser.add_argument("--target", "-t", default="cpu-x86", help="profile whose round_to and quantization to use (default cpu-x86)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds the conversion checks may take (default 300)")
    _inputs(parser)
    _common(parser)
    parser.set_defaults(handler=_inspect)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.25,0.5, got {text!r}") from None


def _add_targets(commands) -> None:
    parser = commands.add_parser(
        "targets",
        help="list target profiles, or show one resolved",
        description="List the bundled target profiles; 'targets show NAME' prints one fully resolved.",
    )
    parser.add_argument("action", nargs="?", choices=["list", "show"], default="list")
    parser.add_argument("name", nargs="?", help="profile to show")
    parser.add_argument("--project", type=Path, help="project file layered over the profile")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    _common(parser)
    parser.set_defaults(handler=_targets)


def _add_diff(commands) -> None:
    defaults = Thresholds()
    parser = commands.add_parser(
        "diff",
        help="compare two builds' manifests and flag regressions",
        description="Show how accuracy, size, gzip size, latency, speed-up, MACs and params changed between two builds, as Markdown "
        "(for a pull-request comment) or --json. Exits 10 (accuracy), 11 (latency), 12 (size) or 14 (several) when a regression passes its "
        "threshold; a threshold of 0 flags any worsening, inf disables it.",
    )
    parser.add_argument("old", type=Path, help="the previous build: its manifest.json or output folder")
    parser.add_argument("new", type=Path, help="the new build: its manifest.json or output folder")
    parser.add_argument(
        "--max-accuracy-drop",
        type=float,
        default=defaults.max_accuracy_drop,
        metavar="POINTS",
        help=f"flag an artefact whose top-1 falls by more (default {defaults.max_accuracy_drop:g})",
    )
    parser.add_argument(
        "--max-latency-increase-pct",
        type=float,
        default=defaults.max_latency_increase_pct,
        metavar="PCT",
        help=f"flag an artefact whose p50 or p90 grows by more (default {defaults.max_latency_increase_pct:g})",
    )
    parser.add_argument(
        "--max-size-increase-pct",
        type=float,
        default=defaults.max_size_increase_pct,
        metavar="PCT",
        help=f"flag an artefact whose file grows by more (default {defaults.max_size_increase_pct:g})",
    )
    _common(parser)
    parser.set_defaults(handler=_diff)


def _add_bench(commands) -> None:
    parser = commands.add_parser(
        "bench",
        help="benchmark one artefact on a device",
        description="Measure latency and memory of an .onnx, .tflite or .pte file, each repeat in its own process.",
    )
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--device", default="local", help="local, gpu, ssh://user@host[:port], adb://SERIAL")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--shape", action="append", default=[], metavar="INPUT=1,3,224,224", help="an input's shape, for dynamic dimensions (repeatable)"
    )
    parser.add_argument("--max-spread", type=float, default=10.0, metavar="PCT", help="take more repeats while p50s spread more (0: never)")
    _common(parser)
    parser.set_defaults(handler=_bench)


def _add_verify(commands) -> None:
    parser = commands.add_parser(
        "verify",
        help="prove that a build's manifest describes the files beside it",
        description="Derive every figure manifest.json states about the files in an output folder again from the files (sha256, "
        "raw/gzip/zip sizes, compression ratio, I/O names, shapes, dtypes and quantization parameters, int8/float tensor mix, weight "
        "sparsity global and per layer, parameters, MACs, channel widths, removed blocks) and compare. Exits 3 naming each mismatch.",
    )
    parser.add_argument("folder", type=Path, help="the output folder of a build (holds manifest.json)")
    parser.add_argument("--parity", action="store_true", help="also run the parity checks again on the test split the manifest names")
    parser.add_argument("--data", type=Path, default=None, help="with --parity: where that data file is now, if it moved")
    _common(parser)
    parser.set_defaults(handler=_verify)


# --------------------------------------------------------------------------- handlers


def _reporter(args) -> Reporter:
    return Reporter(verbosity=0 if args.quiet else (2 if args.verbose else 1), json_mode=args.json)


def _build_inputs(args, overrides: tuple[str, ...]) -> api.BuildInputs:
    """What build, export and analyze resolve a configuration from alike: the model, its data, the settings."""
    return api.BuildInputs(
        project_file=args.project,
        overrides=overrides,
        model=args.model,
        weights=args.weights,
        data=args.data,
        trust_checkpoint=args.trust_checkpoint,
    )


def _input_options(args, overrides: tuple[str, ...]) -> dict[str, Any]:
    """The inputs, and where to write and report."""
    return dict(_build_inputs(args, overrides), out=args.out, cache_dir=args.cache_dir, reporter=_reporter(args))


def _build(args) -> int:
    flags = {name.removeprefix("budget_"): value for name, value in vars(args).items() if name.startswith("budget_")}
    options = dict(_input_options(args, budget_overrides(flags) + tuple(args.overrides)), force=args.force)
    if len(args.target) > 1:
        return _build_matrix(args, api.build_matrix(args.target, **options, executor=args.executor, ray_address=args.ray_address))
    result = api.build(args.target[0], **options)
    _print(args, _build_dict(result), lambda: _build_summary(result))
    _print_violations(result)
    return exit_code(result.violations)


def _inspect(args) -> int:
    # Imported on use: the inspection imports torch, and the CLI's start-up must not.
    from edgeprune.inspection import format_inspection

    config = api.resolve(args.target, **_build_inputs(args, tuple(args.overrides)))
    summary = api.inspect(config, reporter=_reporter(args), timeout_s=args.timeout)
    _print(args, summary, lambda: format_inspection(summary))
    return 0


def _build_matrix(args, matrix: api.MatrixResult) -> int:
    failures = {target: str(error) for target, error in matrix.failures.items()}
    data = {
        "builds": [_build_dict(result) for result in matrix.builds],
        "exit_code": matrix.exit_code,
        "failures": {target: {"error": str(error), "exit_code": error.exit_code} for target, error in matrix.failures.items()},
    }
    _print(args, data, lambda: summary_table([result.manifest for result in matrix.builds], failures))
    for result in matrix.builds:
        _print_violations(result)
    for target, error in matrix.failures.items():
        print(f"edgeprune: error: {target}: {error}", file=sys.stderr)
    return matrix.exit_code


def _build_dict(result) -> dict[str, Any]:
    return {
        "target": result.target,
        "out": str(result.out),
        "manifest": str(result.out / "manifest.json"),
        "report": str(result.out / "report.html"),
        "violations": [v.to_dict() for v in result.violations],
    }


def _print_violations(result) -> None:
    for line in (result.manifest or {}).get("budgets", {}).get("unchecked", []):
        print(f"edgeprune: {result.target}: {line}", file=sys.stderr)
    for violation in result.violations:
        print(f"edgeprune: {result.target}: budget violated ({violation.kind}): {violation.message}", file=sys.stderr)


def _build_summary(result) -> str:
    manifest = result.manifest
    accuracy, primary = manifest["accuracy"], manifest["primary_artifact"]
    entry = manifest["artifacts"].get(primary, {})
    p50, top1 = entry.get("benchmark", {}).get("latency_p50_ms"), accuracy.get("primary")
    parts = [
        f"{result.target}: {result.out / entry.get('file', '?')}",
        f"top-1 {'-' if top1 is None else f'{top1:.2f} %'} (baseline {accuracy.get('baseline', 0):.2f} %)",
        f"{entry.get('size_bytes', 0) / 1024:.1f} KiB",
    ]
    if p50:
        parts += [f"p50 {p50:.3f} ms", memory_text(entry["benchmark"]), *caveats(entry["benchmark"])]
    selection = manifest.get("primary_selection") or {}
    if selection.get("runner_up") and selection.get("margin"):
        parts.append(f"fastest within the budget: {selection['margin']:.2f}x over {selection['runner_up']}")
    return " | ".join(parts)


def _export(args) -> int:
    formats = args.format or ["onnx"]
    overrides = (
        "prune.mode='none'",
        "benchmark.enabled=false",
        f"export.formats={json.dumps(formats)}",
        f"quantize.scheme='{'none' if args.precision == 'fp32' else args.precision}'",
        "quantize.select='quantized'",  # nothing is benchmarked: the precision asked for is the primary file
        *args.overrides,
    )
    result = api.build(args.target, **_input_options(args, overrides), force=args.force)
    artifacts = {
        name: {key: entry.get(key) for key in ("file", "sha256", "accuracy", "parity")}
        for name, entry in result.manifest["artifacts"].items()
    }
    _print(
        args,
        {"out": str(result.out), "artifacts": artifacts},
        lambda: "\n".join(
            f"{entry['file']}: top-1 {entry.get('accuracy') or 0:.2f} %, parity {entry.get('parity')}" for entry in artifacts.values()
        ),
    )
    return 0


def _targets(args) -> int:
    if args.action == "show":
        if not args.name:
            raise EdgepruneError("usage: edgeprune targets show NAME")
        resolved = api.resolve(args.name, project_file=args.project, overrides=tuple(args.overrides)).to_dict()
        _print(args, resolved, lambda: _toml_like(resolved))
        return 0
    infos = api.targets()
    _print(
        args,
        [{"name": i.name, "description": i.description, "path": str(i.path)} for i in infos],
        lambda: "\n".join(f"{i.name:<12} {i.description}" for i in infos),
    )
    return 0


def _diff(args) -> int:
    thresholds = Thresholds(args.max_accuracy_drop, args.max_latency_increase_pct, args.max_size_increase_pct)
    result = api.diff(args.old, args.new, thresholds)
    _print(args, result.to_dict(), lambda: markdown(result).rstrip("\n"))
    for change in result.regressions:
        print(f"edgeprune: regression ({change.regression}): {change.why}", file=sys.stderr)
    return result.exit_code


def _verify(args) -> int:
    result = api.verify(args.folder, parity=args.parity, data=args.data)
    files = sum(1 for figure in result.checked if figure.endswith(".sha256"))
    verdict = "all match" if result.passed else f"{len(result.mismatches)} mismatch(es)"
    _print(args, result.to_dict(), lambda: f"{args.folder}: {len(result.checked)} figures of {files} files checked: {verdict}")
    for mismatch in result.mismatches:
        print(f"edgeprune: mismatch: {mismatch.line()}", file=sys.stderr)
    return 0 if result.passed else VERIFY_FAILED


def _analyze(args) -> int:
    options = _input_options(args, tuple(args.overrides))
    result = api.analyze(args.target, **options, ratios=args.ratios, executor=args.executor, ray_address=args.ray_address, force=args.force)
    data = {"json": str(result.json_path), "table": str(result.table_path), "plot": str(result.plot_path), **result.data}
    _print(args, data, lambda: result.table_path.read_text(encoding="utf-8").rstrip() + f"\n\nwritten: {result.json_path.parent}")
    return 0


def _bench(args) -> int:
    result = api.bench(
        args.artifact, args.device, args.threads, args.iterations, args.repeats, args.warmup, tuple(args.shape), args.max_spread
    )
    _print(args, result, lambda: f"{args.artifact} on {args.device} ({device_text(result)}): {bench_line(result)}")
    return 0


def _print(args, data: Any, human: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif not args.quiet:
        print(human())


def _toml_like(resolved: dict[str, Any]) -> str:
    lines = [f"{key} = {json.dumps(value)}" for key, value in resolved.items() if not isinstance(value, dict)]
    for section, values in resolved.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines)


VERIFY_FAILED = 3  # the exit code of a build whose output check fails
COMMANDS = (_add_build, _add_analyze, _add_inspect, _add_export, _add_targets, _add_bench, _add_diff, _add_verify)

if __name__ == "__main__":
    sys.exit(main())
