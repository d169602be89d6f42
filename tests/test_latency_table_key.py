"""The latency table in the structured-pruning stage's cache key: a search result cached with one table runs again
when the table is replaced, reset or kept for another CPU, runtime or thread count, and is reused while it only grew."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgeprune.cache import cache_key
from edgeprune.config import BenchmarkConfig, BuildConfig, ExportConfig, PruneConfig
from edgeprune.data import Dataset
from edgeprune.latency_table import TABLE_FORMAT, ProfiledRun, cached_table, store_table, table_lineage, table_path
from edgeprune.pipeline import key_components
from edgeprune.stages.prune_structured import PruneStructured
from edgeprune.stages.quantize import Quantize

KEY = {"device": "local: test CPU", "runtime": "onnxruntime 1.0", "threads": 2}
SEARCH = BuildConfig(prune=PruneConfig(speedup=2.0), export=ExportConfig(formats=("onnx",)), benchmark=BenchmarkConfig(threads=2))


def data() -> Dataset:
    x = np.zeros((8, 1, 4, 4), np.float32)
    return Dataset(x, np.zeros(8, np.int64), x, np.zeros(8, np.int64), "synthetic")


def prune_key(config: BuildConfig, cache: Path) -> str:
    return cache_key(key_components(PruneStructured(), config, data(), {}, cache))


def test_a_table_keeps_its_lineage_while_it_grows_and_a_new_one_starts_when_it_is_gone(tmp_path: Path) -> None:
    lineage = table_lineage(tmp_path, KEY)
    assert table_path(tmp_path, KEY).is_file() and table_lineage(tmp_path, KEY) == lineage  # stored once, read back
    table = cached_table(tmp_path, KEY)
    table.add(ProfiledRun({"conv:1x16x8x8:16x16x3x3": [12.5]}, {}, 20.0), "model-a")
    store_table(tmp_path, table)
    assert table_lineage(tmp_path, KEY) == lineage and cached_table(tmp_path, KEY).entries == table.entries
    table_path(tmp_path, KEY).unlink()
    assert table_lineage(tmp_path, KEY) not in ("", lineage)


def test_a_damaged_table_or_one_of_an_older_format_is_replaced_with_a_new_lineage(tmp_path: Path) -> None:
    lineage = table_lineage(tmp_path, KEY)
    path = table_path(tmp_path, KEY)
    path.write_text("{ not json")
    damaged = table_lineage(tmp_path, KEY)
    assert damaged != lineage and json.loads(path.read_text())["format"] == TABLE_FORMAT
    path.write_text(json.dumps({"format": "edgeprune-latency-table/1", "key": KEY, "entries": {}, "profiled": []}))
    assert table_lineage(tmp_path, KEY) not in (lineage, damaged)


def test_the_search_stage_key_follows_the_table_it_reads(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = prune_key(SEARCH, cache)
    shared = key_components(PruneStructured(), SEARCH, data(), {}, cache)["shared"]["latency_table"]
    assert shared["device"].startswith("local: ") and shared["threads"] == 2 and shared["format"] == TABLE_FORMAT
    assert prune_key(SEARCH, cache) == first  # the next build: the same table, the cached result reused
    key = {name: shared[name] for name in ("device", "runtime", "threads")}
    table = cached_table(cache, key)
    table.add(ProfiledRun({"conv:1x16x8x8:16x16x3x3": [12.5]}, {}, 20.0), "model-b")
    store_table(cache, table)
    assert prune_key(SEARCH, cache) == first  # grown by another build: still the same table
    table_path(cache, key).unlink()
    assert prune_key(SEARCH, cache) != first  # reset: the search runs again


@pytest.mark.parametrize(
    "config",
    [
        BuildConfig(prune=PruneConfig(speedup=2.0), export=ExportConfig(formats=("onnx",)), benchmark=BenchmarkConfig(threads=1)),
        BuildConfig(prune=PruneConfig(speedup=2.0), export=ExportConfig(formats=("onnx",)), benchmark=BenchmarkConfig(device="gpu")),
    ],
    ids=["another thread count", "another device"],
)
def test_another_device_or_thread_count_is_another_key(tmp_path: Path, config: BuildConfig) -> None:
    assert prune_key(config, tmp_path) != prune_key(SEARCH, tmp_path)


def test_stages_without_a_table_keep_the_key_they_had(tmp_path: Path) -> None:
    uniform = BuildConfig(prune=PruneConfig(speedup=2.0, speedup_moves="uniform"), export=ExportConfig(formats=("onnx",)))
    for stage, config in ((PruneStructured(), BuildConfig()), (PruneStructured(), uniform), (Quantize(), SEARCH)):
        assert "shared" not in key_components(stage, config, data(), {}, tmp_path)
    assert not (tmp_path / "latency-tables").exists()
