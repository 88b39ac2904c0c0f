"""``darkroom serve``: start (or join) a Ray cluster, deploy the app, print the URL, block.

Ctrl-C (or SIGTERM) shuts down what this command started: the Serve app, and the local Ray
cluster when it started one (a cluster joined through RAY_ADDRESS is left running).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

APP_NAME = "darkroom"


def _wait_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return
            last = r.text[:300]
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"the app did not become ready within {timeout_s:.0f} s: {last}")


def _deploy_config(path: Path, host: str | None, port: int | None) -> tuple[str, int, list[str]]:
    """Deploy every application of a Serve config file, as ``serve run config.yaml`` does."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    http = dict(raw.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    raw["http_options"] = http
    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config, _blocking=True)
    prefixes = [app.route_prefix or "/" for app in config.applications]
    return http["host"], int(http["port"]), prefixes


def run_serve(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app

    started_ray = False
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        # "local" starts a new cluster even if another one runs on this machine (never join one
        # by accident). The dashboard executes code for whoever reaches it (CVE-2023-48022):
        # off in the cluster we start.
        ray.init(
            address=address or "local",
            include_dashboard=False if address is None else None,
            logging_level=logging.WARNING,
            log_to_driver=args.verbose,
        )
        started_ray = address is None

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        if args.config:
            host, port, prefixes = _deploy_config(Path(args.config), args.host, args.port)
        else:
            host, port = args.host or "127.0.0.1", args.port or 8000
            serve.start(http_options={"host": host, "port": port})
            app_args: dict[str, Any] = {"storage": args.storage, "backend": args.backend}
            if args.model:
                app_args["model"] = args.model
            serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
            prefixes = ["/"]
        url = f"http://{host}:{port}"
        _wait_ready(url + prefixes[0].rstrip("/"), args.ready_timeout)
        print(f"Darkroom is serving at {url}{prefixes[0].rstrip('/')} (Ctrl-C to stop)", flush=True)
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("shutting down ...", file=sys.stderr, flush=True)
        return 0
    finally:
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP on Ray Serve (blocks; Ctrl-C stops)")
    p.add_argument("--model", default=None, help="diffusers folder, hub id or exported repository (default: tiny)")
    p.add_argument("--storage", default="./outputs", help="result store: a folder or s3://bucket/prefix")
    p.add_argument("--backend", default="torch", help="engine backend (default: torch)")
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--config",
        default=None,
        help="a Serve config YAML (import_path + args), e.g. "
        "deployments/configs/local.yaml; --host/--port override its http_options",
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    p.add_argument("--verbose", action="store_true", help="stream Ray's worker logs to this terminal")
    p.set_defaults(func=run_serve)
