"""Target profiles: the data files in ``targets/*.toml``, shipped with the package.

A profile is a partial BuildConfig (any section may appear); ``resolve_config``
layers it with the project file and ``--set`` overrides into one validated
BuildConfig.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from edgeprune.config import BuildConfig, merge_layers, parse_override, read_toml
from edgeprune.errors import ConfigError

PROJECT_FILE = "edgeprune.toml"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class TargetInfo:
    name: str
    description: str
    path: Path


def targets_dir() -> Path:
    """The folder holding the bundled profiles (source checkout or installed wheel)."""
    checkout = Path(__file__).resolve().parent.parent / "targets"
    if checkout.is_dir():
        return checkout
    return Path(str(resources.files("edgeprune._targets")))


def list_targets() -> list[TargetInfo]:
    """Every bundled profile, sorted by name."""
    infos = []
    for path in sorted(targets_dir().glob("*.toml"), key=lambda path: path.stem):
        data = read_toml(path)
        infos.append(TargetInfo(path.stem, str(data.get("description", "")), path))
    return infos


def target_path(target: str) -> Path:
    """A bundled profile by name, or a path to a user's own profile file."""
    candidate = Path(target)
    if candidate.suffix == ".toml" and candidate.is_file():
        return candidate
    path = targets_dir() / f"{target}.toml"
    if not path.is_file():
        known = ", ".join(info.name for info in list_targets())
        raise ConfigError(f"unknown target '{target}' (known: {known}; or pass a path to a .toml profile)")
    return path


def load_profile(target: str) -> tuple[str, dict[str, Any]]:
    """The (origin, mapping) layer of a profile, its name checked against the file."""
    path = target_path(target)
    data = read_toml(path)
    name = data.setdefault("name", path.stem)
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):  # it names dist/<name>: no "..", "/" or markup
        raise ConfigError(f"{path}: 'name' must be letters, digits, '.', '_' or '-' (it names the output folder), got {name!r}")
    return str(path), data


def resolve_config(
    target: str,
    project_file: Path | None = None,
    overrides: tuple[str, ...] = (),
    extra: dict[str, Any] | None = None,
) -> BuildConfig:
    """Defaults < profile < project file < ``extra`` (CLI options) < ``--set`` overrides.

    ``project_file=None`` picks up ``./edgeprune.toml`` when it exists.
    """
    layers = [load_profile(target)]
    project = project_file if project_file is not None else Path(PROJECT_FILE)
    if project_file is not None or project.is_file():
        project_data = read_toml(project)
        project_data.pop("name", None)  # the target names the build, not the project
        layers.append((str(project), project_data))
    if extra:
        layers.append(("command line", extra))
    for text in overrides:
        layers.append((f"--set {text}", parse_override(text)))
    return merge_layers(layers)


def describe(config: BuildConfig) -> dict[str, Any]:
    """The resolved profile as plain data, for ``edgeprune targets show``."""
    return config.to_dict()
