"""The stage contract: what a stage is given (``StageContext``), what it returns (``StageOutput``),
what it declares (``Stage``), and what the runner records (``StageRecord``, ``PipelineResult``).

A stage is file-in, file-out: it reads named artefacts produced by earlier stages
(``consumes``), writes new ones into a fresh folder, and returns them with its metrics.
Its cache key (``edgeprune.pipeline``) is (name, version, its config sections, the hashes
of what it consumes, the data fingerprint, the seed, tool versions, its ``fingerprint``,
torch's thread count when it ``trains``, and its optional ``shared_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from edgeprune.artifacts import Artifact
from edgeprune.config import BuildConfig
from edgeprune.data import Dataset
from edgeprune.progress import Reporter


@dataclass
class StageContext:
    """What a running stage may use: its config, the data, its inputs, its output folder, its cache key."""

    config: BuildConfig
    dataset: Dataset
    inputs: dict[str, Artifact]
    workdir: Path
    reporter: Reporter
    key: str = ""  # the stage's cache key (manifest.json's ``cache_key``); empty for a stage run outside the pipeline
    cache_root: Path | None = None  # the build's cache folder, for data reused across builds (latency tables)


@dataclass
class StageOutput:
    artifacts: list[Artifact] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


class Stage(Protocol):
    name: ClassVar[str]
    version: ClassVar[str]
    sections: ClassVar[tuple[str, ...]]  # the config sections the stage reads
    consumes: ClassVar[tuple[str, ...]]  # artefact names it needs
    trains: ClassVar[bool]  # True: torch's thread count joins its cache key (1 or 2 threads train other weights)

    def fingerprint(self, config: BuildConfig) -> dict[str, Any]:
        """Extra cache-key inputs not covered by config and artefacts (e.g. a weights file hash)."""
        ...

    # A stage that reuses data kept in the cache folder across builds may also define
    # ``shared_inputs(config, cache_root) -> dict``: that data's identity joins its cache key
    # (the structured-pruning stage: the latency table its speed-up search reads).

    def run(self, context: StageContext) -> StageOutput: ...


@dataclass(frozen=True)
class StageRecord:
    name: str
    version: str
    key: str
    cached: bool
    reason: str
    seconds: float
    metrics: dict[str, Any]
    artifacts: tuple[str, ...]


@dataclass
class PipelineResult:
    records: list[StageRecord]
    artifacts: dict[str, Artifact]
