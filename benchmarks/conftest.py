"""Benchmark-suite plumbing: each benchmark records its median and peak extra memory under a
group; at the end a table prints every op's speed-up over the dense baseline of its group, taken
from the same run (these machines are noisy, so only same-run ratios mean anything).

Run: pytest benchmarks --benchmark-only
"""

import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import peak_extra_mib  # noqa: E402

_RESULTS: dict = defaultdict(dict)  # group -> name -> (median_ms, extra_mib)


@pytest.fixture
def record(benchmark):
    """record(group, name, fn, rounds=5): time fn with pytest-benchmark, measure memory, remember both."""

    def run(group: str, name: str, fn, rounds: int = 5, baseline: bool = False):
        benchmark.group = group
        benchmark.name = name
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=1, iterations=1)
        extra = peak_extra_mib(fn)  # after the warm-up, so one-off set-up is not counted
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info.update(extra_mib=extra, baseline=baseline)
        _RESULTS[group][name] = (median_ms, extra, baseline)

    return run


def pytest_collection_modifyitems(items):
    """Run each shape's benchmarks together (dense, then ours, forward then backward) instead of
    every shape's dense benchmark before any of ours: load on these shared machines drifts, and a
    same-run ratio means most when its two sides ran minutes, not tens of minutes, apart."""
    first: dict = {}

    def key(item):
        params = getattr(getattr(item, "callspec", None), "params", {})
        shape = tuple(sorted((k, repr(v)) for k, v in params.items() if k != "impl"))
        return first.setdefault((item.module.__name__, shape), len(first))

    order = {id(item): key(item) for item in items}  # first appearances in collection order
    items.sort(key=lambda item: order[id(item)])  # stable: within a shape, the files' own order


def pytest_configure(config):
    torch.set_num_threads(max(1, torch.get_num_threads()))


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("speed-up over the dense baseline (same run)")
    tr.write_line(f"{'group':58s} {'op':34s} {'median ms':>10s} {'extra MiB':>10s} {'speed-up':>9s}")
    for group, rows in _RESULTS.items():
        base = [v[0] for v in rows.values() if v[2]]
        for name, (ms, extra, _) in rows.items():
            ratio = f"{base[0] / ms:8.1f}x" if base else "       -"
            mem = f"{extra:10.1f}" if extra is not None else "       n/a"
            tr.write_line(f"{group:58s} {name:34s} {ms:10.2f} {mem} {ratio}")
