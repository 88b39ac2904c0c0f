"""bench/: metrics from hand-built records, the seeded workload and arrival schedules (no server)."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.metrics import RequestRecord, compare, compute_metrics, distribution, measurement_window, percentile
from bench.runner import Level, Response, closed_loop, open_loop, parse_server_timing
from bench.schedule import Workload, arrival_offsets, gaps, read_prompts

ROOT = Path(__file__).resolve().parents[2]


def rec(i: int, latency_ms: float, status: int = 200, start: float = 0.0, images: int = 1, **timings) -> RequestRecord:
    error = None if status == 200 else f"HTTP {status}"
    return RequestRecord(
        i, start, start, start + latency_ms / 1000, status, images if status == 200 else 0, error, timings
    )


# --- percentiles and distributions ---------------------------------------------------------------


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert percentile([7], 99) == 7
    assert percentile([], 50) == 0.0
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_mean_and_median_are_not_swapped():
    # 100, 100, 100, 100, 1100 ms: median 100, mean 300 (vLLM's old report swapped these).
    m = compute_metrics([rec(i, v) for i, v in enumerate([100, 100, 100, 100, 1100])], 1.0, None)
    assert m.latency_ms.p50 == pytest.approx(100)
    assert m.latency_ms.mean == pytest.approx(300)
    assert m.latency_ms.max == pytest.approx(1100) and m.latency_ms.min == pytest.approx(100)
    assert m.latency_ms.p90 == pytest.approx(700)  # 100 + 0.6 * 1000


def test_percentiles_of_one_to_hundred():
    m = compute_metrics([rec(i, i + 1) for i in range(100)], 10.0, None)
    assert m.latency_ms.p50 == pytest.approx(50.5)
    assert m.latency_ms.p90 == pytest.approx(90.1)
    assert m.latency_ms.p99 == pytest.approx(99.01)
    assert m.latency_ms.mean == pytest.approx(50.5)


# --- throughput, goodput, errors --------------------------------------------------------------------


def test_throughput_goodput_and_errors_by_status():
    records = [
        rec(0, 500, images=2),
        rec(1, 900),
        rec(2, 1500),  # over the SLO
        rec(3, 50, status=503),
        rec(4, 10, status=503),
        rec(5, 0, status=0),  # no response at all
        rec(6, 100, status=400),
    ]
    m = compute_metrics(records, duration_s=2.0, slo_ms=1000)
    assert (m.requests, m.ok, m.failed) == (7, 3, 4)
    assert m.errors_by_status == {"0": 1, "400": 1, "503": 2}
    assert m.images == 4
    assert m.throughput_rps == pytest.approx(1.5)
    assert m.throughput_ips == pytest.approx(2.0)
    assert m.goodput_rps == pytest.approx(1.0)  # 2 successful requests within 1000 ms, over 2 s
    assert m.slo_attainment == pytest.approx(2 / 7)
    # Latency statistics cover successful requests only.
    assert m.latency_ms.count == 3 and m.latency_ms.min == pytest.approx(500)


def test_goodput_without_slo_counts_every_success():
    m = compute_metrics([rec(0, 10_000), rec(1, 20, status=500)], 4.0, None)
    assert m.goodput_rps == m.throughput_rps == pytest.approx(0.25)


def test_a_200_with_an_error_is_not_a_success():
    bad = RequestRecord(0, 0, 0, 1, 200, 0, "response is not JSON", {})
    m = compute_metrics([bad], 1.0, None)
    assert m.ok == 0 and m.errors_by_status == {"200": 1}


def test_empty_input():
    m = compute_metrics([], 0.0, 1000)
    assert (m.requests, m.ok, m.failed, m.images) == (0, 0, 0, 0)
    assert m.throughput_rps == m.goodput_rps == m.slo_attainment == 0.0
    assert m.latency_ms.count == 0 and m.latency_ms.p99 == 0.0
    assert m.stages_ms == {} and m.batch_sizes == {} and m.errors_by_status == {}
    assert measurement_window([]) == 0.0
    assert distribution([]).mean == 0.0


def test_stage_breakdown_batches_and_client_overhead():
    t = {"encode": 2.0, "denoise": 800.0, "decode": 40.0, "storage": 5.0, "denoise_queue": 30.0, "total": 900.0}
    records = [
        rec(0, 950, **t, denoise_batch=1.0),
        rec(1, 1000, **{**t, "denoise": 1000.0, "total": 940.0}, denoise_batch=3.0),
        rec(2, 10, status=500, denoise=5.0),  # failures do not count in the breakdown
    ]
    m = compute_metrics(records, 2.0, None)
    assert m.stages_ms["denoise"].mean == pytest.approx(900)
    assert m.stages_ms["denoise"].p50 == pytest.approx(900)
    assert m.stages_ms["denoise"].p99 == pytest.approx(998)
    assert m.stages_ms["denoise_queue"].mean == pytest.approx(30)
    assert "encode_queue" not in m.stages_ms  # not reported: absent, not zero
    assert m.batch_sizes["denoise_batch"].mean == pytest.approx(2.0) and m.batch_sizes["denoise_batch"].max == 3
    assert m.client_overhead_ms.mean == pytest.approx(55)  # (50 + 60) / 2


def test_measurement_window_and_send_lag():
    a = RequestRecord(0, scheduled=0.0, start=0.01, end=1.0, status=200, images=1)
    b = RequestRecord(1, scheduled=0.5, start=0.5, end=2.5, status=200, images=1)
    assert measurement_window([a, b]) == pytest.approx(2.5)
    m = compute_metrics([a, b], measurement_window([a, b]), None)
    assert m.send_lag_ms.max == pytest.approx(10)
    assert m.throughput_rps == pytest.approx(0.8)


def test_compare_ratios():
    a = compute_metrics([rec(0, 100), rec(1, 200)], 1.0, None)
    b = compute_metrics([rec(0, 50), rec(1, 100), rec(2, 100, start=0.5)], 1.0, None)
    r = compare(a, b)
    assert r.throughput == pytest.approx(1.5)
    assert r.p50 == pytest.approx(100 / 150)
    none = compare(compute_metrics([], 1.0, None), b)
    assert none.throughput is None and none.p99 is None


def test_record_json_round_trip():
    r = rec(3, 123.456, denoise=100.0)
    back = RequestRecord.from_json(r.to_json())
    assert back.index == 3 and back.latency == pytest.approx(r.latency) and back.timings == {"denoise": 100.0}


def test_parse_server_timing():
    header = "encode;dur=1.500, denoise;dur=900.250, total;dur=1000"
    assert parse_server_timing(header) == {"encode": 1.5, "denoise": 900.25, "total": 1000.0}
    assert parse_server_timing("") == {}


# --- workload and arrival schedules ------------------------------------------------------------------


def test_workload_bodies_are_seeded_and_reproducible():
    w = Workload(seed=7, size="64x64", steps=4)
    assert [w.body(i) for i in range(20)] == [Workload(seed=7, size="64x64", steps=4).body(i) for i in range(20)]
    assert [w.body(i)["seed"] for i in range(20)] != [Workload(seed=8).body(i)["seed"] for i in range(20)]
    assert len({w.body(i)["seed"] for i in range(50)}) == 50
    assert w.body(0) != w.body(0, "warmup")
    body = w.body(0)
    assert body["size"] == "64x64" and body["num_inference_steps"] == 4 and body["response_format"] == "url"
    assert "guidance_scale" not in body  # the server's default unless asked


def test_workload_bodies_are_valid_requests():
    from serve.api import parse_generation_request

    for i in range(5):
        parse_generation_request(Workload(seed=1, size="64x48", steps=3, n=2, guidance_scale=5.0).body(i))


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a cat\n\n# comment\n  a dog  \n")
    assert read_prompts(f) == ("a cat", "a dog")
    f.write_text("\n# only a comment\n")
    with pytest.raises(ValueError):
        read_prompts(f)


def test_arrivals_are_seeded_absolute_and_monotonic():
    a = arrival_offsets(4.0, seed=1, count=200)
    assert a == arrival_offsets(4.0, seed=1, count=200)
    assert a != arrival_offsets(4.0, seed=2, count=200)
    assert a[0] == 0.0 and len(a) == 200
    assert all(y >= x for x, y in zip(a, a[1:], strict=False))
    assert all(g >= 0 for g in gaps(a))


@pytest.mark.parametrize("arrival, burstiness", [("poisson", 1.0), ("gamma", 0.25), ("gamma", 4.0)])
def test_arrival_rate_matches(arrival, burstiness):
    a = arrival_offsets(5.0, seed=3, count=20_000, arrival=arrival, burstiness=burstiness)
    rate = (len(a) - 1) / a[-1]
    assert rate == pytest.approx(5.0, rel=0.05)


def test_gamma_burstiness_sets_the_coefficient_of_variation():
    def cv(burstiness: float, arrival: str = "gamma") -> float:
        g = gaps(arrival_offsets(2.0, seed=5, count=20_000, arrival=arrival, burstiness=burstiness))
        return statistics.pstdev(g) / statistics.fmean(g)

    assert cv(1.0, "poisson") == pytest.approx(1.0, rel=0.05)
    assert cv(0.25) == pytest.approx(2.0, rel=0.1)  # 1 / sqrt(0.25)
    assert cv(4.0) == pytest.approx(0.5, rel=0.05)
    # poisson ignores --burstiness
    assert arrival_offsets(2.0, seed=5, count=50, burstiness=0.1) == arrival_offsets(2.0, seed=5, count=50)


def test_arrivals_for_a_duration():
    a = arrival_offsets(10.0, seed=0, duration_s=30.0)
    assert a[-1] < 30.0 and len(a) == pytest.approx(300, rel=0.15)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "count": 1},
        {"rate": 1, "count": 1, "arrival": "uniform"},
        {"rate": 1, "count": 1, "arrival": "gamma", "burstiness": 0},
        {"rate": 1},
        {"rate": 1, "count": 1, "duration_s": 1.0},
    ],
)
def test_arrival_arguments_are_checked(kwargs):
    rate = kwargs.pop("rate")
    with pytest.raises(ValueError):
        arrival_offsets(rate, seed=0, **kwargs)


def test_levels():
    assert Level("closed", 4).label == "c=4" and Level("closed", 4).concurrency == 4
    assert Level("open", 0.5).label == "rate=0.5/s" and Level("open", 0.5).concurrency == 0
    for mode, value in (("closed", 0), ("closed", 1.5), ("open", -1), ("burst", 1)):
        with pytest.raises(ValueError):
            Level(mode, value)


# --- drivers, against a fake target (no sleeping on a real server) ------------------------------------


class FakeTarget:
    name = "fake"

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s, self.seen, self.inflight, self.peak = delay_s, [], 0, 0

    async def send(self, body):
        self.seen.append(body["seed"])
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        await asyncio.sleep(self.delay_s)
        self.inflight -= 1
        return Response(200, images=1, timings={"total": self.delay_s * 1000})


def test_closed_loop_keeps_concurrency_and_sends_each_index_once():
    target, w = FakeTarget(0.01), Workload(seed=1)
    records = asyncio.run(closed_loop(target, w.body, 3, count=10))
    assert [r.index for r in records] == list(range(10))
    assert target.peak == 3 and all(r.ok for r in records)
    assert sorted(target.seen) == sorted(w.body(i)["seed"] for i in range(10))


class HoldingTarget(FakeTarget):
    """Answers nothing until ``count`` requests are in flight (or ``limit_s`` passes): an open loop
    that waited for answers before sending would never get there."""

    def __init__(self, count: int, limit_s: float = 10.0) -> None:
        super().__init__()
        self.count, self.limit_s, self.all_in = count, limit_s, asyncio.Event()

    async def send(self, body):
        self.seen.append(body["seed"])
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        if self.inflight == self.count:
            self.all_in.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.all_in.wait(), self.limit_s)
        self.inflight -= 1
        return Response(200, images=1, timings={"total": 0.0})


def test_open_loop_sends_at_absolute_offsets():
    w = Workload(seed=1)
    offsets = [0.0, 0.05, 0.1, 0.15]

    async def main():
        target = HoldingTarget(len(offsets))  # made inside the loop that runs it
        return target, await open_loop(target, [w.body(i) for i in range(4)], offsets)

    target, records = asyncio.run(main())
    # Sends do not wait for answers: all four were in flight together.
    assert target.peak == 4
    for r, off in zip(records, offsets, strict=True):
        assert r.scheduled == off and r.start > off - 0.005  # never sent before its offset (timer granularity)
    assert [r.start for r in records] == sorted(r.start for r in records)


def test_bench_imports_nothing_heavy():
    code = (
        "import sys, bench, bench.cli, bench.core, bench.report, bench.inprocess\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'ray', 'numpy', 'matplotlib', 'diffusers', 'httpx'))\n"
        "print(bad[:5]); sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
