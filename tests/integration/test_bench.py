"""The load benchmark against the live local app, the monolithic baseline and the in-process pipeline.

Small on purpose (2 steps, a handful of requests): these check the benchmark's plumbing and
outputs, not performance. The measured numbers live in bench/results/.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench import BenchConfig, Level, TargetSpec, Workload, run_benchmark
from bench.report import write_report
from serve.api import parse_generation_request
from serve.imageio import decode_image
from tests.conftest import max_level_diff
from tests.integration.conftest import app_args

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
TIMING_KEYS = {
    "encode",
    "denoise",
    "decode",
    "storage",
    "encode_queue",
    "denoise_queue",
    "decode_queue",
    "encode_batch",
    "denoise_batch",
    "decode_batch",
    "total",
}


def _wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready")


@pytest.fixture(scope="module")
def mono_url(ray_serve, tiny_model, tmp_path_factory) -> str:
    """The monolithic baseline (one ``Monolith`` deployment) at /mono, same args as the split app."""
    from ray import serve

    from deployments.monolith import build_monolith_app

    storage = tmp_path_factory.mktemp("mono-outputs")
    serve.run(
        build_monolith_app(app_args(tiny_model, str(storage))), name="monolith", route_prefix="/mono", blocking=False
    )
    url = f"http://127.0.0.1:{ray_serve}/mono"
    _wait_ready(url)
    yield url
    serve.delete("monolith")


def _check_outputs(out: Path) -> dict:
    for name in ("report.json", "summary.md", "latency_cdf.png", "load.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (out / "load.png").read_bytes().startswith(b"\x89PNG")
    report = json.loads((out / "report.json").read_text())
    assert report["metadata"]["machine"]["cpu_count"] >= 1
    assert report["metadata"]["versions"]["httpx"]
    assert report["metadata"]["started_at"] and report["metadata"]["finished_at"]
    assert report["config"]["order"].startswith("phases per round")
    return report


def test_benchmark_function_closed_and_open_loop(local_app, tmp_path):
    config = BenchConfig(
        targets=(TargetSpec("split", url=local_app["url"]),),
        levels=(Level("closed", 1), Level("closed", 3), Level("open", 4.0)),
        workload=Workload(seed=3, steps=STEPS),
        requests=4,
        warmup=1,
        slo_ms=60_000,
        progress=False,
    )
    result = run_benchmark(config)
    paths = write_report(result, tmp_path)
    assert [p.name for p in paths["plots"]] == ["latency_cdf.png", "load.png"]
    report = _check_outputs(tmp_path)
    assert [lv["level"]["label"] for lv in report["levels"]] == ["c=1", "c=3", "rate=4/s"]
    for lr in result.levels:
        m = lr.run("split").metrics
        assert (m.requests, m.ok, m.errors_by_status) == (4, 4, {}), lr.run("split").records
        assert m.throughput_ips > 0 and m.goodput_rps == pytest.approx(m.throughput_rps)
        assert 0 < m.latency_ms.p50 <= m.latency_ms.p99 <= m.latency_ms.max
        assert m.stages_ms["denoise"].mean > 0 and m.stages_ms["total"].mean > 0
        records = lr.run("split").records
        assert all(set(r.timings) == TIMING_KEYS for r in records)
        assert [r.index for r in sorted(records, key=lambda r: r.index)] == [0, 1, 2, 3]
    # Concurrent clients share batches at c=3.
    assert result.levels[1].run("split").metrics.batch_sizes["denoise_batch"].max >= 1
    entry = report["levels"][2]["results"]["split"]["rounds"][0]
    assert len(entry["records"]) == 4 and entry["metrics"]["latency_ms"]["p50"] > 0
    summary = (tmp_path / "summary.md").read_text()
    assert "| c=3 | split | 1 | 4/4 |" in summary and "Ratios" not in summary


def test_monolith_serves_the_same_api_with_diffusers_images(mono_url, local_app, reference):
    body = {
        "prompt": "a lighthouse",
        "seed": 11,
        "num_inference_steps": 3,
        "negative_prompt": "fog",
        "scheduler": "euler_a",
    }
    r = httpx.post(f"{mono_url}/v1/images/generations", json={**body, "response_format": "b64_json"}, timeout=120)
    assert r.status_code == 200, r.text
    got = decode_image(base64.b64decode(r.json()["data"][0]["b64_json"]))
    want = reference(parse_generation_request(body).to_params(default_size=(64, 64)))
    assert max_level_diff(got[None], want) == 0  # it is diffusers' own pipeline
    assert set(r.json()["timings"]) == TIMING_KEYS
    assert "denoise;dur=" in r.headers["server-timing"]
    # The same request to the split app: same response shape, same image within the contract.
    s = httpx.post(
        f"{local_app['url']}/v1/images/generations", json={**body, "response_format": "b64_json"}, timeout=120
    )
    assert set(s.json()) == set(r.json()) and set(s.json()["timings"]) == TIMING_KEYS
    assert max_level_diff(decode_image(base64.b64decode(s.json()["data"][0]["b64_json"]))[None], want) <= 3
    # url responses, errors and readiness come from the same serve.api routes.
    u = httpx.post(f"{mono_url}/v1/images/generations", json={"prompt": "a cat", "num_inference_steps": 2}, timeout=120)
    assert httpx.get(u.json()["data"][0]["url"], timeout=30).content.startswith(b"\x89PNG")
    bad = httpx.post(f"{mono_url}/v1/images/generations", json={"prompt": "a", "n": 11}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "n"
    ready = httpx.get(f"{mono_url}/readyz", timeout=30).json()
    assert ready["checks"] == {"Monolith": "ok", "storage": "ok"}


def test_cli_compare_with_monolith(local_app, mono_url, tmp_path):
    out = tmp_path / "run"
    args = [
        sys.executable, "-m", "serve.cli", "bench",
        "--url", local_app["url"], "--label", "split",
        "--compare", mono_url, "--compare-label", "monolith",
        "--concurrency", "2", "--rate", "3", "--rounds", "2",
        "--requests", "3", "--warmup", "1", "--steps", str(STEPS), "--size", "64x64",
        "--slo-ms", "60000", "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = _check_outputs(out)
    assert list(report["targets"]) == ["split", "monolith"]
    assert [(p["round"], p["kind"]) for p in report["phases"]] == [(1, "served"), (2, "served")]
    for level in report["levels"]:
        for name in ("split", "monolith"):
            for run in level["results"][name]["rounds"]:
                m = run["metrics"]
                assert m["ok"] == m["requests"] == 3 and m["throughput_ips"] > 0, (name, m)
        ratios = level["ratios_vs_split"]
        assert set(ratios) == {"monolith"}
        for k in ("throughput", "p50", "p99"):
            spread = ratios["monolith"][k]
            assert len(spread["values"]) == 2 and spread["min"] <= spread["median"] <= spread["max"]
    # The identical schedule: both targets got the same open-loop arrival offsets, in every round.
    rate_level = report["levels"][1]["results"]
    offsets = {n: [[r["scheduled"] for r in run["records"]] for run in rate_level[n]["rounds"]] for n in rate_level}
    assert offsets["split"] == offsets["monolith"] and offsets["split"][0] == offsets["split"][1]
    summary = (out / "summary.md").read_text()
    assert "Ratios vs `split`" in summary and "| c=2 | monolith | 2 |" in summary
    # The goal checks, with their spreads: img/s in a closed loop, p50 at a Poisson rate (8b08400).
    assert "| img/s split / monolith at c=2 |" in summary and "| p50 split / monolith at rate=3/s |" in summary
    assert "wrote" in proc.stdout and "[split c=2 round 1]" in proc.stderr  # plain progress lines (no tty)


def test_cli_refuses_in_process_beside_the_live_cluster(local_app, tmp_path):
    """This session's cluster is alive: the in-process baseline would share its cores. One line, exit 2."""
    args = [
        sys.executable, "-m", "serve.cli", "bench", "--url", local_app["url"], "--in-process",
        "--requests", "2", "--steps", str(STEPS), "--out", str(tmp_path / "run"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("darkroom: error: refusing to measure the in-process baseline beside a live")
    assert "a Ray instance (pid" in lines[0] and not (tmp_path / "run").exists()


def _colocated_on_a_free_port(tmp_path):
    import yaml

    from tests.ports import free_port

    port = free_port()
    raw = yaml.safe_load((ROOT / "deployments" / "configs" / "colocated.yaml").read_text())
    raw["http_options"]["port"] = port
    raw["applications"][0]["args"]["storage"] = str(tmp_path / "outputs")
    config_path = tmp_path / "colocated.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    return config_path, port


def _launched_colocated_vs_in_process(tmp_path, ignore_sessions, **kwargs):
    """The colocated app, launched by the bench on a free port, vs the in-process baseline: c=1 and
    c=2, 3 requests, 2 rounds (clusters alive before the test, such as this session's, ignored)."""
    config_path, port = _colocated_on_a_free_port(tmp_path)
    return BenchConfig(
        targets=(TargetSpec("colocated", url=f"http://127.0.0.1:{port}"), TargetSpec("in-process")),
        levels=(Level("closed", 1), Level("closed", 2)),
        workload=Workload(seed=5, steps=STEPS),
        requests=3,
        warmup=1,
        progress=False,
        rounds=2,
        torch_threads=1,
        serve_config=str(config_path),
        serve_log=str(tmp_path / "serve.log"),
        ignore_sessions=ignore_sessions,
        **kwargs,
    )


def test_bench_freezes_the_served_app_for_the_baseline(tmp_path):
    """--freeze on a real launched app: started once, every process of it (Ray's included) frozen
    for each in-process run (no CPU used meanwhile), thawed, still serving every request after
    it, and stopped at the end with nothing left behind."""
    from bench.cluster import live_clusters

    before = tuple(sorted(c.session for c in live_clusters() if c.session))
    config = _launched_colocated_vs_in_process(tmp_path, before, freeze_served=True)
    result = run_benchmark(config)
    assert [(p["round"], p["kind"], p["level"]) for p in result.phases] == [
        (r, k, lv) for r in (1, 2) for lv in ("c=1", "c=2") for k in ("served", "in-process")
    ]
    assert result.phases[0]["server"]["start_s"] > 0
    for p in result.phases:
        if p["kind"] == "in-process":
            assert p["frozen"]["processes"] >= 5 and p["frozen"]["cpu_s"] == 0, p  # Ray's too, and still
    assert [c for c in live_clusters() if c.session not in before and c.kind == "ray"] == []
    for lr in result.levels:
        for name in ("colocated", "in-process"):
            assert [r.metrics.ok for r in lr.runs[name]] == [3, 3], name  # served after every thaw
        assert lr.run("colocated").cpu_ms_per_image["total"] > 0


def test_bench_starts_and_stops_the_served_app_around_the_baseline(tmp_path):
    """--serve: the bench starts the app (darkroom serve --config) for each served phase and stops it,
    Ray cluster included, before each in-process phase (A/B/A/B); every in-process phase checked
    that no serving cluster was alive (clusters alive before the test, such as this session's, are
    ignored: the test cannot stop them)."""
    from bench.cluster import live_clusters

    before = tuple(sorted(c.session for c in live_clusters() if c.session))
    config = _launched_colocated_vs_in_process(tmp_path, before)
    result = run_benchmark(config)
    phases = [(p["round"], p["kind"]) for p in result.phases]
    assert phases == [(1, "served"), (1, "in-process"), (2, "served"), (2, "in-process")]
    for p in result.phases:
        if p["kind"] == "served":
            assert p["server"]["stopped"] and p["server"]["start_s"] > 0
        else:
            assert p["alone"].startswith("no serving cluster alive")
    # Nothing the bench started is left behind.
    assert [c for c in live_clusters() if c.session not in before and c.kind == "ray"] == []
    assert result.targets["in-process"]["torch_threads"] == 1
    for lr in result.levels:
        for name in ("colocated", "in-process"):
            assert [r.metrics.ok for r in lr.runs[name]] == [3, 3], name
        assert len(lr.ratios["in-process"]["p50"].values) == 2
        served_cpu = lr.run("colocated").cpu_ms_per_image  # the launched server's processes, by name
        assert served_cpu["total"] > 0 and any(k.startswith("ray::ServeReplica") for k in served_cpu), served_cpu
        assert set(lr.run("in-process").cpu_ms_per_image) <= {"bench client (this process)", "total"}
    assert {g["check"] for g in result.goals()} == {
        "p50 colocated / in-process at c=1",
        "peak img/s colocated / in-process (closed loop)",
    }


def test_monolith_configs_validate_and_build(tiny_model, tmp_path):
    from ray.serve import Application

    from deployments.cli import load_serve_config
    from deployments.monolith import build_monolith_app

    for name in ("monolith.yaml", "side-by-side.yaml"):
        config, _ = load_serve_config(ROOT / "deployments" / "configs" / name)
        mono = [a for a in config.applications if a.import_path == "deployments.monolith:build_monolith_app"]
        assert len(mono) == 1
        assert isinstance(build_monolith_app({**mono[0].args, "model": tiny_model}), Application)
    app = build_monolith_app({"storage": str(tmp_path), "monolith": {"max_ongoing_requests": 7, "max_batch_size": 1}})
    assert isinstance(app, Application)
    with pytest.raises(ValueError):
        build_monolith_app({"monolith": {"bogus": 1}})


def test_cli_cold_start_goes_into_the_report(local_app, tmp_path):
    """--cold-start measures the first request before the load and reports it per stage."""
    out = tmp_path / "cold"
    args = [
        sys.executable, "-m", "serve.cli", "bench", "--url", local_app["url"], "--cold-start",
        "--concurrency", "1", "--requests", "2", "--warmup", "0", "--steps", str(STEPS), "--out", str(out),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["cold_start"]["breakdown"]["stages"]
    assert set(stages) >= {"encode", "denoise", "decode"}
    assert report["cold_start"]["cold"]["status"] == 200
    assert "Scale-from-zero cold start" in (out / "summary.md").read_text()
