"""``darkroom bench``: drive a served app (and optionally a second one, and the in-process
pipeline: its limit) with a seeded workload at several load levels; write report.json, summary.md, plots.

The in-process baseline runs alone: with ``--serve CONFIG`` the bench starts the app for each
served phase and stops it (its Ray cluster included) before each in-process phase, alternating
``--rounds`` times (A/B/A/B), and runs the in-process pipeline once per torch thread count
1, 2, 4, ... up to the app's model replicas' threads together (more threads are not always
faster, and which count wins depends on the load); the goals take the best count in each round.
Without ``--serve`` it refuses to run the in-process phase while a serving cluster is alive on
this machine.

Examples::

    darkroom bench --url http://127.0.0.1:8000 --concurrency 1,2,4,8 --requests 40 --steps 20
    darkroom bench --url http://127.0.0.1:8000/split --compare http://127.0.0.1:8000/mono \\
        --rate 1,2,4 --duration 60 --arrival gamma --burstiness 0.5 --slo-ms 5000
    darkroom bench --in-process --concurrency 1,8 --requests 40 --steps 20
    darkroom bench --url http://127.0.0.1:8000 --rate 2 --duration 10m --steps 20   # a soak
    darkroom bench --serve deployments/configs/colocated.yaml --in-process --rounds 2 \\
        --concurrency 1,8 --requests 40 --steps 20
    darkroom bench --url http://127.0.0.1:8000/mixed --compare http://127.0.0.1:8000/grouped \\
        --loras style0,style1,style2,style3 --concurrency 8 --requests 64 --steps 20
    darkroom bench --serve deployments/configs/side-by-side.yaml --url http://127.0.0.1:8000/colocated \\
        --label colocated --compare http://127.0.0.1:8000/split --compare-label split \\
        --compare http://127.0.0.1:8000/mono --compare-label monolith --reference monolith \\
        --in-process --freeze --concurrency 1,4,16 --rate 2,5    # every profile, one run

``--compare`` repeats; ``--reference LABEL`` checks every other app against that one (the goals
table: img/s at least its own in a closed loop, p50 at most its own at a rate).

With ``--loras``, every served target runs twice per level: as given, then "+loras" (each
request with one adapter drawn, seeded, from the list); the summary compares the two and shows
the Denoiser's adapter-cache hit rate.
    darkroom bench --url http://127.0.0.1:8000 --compare-stream --partial-images 3 --concurrency 16 \\
        --requests 200 --steps 20 --size 64x64    # streaming vs not, same app, same requests
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from serve.errors import InvalidRequestError

_SIZE = re.compile(r"[0-9]+x[0-9]+")
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)\s*(s|m|h)?")
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """``"600"``, ``"30s"``, ``"10m"``, ``"1.5h"`` -> seconds (argparse type of ``--duration``)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None or float(match[1]) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 600, 30s, 10m or 1h")
    return float(match[1]) * _UNIT_S[match[2]]


def parse_levels(text: str | None, mode: str, flag: str) -> list[Any]:
    """``"1,2,4"`` -> closed levels at 1, 2, 4 clients (``mode="open"``: req/s, floats)."""
    from bench.runner import Level

    if not text:
        return []
    levels = []
    for part in text.split(","):
        try:
            value = float(part) if mode == "open" else int(part)
            levels.append(Level(mode, value))
        except ValueError:
            kind = "a rate > 0 (req/s)" if mode == "open" else "an integer >= 1"
            raise InvalidRequestError(flag, text, f"each comma-separated value must be {kind}") from None
    return levels


def _label(url: str) -> str:
    parts = urlsplit(url)
    return (parts.netloc + parts.path.rstrip("/")) or url


def _ignored_sessions() -> tuple[str, ...]:
    from serve.settings import Settings

    return Settings.from_env().bench_ignore_sessions


def config_from_args(args: argparse.Namespace) -> Any:
    from bench.core import BenchConfig, TargetSpec
    from bench.schedule import DEFAULT_PROMPTS, Workload, read_prompts

    serve_plan = plan_serve(args) if args.serve else None
    if not args.url and not args.in_process:
        raise InvalidRequestError("--url", None, "give a URL to benchmark, --serve CONFIG, or --in-process")
    if args.rounds is not None and args.rounds < 1:
        raise InvalidRequestError("--rounds", args.rounds, "must be >= 1")
    if args.freeze and not (args.serve and args.in_process):
        raise InvalidRequestError(
            "--freeze", True, "needs --serve CONFIG and --in-process (it freezes the app it starts)"
        )
    compares = args.compare or []
    labels = args.compare_label or []
    if compares and not args.url:
        raise InvalidRequestError("--compare", compares[0], "needs --url (the first target)")
    if len(labels) > len(compares):
        raise InvalidRequestError("--compare-label", labels[-1], "names more targets than --compare gives")
    if args.compare_stream and not args.url:
        raise InvalidRequestError("--compare-stream", True, "needs --url (the app to stream from)")
    if args.compare_stream and (compares or args.stream):
        raise InvalidRequestError(
            "--compare-stream", True, "compares --url with itself: leave out --compare and --stream"
        )
    if not 0 <= args.partial_images <= 3:
        raise InvalidRequestError("--partial-images", args.partial_images, "must be within 0..3 (OpenAI's range)")
    if args.size is not None and not _SIZE.fullmatch(args.size):
        raise InvalidRequestError("--size", args.size, "must be WIDTHxHEIGHT, e.g. 512x512")
    levels = parse_levels(args.concurrency, "closed", "--concurrency") + parse_levels(args.rate, "open", "--rate")
    if not levels:
        levels = parse_levels("1", "closed", "--concurrency")
    if args.requests is not None and args.duration is not None:
        raise InvalidRequestError("--duration", args.duration, "give --requests or --duration, not both")
    loras = tuple(n.strip() for n in (args.loras or "").split(",") if n.strip())
    if loras and args.in_process:
        raise InvalidRequestError("--loras", args.loras, "applies to --url/--compare (served apps), not --in-process")
    targets = []
    streaming = {"stream": args.stream, "partial_images": args.partial_images if args.stream else 0}
    pairs = [(args.url, args.label)] + [(u, labels[i] if i < len(labels) else None) for i, u in enumerate(compares)]
    for url, label in pairs:
        if url:
            name = label or _label(url)
            targets.append(TargetSpec(name, url=url, **streaming))
            if loras:  # the same load with adapters, right after the same load without
                targets.append(TargetSpec(f"{name} +loras", url=url, loras=True, **streaming))
    if args.compare_stream:
        name = f"{args.label or _label(args.url)} streaming {args.partial_images} partial images"
        targets.append(TargetSpec(name, url=args.url, stream=True, partial_images=args.partial_images))
    served_names = [t.name for t in targets]
    if args.reference is not None and args.reference not in served_names:
        raise InvalidRequestError("--reference", args.reference, f"names no served target: {', '.join(served_names)}")
    if args.in_process:
        model = args.model or (serve_plan["model"] if serve_plan else None)  # the served app's model
        if args.torch_threads:
            targets.append(TargetSpec("in-process", model=model, torch_threads=args.torch_threads))
        else:
            counts = thread_counts(serve_plan["torch_threads"] if serve_plan else None)
            for n in counts:  # one target per count: the goals take the best (bench/inprocess.py)
                name = "in-process" if len(counts) == 1 else f"in-process {n} thread{'s' if n > 1 else ''}"
                targets.append(TargetSpec(name, model=model, torch_threads=n))
    try:
        prompts = read_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
    except (OSError, ValueError) as exc:
        raise InvalidRequestError("--prompts", str(args.prompts), str(exc)) from None
    workload = Workload(
        prompts=prompts,
        seed=args.seed,
        size=args.size,
        steps=args.steps,
        n=args.n,
        guidance_scale=args.guidance,
        response_format=args.response_format,
        lora_scale=args.lora_scale,
    )
    try:
        return BenchConfig(
            targets=tuple(targets),
            levels=tuple(levels),
            workload=workload,
            requests=args.requests if args.duration is None else None,
            duration_s=args.duration,
            warmup=args.warmup,
            slo_ms=args.slo_ms,
            arrival=args.arrival,
            burstiness=args.burstiness,
            timeout_s=args.timeout,
            ready_timeout_s=args.ready_timeout,
            max_batch=args.max_batch or (serve_plan["max_batch"] if serve_plan else 8),
            torch_threads=args.torch_threads or (serve_plan["torch_threads"] if serve_plan else None),
            progress=not args.quiet,
            loras=loras,
            memory_interval_s=args.memory_interval,
            rounds=args.rounds or (5 if args.freeze else 2 if args.serve and args.in_process else 1),
            freeze_served=args.freeze,
            serve_config=str(args.serve) if args.serve else None,
            torch_options=serve_plan["torch_options"] if serve_plan else None,
            step_cache=serve_plan["step_cache"] if serve_plan else None,
            gil_switch_interval_ms=serve_plan["gil_switch_interval_ms"] if serve_plan else None,
            serve_port=args.serve_port,
            serve_model=args.model if args.serve else None,
            serve_log=str(args.serve_log) if args.serve_log else None,
            ignore_sessions=_ignored_sessions(),
            reference=args.reference,
        )
    except ValueError as exc:
        raise InvalidRequestError("bench", None, str(exc)) from None


def thread_counts(most: int | None) -> list[int]:
    """The in-process baseline's torch thread counts: 1, 2, 4, ... and ``most`` itself, up to
    ``most`` (the served app's model threads together; None: this machine's cores)."""
    from bench.machine import usable_cores

    most = usable_cores() if most is None else most
    counts, n = [], 1
    while n < most:
        counts.append(n)
        n *= 2
    return [*counts, max(1, most)]


def plan_serve(args: argparse.Namespace) -> dict[str, Any]:
    """For ``--serve CONFIG``: validate the file (no Ray), default ``--url`` to its first app, and
    size the in-process baseline like the app behind ``--url``: its model (unless ``--model``
    names one), the torch threads of its model replicas together (capped at this machine's
    cores), its Denoiser's batch limit, its torch backend options and step cache."""
    from bench.machine import usable_cores
    from deployments.cli import load_serve_config

    path = Path(args.serve)
    try:
        config, apps = load_serve_config(path)
    except InvalidRequestError as exc:
        raise InvalidRequestError("--serve", str(path), exc.reason) from None
    http = config.http_options
    host = http.host if http.host not in (None, "0.0.0.0", "::") else "127.0.0.1"
    port = args.serve_port or http.port
    urls = {app.name: f"http://{host}:{port}{(app.route_prefix or '/').rstrip('/')}" for app in config.applications}
    if not urls:
        raise InvalidRequestError("--serve", str(path), "the config has no application")
    if not args.url:
        args.url = next(iter(urls.values()))
    elif args.url.rstrip("/") not in urls.values():
        raise InvalidRequestError("--url", args.url, f"the --serve config serves {', '.join(urls.values())}")
    for compare in args.compare or []:
        if compare.rstrip("/") not in urls.values():
            raise InvalidRequestError("--compare", compare, f"the --serve config serves {', '.join(urls.values())}")
    by_url = {url: name for name, url in urls.items()}
    cfg = apps.get(by_url[args.url.rstrip("/")]) or next(iter(apps.values()), None)
    cores = usable_cores()
    if cfg is None:
        return {
            "torch_threads": None,
            "max_batch": 8,
            "torch_options": None,
            "step_cache": None,
            "model": None,
            "gil_switch_interval_ms": None,
        }
    return {
        "torch_threads": min(cfg.model_torch_threads(), cores),
        "max_batch": cfg.denoiser.max_batch_size,
        "torch_options": cfg.torch.model_dump(mode="json"),
        "step_cache": cfg.step_cache.model_dump(mode="json") if cfg.step_cache else None,
        "model": cfg.model,
        "gil_switch_interval_ms": cfg.gil_interval_ms(),
    }


def run_bench(args: argparse.Namespace) -> int:
    from bench.core import run_benchmark
    from bench.report import summary_markdown, write_report

    if args.requests is None and args.duration is None:
        args.requests = 20
    config = config_from_args(args)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    out = args.out or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    cold = measure_cold(args) if args.cold_start else None  # before the load warms anything
    result = run_benchmark(config)
    paths = write_report(result, out, include_records=not args.no_records)
    if cold is not None:
        add_cold_start(paths, cold)
    print(summary_markdown(result))
    print(f"wrote {paths['report']}, {paths['summary']}" + "".join(f", {p}" for p in paths["plots"]))
    failed = sum(run.metrics.failed for lr in result.levels for runs in lr.runs.values() for run in runs)
    if failed:
        print(f"darkroom bench: {failed} request(s) failed (see errors in {paths['summary']})", file=sys.stderr)
    return 0


def measure_cold(args: argparse.Namespace) -> dict[str, Any]:
    """Scale-from-zero cold start per stage (bench/cold_start.py), against ``--url``."""
    from bench.cold_start import ColdStartConfig, format_report, measure_cold_start

    if not args.url:
        raise InvalidRequestError("--cold-start", None, "needs --url (a served app)")
    cfg = ColdStartConfig(url=args.url, steps=args.steps or 20, idle_s=args.cold_idle_s, seed=args.seed)
    report = measure_cold_start(cfg)
    print(format_report(report), file=sys.stderr)
    return report


def add_cold_start(paths: dict[str, Any], cold: dict[str, Any]) -> None:
    """Put the cold-start measurement into report.json and summary.md."""
    import json

    from bench.cold_start import format_report

    data = json.loads(paths["report"].read_text())
    data["cold_start"] = cold
    paths["report"].write_text(json.dumps(data, indent=2))
    summary = "\n## Scale-from-zero cold start (first request at zero replicas)\n\n```\n"
    summary += format_report(cold) + "\n```\n"
    paths["summary"].write_text(paths["summary"].read_text() + summary)


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="load-test a served app (closed or open loop), optionally against a second app or in-process",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", default=None, help="the app to benchmark, e.g. http://127.0.0.1:8000")
    p.add_argument("--label", default=None, help="name of --url's target in the report (default: host/path)")
    p.add_argument(
        "--compare",
        action="append",
        default=None,
        help="another app driven with the identical schedule, after --url at each level (repeat for more)",
    )
    p.add_argument(
        "--compare-label",
        action="append",
        default=None,
        help="name of a --compare target in the report (repeat: the first names the first --compare, ...)",
    )
    p.add_argument(
        "--reference",
        default=None,
        metavar="LABEL",
        help="check every other app against this one (img/s >= it in a closed loop, p50 <= it at a rate), "
        "e.g. --reference monolith; default: --url's app against each --compare",
    )
    p.add_argument(
        "--stream",
        action="store_true",
        help="every HTTP request streams (stream: true, --partial-images partial images), read to its last event",
    )
    p.add_argument(
        "--compare-stream",
        action="store_true",
        help="compare streaming with not: --url plain, then --url again with every request streaming "
        "--partial-images partial images (same requests; the ratios are streaming / plain)",
    )
    p.add_argument(
        "--partial-images", type=int, default=3, help="partial images per streamed request, 0..3 (default 3)"
    )
    p.add_argument(
        "--in-process",
        action="store_true",
        help="also (or only) run the workload on serve.pipeline.Pipeline in this process: the limit",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model for --in-process (default: the shipped demo model; with --serve: the config's) and, with "
        "--serve, for the app the bench starts too (darkroom serve --config CONFIG --model MODEL)",
    )
    p.add_argument(
        "--serve",
        type=Path,
        default=None,
        help="a Serve config the bench starts (darkroom serve --config) for each served phase and stops "
        "after, so that the in-process phase runs with no cluster alive; --url defaults to its first app",
    )
    p.add_argument("--serve-port", type=int, default=None, help="with --serve: the HTTP port (default: the config's)")
    p.add_argument(
        "--serve-log", type=Path, default=None, help="with --serve: append the server's output here (default: dropped)"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="repeat the served phase and the in-process phase this many times (A/B/A/B); ratios are given "
        "as median and range over the rounds (default: 2 with --serve and --in-process, 5 with --freeze, else 1)",
    )
    p.add_argument(
        "--freeze",
        action="store_true",
        help="with --serve and --in-process: start the app once and, instead of stopping it, freeze it "
        "(SIGSTOP every process of it: it gets no CPU; checked) for each in-process run, alternating served "
        "and in-process at every level of every round; rounds then cost seconds, not a restart, so use more",
    )
    load = p.add_argument_group("load")
    load.add_argument("--concurrency", default=None, help="closed loop: clients, comma-separated sweep, e.g. 1,2,4")
    load.add_argument("--rate", default=None, help="open loop: requests/s, comma-separated sweep, e.g. 0.5,1,2")
    load.add_argument("--requests", type=int, default=None, help="measured requests per level and target (default 20)")
    load.add_argument(
        "--duration",
        type=parse_duration,
        default=None,
        help="sending time per level and target: seconds, or 30s, 10m, 1h; a duration run also reports "
        "each minute (errors, latency percentiles) and each local replica's memory, and the soak checks",
    )
    load.add_argument(
        "--memory-interval",
        type=float,
        default=10.0,
        help="with --duration: seconds between samples of each local Serve replica's memory (0: none)",
    )
    load.add_argument("--warmup", type=int, default=2, help="unmeasured warm-up requests per level and target")
    load.add_argument("--arrival", choices=("poisson", "gamma"), default="poisson", help="open-loop arrivals")
    load.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother"
    )
    load.add_argument("--slo-ms", type=float, default=None, help="latency SLO for goodput (default: none)")
    load.add_argument("--timeout", type=float, default=600.0, help="per-request client timeout, seconds")
    load.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for /readyz")
    work = p.add_argument_group("workload")
    work.add_argument("--prompts", type=Path, default=None, help="prompts file, one per line (default: built-in)")
    work.add_argument("--size", default=None, help="WxH (default: the model's native size)")
    work.add_argument("--steps", type=int, default=None, help="num_inference_steps (default: the server's, 50)")
    work.add_argument("--n", type=int, default=1, help="images per request")
    work.add_argument("--guidance", type=float, default=None, help="guidance_scale (default: the server's, 7.5)")
    work.add_argument("--seed", type=int, default=0, help="seeds every request body and arrival time")
    work.add_argument(
        "--loras",
        default=None,
        help="comma-separated adapter names: each target also runs the same load with one adapter per "
        "request, drawn from these (seeded)",
    )
    work.add_argument("--lora-scale", type=float, default=1.0, help="scale of the drawn adapters (default 1)")
    work.add_argument(
        "--response-format",
        choices=("url", "b64_json"),
        default="url",
        help="url (the image is stored, the answer links it) or b64_json (inline) (default url)",
    )
    inproc = p.add_argument_group("in-process")
    inproc.add_argument(
        "--max-batch",
        type=int,
        default=None,
        help="in-process batch limit (closed loop: min(C, this)); default: the --serve app's Denoiser "
        "max_batch_size, else 8",
    )
    inproc.add_argument(
        "--torch-threads",
        type=int,
        default=None,
        help="in-process torch threads, exactly; default: one in-process target per count 1, 2, 4, ... up to "
        "the --serve app's model replicas' threads together (capped at the cores), else the cores; the goals "
        "take the best",
    )
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=None, help="output folder (default: bench-results/<timestamp>)")
    out.add_argument("--no-records", action="store_true", help="leave per-request records out of report.json")
    out.add_argument("--quiet", action="store_true", help="no progress output")
    out.add_argument(
        "--cold-start",
        action="store_true",
        help="first measure the scale-from-zero cold start per stage (an app in the serverless profile, "
        "scaled to zero) and add it to the report",
    )
    out.add_argument("--cold-idle-s", type=float, default=0.0, help="with --cold-start: idle this long first")
    p.set_defaults(func=run_bench)
