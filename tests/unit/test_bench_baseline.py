"""The honest baseline (no Ray here): the in-process phase refuses to run beside a live serving
cluster, or runs apart from the one the bench starts and stops; phases alternate A/B/A/B; ratios
come with their spread over the rounds; issue 14's goals are checked from them."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import bench.cluster as cluster
import bench.core as core
from bench.cluster import LiveCluster, live_clusters, require_alone
from bench.core import BenchConfig, TargetSpec, phase_plan, run_benchmark
from bench.metrics import compute_metrics, ratio_spreads, spread
from bench.runner import Level, Response
from serve.cli import main as darkroom
from serve.errors import DarkroomError
from tests.unit.test_bench_metrics import rec

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "deployments" / "configs"

RAYLET = ["/x/site-packages/ray/core/src/ray/raylet/raylet", "--node_ip_address=127.0.0.1", "--session_name=session_a"]
GCS = ["/x/site-packages/ray/core/src/ray/gcs/gcs_server", "--session-name=session_a"]
SERVE = ["/usr/bin/python", "/usr/local/bin/darkroom", "serve", "--config", "x.yaml"]


# -- what counts as a live serving cluster ----------------------------------------------------------


def test_live_clusters_finds_ray_instances_and_darkroom_serve():
    procs = [
        (10, RAYLET),
        (11, GCS),  # the same Ray instance: one entry
        (12, ["/y/raylet", "--session_name=session_b"]),
        (20, SERVE),
        (21, ["python", "-m", "serve.cli", "serve", "--port", "9000"]),
        (30, ["python", "-m", "serve.cli", "bench", "--in-process"]),  # a bench, not a server
        (31, ["darkroom", "serve", "--config", "x.yaml", "--check"]),  # validates a file, starts nothing
        (32, ["vim", "raylet.md"]),
        (33, ["/usr/bin/python", "train.py"]),
    ]
    found = live_clusters(procs)
    assert [(c.kind, c.pid, c.session) for c in found] == [
        ("ray", 10, "session_a"),
        ("ray", 12, "session_b"),
        ("darkroom serve", 20, None),
        ("darkroom serve", 21, None),
    ]
    assert "pid 10, session_a" in found[0].describe() and "darkroom serve" in found[2].describe()
    assert [c.pid for c in live_clusters(procs, ignore_sessions={"session_a"})] == [12, 20, 21]
    assert live_clusters([(33, ["python", "x.py"])]) == []


def test_live_clusters_reads_this_machines_processes():
    """No fake list: it lists real processes and never counts itself."""
    found = live_clusters()
    assert all(isinstance(c, LiveCluster) for c in found)
    assert cluster._processes(), "no process visible at all"


def test_require_alone_refuses_in_one_line(monkeypatch):
    monkeypatch.setattr(cluster, "_processes", lambda: [(10, RAYLET), (20, SERVE)])
    with pytest.raises(DarkroomError) as err:
        require_alone()
    message = err.value.message
    assert "\n" not in message and "pid 10" in message and "darkroom serve" in message
    assert "--serve CONFIG" in message  # and what to do instead
    monkeypatch.setattr(cluster, "_processes", lambda: [(33, ["python", "x.py"])])
    require_alone()  # alone: no error


@pytest.mark.parametrize(
    "extra",
    [
        ["--in-process"],
        ["--url", "http://10.0.0.9:8000", "--in-process"],  # even with the target elsewhere
    ],
)
def test_cli_refuses_the_in_process_phase_beside_a_live_cluster(monkeypatch, capsys, tmp_path, extra):
    monkeypatch.setattr(cluster, "_processes", lambda: [(10, RAYLET)])
    code = darkroom(["bench", *extra, "--requests", "1", "--steps", "2", "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("darkroom: error: refusing to measure the in-process baseline") and "pid 10" in err[0]
    assert not (tmp_path / "out").exists()  # refused before anything ran


# -- phases, rounds and spreads ---------------------------------------------------------------------


def test_phase_plan_alternates():
    assert phase_plan(2, True, True) == [(1, "served"), (1, "in-process"), (2, "served"), (2, "in-process")]
    assert phase_plan(2, True, False) == [(1, "served"), (2, "served")]
    assert phase_plan(1, False, True) == [(1, "in-process")]


def test_spread_and_ratio_spreads():
    s = spread([1.2, None, 0.9, 1.0])
    assert (s.median, s.min, s.max, s.values) == (1.0, 0.9, 1.2, (1.2, None, 0.9, 1.0))
    assert str(s) == "1.00x (0.90–1.20)" and str(spread([1.5])) == "1.50x" and str(spread([None])) == "—"
    fast = compute_metrics([rec(0, 100), rec(1, 100)], 1.0, None)  # 2 img/s, p50 100 ms
    slow = compute_metrics([rec(0, 200)], 1.0, None)  # 1 img/s, p50 200 ms
    r = ratio_spreads([fast, slow], [slow, slow])  # round 1: other is half as fast; round 2: equal
    assert r["throughput"].values == (0.5, 1.0) and r["p50"].values == (2.0, 1.0)
    assert r["throughput"].median == pytest.approx(0.75)
    with pytest.raises(ValueError):
        ratio_spreads([fast], [fast, slow])


# -- a whole run with fake targets: the bench starts and stops the served app ----------------------------


class FakeServed:
    def __init__(self, name, latency_s):
        self.name, self.latency_s = name, latency_s

    async def start(self):
        assert world["alive"], "a served target was driven with its server stopped"
        return {"kind": "http", "url": f"http://fake/{self.name}"}

    def configure(self, level):
        pass

    async def send(self, body):
        await asyncio.sleep(self.latency_s)
        return Response(200, images=1, timings={"total": self.latency_s * 1000})

    async def close(self):
        pass


class FakeInProcess(FakeServed):
    checks: list[list[LiveCluster]] = []

    async def start(self):
        return {"kind": "in-process", "torch_threads": 1}

    async def send(self, body):
        FakeInProcess.checks.append(live_clusters())  # what is alive while it runs
        return await super().send(body)


world = {"alive": False, "starts": 0}


class FakeServer:
    """Stands for LaunchedServer: a Ray instance 'exists' between start() and stop()."""

    def __init__(self, *args, **kwargs):
        pass

    def start(self):
        world["alive"] = True
        world["starts"] += 1
        return 0.1

    def stop(self):
        world["alive"] = False

    def processes(self):
        return []


def test_launched_target_alternates_with_the_baseline_and_is_stopped_between(monkeypatch, tmp_path):
    monkeypatch.setattr(cluster, "_processes", lambda: [(10, RAYLET)] if world["alive"] else [])
    monkeypatch.setattr(cluster, "LaunchedServer", FakeServer)
    latencies = {"served": 0.012, "mono": 0.02, "in-process": 0.01}

    def fake_target(spec, config):
        cls = FakeInProcess if spec.url is None else FakeServed
        return cls(spec.name, latencies[spec.name])

    monkeypatch.setattr(core, "make_target", fake_target)
    FakeInProcess.checks = []
    config = BenchConfig(
        targets=(
            TargetSpec("served", url="http://fake/a"),
            TargetSpec("mono", url="http://fake/b"),
            TargetSpec("in-process"),
        ),
        levels=(Level("closed", 1), Level("closed", 2)),
        requests=3,
        warmup=1,
        progress=False,
        rounds=2,
        serve_config=str(CONFIGS / "colocated.yaml"),
    )
    result = run_benchmark(config)
    assert [(p["round"], p["kind"]) for p in result.phases] == phase_plan(2, True, True)
    assert world == {"alive": False, "starts": 2}  # started for each served phase, stopped after
    assert all(p["server"]["stopped"] for p in result.phases if p["kind"] == "served")
    assert all("no serving cluster alive" in p["alone"] for p in result.phases if p["kind"] == "in-process")
    assert FakeInProcess.checks and all(alive == [] for alive in FakeInProcess.checks)  # ran alone, every request
    for lr in result.levels:
        assert [r.round for r in lr.runs["served"]] == [1, 2] and [r.round for r in lr.runs["in-process"]] == [1, 2]
        assert len(lr.ratios["in-process"]["throughput"].values) == 2
        assert all("total" in run.cpu_ms_per_image for runs in lr.runs.values() for run in runs)
    goals = {g["check"]: g for g in result.goals()}
    assert set(goals) == {
        "p50 served / in-process at c=1",
        "peak img/s served / in-process (closed loop)",
        "img/s served / mono at c=1",
        "img/s served / mono at c=2",
    }
    assert len(goals["img/s served / mono at c=2"]["spread"]["values"]) == 2  # one per round
    data = result.to_json()
    assert data["goals"] and data["phases"] and len(data["levels"][0]["results"]["served"]["rounds"]) == 2
    assert data["levels"][0]["ratios_vs_served"]["in-process"]["throughput"]["median"] > 0
    from bench.report import write_report

    paths = write_report(result, tmp_path / "report")
    summary = paths["summary"].read_text()
    assert "## Goals (issues 12 and 14)" in summary and "| p50 served / in-process at c=1 |" in summary
    assert "| c=2 | in-process | 2 | 3/3 |" in summary  # every round's run, in its own row
    assert "phases: 1:served, 1:in-process, 2:served, 2:in-process" in summary
    import json

    assert json.loads(paths["report"].read_text())["levels"][1]["results"]["mono"]["rounds"][1]["records"]


def test_a_cluster_left_alive_stops_the_run_before_the_baseline(monkeypatch):
    """A server that does not go away (the stop leaves it running) fails the in-process phase."""

    class Stubborn(FakeServer):
        def stop(self):
            pass  # still alive

    world.update(alive=False, starts=0)
    monkeypatch.setattr(cluster, "_processes", lambda: [(10, RAYLET)] if world["alive"] else [])
    monkeypatch.setattr(cluster, "LaunchedServer", Stubborn)
    monkeypatch.setattr(
        core, "make_target", lambda spec, config: (FakeInProcess if spec.url is None else FakeServed)(spec.name, 0.001)
    )
    config = BenchConfig(
        targets=(TargetSpec("served", url="http://fake/a"), TargetSpec("in-process")),
        levels=(Level("closed", 1),),
        requests=1,
        warmup=0,
        progress=False,
        serve_config=str(CONFIGS / "colocated.yaml"),
    )
    with pytest.raises(DarkroomError, match="refusing to measure the in-process baseline"):
        run_benchmark(config)
    world["alive"] = False


def _args(*argv):
    from serve.cli import build_parser

    return build_parser().parse_args(["bench", "--requests", "4", *argv])


def test_serve_config_gives_the_url_threads_and_batch():
    from bench.cli import config_from_args, thread_counts

    cfg = config_from_args(_args("--serve", str(CONFIGS / "colocated.yaml"), "--in-process", "--serve-port", "8123"))
    assert [t.url for t in cfg.targets] == ["http://127.0.0.1:8123", None]
    assert cfg.torch_threads == 1 and cfg.max_batch == 8 and cfg.rounds == 2
    assert cfg.serve_config.endswith("colocated.yaml") and cfg.serve_port == 8123
    # The baseline runs the app's engines: its torch backend options and step cache (none here).
    assert cfg.torch_options["cuda_graphs"] is False and cfg.step_cache is None
    split = config_from_args(
        _args("--serve", str(CONFIGS / "side-by-side.yaml"), "--url", "http://127.0.0.1:8000/split", "--in-process")
    )
    import os

    cores = len(os.sched_getaffinity(0))
    assert split.torch_threads == min(3, cores)  # three model replicas of 1 thread, at most the cores
    # ... the most the baseline tries: one in-process target per count up to that, the goals take the best
    assert [t.torch_threads for t in split.in_process] == thread_counts(min(3, cores))
    explicit = config_from_args(
        _args("--serve", str(CONFIGS / "colocated.yaml"), "--in-process", "--torch-threads", "2")
    )
    assert [(t.name, t.torch_threads) for t in explicit.in_process] == [("in-process", 2)]  # asked for: exactly that


def test_compare_repeats_with_labels_and_a_reference():
    """--compare and --compare-label repeat, in order; --reference names one of the apps."""
    from bench.cli import config_from_args

    cfg = config_from_args(
        _args(
            *("--serve", str(CONFIGS / "side-by-side.yaml"), "--url", "http://127.0.0.1:8000/colocated"),
            *("--label", "colocated", "--compare", "http://127.0.0.1:8000/split", "--compare-label", "split"),
            *("--compare", "http://127.0.0.1:8000/mono", "--compare-label", "monolith"),
            *("--reference", "monolith", "--in-process", "--torch-threads", "1"),
        )
    )
    assert [(t.name, t.url) for t in cfg.targets] == [
        ("colocated", "http://127.0.0.1:8000/colocated"),
        ("split", "http://127.0.0.1:8000/split"),
        ("monolith", "http://127.0.0.1:8000/mono"),
        ("in-process", None),
    ]
    assert cfg.reference == "monolith"
    # The baseline is sized like --url's app (colocated: one replica of 1 thread), not the split app.
    assert cfg.torch_threads == 1
    unlabelled = config_from_args(
        _args("--url", "http://a:1/x", "--compare", "http://a:1/y", "--compare", "http://a:1/z")
    )
    assert [t.name for t in unlabelled.targets] == ["a:1/x", "a:1/y", "a:1/z"] and unlabelled.reference is None


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--url", "http://a:1/x", "--compare", "http://a:1/y", "--reference", "nope"], "--reference"),
        (
            ["--url", "http://a:1/x", "--compare", "http://a:1/y", "--compare-label", "y", "--compare-label", "z"],
            "--compare-label",
        ),
        (
            [
                "--serve",
                "deployments/configs/side-by-side.yaml",
                "--url",
                "http://127.0.0.1:8000/split",
                "--compare",
                "http://127.0.0.1:8000/mono",
                "--compare",
                "http://127.0.0.1:8000/nope",
            ],
            "--compare",
        ),
    ],
)
def test_compare_and_reference_errors_name_the_flag(argv, flag, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert darkroom(["bench", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"darkroom: error: {flag}:"), err


def test_serve_config_gives_the_baseline_its_model():
    """The in-process baseline runs the model the served app runs (a config naming ``tiny`` is
    not compared against the default demo model); --model names one for both."""
    from bench.cli import config_from_args

    lora = CONFIGS / "lora-bench.yaml"
    cfg = config_from_args(_args("--serve", str(lora), "--in-process", "--torch-threads", "1"))
    assert [t.model for t in cfg.in_process] == ["tiny"]
    assert cfg.serve_model is None
    # --model with --serve: the app the bench starts serves it too (darkroom serve --model).
    cfg = config_from_args(_args("--serve", str(lora), "--in-process", "--torch-threads", "1", "--model", "x"))
    assert [t.model for t in cfg.in_process] == ["x"] and cfg.serve_model == "x"
    from bench.core import _launched_server

    command = _launched_server(cfg).command()
    assert command[command.index("--model") + 1] == "x"
    default = config_from_args(
        _args("--serve", str(CONFIGS / "colocated.yaml"), "--in-process", "--torch-threads", "1")
    )
    assert [t.model for t in default.in_process] == [None]  # the default model, as the config's


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--serve", "deployments/configs/nope.yaml"], "--serve"),
        (["--serve", "deployments/configs/colocated.yaml", "--url", "http://127.0.0.1:9/x"], "--url"),
        (["--serve", "deployments/configs/colocated.yaml", "--rounds", "0"], "--rounds"),
        (["--serve", "deployments/configs/colocated.yaml", "--freeze"], "--freeze"),  # no --in-process
        (["--in-process", "--freeze"], "--freeze"),  # no --serve: nothing of its own to freeze
    ],
)
def test_serve_flag_errors_name_the_flag(argv, flag, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert darkroom(["bench", *argv, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"darkroom: error: {flag}:"), err


# -- CPU per image, by process -----------------------------------------------------------------------------


def test_cpu_per_image_by_process():
    import os
    import subprocess
    import sys

    from bench import cpu

    me = os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in cpu.tree(me) and me in cpu.tree(me)
        assert cpu.label(child.pid) == f"{Path(sys.executable).name} -c"
    finally:
        child.kill()
        child.wait()
    before = {me: 1.0, 42: 2.0, 43: 5.0}
    after = {me: 1.2, 42: 2.0, 43: 5.6, 44: 9.0}  # 44 started mid-run: not counted
    got = cpu.per_image(before, after, images=4)
    assert got[cpu.CLIENT] == pytest.approx(50.0) and got["total"] == pytest.approx(200.0)
    assert cpu.per_image(before, after, images=0) is None
    busy = cpu.snapshot([me])[me]
    sum(i * i for i in range(300_000))
    assert cpu.snapshot([me])[me] >= busy


def test_the_baseline_runs_with_the_apps_gil_switch_interval(tmp_path):
    """An app config's ``gil_switch_interval_ms`` reaches the in-process baseline, which sets it
    in the bench's process while it runs and restores the interval it found."""
    import asyncio
    import sys

    import yaml

    from bench.cli import config_from_args
    from bench.inprocess import InProcessTarget

    raw = yaml.safe_load((CONFIGS / "colocated.yaml").read_text())
    raw["applications"][0]["args"]["gil_switch_interval_ms"] = 2.0
    path = tmp_path / "colocated-si.yaml"
    path.write_text(yaml.safe_dump(raw))
    cfg = config_from_args(_args("--serve", str(path), "--in-process", "--torch-threads", "1"))
    assert cfg.gil_switch_interval_ms == 2.0
    # None in the file: the profile's default, as the replicas apply it (colocated 0.5 ms, split Python's).
    assert config_from_args(_args("--serve", str(CONFIGS / "colocated.yaml"))).gil_switch_interval_ms == 0.5
    assert config_from_args(_args("--serve", str(CONFIGS / "local.yaml"))).gil_switch_interval_ms is None

    before = sys.getswitchinterval()
    target = InProcessTarget("tiny", torch_threads=1, gil_switch_interval_ms=0.5)

    async def main():
        info = await target.start()
        during = sys.getswitchinterval()
        await target.close()
        return info, during

    info, during = asyncio.run(main())
    assert during == pytest.approx(0.0005) and info["gil_switch_interval_ms"] == 0.5
    assert sys.getswitchinterval() == before
