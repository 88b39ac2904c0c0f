"""The in-process baseline's torch threads: one target per count (1, 2, 4, ... up to the app's),
the goals take the best of each round, and each batch sets its count in the thread that runs it."""

from __future__ import annotations

import pytest

from bench.runner import Level


@pytest.mark.parametrize(
    "most, counts", [(1, [1]), (2, [1, 2]), (3, [1, 2, 3]), (4, [1, 2, 4]), (12, [1, 2, 4, 8, 12])]
)
def test_thread_counts_double_up_to_the_apps_threads(most, counts):
    from bench.cli import thread_counts

    assert thread_counts(most) == counts


def test_one_in_process_target_per_thread_count(monkeypatch):
    from bench import cli
    from serve.cli import build_parser

    def config(*argv):
        return cli.config_from_args(build_parser().parse_args(["bench", "--requests", "4", *argv]))

    real = cli.thread_counts
    monkeypatch.setattr(cli, "thread_counts", lambda most: real(2 if most is None else most))  # a 2-core machine
    cfg = config("--url", "http://127.0.0.1:1", "--in-process")
    inproc = [(t.name, t.torch_threads) for t in cfg.in_process]
    assert inproc == [("in-process 1 thread", 1), ("in-process 2 threads", 2)]
    exact = config("--url", "http://127.0.0.1:1", "--in-process", "--torch-threads", "3")
    assert [(t.name, t.torch_threads) for t in exact.in_process] == [("in-process", 3)]


def test_goals_take_the_best_in_process_count_of_each_round():
    """Round 1: 1 thread wins at c=1, 2 threads at c=8; round 2: 1 thread wins both."""
    from bench.core import BenchConfig, BenchResult, LevelResult, TargetRun, TargetSpec
    from bench.metrics import compute_metrics
    from tests.unit.test_bench_metrics import rec

    def run(name, level, round_no, latency_ms, count):
        return TargetRun(
            name, level, "t", compute_metrics([rec(i, latency_ms) for i in range(count)], 1.0, None), [], None, round_no
        )

    c1, c8 = Level("closed", 1), Level("closed", 8)
    table = {
        c1: {"app": [(110, 9), (120, 8)], "ip 1": [(100, 10), (100, 10)], "ip 2": [(300, 3), (300, 3)]},
        c8: {"app": [(300, 18), (300, 18)], "ip 1": [(400, 16), (400, 20)], "ip 2": [(250, 24), (500, 12)]},
    }
    levels = [
        LevelResult(lv, {n: [run(n, lv, r + 1, *v) for r, v in enumerate(vals)] for n, vals in by.items()}, {})
        for lv, by in table.items()
    ]
    config = BenchConfig(
        targets=(TargetSpec("app", url="u"), TargetSpec("ip 1", torch_threads=1), TargetSpec("ip 2", torch_threads=2)),
        levels=(c1, c8),
        rounds=2,
    )
    goals = {g["check"]: g for g in BenchResult(config, {}, {}, levels).goals()}
    p50 = goals["p50 app / in-process (best) at c=1"]
    assert p50["spread"]["values"] == pytest.approx((1.10, 1.20))
    peak = goals["peak img/s app / in-process (best) (closed loop)"]
    assert peak["spread"]["values"] == pytest.approx((18 / 24, 18 / 20))


def test_in_process_batches_run_with_the_chosen_threads_in_their_own_thread():
    """torch applies set_num_threads to a thread only until its OpenMP team exists: a pool thread
    that already ran with 2 threads keeps 2 when another thread sets 1. Each batch sets the
    chosen count in the thread that runs it."""
    import concurrent.futures

    import torch

    from bench.inprocess import InProcessTarget

    seen: list[int] = []

    class FakePipe:
        def generate_batch(self, batch):
            seen.append(torch.get_num_threads())
            return batch

    target = InProcessTarget(max_batch=8)
    target._pipe, target._threads = FakePipe(), 1
    before = torch.get_num_threads()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:

        def warm_with_two():
            torch.set_num_threads(2)
            torch.nn.functional.conv2d(torch.ones(1, 2, 4, 4), torch.ones(2, 2, 3, 3))  # its team: 2 threads
            return torch.get_num_threads()

        assert pool.submit(warm_with_two).result() == 2
        torch.set_num_threads(1)  # elsewhere: does not reach the pool thread ...
        assert pool.submit(torch.get_num_threads).result() == 2
        assert pool.submit(target._generate, ["a"]).result() == ["a"]  # ... but the batch sets it
        assert seen == [1]
    finally:
        pool.shutdown()
        torch.set_num_threads(before)
