"""The in-process baseline's torch thread count: the fastest of 1..N per batch size, chosen by a
pure calibration policy (fake clock here), and applied in the thread that runs each batch."""

from __future__ import annotations

import pytest

from bench.runner import Level


class FakeClock:
    """A clock that only moves when the fake pipeline "runs": no dependence on this machine's speed."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "cost_s, expected",
    [
        ({1: 0.19, 2: 0.55}, 1),  # what the 2-core dev machine measured for the tiny model
        ({1: 0.40, 2: 0.25, 3: 0.30}, 2),  # a bigger model: more threads help up to a point
        ({1: 0.30, 2: 0.30}, 1),  # a tie goes to fewer threads
    ],
)
def test_calibrate_threads_keeps_the_fastest_count(cost_s, expected):
    from bench.inprocess import calibrate_threads

    clock, state, calls = FakeClock(), {"threads": None}, []

    def run():
        calls.append(state["threads"])
        clock.now += cost_s[state["threads"]]

    chosen, timings = calibrate_threads(run, lambda t: state.update(threads=t), sorted(cost_s), repeats=2, clock=clock)
    assert chosen == expected and state["threads"] == expected  # the winner is left set
    assert timings == {t: round(c * 1000, 3) for t, c in cost_s.items()}
    assert calls == [t for t in sorted(cost_s) for _ in range(3)]  # one warm-up, two timed each
    with pytest.raises(ValueError):
        calibrate_threads(run, lambda t: None, [])


def test_in_process_target_calibrates_threads_once_per_batch_size(monkeypatch):
    """configure() picks the thread count per batch limit (c=1 may want 1 thread, a batch of 8 two),
    once per size, and leaves it set for the level."""
    import torch

    import bench.inprocess as inprocess

    seen: list[int] = []

    def fake_calibrate(run, set_threads, candidates, **_):
        run()  # a batch of the level's size
        chosen = 1 if seen[-1] == 1 else max(candidates)
        set_threads(chosen)
        return chosen, {t: 1.0 for t in candidates}

    class FakePipe:
        def generate_batch(self, batch):
            seen.append(len(batch))

    monkeypatch.setattr(inprocess, "calibrate_threads", fake_calibrate)
    target = inprocess.InProcessTarget(max_batch=8, fastest_threads=True, calibration_body={"prompt": "x"})
    target._pipe, target._params, target._most_threads = FakePipe(), object(), 2
    before = torch.get_num_threads()
    try:
        for level in (Level("closed", 1), Level("closed", 16), Level("closed", 1), Level("open", 4.0)):
            target.configure(level)
            want = 1 if target.batch_limit == 1 else 2
            assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert seen == [1, 8]  # once per batch size (c=16 and the open loop both batch up to 8)
    assert {b: v["threads"] for b, v in target.threads_by_batch.items()} == {1: 1, 8: 2}


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
