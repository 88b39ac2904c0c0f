"""Per-stage autoscaling and scale-to-zero on a multi-node Ray cluster; the local Serve YAMLs deploy.

Both tests run their Ray in a subprocess with its own RAY_TMPDIR, so nothing here touches the
session-wide Ray instance of the other integration tests (``ray_serve`` in conftest.py), and a
plain ``ray.init()`` elsewhere never finds these clusters' addresses.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port as _free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
HELPER = Path(__file__).with_name("autoscaling_cluster.py")
DARKROOM = shutil.which("darkroom")


@pytest.fixture
def ray_tmpdir() -> Iterator[str]:
    """A short private RAY_TMPDIR (Ray's socket paths must stay under ~107 characters)."""
    path = tempfile.mkdtemp(prefix="drk", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _env(ray_tmpdir: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    env.update(RAY_TMPDIR=ray_tmpdir, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), **extra)
    return env


def test_stages_autoscale_independently_and_scale_to_zero(tiny_model, tmp_path, ray_tmpdir):
    out = tmp_path / "autoscaling.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(HELPER),
            "--model",
            tiny_model,
            "--storage",
            str(tmp_path / "outputs"),
            "--workdir",
            str(tmp_path),
            "--out",
            str(out),
        ],
        cwd=ROOT,
        env=_env(ray_tmpdir),
        capture_output=True,
        text=True,
        timeout=600,  # ~150 s on an idle 2-core machine; far more when it is shared
    )
    assert out.is_file(), proc.stdout[-2000:] + proc.stderr[-4000:]
    r = json.loads(out.read_text())
    print(f"autoscaling timeline: {out}")  # kept with the test's tmp_path (pytest -s shows it)
    assert r["ok"], r.get("error", "") + proc.stderr[-4000:]

    # 1. Deployed on a 3-node cluster whose GPUs (logical) live on the two workers only.
    assert r["cluster_resources"] == {"CPU": 6.0, "GPU": 4.0}
    assert r["initial"] == {"Ingress": 1, "TextEncoder": 1, "Denoiser": 1, "Decoder": 1}

    # 2. Under Denoiser-bound load each stage followed its own settings: the Denoiser went to its
    #    max (3) while the TextEncoder (max 1) stayed at 1 and the Decoder within its max (2).
    assert r["load"]["ok"] == r["load"]["requests"] > 0, r["load"]
    assert r["peak_running"]["Denoiser"] == 3
    assert r["peak_running"]["TextEncoder"] == 1
    assert 1 <= r["peak_running"]["Decoder"] <= 2
    assert r["peak_running"]["Ingress"] == 1
    assert r["load"]["denoise_batch_max"] > 1  # the Denoiser batched across requests
    # Stage replicas sat on the GPU nodes (their num_gpus fractions) and used 3 + 0.25 + 0.25.
    placed = r["placement_under_load"]
    for stage in ("TextEncoder", "Denoiser", "Decoder"):
        assert placed[stage] and set(placed[stage]) == {"gpu-worker"}, placed
    assert 3.5 <= r["peak_gpus_used"] <= 4.0

    # 3. After the load every stage went back to zero and gave its GPUs back; the Ingress stayed.
    assert r["idle"] == {"Ingress": 1, "TextEncoder": 0, "Denoiser": 0, "Decoder": 0}
    assert r["idle_gpus_used"] == 0.0
    assert r["min_running_ingress_after_deploy"] == 1
    timeline = r["timeline"]
    after_load = [s for s in timeline if r["marks"]["load_end"] <= s["t"] <= r["marks"]["all_zero"]]
    denoisers = [s["running"]["Denoiser"] for s in after_load]
    assert denoisers[0] >= 2 and denoisers[-1] == 0 and 1 in denoisers  # 3 -> 1 -> 0, stepwise

    # 4. A request then came in at zero and was served: 200 with an image, each stage woken.
    cold = r["from_zero"]
    assert cold["status"] == 200 and cold["images"] == 1, cold
    assert cold["ok"], cold
    stages = cold["stages"]
    # The first stage's wait on the cold request was its replica start: seconds, vs ms warm.
    enc = stages["encode"]
    assert enc["cold_start_ms"] > 1000 and enc["warm_queue_ms"] < enc["cold_queue_ms"] / 2, stages
    # The Ingress woke the Denoiser and Decoder when the request arrived, so they started
    # alongside the TextEncoder: the cold request pays the slowest start, not the sum of three.
    waited_later = stages["denoise"]["cold_queue_ms"] + stages["decode"]["cold_queue_ms"]
    assert waited_later < enc["cold_queue_ms"], stages


@pytest.mark.skipif(DARKROOM is None, reason="the darkroom console script is not installed")
@pytest.mark.parametrize("config", ["serverless.yaml", "steady.yaml"])
def test_local_serve_yaml_deploys_with_darkroom_serve(config, tiny_model, tmp_path, ray_tmpdir):
    """`darkroom serve --config deployments/configs/<config>` as a user runs it: serves, stops."""
    from serve.tiny import TINY_MODEL_VERSION

    # The YAMLs name no model: each replica uses the tiny model in DARKROOM_CACHE_DIR. Put it
    # there first, so four replicas starting at once do not all write it.
    cache = tmp_path / "cache"
    shutil.copytree(tiny_model, cache / f"tiny-model-v{TINY_MODEL_VERSION}")
    port = _free_port()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(
        [DARKROOM, "serve", "--config", str(ROOT / "deployments/configs" / config), "--port", str(port)],
        cwd=tmp_path,  # storage ./outputs lands here
        env=_env(ray_tmpdir, DARKROOM_CACHE_DIR=str(cache)),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        serving = ""
        while "is serving at" not in serving:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            assert time.monotonic() < deadline, "darkroom serve did not become ready"
            try:
                serving = lines.get(timeout=1)
            except queue.Empty:
                pass
        url = f"http://127.0.0.1:{port}"
        r = httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a red fox", "num_inference_steps": 3, "seed": 1, "response_format": "b64_json"},
            timeout=180,
        )
        assert r.status_code == 200, r.text
        assert r.json()["data"][0]["b64_json"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own session: only what this test started
            code = proc.wait(timeout=30)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-4000:]
