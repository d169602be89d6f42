"""``edgeprune verify``: every figure manifest.json states about the files in an output folder, derived again.

For each artefact the manifest lists, the file's figures are read back from its bytes
(``artifact_facts``: sha256, raw/gzip/zip sizes, compression ratio, I/O names, shapes,
dtypes and quantization parameters, stored tensor mix, weight sparsity global and per
layer; parameters, MACs, channel widths and removed blocks of model.pt) and compared
with the manifest: exactly for hashes, counts, names and shapes, within
``FLOAT_RELATIVE`` for ratios. The ``model`` section and the channel table are checked
against model.pt, ``content_sha256`` against the manifest itself, and every model file in
the folder must be listed. With ``parity`` the parity checks are run again on the test
split the manifest names (``parity_data``, ``edgeprune.verify_parity``): top-1, top-1 agreement and
max abs error within its tolerances, and the profile's parity tolerances.

The build runs ``verify_output`` on its staged output folder before swapping it in.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeprune.artifact_facts import file_facts, format_facts
from edgeprune.artifacts import MANIFEST
from edgeprune.errors import EdgepruneError, InputError, StageError
from edgeprune.manifest import content_sha256, model_facts
from edgeprune.verify_parity import check_parity_again

FLOAT_RELATIVE = 1e-6  # figures read from files: the same bytes give the same numbers up to JSON's float printing
MODEL_SUFFIXES = (".onnx", ".tflite", ".pt", ".pte")
FIRST_VERIFIABLE = 3  # the manifest version whose file figures are read from the files
_MISSING = object()


@dataclass(frozen=True)
class Mismatch:
    """One figure the files contradict: where it is in the manifest, what the manifest says, what the file gives."""

    figure: str
    stated: Any
    derived: Any
    source: str

    def line(self) -> str:
        return f"{self.figure}: manifest says {_show(self.stated)}, {self.source} gives {_show(self.derived)}"

    def to_dict(self) -> dict[str, Any]:
        return {"figure": self.figure, "manifest": _jsonable(self.stated), "derived": _jsonable(self.derived), "source": self.source}


@dataclass
class Verification:
    """The outcome: every figure checked (by manifest path) and the mismatches."""

    folder: Path
    checked: list[str] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)
    parity: bool = False

    @property
    def passed(self) -> bool:
        return not self.mismatches

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "passed": self.passed,
            "parity": self.parity,
            "figures_checked": len(self.checked),
            "checked": self.checked,
            "mismatches": [mismatch.to_dict() for mismatch in self.mismatches],
        }

    def compare(self, figure: str, stated: Any, derived: Any, source: str, relative: float = FLOAT_RELATIVE, absolute: float = 0.0) -> None:
        """Record ``figure`` as checked (each leaf of a table or list) and any leaf where ``stated`` != ``derived``
        (numbers: beyond ``absolute`` + ``relative`` of the larger)."""
        if isinstance(derived, dict) and isinstance(stated, dict):
            for key in [*derived, *(key for key in stated if key not in derived)]:
                self.compare(f"{figure}.{key}", stated.get(key, _MISSING), derived.get(key, _MISSING), source, relative, absolute)
            return
        if isinstance(derived, list) and isinstance(stated, list) and len(derived) == len(stated):
            for index, (one, other) in enumerate(zip(stated, derived, strict=True)):
                self.compare(f"{figure}[{index}]", one, other, source, relative, absolute)
            return
        self.checked.append(figure)
        if not same_figure(stated, derived, relative, absolute):
            self.mismatches.append(Mismatch(figure, stated, derived, source))


def same_figure(stated: Any, derived: Any, relative: float = FLOAT_RELATIVE, absolute: float = 0.0) -> bool:
    """Equal, or both numbers (not booleans) within ``absolute`` + ``relative`` of the larger."""
    numbers = (int, float)
    if isinstance(stated, numbers) and isinstance(derived, numbers) and not isinstance(stated, bool) and not isinstance(derived, bool):
        if isinstance(stated, int) and isinstance(derived, int):
            return stated == derived
        return math.isclose(stated, derived, rel_tol=relative, abs_tol=absolute) or stated == derived
    return stated == derived


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an output folder. Raises InputError when there is none or it is not a manifest."""
    path = Path(folder) / MANIFEST
    if not Path(folder).is_dir():
        raise InputError(f"{folder}: not a folder (give the output folder of a build, e.g. dist/android)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no manifest.json here (give the output folder of a build)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("artifacts"), dict):
        raise InputError(f"{path}: not an edgeprune manifest (no artifacts table)")
    version = manifest.get("manifest_version")
    if not isinstance(version, int) or version < FIRST_VERIFIABLE:
        raise InputError(f"{path}: manifest version {version} predates figures read from the files ({FIRST_VERIFIABLE}); rebuild")
    return manifest


def verify_output(folder: Path, *, parity: bool = False, data: Path | None = None) -> Verification:
    """Derive every figure ``folder/manifest.json`` states about the folder's files and compare.

    ``parity`` also re-runs the parity checks on the manifest's test split (``data``: that
    data file moved elsewhere). Raises InputError when the folder holds no manifest.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    result = Verification(folder, parity=parity)
    check_content_hash(manifest, result)
    facts = {}
    for name, entry in manifest["artifacts"].items():
        facts[name] = check_artifact(folder, f"artifacts.{name}", entry, result)
    if facts.get("model") is not None:
        check_model_section(manifest.get("model", {}), facts["model"], manifest["artifacts"]["model"]["file"], result)
    check_unlisted(folder, manifest, result)
    if parity:
        check_parity_again(folder, manifest, result, data)
    return result


def check_output(folder: Path) -> None:
    """The build's last step before it publishes ``folder``: raise StageError (exit 3) when a file contradicts the manifest."""
    result = verify_output(folder)
    if not result.passed:
        more = f" (and {len(result.mismatches) - 1} more)" if len(result.mismatches) > 1 else ""
        raise StageError(
            f"the output folder contradicts its manifest, so nothing was published (the previous output is intact): "
            f"{result.mismatches[0].line()}{more}"
        )


def check_content_hash(manifest: dict[str, Any], result: Verification) -> None:
    if "content_sha256" in manifest:
        result.compare("content_sha256", manifest["content_sha256"], content_sha256(manifest), MANIFEST)


def check_artifact(folder: Path, figure: str, entry: dict[str, Any], result: Verification) -> dict[str, Any] | None:
    """Compare one artefact entry with its file's figures; returns them (None when the file is missing or unreadable)."""
    filename = entry.get("file", "")
    path = folder / filename
    if not filename or Path(filename).name != filename or not path.is_file():
        result.compare(f"{figure}.file", filename, "no such file in the folder", str(folder))
        return None
    derived, unreadable = file_facts(path), None
    try:
        derived.update(format_facts(path, entry.get("kind", "")))
    except EdgepruneError as error:
        unreadable = str(error)
    result.compare(figure, {key: entry.get(key, _MISSING) for key in derived}, derived, filename)
    if unreadable is not None:
        result.compare(f"{figure}.readable", True, unreadable, filename)
        return None
    return derived


def check_model_section(model: dict[str, Any], derived: dict[str, Any], filename: str, result: Verification) -> None:
    """``manifest["model"]`` (params, MACs, widths, removed blocks, sparsity) and the channel table against model.pt."""
    expected = model_facts(derived)
    result.compare("model", {key: model.get(key, _MISSING) for key in expected}, expected, filename)
    for index, row in enumerate(model.get("channels", [])):
        result.compare(
            f"model.channels[{index}].channels_after", row.get("channels_after"), derived["widths"].get(row.get("layer"), 0), filename
        )


def check_unlisted(folder: Path, manifest: dict[str, Any], result: Verification) -> None:
    """A model file in the folder that the manifest does not describe is a mismatch too."""
    listed = {entry.get("file") for entry in manifest["artifacts"].values()}
    for path in sorted(folder.iterdir()):
        if path.suffix in MODEL_SUFFIXES and path.is_file() and path.name not in listed:
            result.compare(f"artifacts[{path.name}]", "not listed", "a model file", path.name)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    text = json.dumps(_jsonable(value), sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _jsonable(value: Any) -> Any:
    return None if value is _MISSING else value
