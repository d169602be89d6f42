"""``edgeprune verify --parity``: the parity checks of a build run again on the files of its output folder.

The manifest's ``parity_data`` names the test split (the bundled example or the user's
data file, its preprocessing and fingerprint). Each exported artefact's logits are
compared again with model.pt's (``parity``) and with its fp32 sibling's
(``versus_fp32``); top-1, top-1 agreement and max abs error must match what the
manifest states within the tolerances below, and the profile's
parity tolerances must still hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgeprune.config import merge_layers
from edgeprune.data import load_dataset
from edgeprune.errors import EdgepruneError, InputError
from edgeprune.parity import artifact_logits, check_parity, parity_report

ACCURACY_POINTS = 0.5  # --parity: top-1 (percent) re-measured on another CPU may differ by a few images
AGREEMENT = 0.01  # --parity: top-1 agreement (fraction)
MAX_ABS_ERROR = (1e-3, 0.1)  # --parity: |re-measured - stated| <= 1e-3 + 10 % of the stated max abs error


class Verification(Protocol):
    """Where the re-measured figures go (``edgeprune.verify.Verification``)."""

    def compare(self, figure: str, stated: Any, derived: Any, source: str, relative: float = ..., absolute: float = ...) -> None: ...


def check_parity_again(folder: Path, manifest: dict[str, Any], result: Verification, data: Path | None = None) -> None:
    """Re-measure every artefact the manifest states parity for; mismatches go into ``result``."""
    # Imported on use: a build runs ``edgeprune.verify`` without parity, and importing edgeprune must not import torch.
    from edgeprune.modelio import load_model
    from edgeprune.training import predict_logits

    where = manifest.get("parity_data")
    if not where:
        raise InputError(f"{folder / 'manifest.json'}: no parity_data (a manifest from an older edgeprune); rebuild to verify parity")
    source = data_source(where, data)
    config = merge_layers([("manifest.json", {"data": {**where["config"], "source": source}, "parity": manifest["config"]["parity"]})])
    dataset = load_dataset(config.data, where["num_classes"])
    result.compare("parity_data.fingerprint", where["fingerprint"], dataset.fingerprint, source)
    if dataset.fingerprint != where["fingerprint"]:
        return  # other data: every figure would differ for that reason alone
    artifacts = manifest["artifacts"]
    logits = {"model": predict_logits(load_model(folder / artifacts["model"]["file"]), dataset.x_test)}
    for name, entry in artifacts.items():
        if entry.get("kind") in ("onnx", "tflite") and "parity" in entry:
            logits[name] = _logits(folder / entry["file"], entry, dataset.x_test)
            check_artifact_parity(name, entry, logits, dataset.y_test, config.parity, result)


def data_source(where: dict[str, Any], data: Path | None) -> str:
    """``data`` when given, else the recorded absolute path if it still exists, else the source as the build was given it."""
    if data is not None:
        return str(data)
    recorded = where.get("path")
    return recorded if recorded and Path(recorded).is_file() else where["source"]


def _logits(path: Path, entry: dict[str, Any], images: np.ndarray) -> np.ndarray:
    return artifact_logits(path, images, layout=entry.get("input_layout"))


def check_artifact_parity(name, entry, logits: dict[str, np.ndarray], labels: np.ndarray, parity_config, result: Verification) -> None:
    """Top-1 and the parity reports of one artefact, measured again, against the manifest and the profile's tolerances."""
    count = min(parity_config.samples, len(labels))
    figure, mine = f"artifacts.{name}", logits[name]
    accuracy = float((mine.argmax(1) == labels).mean() * 100.0)
    result.compare(f"{figure}.accuracy", entry["accuracy"], accuracy, entry["file"], relative=0.0, absolute=ACCURACY_POINTS)
    tolerance = {"fp32": "fp32", "fp16": "fp16"}.get(entry.get("precision", "fp32"), "int8")
    references = [("parity", "model"), ("versus_fp32", entry.get("parent"))]
    for key, reference in references:
        if key not in entry or reference not in logits:
            continue
        report = parity_report(logits[reference][:count], mine[:count], labels[:count])
        _compare_report(f"{figure}.{key}", entry[key], report, entry["file"], result)
        try:
            check_parity(name, tolerance, report, parity_config, against="" if reference == "model" else reference)
        except EdgepruneError as error:
            result.compare(f"{figure}.{key}.passes", True, str(error), entry["file"])


def _compare_report(figure: str, stated: dict[str, Any], report: dict[str, Any], source: str, result: Verification) -> None:
    """Top-1 agreement within ``AGREEMENT``, max abs error within ``MAX_ABS_ERROR``, sample count exactly."""
    result.compare(f"{figure}.samples", stated.get("samples"), report["samples"], source)
    result.compare(f"{figure}.top1_agreement", stated.get("top1_agreement"), report["top1_agreement"], source, absolute=AGREEMENT)
    allowed = MAX_ABS_ERROR[0] + MAX_ABS_ERROR[1] * abs(stated.get("max_abs_error") or 0.0)
    result.compare(f"{figure}.max_abs_error", stated.get("max_abs_error"), report["max_abs_error"], source, absolute=allowed)
