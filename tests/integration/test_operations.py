"""Operating the live app on a local Ray cluster: request ids through every stage's logs, metrics on
Ray's endpoint, per-key limits, every port on loopback, the monolith's auth/limits/policy, and the
image safety check withholding images."""

from __future__ import annotations

import os
import re
import time
import uuid
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from serve.metrics import CATALOGUE
from tests.integration.conftest import app_args, deploy
from tests.integration.raylogs import LogWatch, descendants, is_loopback, listening_sockets

pytestmark = pytest.mark.integration

KEY, LIMITED = "ops-key", "ops-limited"
CHEAP = {"num_inference_steps": 2}
STAGES = ("Ingress", "TextEncoder", "Denoiser", "Decoder")


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def ops(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    storage = tmp_path_factory.mktemp("ops")
    args = app_args(
        tiny_model,
        str(storage),
        api_keys=[KEY, LIMITED],
        rate_limits={"keys": {LIMITED: {"requests_per_minute": 6, "burst": 2}}},
        prompt_policy={"blocklist": ["forbidden"]},
    )
    url = deploy("ops", "/ops", args, ray_cluster["port"])
    yield {"url": url, "storage": storage, **ray_cluster}
    serve.delete("ops")


def post(url: str, body: dict, key: str = KEY, **headers: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/images/generations", json=body, headers={**auth(key), **headers}, timeout=120)


def test_request_id_is_echoed_once_and_every_stage_logs_it(ops):
    watch = LogWatch()
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    r = post(ops["url"], {"prompt": "a traced lighthouse", **CHEAP}, **{"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    assert r.headers.get_list("x-request-id") == [rid]  # the proxy's, not a second copy of ours
    made = post(ops["url"], {"prompt": "untraced", **CHEAP}).headers.get_list("x-request-id")
    assert len(made) == 1 and made[0]
    seen: dict[str, list[str]] = defaultdict(list)

    def every_stage_logged(line: dict) -> bool:
        if line["request_id"] == rid:
            seen[line["stage"]].append(line["message"])
        # The Decoder logs when a call arrives and again once its images are stored: wait for both.
        return set(seen) >= set(STAGES) and any("stored" in m for m in seen["Decoder"])

    watch.wait_for(every_stage_logged, timeout_s=30)
    assert any(m.startswith("POST") for m in seen["Ingress"]), seen["Ingress"]  # the access line
    assert any("encode" in m for m in seen["TextEncoder"])
    assert any("denoise" in m for m in seen["Denoiser"])
    assert any("stored" in m for m in seen["Decoder"])


def scrape(port: int) -> dict[str, dict[str, set[str]]]:
    """``{series name: {label: values}}`` of Ray's Prometheus endpoint."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    out: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for line in text.splitlines():
        m = re.match(r"(ray_darkroom_[a-z_]+)\{(.*)\}\s", line)
        if m:
            for key, value in re.findall(r'(\w+)="([^"]*)"', m.group(2)):
                out[m.group(1)][key].add(value)
    return out


def test_metrics_appear_on_rays_endpoint(ops):
    url = ops["url"]
    for _ in range(2):  # the same prompt twice: prompt-cache hits
        assert post(url, {"prompt": "a metered harbour", **CHEAP}).status_code == 200
    assert post(url, {"prompt": "x", "n": 99}).status_code == 400
    assert post(url, {"prompt": "a forbidden thing"}).status_code == 400
    assert httpx.get(f"{url}/v1/models", headers=auth("wrong"), timeout=30).status_code == 401
    job = httpx.post(f"{url}/v1/images/jobs", json={"prompt": "a metered job", **CHEAP}, headers=auth(), timeout=60)
    assert job.status_code == 202
    wait_job(url, job.json()["id"])
    # Everything a run without faults records; stage retries and store errors need a fault
    # (test_faults.py kills replicas).
    expected = {
        name for name in CATALOGUE if name not in ("darkroom_stage_retries_total", "darkroom_store_errors_total")
    }
    deadline = time.monotonic() + 60
    while True:
        series = scrape(ops["metrics_port"])
        names = {re.sub(r"_(bucket|sum|count)$", "", n).removeprefix("ray_") for n in series}
        if names >= expected and series["ray_darkroom_requests_total"]["stage"] >= set(STAGES):
            break
        assert time.monotonic() < deadline, sorted(expected - names)
        time.sleep(1)
    requests = series["ray_darkroom_requests_total"]
    assert {"Ingress", "TextEncoder", "Denoiser", "Decoder"} <= requests["deployment"]  # Serve's own label
    assert {"200", "400", "401"} <= requests["status"]
    assert {"invalid", "content_policy", "unauthenticated"} <= series["ray_darkroom_rejected_total"]["reason"]
    assert "hit" in series["ray_darkroom_prompt_cache_total"]["result"]
    assert {"submitted", "succeeded"} <= series["ray_darkroom_jobs_total"]["event"]
    assert {"image", "job"} <= series["ray_darkroom_store_seconds_bucket"]["op"]


def wait_job(url: str, job_id: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = httpx.get(f"{url}/v1/images/jobs/{job_id}", headers=auth(), timeout=30).json()
        if state["status"] in ("succeeded", "failed"):
            return state
        assert time.monotonic() < deadline, state
        time.sleep(0.2)


def test_per_key_requests_per_minute_is_a_429_with_retry_after(ops):
    statuses = [post(ops["url"], {"prompt": "limited", **CHEAP}, key=LIMITED) for _ in range(3)]
    assert [r.status_code for r in statuses[:2]] == [200, 200]
    r = statuses[2]  # burst 2, then one token per 10 s
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert post(ops["url"], {"prompt": "unlimited key", **CHEAP}).status_code == 200  # another key


def test_local_cluster_listens_on_loopback_only(ops):
    """Every TCP port the cluster's processes (GCS, raylet, workers, agents, Serve's proxy,
    controller and replicas: all descendants of this test process) listen on is loopback."""
    sockets = listening_sockets(descendants(os.getpid()))
    ports = {port for _, port, _, _ in sockets}
    assert ops["port"] in ports and ops["metrics_port"] in ports  # the check sees the cluster's servers
    replicas = [s for s in sockets if "ServeReplica" in s[3]]
    assert len({pid for _, _, pid, _ in replicas}) >= 4  # ... and every replica's (gRPC servers)
    exposed = [s for s in sockets if not is_loopback(s[0])]
    assert exposed == [], exposed


def test_monolith_enforces_auth_limits_policy_and_the_image_check(ray_cluster, tiny_model, tmp_path_factory):
    """The baseline app builds its service config with the split app's builder: the same keys,
    body limit, request limits, prompt policy and image check."""
    from ray import serve

    from deployments.monolith import build_monolith_app
    from serve.tiny.safety import write_tiny_safety_checker

    storage = tmp_path_factory.mktemp("mono-sec")
    checker = write_tiny_safety_checker(tmp_path_factory.mktemp("checker"), "flag-all")
    args = app_args(
        tiny_model,
        str(storage),
        api_keys=[KEY],
        max_body_bytes=2048,
        limits={"max_steps": 4},
        prompt_policy={"blocklist": ["forbidden"], "image_checker": str(checker)},
    )
    for stage in ("ingress", "text_encoder", "denoiser", "decoder"):
        args.pop(stage)
    serve.run(build_monolith_app(args), name="mono-sec", route_prefix="/mono-sec", blocking=False)
    url = f"http://127.0.0.1:{ray_cluster['port']}/mono-sec"
    try:
        wait_ready(url)
        assert_enforces_auth_limits_policy_and_the_image_check(url, storage)
    finally:
        serve.delete("mono-sec")


def test_colocated_enforces_auth_limits_policy_and_the_image_check(ray_cluster, tiny_model, tmp_path_factory):
    """The colocated profile too: one service-config builder, and its in-replica Decoder loads the
    policy's image checker as the split Decoder deployment does."""
    from ray import serve

    from serve.tiny.safety import write_tiny_safety_checker

    storage = tmp_path_factory.mktemp("colo-sec")
    checker = write_tiny_safety_checker(tmp_path_factory.mktemp("checker"), "flag-all")
    args = app_args(
        tiny_model,
        str(storage),
        profile="colocated",
        api_keys=[KEY],
        max_body_bytes=2048,
        limits={"max_steps": 4},
        prompt_policy={"blocklist": ["forbidden"], "image_checker": str(checker)},
    )
    url = deploy("colo-sec", "/colo-sec", args, ray_cluster["port"])
    try:
        assert_enforces_auth_limits_policy_and_the_image_check(url, storage)
    finally:
        serve.delete("colo-sec")


def assert_enforces_auth_limits_policy_and_the_image_check(url: str, storage: Path) -> None:
    assert httpx.post(f"{url}/v1/images/generations", json={"prompt": "x"}, timeout=60).status_code == 401
    assert post(url, {"prompt": "x" * 4000}).status_code == 413
    r = post(url, {"prompt": "a forbidden thing", **CHEAP})
    assert r.status_code == 400 and r.json()["error"]["code"] == "content_policy_violation"
    r = post(url, {"prompt": "too many steps", "num_inference_steps": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "num_inference_steps"
    r = post(url, {"prompt": "allowed, generated, then withheld", **CHEAP})
    assert r.status_code == 400 and r.json()["error"]["code"] == "moderation_blocked", r.text
    assert list(Path(storage).rglob("*.png")) == []


def wait_ready(url: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not ready")


def test_image_check_that_flags_everything_stores_nothing(ray_cluster, tiny_model, tmp_path_factory):
    from ray import serve

    from serve.tiny.safety import write_tiny_safety_checker

    storage = tmp_path_factory.mktemp("safe")
    checker = write_tiny_safety_checker(tmp_path_factory.mktemp("checker"), "flag-all")
    args = app_args(tiny_model, str(storage), api_keys=[KEY], prompt_policy={"image_checker": str(checker)})
    url = deploy("safe", "/safe", args, ray_cluster["port"])
    try:
        r = post(url, {"prompt": "an innocent meadow", **CHEAP, "n": 2})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "moderation_blocked" and err["type"] == "image_generation_user_error"
        assert "withheld" in err["message"]
        job = httpx.post(f"{url}/v1/images/jobs", json={"prompt": "a job", **CHEAP}, headers=auth(), timeout=60)
        state = wait_job(url, job.json()["id"])
        assert state["status"] == "failed" and state["error"]["code"] == "moderation_blocked"
        assert list(Path(storage).rglob("*.png")) == []
    finally:
        serve.delete("safe")
