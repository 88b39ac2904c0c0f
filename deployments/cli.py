"""``darkroom serve``: start (or join) a Ray cluster, deploy the app, print the URL, block.

Before Ray starts it refuses a busy port (one line naming what holds it, exit 2: see
``deployments/preflight.py``). While it starts it reports each stage (loading, ready) and then
prints a banner (``deployments/startup.py``); Ray's own output goes to a log file unless
``--verbose``. Ctrl-C or SIGTERM (also for a background job, whose SIGINT a shell ignores)
shuts down what this command started: the Serve app, and the local Ray cluster when it started
one (a cluster joined through RAY_ADDRESS is left running).

``darkroom serve --config FILE --check`` validates a Serve config file without starting Ray:
the file against Ray's own ``ServeDeploySchema``, each Darkroom application's ``args`` against
``AppConfig`` (which rejects unknown keys, autoscaling ones included), and deployment names.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import yaml

logger = logging.getLogger(__name__)

APP_NAME = "darkroom"
BUILDER = "deployments.app:build_app"
DEPLOYMENT_NAMES = ("Ingress", "TextEncoder", "Denoiser", "Decoder")
# AppConfig field of each deployment's options, by deployment name.
OPTIONS_FIELD = {"Ingress": "ingress", "TextEncoder": "text_encoder", "Denoiser": "denoiser", "Decoder": "decoder"}


def load_serve_config(path: Path) -> tuple[Any, dict[str, Any]]:
    """Parse and validate a Serve config file without starting Ray.

    Returns ``(ServeDeploySchema, {app name: AppConfig})`` for the applications built by
    ``deployments.app:build_app`` (others are checked by Ray's schema only). Raises
    ``InvalidRequestError`` naming ``--config`` and what is wrong.
    """
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    from deployments.config import AppConfig
    from serve.errors import InvalidRequestError

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidRequestError("--config", str(path), f"cannot read the file: {exc}") from None
    if not isinstance(raw, dict):
        raise InvalidRequestError("--config", str(path), "not a Serve config (a YAML mapping with applications)")
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as exc:
        raise InvalidRequestError("--config", str(path), f"not a valid Serve config: {exc}") from None
    apps: dict[str, Any] = {}
    for app in config.applications:
        if app.import_path != BUILDER:
            continue  # e.g. the monolithic baseline: Ray's schema is all we check
        for dep in app.deployments:
            if dep.name not in DEPLOYMENT_NAMES:
                raise InvalidRequestError(
                    "--config",
                    str(path),
                    f"application {app.name!r}: unknown deployment {dep.name!r} "
                    f"(Darkroom's are {', '.join(DEPLOYMENT_NAMES)})",
                )
        try:
            cfg = AppConfig.model_validate(app.args or {})
        except ValidationError as exc:
            raise InvalidRequestError("--config", str(path), f"application {app.name!r} args: {exc}") from None
        for name in DEPLOYMENT_NAMES:
            try:
                _check_deployment_options(getattr(cfg, OPTIONS_FIELD[name]).serve_options(name))
            except (ValidationError, ValueError, TypeError) as exc:
                raise InvalidRequestError(
                    "--config", str(path), f"application {app.name!r}, deployment {name}: {exc}"
                ) from None
        apps[app.name] = cfg
    return config, apps


def _check_deployment_options(options: dict[str, Any]) -> None:
    """What ``Deployment.options`` would get, through Ray's own schemas (no Ray start, no torch)."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, RayActorOptionsSchema

    # Ray's schema ignores unknown actor options (a typo such as num_gpu); its deploy rejects
    # them later, on the cluster: reject them here, from the same list of fields.
    unknown = sorted(set(options.get("ray_actor_options") or {}) - set(RayActorOptionsSchema.model_fields))
    if unknown:
        raise ValueError(
            f"ray_actor_options: unknown key(s) {unknown}; known: {sorted(RayActorOptionsSchema.model_fields)}"
        )
    DeploymentSchema.model_validate(options)
    if options.get("autoscaling_config"):
        AutoscalingConfig.model_validate(options["autoscaling_config"])


def describe_app(cfg: Any) -> list[str]:
    """One line per deployment: replicas (fixed or min..max) and resources, for ``--check``."""
    lines = []
    for name in DEPLOYMENT_NAMES:
        opts = getattr(cfg, OPTIONS_FIELD[name])
        if cfg.profile == "colocated" and name != "Ingress":
            lines.append(f"  {name}: inside each Ingress replica (colocated), max_batch_size {opts.max_batch_size}")
            continue
        if opts.autoscaling:
            auto = opts.autoscaling_config or {}
            hi = auto.get("max_replicas", 100 if opts.num_replicas == "auto" else 1)
            replicas = f"{opts.min_replicas}..{hi} replicas (target {auto.get('target_ongoing_requests', 2)} ongoing)"
        else:
            replicas = f"{opts.num_replicas if opts.num_replicas is not None else 1} replica(s)"
        res = opts.ray_actor_options
        lines.append(f"  {name}: {replicas}, num_cpus {res.get('num_cpus', 1)}, num_gpus {res.get('num_gpus', 0)}")
    return lines


def run_check(path: Path) -> int:
    config, apps = load_serve_config(path)
    print(f"{path}: valid Serve config, {len(config.applications)} application(s)")
    for app in config.applications:
        print(f"{app.name} at {app.route_prefix or '/'} ({app.import_path})")
        if app.name in apps:
            cfg = apps[app.name]
            print(
                f"  model {cfg.model or '(the shipped demo model)'}, backend {cfg.backend}, "
                f"storage {cfg.storage}, profile {cfg.profile}"
            )
            for line in describe_app(cfg):
                print(line)
        else:
            print(f"  not built by {BUILDER}: checked against Ray's schema only")
    return 0


def _http_of(path: Path, host: str | None, port: int | None) -> tuple[dict[str, Any], str, int]:
    """A Serve config file's raw dict with its http_options, --host/--port applied."""
    raw: dict[str, Any] = yaml.safe_load(path.read_text())
    http = dict(raw.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = port
    http.setdefault("host", "127.0.0.1")
    http.setdefault("port", 8000)
    raw["http_options"] = http
    return raw, http["host"], int(http["port"])


def with_model(raw: dict[str, Any], apps: dict[str, Any], model: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``darkroom serve --config FILE --model M``: every app of the file serves ``M`` instead of
    its own model (the raw config as deployed, and the validated ``AppConfig`` per app)."""
    raw = {
        **raw,
        "applications": [
            {**app, "args": {**(app.get("args") or {}), "model": model}} for app in raw.get("applications") or []
        ],
    }
    return raw, {name: cfg.model_copy(update={"model": model}) for name, cfg in apps.items()}


def _deploy_config(raw: dict[str, Any]) -> list[tuple[str, str]]:
    """Deploy every application of a Serve config, as ``serve run config.yaml`` does; returns
    ``(name, route prefix)`` per application (not waiting for them)."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config)
    return [(app.name, app.route_prefix or "/") for app in config.applications]


def deploy_config_file(
    path: Path, host: str | None, port: int | None, timeout_s: float, say: Any = lambda _: None
) -> tuple[str, int, list[str]]:
    """The ``darkroom serve --config`` deployment on a running Ray: deploy every application of
    the file, report each stage to ``say`` until all run (bounded); ``(host, port, prefixes)``."""
    from deployments.startup import wait_until_deployed

    raw, host, port = _http_of(Path(path), host, port)
    apps = _deploy_config(raw)
    wait_until_deployed([name for name, _ in apps], timeout_s, say, time.monotonic())
    return host, port, [prefix for _, prefix in apps]


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM both stop the server (KeyboardInterrupt), installed explicitly: a
    background job started from a script has SIGINT ignored (SIG_IGN), and Ray installs its own
    SIGTERM handler in ray.init."""

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


def _lora_uri(value: str) -> str:
    """``--loras``: an s3:// URI as is; a folder made absolute and checked before Ray starts."""
    if value.startswith("s3://"):
        return value
    path = Path(value[len("file://") :] if value.startswith("file://") else value).expanduser().resolve()
    if not path.is_dir():
        from serve.errors import InvalidRequestError

        raise InvalidRequestError("--loras", value, "is not a folder (nor an s3://bucket/prefix)")
    return str(path)


def run_serve(args: argparse.Namespace) -> int:
    if args.check:
        if not args.config:
            from serve.errors import InvalidRequestError

            raise InvalidRequestError("--check", True, "needs --config FILE (the file to validate)")
        return run_check(Path(args.config))
    from deployments.config import AppConfig
    from deployments.preflight import check_port, port_holder
    from serve.errors import InvalidRequestError

    if args.config and args.loras:
        from serve.errors import InvalidRequestError

        raise InvalidRequestError("--loras", args.loras, "with --config, set lora_repository in the app's args")
    if args.config and args.profile:
        from serve.errors import InvalidRequestError

        raise InvalidRequestError("--profile", args.profile, "a --config file sets profile in its args")
    if args.config:
        _, apps = load_serve_config(Path(args.config))  # fail on a bad file before starting Ray
        raw, host, port = _http_of(Path(args.config), args.host, args.port)
        if args.model:
            raw, apps = with_model(raw, apps, args.model)
        cfg = next(iter(apps.values()), None)
    else:
        raw, host, port = None, args.host or "127.0.0.1", args.port or 8000
        app_args: dict[str, Any] = {
            "storage": args.storage,
            "backend": args.backend,
            "profile": args.profile or "split",
        }
        if args.model:
            app_args["model"] = args.model
        if args.loras:
            app_args["lora_repository"] = _lora_uri(args.loras)
        cfg = AppConfig.model_validate(app_args)
    address = os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # Before Ray: Serve's proxy would share a busy port (SO_REUSEPORT) or die in a traceback.
        check_port(host, port)
        if args.metrics_port is not None:
            holder = port_holder("127.0.0.1", args.metrics_port)
            if holder is not None:
                raise InvalidRequestError("--metrics-port", args.metrics_port, f"in use by {holder}")
    elif args.metrics_port is not None:
        raise InvalidRequestError(
            "--metrics-port",
            args.metrics_port,
            "applies to the local cluster darkroom serve starts, not to RAY_ADDRESS",
        )
    _stop_on_signals()
    from deployments.startup import ServeConsole

    with ServeConsole(quiet=not args.verbose) as console:
        return _serve(args, console, host, port, address, raw, cfg)


def _serve(
    args: argparse.Namespace, console: Any, host: str, port: int, address: str | None, raw: Any, cfg: Any
) -> int:
    from deployments.startup import banner, has_playground, results_location, wait_ready, wait_until_deployed
    from serve.model import resolve_source
    from serve.settings import Settings

    t0 = time.monotonic()
    if args.config:
        console.say(f"Darkroom: the applications of {args.config}")
    else:
        console.say(f"Darkroom: model {cfg.model or '(the shipped demo model)'}, backend {cfg.backend}")
    if cfg is not None:
        resolve_source(cfg.model)  # a tiny model is made into the cache once here, not by four replicas

    import ray
    from ray import serve

    from deployments.app import build_app

    started_ray = False
    try:
        if not ray.is_initialized():
            # A new local cluster even if another one runs on this machine (never join one by
            # accident), without the dashboard (it executes code for whoever reaches it,
            # CVE-2023-48022), every port on loopback (deployments/local_cluster.py).
            from deployments.local_cluster import start_local_cluster

            quiet = {"logging_level": logging.WARNING, "log_to_driver": args.verbose}
            if address is None:
                console.say("starting a local Ray cluster ...")
                start_local_cluster(metrics_port=args.metrics_port, **quiet)
            else:
                console.say(f"joining Ray at {address} ...")
                ray.init(address=address, **quiet)
            started_ray = address is None
            _stop_on_signals()  # again: ray.init installs its own SIGTERM handler
        console.say(f"deploying (Ray up in {time.monotonic() - t0:.0f} s):")
        if raw is not None:
            apps = _deploy_config(raw)
        else:
            serve.start(http_options={"host": host, "port": port})
            # Not serve.run: it returns only once every stage runs; the progress is ours to show.
            serve._run(build_app(cfg), _blocking=False, name=APP_NAME, route_prefix="/")
            apps = [(APP_NAME, "/")]
        wait_until_deployed([name for name, _ in apps], args.ready_timeout, console.say, t0)
        url = f"http://{host}:{port}{apps[0][1].rstrip('/')}"
        wait_ready(url, args.ready_timeout)
        keys = bool((cfg.api_keys if cfg else ()) or Settings.from_env().api_keys)
        storage = results_location(cfg.storage) if cfg else "see the config's storage"
        console.say(f"ready in {time.monotonic() - t0:.0f} s")
        for line in banner(url, storage, keys, has_playground(url)):
            console.show(line)
        if args.metrics_port is not None:
            console.show(f"  metrics:    http://127.0.0.1:{args.metrics_port}/metrics (Prometheus; docs/operating.md)")
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.say("shutting down ...")
        return 0
    finally:
        # A second Ctrl-C would abandon the cluster half stopped: finish stopping first.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()
        console.say("stopped")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP on Ray Serve (blocks; Ctrl-C stops)")
    p.add_argument(
        "--model",
        default=None,
        help="diffusers folder, hub id, exported repository or tiny (default: the shipped demo model; "
        "with --config: replaces the model of every app in the file)",
    )
    p.add_argument("--storage", default="./outputs", help="result store: a folder or s3://bucket/prefix")
    p.add_argument("--backend", default="torch", help="engine backend (default: torch)")
    p.add_argument(
        "--loras",
        default=None,
        help='LoRA adapter repository requests may choose from ("loras": [{name, scale}]): a folder or '
        "s3://bucket/prefix of NAME.safetensors files (diffusers or kohya keys); new files need no restart",
    )
    p.add_argument(
        "--profile",
        choices=("split", "colocated"),
        default=None,
        help="split: a deployment per stage; colocated: every stage inside the Ingress replica (one process, "
        "no stage hops: the shape for one GPU or a small machine) (default: split; --config files set their own)",
    )
    p.add_argument("--host", default=None, help="HTTP host (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8000)")
    p.add_argument(
        "--config",
        default=None,
        help="a Serve config YAML (import_path + args), e.g. "
        "deployments/configs/local.yaml; --host/--port override its http_options",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="with --config: validate the file (Ray's ServeDeploySchema + Darkroom's AppConfig) "
        "and print each deployment's replicas and resources, without starting Ray",
    )
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for /readyz")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="pin Ray's Prometheus exporter of the local cluster to this port: "
        "http://127.0.0.1:PORT/metrics serves the darkroom_* series (default: a free port)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's own output here (start warnings, Serve's messages, the workers' logs); "
        "by default it goes to a log file, named if the start fails",
    )
    p.set_defaults(func=run_serve)
