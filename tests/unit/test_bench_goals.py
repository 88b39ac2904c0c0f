"""The bench report's goals (bench/goals.py) from hand-built runs: served vs in-process, every
app vs a compared or reference app, latency in an open loop, streaming vs plain."""

from __future__ import annotations

import pytest

from bench.core import BenchConfig, TargetSpec
from bench.metrics import compute_metrics
from bench.runner import Level
from tests.unit.test_bench_metrics import rec


def test_goals_from_hand_built_runs():
    """served vs in-process at c=1 and at peak, and served vs a compared app at every level."""
    from bench.core import BenchResult, LevelResult, TargetRun

    def run(name, level, round_no, latency_ms, count):
        m = compute_metrics([rec(i, latency_ms) for i in range(count)], 1.0, None)  # count img/s
        return TargetRun(name, level, "t", m, [], None, round_no)

    c1, c8 = Level("closed", 1), Level("closed", 8)
    # round 1, round 2: (p50 ms, img/s) per target and level
    table = {
        c1: {"split": [(105, 9), (112, 9)], "mono": [(120, 8), (110, 10)], "in-process": [(100, 10), (100, 10)]},
        c8: {"split": [(300, 27), (300, 26)], "mono": [(900, 9), (900, 9)], "in-process": [(280, 30), (280, 28)]},
    }
    levels = []
    for level, by in table.items():
        runs = {n: [run(n, level, r + 1, *v) for r, v in enumerate(vals)] for n, vals in by.items()}
        levels.append(LevelResult(level, runs, {}))
    config = BenchConfig(
        targets=(TargetSpec("split", url="u1"), TargetSpec("mono", url="u2"), TargetSpec("in-process")),
        levels=(c1, c8),
        rounds=2,
    )
    goals = {g["check"]: g for g in BenchResult(config, {}, {}, levels).goals()}
    p50 = goals["p50 split / in-process at c=1"]
    assert p50["spread"]["values"] == pytest.approx((1.05, 1.12)) and p50["goal"] == "<= 1.1"
    assert p50["median_met"] and not p50["every_round_met"]  # median 1.085; round 2 missed it
    peak = goals["peak img/s split / in-process (closed loop)"]
    assert peak["spread"]["values"] == pytest.approx((27 / 30, 26 / 28)) and peak["every_round_met"]
    mono1, mono8 = goals["img/s split / mono at c=1"], goals["img/s split / mono at c=8"]
    assert mono1["spread"]["values"] == pytest.approx((9 / 8, 9 / 10)) and not mono1["every_round_met"]
    assert mono8["every_round_met"] and mono8["spread"]["min"] == pytest.approx(26 / 9)


def test_goals_against_a_reference_app():
    """--reference monolith: every other served app against the monolith (the split app too, not
    only the first), the in-process goals still for the first app; no check of colocated / split."""
    from bench.core import BenchResult, LevelResult, TargetRun

    def run(name, level, latency_ms, count):
        m = compute_metrics([rec(i, latency_ms) for i in range(count)], 1.0, None)
        return TargetRun(name, level, "t", m, [], None, 1)

    c1, r2 = Level("closed", 1), Level("open", 2.0)
    table = {
        c1: {"colocated": (105, 9), "split": (125, 8), "mono": (140, 7), "in-process": (100, 10)},
        r2: {"colocated": (110, 2), "split": (150, 2), "mono": (140, 2), "in-process": (100, 2)},
    }
    levels = [LevelResult(lv, {n: [run(n, lv, *v)] for n, v in by.items()}, {}) for lv, by in table.items()]
    served = tuple(TargetSpec(n, url=f"u{i}") for i, n in enumerate(("colocated", "split", "mono")))
    config = BenchConfig(targets=(*served, TargetSpec("in-process")), levels=(c1, r2), reference="mono")
    goals = {g["check"]: g for g in BenchResult(config, {}, {}, levels).goals()}
    assert set(goals) == {
        "p50 colocated / in-process at c=1",
        "peak img/s colocated / in-process (closed loop)",
        "img/s colocated / mono at c=1",
        "img/s split / mono at c=1",
        f"p50 colocated / mono at {r2.label}",
        f"p50 split / mono at {r2.label}",
    }
    assert goals["img/s split / mono at c=1"]["spread"]["values"] == pytest.approx((8 / 7,))
    assert goals["img/s split / mono at c=1"]["every_round_met"]
    late = goals[f"p50 split / mono at {r2.label}"]
    assert late["spread"]["values"] == pytest.approx((150 / 140,)) and not late["median_met"]
    with pytest.raises(ValueError, match="reference 'nope' is not a served target"):
        BenchConfig(targets=served, levels=(c1,), reference="nope")
    with pytest.raises(ValueError, match="is not a served target"):  # the baseline is not an app
        BenchConfig(targets=(*served, TargetSpec("in-process")), levels=(c1,), reference="in-process")


def test_open_loop_goals_compare_latency():
    """At a Poisson rate both apps complete the offered rate (equal img/s within noise): the
    comparison is the first app's p50 over the compared app's, at most 1."""
    from bench.core import BenchResult, LevelResult, TargetRun

    def run(name, level, latency_ms, count):
        m = compute_metrics([rec(i, latency_ms) for i in range(count)], 1.0, None)
        return TargetRun(name, level, "t", m, [], None, 1)

    r2, r4 = Level("open", 2.0), Level("open", 4.0)
    # split: 2.0 and 3.9 img/s (a hair under the monolith's 4.0), but far lower latency at 4/s
    table = {r2: {"split": (150, 2), "mono": (140, 2)}, r4: {"split": (200, 39), "mono": (900, 40)}}
    levels = [LevelResult(lv, {n: [run(n, lv, *v)] for n, v in by.items()}, {}) for lv, by in table.items()]
    config = BenchConfig(targets=(TargetSpec("split", url="u1"), TargetSpec("mono", url="u2")), levels=(r2, r4))
    goals = {g["check"]: g for g in BenchResult(config, {}, {}, levels).goals()}
    assert set(goals) == {f"p50 split / mono at {r2.label}", f"p50 split / mono at {r4.label}"}
    at2, at4 = goals[f"p50 split / mono at {r2.label}"], goals[f"p50 split / mono at {r4.label}"]
    assert at2["goal"] == "<= 1" and at2["spread"]["values"] == pytest.approx((150 / 140,)) and not at2["median_met"]
    assert at4["spread"]["values"] == pytest.approx((200 / 900,)) and at4["every_round_met"]


def test_compare_stream_checks_issue_12s_streaming_throughput():
    """--compare-stream: the streamed run's img/s over the plain run's, at least 0.9 (issue 12),
    instead of "the first target at least the compared one"."""
    from bench.core import BenchResult, LevelResult, TargetRun

    def run(name, level, round_no, count):
        m = compute_metrics([rec(i, 100) for i in range(count)], 1.0, None)
        return TargetRun(name, level, "t", m, [], None, round_no)

    c16 = Level("closed", 16)
    runs = {"plain": [run("plain", c16, r, 20) for r in (1, 2, 3)]}
    runs["plain streaming"] = [run("plain streaming", c16, r, n) for r, n in ((1, 19), (2, 16), (3, 18))]
    config = BenchConfig(
        targets=(TargetSpec("plain", url="u"), TargetSpec("plain streaming", url="u", stream=True, partial_images=3)),
        levels=(c16,),
        rounds=3,
    )
    goals = BenchResult(config, {}, {}, [LevelResult(c16, runs, {})]).goals()
    assert [g["check"] for g in goals] == ["img/s plain streaming / plain at c=16"]
    (g,) = goals
    assert g["goal"] == ">= 0.9" and g["spread"]["values"] == pytest.approx((0.95, 0.80, 0.90))
    assert g["median_met"] and not g["every_round_met"]  # median 0.90; round 2 missed it


# -- --serve: URLs and the baseline's size come from the config -------------------------------------------
