"""EXPERIMENT HELPER for bench/results/README.md: deploy every app of a Serve config and wait.

Like ``darkroom serve --config FILE --port PORT``, but deploys with ``_blocking=False`` and waits
on each app's ``/readyz`` for up to 15 minutes: ``darkroom serve --config`` gave up twice on this
2-core machine under load with Ray's own 60 s "Serve application isn't running" limit.

    python bench/results/experiment/deploy_config.py bench/results/experiment/four-apps.yaml 8124
"""

import logging
import sys
import time
from pathlib import Path

import httpx
import ray
import yaml
from ray.serve._private import api as serve_api
from ray.serve.schema import ServeDeploySchema

raw = yaml.safe_load(Path(sys.argv[1]).read_text())
raw["http_options"]["port"] = port = int(sys.argv[2])
ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
config = ServeDeploySchema.model_validate(raw)
client = serve_api.serve_start(http_options=config.http_options.model_dump(), proxy_location=config.proxy_location)
client.deploy_apps(config, _blocking=False)
for app in config.applications:
    url = f"http://127.0.0.1:{port}{(app.route_prefix or '/').rstrip('/')}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    print("ready:", url, flush=True)
while True:  # SIGTERM stops the cluster this script started
    time.sleep(60)
