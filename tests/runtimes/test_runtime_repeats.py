"""More repeats while p50s disagree, the steadiest kept, a noisy figure flagged; threads within the host's cores."""

from __future__ import annotations

import time
from pathlib import Path

from edgeprune.runtimes.base import BenchSettings, run_repeats, steadiest
from edgeprune.runtimes.figures import bench_line, caveats
from edgeprune.runtimes.local import LocalAdapter


def runner_json(p50: float) -> dict:
    return {"latency_mean_ms": p50, "latency_p50_ms": p50, "peak_rss_mb": 60.0, "model_memory_mb": 2.0, "threads": 2}


def fake_runs(p50s: list[float], seconds_each: float = 0.0):
    figures = iter(p50s)

    def run_once(what: str) -> dict:
        time.sleep(seconds_each)
        return runner_json(next(figures))

    return run_once


def test_steadiest_keeps_the_repeats_that_agree_in_the_order_taken():
    runs = [runner_json(p50) for p50 in (1.0, 1.6, 1.02, 0.99, 2.5)]
    assert [run["latency_p50_ms"] for run in steadiest(runs, 3)] == [1.0, 1.02, 0.99]
    assert steadiest(runs, 9) == runs


def test_a_spread_above_the_limit_takes_more_repeats_until_three_agree():
    settings = BenchSettings(repeats=3, max_spread_pct=10.0)
    result = run_repeats(fake_runs([1.0, 1.6, 1.3, 1.02, 0.99, 5.0]), settings, "x", "local", Path("m.onnx"))
    assert result.repeats_taken == 5 and len(result.repeats) == 5  # stopped once 1.0, 1.02, 0.99 agreed
    assert result.latency_p50_ms == 1.0 and result.p50_spread_pct < 10 and not result.noisy


def test_without_a_limit_the_first_repeats_are_the_figure():
    result = run_repeats(fake_runs([1.0, 1.6, 1.3]), BenchSettings(repeats=3), "x", "local", Path("m.onnx"))
    assert result.repeats_taken == 3 and result.latency_p50_ms == 1.3 and result.p50_spread_pct > 40 and not result.noisy


def test_a_figure_that_stays_noisy_stops_at_the_time_limit_and_is_flagged():
    settings = BenchSettings(repeats=3, max_spread_pct=10.0, spread_time_limit_s=0.1)
    p50s = [1.0 + 0.5 * i for i in range(100)]  # no three within 10 % of each other among the first dozen
    result = run_repeats(fake_runs(p50s, seconds_each=0.02), settings, "x", "local", Path("m.onnx"))
    assert 4 <= result.repeats_taken <= 12 and result.noisy
    assert "NOISY" in bench_line(result.to_dict())


def test_a_local_benchmark_runs_at_most_the_host_cores_and_says_so():
    adapter = LocalAdapter()
    adapter.host_affinity = [0, 1]
    capped, requested = adapter._within_cores(BenchSettings(threads=4))
    assert capped.threads == 2 and requested == 4
    kept, requested = adapter._within_cores(BenchSettings(threads=4, threads_beyond_cores=True))
    assert kept.threads == 4 and requested is None
    assert adapter._within_cores(BenchSettings(threads=2)) == (BenchSettings(threads=2), None)
    assert caveats({"threads": 2, "threads_requested": 4}) == ["ran 2 threads, not the 4 asked: the host has 2 cores"]
