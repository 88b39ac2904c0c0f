"""The soak report: per-minute errors and latency, replica memory from /proc, the verdict (pure)."""

from __future__ import annotations

import argparse

import pytest

from bench.cli import parse_duration
from bench.memory import MemorySample, MemorySampler, rss_bytes, serve_processes
from bench.metrics import RequestRecord
from bench.soak import memory_per_minute, per_minute, soak_markdown, soak_report, verdict


def rec(i: int, t: float, latency_s: float, status: int = 200) -> RequestRecord:
    return RequestRecord(i, t, t, t + latency_s, status, images=1 if status == 200 else 0)


def test_per_minute_rows():
    records = [rec(0, 1, 1.0), rec(1, 30, 2.0), rec(2, 61, 1.5), rec(3, 62, 9.0, status=503), rec(4, 185, 1.0)]
    rows = per_minute(records)
    assert [r["minute"] for r in rows] == [0, 1, 2, 3]
    assert [r["requests"] for r in rows] == [2, 2, 0, 1]  # an empty minute is a row too
    assert rows[1]["errors"] == {"503": 1} and rows[1]["ok"] == 1
    assert rows[0]["p50_ms"] == 1500.0 and rows[0]["max_ms"] == 2000.0
    assert rows[1]["p99_ms"] == 1500.0  # failed requests have no latency
    assert per_minute([]) == []


def test_memory_per_minute_keeps_each_minutes_largest():
    mib = 2**20
    samples = [
        MemorySample(5, "ServeReplica:a:Denoiser#7", 100 * mib),
        MemorySample(50, "ServeReplica:a:Denoiser#7", 120 * mib),
        MemorySample(70, "ServeReplica:a:Denoiser#7", 110 * mib),
        MemorySample(130, "ProxyActor#9", 50 * mib),
    ]
    assert memory_per_minute(samples) == {
        "ProxyActor#9": [None, None, 50.0],
        "ServeReplica:a:Denoiser#7": [120.0, 110.0, None],
    }


def minutes(p99s, errors=None):
    return [
        {"minute": i, "requests": 10, "ok": 10, "errors": (errors or {}).get(i, {}), "p99_ms": p}
        for i, p in enumerate(p99s)
    ]


@pytest.mark.parametrize(
    "p99s, errors, memory, passed, failing",
    [
        ([1000, 1100, 1150], None, {"r": [500, 600, 620, 640]}, True, None),
        ([1000, 1100, 1250], None, {"r": [500, 600, 620, 640]}, False, "p99_ok"),  # 1.25x
        ([1000, 1000, 1000], {1: {"503": 1}}, {"r": [500, 600, 600]}, False, "errors_ok"),
        # 600 -> 700 after the warm-up minute: +16.7% (minute 0's 500 does not count).
        ([1000, 1000, 1000], None, {"r": [500, 600, 650, 700]}, False, "memory_ok"),
    ],
)
def test_verdict(p99s, errors, memory, passed, failing):
    v = verdict(minutes(p99s, errors), memory)
    assert v["passed"] is passed
    if failing:
        assert v[failing] is False
    assert set(v["memory_growth"]) == {"r"}


def test_verdict_with_too_little_data_does_not_pass():
    v = verdict(minutes([1000]), {})
    assert v["p99_ok"] is None and v["memory_ok"] is None and v["passed"] is False


def test_soak_report_and_markdown():
    records = [rec(i, i * 10.0, 1.0) for i in range(13)]
    samples = [MemorySample(t, "ServeReplica:a:Decoder#3", 300 * 2**20) for t in (5.0, 65.0, 125.0)]
    report = soak_report(records, samples)
    assert [r["minute"] for r in report["per_minute"]] == [0, 1, 2]
    assert report["verdict"]["memory_growth"] == {"ServeReplica:a:Decoder#3": 0.0}
    text = "\n".join(soak_markdown("split", "rate=1/s", report))
    assert "| 2 | 1 | 1 | 0 |" in text and "ServeReplica:a:Decoder#3" in text and "+0.0%" in text


def test_serve_processes_and_rss_from_proc(tmp_path):
    def proc(pid, title, rss_kb):
        d = tmp_path / str(pid)
        d.mkdir()
        (d / "cmdline").write_bytes(title.encode() + b"\0")
        (d / "status").write_text(f"Name:\tx\nVmRSS:\t{rss_kb} kB\n")

    proc(11, "ray::ServeReplica:app:Denoiser", 2048)
    proc(12, "ray::ProxyActor.receive_asgi_messages", 1024)  # Ray's title while a method runs
    proc(13, "python -m pytest", 4096)
    (tmp_path / "self").mkdir()
    assert serve_processes(tmp_path) == {11: "ServeReplica:app:Denoiser#11", 12: "ProxyActor#12"}
    assert rss_bytes(11, tmp_path) == 2048 * 1024 and rss_bytes(99, tmp_path) is None
    sampler = MemorySampler(proc=tmp_path)
    sampler.sample()
    assert sorted((s.process, s.rss_bytes) for s in sampler.samples) == [
        ("ProxyActor#12", 1024 * 1024),
        ("ServeReplica:app:Denoiser#11", 2048 * 1024),
    ]


@pytest.mark.parametrize("text, seconds", [("600", 600.0), ("30s", 30.0), ("10m", 600.0), ("1.5h", 5400.0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "ten minutes", "10d", "0", "-5m"])
def test_parse_duration_refuses(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)
