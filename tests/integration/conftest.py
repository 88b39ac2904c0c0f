"""Integration fixtures: a real S3 protocol endpoint (moto's server) on loopback.

The server runs in this process, so its state survives a stop/start on the same port; tests
use that to simulate an outage. Each test gets a reset server and a fresh bucket.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from tests.ports import free_port as _free_port

logger = logging.getLogger(__name__)


def _wait_until_up(endpoint: str, timeout_s: float = 10.0) -> None:
    """Bounded wait: the server thread is listening when start() returns, but be sure."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            httpx.get(f"{endpoint}/moto-api/", timeout=1.0)
            return
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class MotoController:
    """Start, stop and restart moto's threaded server on one fixed loopback port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._server: ThreadedMotoServer | None = None

    def start(self) -> None:
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        _wait_until_up(self.endpoint)

    def stop(self) -> None:
        """Stop serving and close the listening socket, so clients get "connection refused".

        ThreadedMotoServer.stop() only ends the serve loop; without server_close() the port
        stays bound, connections hang in the backlog and a restart on the port fails.
        """
        if self._server is None:
            return
        self._server.stop()
        inner: Any = getattr(self._server, "_server", None)
        if inner is not None:
            inner.server_close()
        self._server = None

    def reset(self) -> None:
        httpx.post(f"{self.endpoint}/moto-api/reset", timeout=10.0).raise_for_status()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoController]:
    """The controller behind ``s3_server``, for tests that need to stop and restart it."""
    with pytest.MonkeyPatch.context() as mp:
        # Only boto3's standard variables, and nothing from the developer's own AWS setup.
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        controller = MotoController()
        controller.start()
        mp.setenv("AWS_ENDPOINT_URL", controller.endpoint)
        logger.info("moto S3 server on %s", controller.endpoint)
        try:
            yield controller
        finally:
            controller.stop()


@pytest.fixture(scope="session")
def s3_server(moto_server: MotoController) -> str:
    """Endpoint URL of the session's S3 server; AWS_* env vars already point boto3 at it."""
    return moto_server.endpoint


@pytest.fixture
def s3_client(s3_server: str) -> Any:
    """A raw boto3 client for checking what a store really wrote."""
    return boto3.session.Session().client("s3", endpoint_url=s3_server)


@pytest.fixture
def s3_bucket(moto_server: MotoController, s3_client: Any) -> str:
    """Reset the server, create a fresh bucket, and return ``s3://bucket/prefix`` for it."""
    moto_server.reset()
    bucket = f"darkroom-test-{uuid.uuid4().hex[:12]}"
    s3_client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/results"


# --- A real local Ray Serve cluster, shared by the whole session ------------------------------

SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


def app_args(model: str, storage: str, **overrides: Any) -> dict[str, Any]:
    """build_app args sized for a 2-core machine: tiny CPU shares, explicit queue limits."""
    args: dict[str, Any] = {
        "model": model,
        "storage": storage,
        "ingress": {**SMALL, "max_ongoing_requests": 256, "max_batch_size": 1},
        "text_encoder": {
            **SMALL,
            "max_ongoing_requests": 64,
            "max_batch_size": 16,
            "batch_wait_timeout_s": 0.02,
        },
        "denoiser": {**SMALL, "max_ongoing_requests": 32, "max_batch_size": 8, "batch_wait_timeout_s": 0.05},
        "decoder": {**SMALL, "max_ongoing_requests": 32, "max_batch_size": 8, "batch_wait_timeout_s": 0.02},
        "request_timeout_s": 120,
        "stage_timeout_s": 120,
    }
    args.update(overrides)
    return args


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict[str, int]]:
    """One local Ray cluster + Serve for the session (Ray start costs ~10 s here), started as
    ``darkroom serve`` starts it (every port on loopback, the proxy's middleware), with Ray's
    metrics exporter pinned: yields the HTTP and metrics ports."""
    ray = pytest.importorskip("ray")
    from ray import serve

    from deployments.local_cluster import start_local_cluster

    port, metrics_port = _free_port(), _free_port()
    start_local_cluster(
        metrics_port=metrics_port,
        num_cpus=8,
        logging_level=logging.WARNING,
        log_to_driver=False,
        # Metrics reach the exporter every 2 s instead of 10: tests that read them wait less.
        _system_config={"metrics_report_interval_ms": 2000},
    )
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        yield {"port": port, "metrics_port": metrics_port}
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="session")
def ray_serve(ray_cluster: dict[str, int]) -> int:
    """The session cluster's Serve HTTP port."""
    return ray_cluster["port"]


def deploy(name: str, prefix: str, args: dict[str, Any], port: int) -> str:
    from ray import serve

    from deployments.app import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix, blocking=False)
    url = f"http://127.0.0.1:{port}{prefix.rstrip('/')}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"app {name} not ready")


@pytest.fixture(scope="session")
def local_app(ray_serve: int, tiny_model: str, tmp_path_factory) -> dict[str, Any]:
    """The app on the tiny model with local storage, at the root route."""
    storage = tmp_path_factory.mktemp("outputs")
    # 30 ms per UNet step (fault injection, 0 in production): concurrent requests of a few steps
    # certainly overlap in the Denoiser, so tests of batching do not depend on the machine's speed.
    url = deploy("local", "/", app_args(tiny_model, str(storage), debug_step_delay_s=0.03), ray_serve)
    return {"url": url, "storage": storage, "port": ray_serve}
