"""``darkroom bench --freeze`` (no Ray here): the served app started once and frozen for every
in-process run, another live cluster still refused, a real process tree held still and let go;
and what every report records from the environment."""

from __future__ import annotations

import contextlib

import pytest

import bench.cluster as cluster
import bench.core as core
from bench.core import BenchConfig, TargetSpec, run_benchmark
from bench.runner import Level
from serve.errors import DarkroomError
from tests.unit.test_bench_baseline import CONFIGS, RAYLET, SERVE, FakeInProcess, FakeServed, FakeServer, world


class FreezableServer(FakeServer):
    """Stands for LaunchedServer with ``--freeze``: its raylet (pid 10) 'exists' from start() to
    stop(); frozen() marks it frozen for the block and yields its pids."""

    @contextlib.contextmanager
    def frozen(self):
        world["frozen"] = True
        try:
            yield [10]
        finally:
            world["frozen"] = False


class FrozenCheck(FakeInProcess):
    async def send(self, body):
        FakeInProcess.checks.append(world["frozen"])
        return await FakeServed.send(self, body)


class ThawedCheck(FakeServed):
    async def send(self, body):
        assert not world["frozen"], "a served target was driven while its server was frozen"
        return await super().send(body)


def _frozen_run(monkeypatch, others=()):
    world.update(alive=False, starts=0, frozen=False)
    monkeypatch.setattr(
        cluster,
        "_processes",
        lambda: (
            ([(10, RAYLET)] if world["alive"] else []) + ([(11, argv) for argv in others] if world["frozen"] else [])
        ),
    )
    monkeypatch.setattr(cluster, "LaunchedServer", FreezableServer)
    monkeypatch.setattr(
        core, "make_target", lambda spec, config: (FrozenCheck if spec.url is None else ThawedCheck)(spec.name, 0.002)
    )
    FakeInProcess.checks = []
    config = BenchConfig(
        targets=(TargetSpec("served", url="http://fake/a"), TargetSpec("in-process")),
        levels=(Level("closed", 1), Level("closed", 2)),
        requests=3,
        warmup=1,
        progress=False,
        rounds=3,
        serve_config=str(CONFIGS / "colocated.yaml"),
        freeze_served=True,
    )
    return run_benchmark(config)


def test_freeze_starts_the_app_once_and_freezes_it_for_every_in_process_run(monkeypatch, tmp_path):
    result = _frozen_run(monkeypatch)
    assert world["starts"] == 1 and not world["alive"]  # started once, stopped at the end
    plan = [(p["round"], p["kind"], p["level"]) for p in result.phases]
    assert plan == [(r, k, lv) for r in (1, 2, 3) for lv in ("c=1", "c=2") for k in ("served", "in-process")]
    assert FakeInProcess.checks and all(FakeInProcess.checks)  # every in-process request ran while frozen
    inproc = [p for p in result.phases if p["kind"] == "in-process"]
    assert all(p["frozen"]["processes"] == 1 and "frozen" in p["alone"] for p in inproc)
    for lr in result.levels:
        assert [r.round for r in lr.runs["served"]] == [1, 2, 3] == [r.round for r in lr.runs["in-process"]]
        assert len(lr.ratios["in-process"]["throughput"].values) == 3
    from bench.report import write_report

    summary = write_report(result, tmp_path / "report", plots=False)["summary"].read_text()
    assert "served app started once by the bench" in summary and "frozen for each of the 6 in-process runs" in summary
    assert "with the served app frozen (SIGSTOP" in summary


def test_freeze_still_refuses_another_live_cluster(monkeypatch):
    """Only the bench's own frozen server is let be: another Ray instance, alive by the time of the
    first in-process run, stops the run there."""
    other = ["/x/ray/raylet", "--session_name=session_b"]
    with pytest.raises(DarkroomError, match=r"refusing to measure the in-process baseline.*pid 11"):
        _frozen_run(monkeypatch, others=[other])
    assert world["alive"] is False and world["frozen"] is False  # thawed and stopped all the same


def test_freeze_needs_a_launched_server_and_a_baseline():
    for kwargs in ({}, {"serve_config": str(CONFIGS / "colocated.yaml")}):
        with pytest.raises(ValueError, match="freezing the served app needs"):
            BenchConfig(
                targets=(TargetSpec("served", url="http://fake/a"),)
                + ((TargetSpec("in-process"),) if not kwargs else ()),
                levels=(Level("closed", 1),),
                freeze_served=True,
                **kwargs,
            )


def test_frozen_holds_a_real_process_tree_still_and_lets_it_go(tmp_path):
    """A real process and its child, both spinning: inside ``frozen()`` both read stopped (T) and
    use no CPU at all; after it (and after an error inside it) both run again."""
    import subprocess
    import sys
    import time

    from bench.cpu import snapshot, tree

    spin = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', 'while True: pass']); exec('while True: pass')"
    )
    proc = subprocess.Popen([sys.executable, "-c", spin], start_new_session=True)
    server = cluster.LaunchedServer(tmp_path / "x.yaml", [])
    server.proc = proc
    try:
        deadline = time.monotonic() + 30
        while len(tree(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(tree(proc.pid)) == 2
        with server.frozen() as pids:
            assert sorted(pids) == sorted(tree(proc.pid)) and len(pids) == 2
            assert {cluster.process_state(pid) for pid in pids} == {"T"}
            assert cluster.live_clusters([(pids[0], SERVE)], ignore_pids=pids) == []
            before = snapshot(pids)
            time.sleep(0.3)
            assert snapshot(pids) == before  # not one clock tick
        assert all(cluster.process_state(pid) in ("R", "S") for pid in pids)
        with pytest.raises(KeyError), server.frozen():
            raise KeyError("inside")
        assert all(cluster.process_state(pid) in ("R", "S") for pid in pids)
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        server.proc = None


def test_the_report_records_ray_serves_modes_from_the_environment_but_no_secret(monkeypatch):
    from bench.machine import machine_metadata

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    monkeypatch.setenv("RAY_SERVE_API_TOKEN", "hush")
    monkeypatch.setenv("DARKROOM_API_KEYS", "hush")
    env = machine_metadata()["environment"]
    assert env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert "hush" not in env.values() and "DARKROOM_API_KEYS" not in env
