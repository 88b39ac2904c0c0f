"""Per-stage autoscaling and scale-to-zero on a local multi-node Ray cluster (run as a script).

tests/integration/test_autoscaling.py runs this in a subprocess, so its cluster never meets the
session-wide Ray instance the other integration tests share (pass RAY_TMPDIR too: Ray's
``Cluster`` writes its address to ``$RAY_TMPDIR/ray/ray_current_cluster``, where a later plain
``ray.init()`` would find and join it). It prints nothing but a final JSON line and writes the
full result (replica-count timeline included) to ``--out``.

The cluster: a head node with 2 CPUs and no GPU (controller, proxy) and two worker nodes with
2 CPUs and 2 *logical* GPUs each (the Ingress, needing no GPU, may land on any node). Stages ask
for GPU fractions as on a real GPU cluster (TextEncoder 0.25, Denoiser 1, Decoder 0.25), so they
can only be placed on the "GPU" workers, and run the tiny model on CPU (``device: cpu``). The app
is deployments/configs/serverless.yaml with test-sized delays (seconds, not minutes) and the
Denoiser allowed 3 replicas.

Phases, each with a bounded wait:
  1. deploy: one replica per deployment (``initial_replicas: 1``: started in parallel);
  2. load: concurrent clients with many denoise steps, until the Denoiser holds its max;
  3. idle: every stage back to 0, Ingress still 1;
  4. from zero: one request, served (200 + an image), with bench.cold_start's per-stage
     breakdown of its wait against warm requests sent at the end of phase 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.cold_start import ColdStartConfig, Sample, cold_start_breakdown, send_one  # noqa: E402
from tests.ports import free_port  # noqa: E402

STAGES = ("TextEncoder", "Denoiser", "Decoder")
NAMES = ("Ingress", *STAGES)
GPUS = {"text_encoder": 0.25, "denoiser": 1.0, "decoder": 0.25}
# Short, so a test sees a whole up/down cycle in about a minute (production values: the YAMLs).
# The to-zero delay must still outlast the other stages' cold starts (~8 s each here): a stage
# idles while a request waits on the next one, and with a 3 s delay TextEncoder was back at zero
# before a cold request left the Decoder, so every request paid every cold start again. And a
# fast stage's few-ms calls are seldom caught by the sampled ongoing-request metric, so it looks
# idle from its last sampled call on, even while it serves a trickle.
FAST = {
    "metrics_interval_s": 0.5,
    "look_back_period_s": 1.0,
    "upscale_delay_s": 1.0,
    "downscale_delay_s": 2.0,
    "downscale_to_zero_delay_s": 30.0,
}
MAX_REPLICAS = {"text_encoder": 1, "denoiser": 3, "decoder": 2}
TARGETS = {"text_encoder": 16, "denoiser": 2, "decoder": 8}


def app_config(model: str, storage: str, port: int) -> dict[str, Any]:
    """deployments/configs/serverless.yaml with the test's model, storage, GPUs and delays."""
    raw = yaml.safe_load((ROOT / "deployments/configs/serverless.yaml").read_text())
    raw["http_options"] = {"host": "127.0.0.1", "port": port}
    args = raw["applications"][0]["args"]
    args.update(model=model, storage=storage, device="cpu", request_timeout_s=150, stage_timeout_s=150)
    for field, gpus in GPUS.items():
        opts = args[field]
        opts["ray_actor_options"] = {"num_cpus": 0.1, "num_gpus": gpus}
        auto = opts["autoscaling_config"]
        auto.update(FAST, max_replicas=MAX_REPLICAS[field], target_ongoing_requests=TARGETS[field])
        # Start warm (in parallel, during the deploy) rather than pay three cold starts one after
        # another in the load phase: scale-from-zero is what phase 4 measures.
        auto["initial_replicas"] = 1
        opts["graceful_shutdown_timeout_s"] = 10
    args["denoiser"]["max_batch_size"] = 4
    # 50 ms per UNet step (fault injection, 0 in production): the load phase's requests pile up
    # in the Denoiser (and batch there) however fast the machine is.
    args["debug_step_delay_s"] = 0.05
    return raw


def wait_for(what: str, pred: Callable[[], bool], timeout_s: float, every_s: float = 0.2) -> float:
    """Poll ``pred`` until true; returns the seconds it took. Raises TimeoutError naming ``what``."""
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - t0


class Recorder:
    """Samples replica counts per deployment (and GPUs in use) on a thread, every ``period_s``."""

    def __init__(self, app: str, t0: float, period_s: float = 0.25) -> None:
        self.app, self.t0, self.period_s = app, t0, period_s
        self.timeline: list[dict[str, Any]] = []
        self.latest: dict[str, dict[str, int]] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def sample(self) -> dict[str, Any]:
        import ray
        from ray import serve

        status = serve.status().applications.get(self.app)
        counts: dict[str, dict[str, int]] = {}
        for name in NAMES:
            dep = status.deployments.get(name) if status else None
            states = {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()}
            counts[name] = {"running": states.get("RUNNING", 0), "starting": states.get("STARTING", 0)}
        gpu_total = ray.cluster_resources().get("GPU", 0.0)
        gpu_free = ray.available_resources().get("GPU", 0.0)
        self.latest = counts
        return {
            "t": round(time.monotonic() - self.t0, 2),
            "app_status": str(getattr(status.status, "value", status.status)) if status else None,
            "running": {n: c["running"] for n, c in counts.items()},
            "starting": {n: c["starting"] for n, c in counts.items()},
            "gpus_used": round(gpu_total - gpu_free, 3),
        }

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.timeline.append(self.sample())
            except Exception as exc:  # keep sampling; report what went wrong
                self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            self._stop.wait(self.period_s)

    def running(self, name: str) -> int:
        return self.latest.get(name, {}).get("running", 0)

    def replicas(self, name: str) -> int:
        c = self.latest.get(name, {})
        return c.get("running", 0) + c.get("starting", 0)


def placement(app: str) -> dict[str, list[str]]:
    """Kind of node ("gpu-worker" / "head") of each running replica, per deployment."""
    import ray
    from ray.serve.context import _get_global_client

    gpu_nodes = {n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0}
    details = _get_global_client().get_serve_details()
    deployments = details.get("applications", {}).get(app, {}).get("deployments", {})
    out: dict[str, list[str]] = {}
    for name, dep in deployments.items():
        out[name] = sorted(
            "gpu-worker" if r.get("node_id") in gpu_nodes else "head"
            for r in dep.get("replicas", [])
            if r.get("state") == "RUNNING"
        )
    return out


def drive_load(url: str, clients: int, steps: int, stop: threading.Event) -> list[Sample]:
    """``clients`` closed-loop clients sending requests until ``stop`` is set."""
    results: list[Sample] = []
    lock = threading.Lock()
    cfg = ColdStartConfig(url=url, steps=steps, timeout_s=150)

    def client(i: int) -> None:
        with httpx.Client(base_url=url) as http:
            n = 0
            while not stop.is_set():
                sample = send_one(http, ColdStartConfig(**{**cfg.__dict__, "seed": i * 1000 + n}))
                n += 1
                with lock:
                    results.append(sample)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(timeout=160)
    return results


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Fill ``result`` as it goes, so a failure still leaves the timeline so far."""
    import ray
    from ray.cluster_utils import Cluster

    from deployments.cli import deploy_config_file

    t0 = time.monotonic()
    result.update(phases={}, config={"fast": FAST, "max_replicas": MAX_REPLICAS, "gpus": GPUS})
    phases = result["phases"]
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "num_gpus": 0, "include_dashboard": False},
    )
    recorder: Recorder | None = None
    try:
        for _ in range(2):
            cluster.add_node(num_cpus=2, num_gpus=2)
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        phases["cluster_up_s"] = round(time.monotonic() - t0, 2)
        result["cluster_resources"] = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}

        port = free_port()
        config_path = Path(args.workdir) / "serverless-test.yaml"
        config_path.write_text(yaml.safe_dump(app_config(args.model, args.storage, port)))
        t_deploy = time.monotonic()
        host, port, _ = deploy_config_file(config_path, None, None, 240)  # the `darkroom serve --config` path
        url = f"http://{host}:{port}"
        recorder = Recorder("darkroom", t0)
        recorder.start()
        wait_for("ingress up", lambda: _healthy(url), 60)
        wait_for("first status sample", lambda: bool(recorder.latest), 10)
        phases["deployed_s"] = round(time.monotonic() - t_deploy, 2)
        result["initial"] = {n: recorder.replicas(n) for n in NAMES}

        marks = result["marks"] = {}  # phase boundaries on the timeline's clock (s)

        def mark(name: str) -> None:
            marks[name] = round(time.monotonic() - t0, 2)

        # 2. load until the Denoiser holds its max replicas (bounded): requests pile up at the
        #    Denoiser, which scales on its own target while TextEncoder and Decoder keep theirs.
        stop = threading.Event()
        holder: dict[str, list[Sample]] = {}
        loader = threading.Thread(
            target=lambda: holder.setdefault("r", drive_load(url, args.clients, args.load_steps, stop)), daemon=True
        )
        mark("load_start")
        loader.start()
        try:
            wait_for("Denoiser at max", lambda: recorder.running("Denoiser") >= MAX_REPLICAS["denoiser"], 120)
            mark("denoiser_at_max")
            time.sleep(1.0)
            result["placement_under_load"] = placement("darkroom")
        finally:
            stop.set()
            loader.join(timeout=170)
        mark("load_end")
        # Warm reference for the cold-start breakdown, taken now that every stage is up (after
        # the idle phase a warm request could meet a stage already back at zero).
        with httpx.Client(base_url=url) as http:
            warm = [
                send_one(http, ColdStartConfig(url=url, steps=args.steps, timeout_s=150, seed=100 + i))
                for i in range(2)
            ]
        samples = holder.get("r", [])
        result["load"] = {
            "clients": args.clients,
            "steps": args.load_steps,
            "requests": len(samples),
            "ok": sum(s.ok for s in samples),
            "errors": [s.error for s in samples if not s.ok][:5],
            "denoise_batch_max": max((s.timings.get("denoise_batch", 0) for s in samples), default=0),
        }

        # 3. idle: every stage back to zero, the Ingress still up.
        t_idle = time.monotonic()
        to_zero: dict[str, float] = {}

        def all_zero() -> bool:
            now = round(time.monotonic() - t_idle, 2)
            for n in STAGES:
                if recorder.replicas(n) == 0:
                    to_zero.setdefault(n, now)
                else:
                    to_zero.pop(n, None)
            return len(to_zero) == len(STAGES)

        wait_for("stages at zero", all_zero, 60)
        mark("all_zero")
        phases["to_zero_after_load_s"] = to_zero
        result["idle"] = {n: recorder.replicas(n) for n in NAMES}
        # Stopped replicas give their (logical) GPUs back: on a real cluster the autoscaler can
        # then release the GPU machines.
        wait_for("GPUs released", lambda: ray.available_resources().get("GPU", 0.0) >= 4.0, 20)
        result["idle_gpus_used"] = recorder.sample()["gpus_used"]

        # 4. one request from zero: served, and its per-stage cold start against the warm ones.
        mark("cold_request")
        with httpx.Client(base_url=url) as http:
            cold = send_one(http, ColdStartConfig(url=url, steps=args.steps, timeout_s=240, seed=7))
        mark("cold_done")
        result["from_zero"] = cold_start_breakdown(cold, warm)
        result["from_zero"].update(status=cold.status, images=cold.images, error=cold.error)
        result["from_zero"]["warm_errors"] = [w.error for w in warm if not w.ok]
        time.sleep(0.5)
    finally:
        if recorder is not None:
            recorder.stop()
            result["timeline"] = recorder.timeline
            result["recorder_errors"] = recorder.errors[:5]
        _shutdown(cluster)
    timeline = result.get("timeline", [])
    result["peak_running"] = {n: max((s["running"][n] for s in timeline), default=0) for n in NAMES}
    result["min_running_ingress_after_deploy"] = min(
        (s["running"]["Ingress"] for s in timeline if s["app_status"] == "RUNNING"), default=0
    )
    result["peak_gpus_used"] = max((s["gpus_used"] for s in timeline), default=0.0)
    result["total_s"] = round(time.monotonic() - t0, 2)


def _healthy(url: str) -> bool:
    # /healthz, not /readyz: readiness calls every stage, which would wake them from zero.
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _shutdown(cluster: Any) -> None:
    import ray
    from ray import serve

    for step in (serve.shutdown, ray.shutdown, cluster.shutdown):
        try:
            step()
        except Exception as exc:  # best effort: the next step still runs
            print(f"shutdown: {type(exc).__name__}: {exc}", file=sys.stderr)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="tiny model folder")
    p.add_argument("--storage", required=True, help="result folder")
    p.add_argument("--workdir", required=True, help="scratch folder (the derived Serve YAML)")
    p.add_argument("--out", required=True, help="JSON result file")
    p.add_argument("--steps", type=int, default=4, help="denoise steps of the cold/warm requests")
    p.add_argument("--load-steps", type=int, default=20, help="denoise steps under load (Denoiser-bound)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients under load")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result: dict[str, Any] = {"ok": False}
    try:
        run(args, result)
        result["ok"] = True
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "timeline"}, default=str))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
