"""A run's outputs: ``report.json`` (config, metadata, metrics, records), ``summary.md``, PNG plots.

Plots use matplotlib's Agg backend, imported only here and only when plotting; without
matplotlib the run still writes its JSON and markdown (and says so).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from bench.core import BenchResult
from bench.metrics import Metrics, Spread, spread

logger = logging.getLogger(__name__)

STAGES = ("encode", "denoise", "decode", "storage")
QUEUES = ("encode_queue", "denoise_queue", "decode_queue")


def _f(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _errors(m: Metrics) -> str:
    return ", ".join(f"{k}: {v}" for k, v in m.errors_by_status.items()) or "0"


def _median(values: list[float]) -> float:
    return spread(values).median or 0.0


def _phases_line(result: BenchResult) -> str:
    cfg = result.config
    model = f" with `--model {cfg.serve_model}`" if cfg.serve_config and cfg.serve_model else ""
    if cfg.freeze_served:
        frozen = [p["frozen"] for p in result.phases if "frozen" in p]
        most = max((f["cpu_s"] for f in frozen), default=0.0)
        return (
            f"{len(result.phases)} (per round and level: served, then in-process with the served app frozen); "
            f"served app started once by the bench from `{cfg.serve_config}`{model}, frozen for each of the "
            f"{len(frozen)} in-process runs ({max((f['processes'] for f in frozen), default=0)} processes; "
            f"CPU they used while frozen: at most {most:.2f} s in a run) and stopped at the end"
        )
    line = ", ".join(f"{p['round']}:{p['kind']}" for p in result.phases)
    if cfg.serve_config:
        line += f"; served app started and stopped by the bench from `{cfg.serve_config}`{model}"
    return line


def summary_markdown(result: BenchResult) -> str:
    cfg, meta = result.config, result.metadata
    wl = cfg.workload
    machine = meta.get("machine", {})
    git = meta.get("git", {})
    amount = f"{cfg.requests} requests" if cfg.requests is not None else f"{cfg.duration_s:g} s"
    lines = [
        "# Darkroom benchmark",
        "",
        f"- started {meta.get('started_at')}, finished {meta.get('finished_at')}",
        f"- machine: {machine.get('cpu_count')} CPUs, {machine.get('platform')}, Python {machine.get('python')}",
        f"- commit: {git.get('commit') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}",
        "- environment: " + (", ".join(f"`{k}={v}`" for k, v in meta.get("environment", {}).items()) or "none set"),
        "- targets: " + ", ".join(f"`{n}` ({_describe(i)})" for n, i in result.targets.items()),
        f"- workload: size {wl.size or 'native'}, steps {wl.steps or 'server default'}, n {wl.n}, "
        f"seed {wl.seed}, {len(wl.prompts)} prompts, response_format {wl.response_format}",
        f"- per level and target: {cfg.warmup} warm-up + {amount}; arrivals {cfg.arrival}"
        + (f" (burstiness {cfg.burstiness:g})" if cfg.arrival == "gamma" else "")
        + f"; SLO {_f(cfg.slo_ms, 0) + ' ms' if cfg.slo_ms else 'none'}",
        f"- rounds: {cfg.rounds}; phases: " + _phases_line(result),
        f"- order: {meta.get('order')}",
        "- host load: the 1-minute load average when each run started (it includes any other work on the "
        "machine; above the CPU count means the run shared its CPUs)",
    ]
    goals = result.goals()
    if goals:
        heading = "## Goals (issues 12 and 14), median (range) over the rounds"
        lines += ["", heading, "", "| check | value | goal | met |"]
        lines.append("|---|---|---|---|")
        for g in goals:
            s = g["spread"]
            value = Spread(s["median"], s["min"], s["max"], tuple(s["values"]))
            met = "yes" if g["every_round_met"] else ("median only" if g["median_met"] else "no")
            lines.append(f"| {g['check']} | {value} | {g['goal']} | {met} |")
    lines += [
        "",
        "## Throughput and latency",
        "",
        "| level | target | round | ok/sent | errors | req/s | img/s | goodput req/s | p50 ms | p90 ms | p99 ms "
        "| mean ms | max ms | host load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lr in result.levels:
        for name, runs in lr.runs.items():
            for run in runs:
                m, lat = run.metrics, run.metrics.latency_ms
                lines.append(
                    f"| {lr.level.label} | {name} | {run.round} | {m.ok}/{m.requests} | {_errors(m)} "
                    f"| {m.throughput_rps:.3f} | {m.throughput_ips:.3f} | {m.goodput_rps:.3f} | {lat.p50:.0f} "
                    f"| {lat.p90:.0f} | {lat.p99:.0f} | {lat.mean:.0f} | {lat.max:.0f} | {_f(run.host_load, 2)} |"
                )
    lines += [
        "",
        "## Where the time goes (server timings, ms: mean / p99; the median round)",
        "",
        "| level | target | " + " | ".join(STAGES) + " | " + " | ".join(QUEUES) + " | denoise batch mean/max "
        "| client overhead mean |",
        "|---|---|" + "---|" * (len(STAGES) + len(QUEUES) + 2),
    ]
    for lr in result.levels:
        for name, runs in lr.runs.items():
            m = _median_run(runs).metrics
            cells = []
            for key in STAGES + QUEUES:
                d = m.stages_ms.get(key)
                cells.append(f"{d.mean:.0f} / {d.p99:.0f}" if d else "—")
            b = m.batch_sizes.get("denoise_batch")
            batch = f"{b.mean:.2f} / {b.max:.0f}" if b else "—"
            overhead = _f(m.client_overhead_ms.mean) if m.client_overhead_ms.count else "—"
            lines.append(f"| {lr.level.label} | {name} | " + " | ".join(cells) + f" | {batch} | {overhead} |")
    cpu_rows = []
    for lr in result.levels:
        for name, runs in lr.runs.items():
            measured = [r.cpu_ms_per_image for r in runs if r.cpu_ms_per_image]
            if not measured:
                continue
            totals = spread([m["total"] for m in measured])
            top = _median_run(runs).cpu_ms_per_image or measured[0]
            parts = ", ".join(f"{k} {v:.1f}" for k, v in top.items() if k != "total" and v >= 0.5)
            cpu_rows.append(
                f"| {lr.level.label} | {name} | {totals.median:.1f} ({totals.min:.1f}–{totals.max:.1f}) | {parts} |"
            )
    if cpu_rows:
        lines += [
            "",
            "## CPU per image (ms, every process of the target and the bench client; median (range) over the "
            "rounds; by process: the median round)",
            "",
            "| level | target | total | by process |",
            "|---|---|---|---|",
            *cpu_rows,
        ]
    lines += lora_section(result)
    if len(result.config.targets) > 1:
        base = result.baseline
        lines += [
            "",
            f"## Ratios vs `{base}` (other / {base}, within each round; median (range) over the rounds; "
            "throughput > 1 and latency < 1 favour the other)",
            "",
            "| level | target | throughput (img/s) | goodput | p50 | p99 |",
            "|---|---|---|---|---|---|",
        ]
        for lr in result.levels:
            for name, r in lr.ratios.items():
                lines.append(
                    f"| {lr.level.label} | {name} | {r['throughput']} | {r['goodput']} | {r['p50']} | {r['p99']} |"
                )
    for lr in result.levels:
        for name, runs in lr.runs.items():
            for run in runs:
                if run.soak is not None:
                    from bench.soak import soak_markdown

                    label = name + (f" round {run.round}" if len(runs) > 1 else "")
                    lines += soak_markdown(label, lr.level.label, run.soak)
    return "\n".join(lines) + "\n"


def lora_section(result: BenchResult) -> list[str]:
    """With ``--loras``: each app with adapters next to itself without, the adapter-cache hit rate,
    and (two apps) the first app's "+loras" over the second's (e.g. mixed batches / one group); the
    median round of each."""
    specs = [t for t in result.config.targets if t.loras]
    if not specs:
        return []
    plain = {t.url: t.name for t in result.config.targets if not t.loras}
    lines = [
        "",
        f"## LoRA adapters (+loras: one of {', '.join(result.config.loras)} per request, seeded)",
        "",
        "| level | target | img/s | p50 ms | p99 ms | adapter-cache hit rate | adapter loads | img/s vs without |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for lr in result.levels:
        for spec in specs:
            m = _median_run(lr.runs[spec.name]).metrics
            without_runs = lr.runs.get(plain.get(spec.url, ""))
            without = _median_run(without_runs) if without_runs else None
            ratio = (
                m.throughput_ips / without.metrics.throughput_ips
                if without and without.metrics.throughput_ips
                else None
            )
            hit = "—" if m.lora_cache_hit_rate is None else f"{m.lora_cache_hit_rate:.2f}"
            lines.append(
                f"| {lr.level.label} | {spec.name} | {m.throughput_ips:.3f} | {m.latency_ms.p50:.0f} "
                f"| {m.latency_ms.p99:.0f} | {hit} | {m.lora_loads} | {_x(ratio)} |"
            )
    if len(specs) > 1:
        first, second = specs[0].name, specs[1].name
        cells = []
        for lr in result.levels:
            a = _median_run(lr.runs[first]).metrics.throughput_ips
            b = _median_run(lr.runs[second]).metrics.throughput_ips
            cells.append(f"{lr.level.label} {_x(_div(a, b))}")
        lines += ["", f"`{first}` over `{second}` (img/s): " + ", ".join(cells)]
    return lines


def _div(a: float, b: float) -> float | None:
    return a / b if b else None


def _describe(info: dict[str, Any]) -> str:
    if info.get("url"):
        return info["url"]
    threads = info.get("torch_threads")
    return f"{info.get('kind')}, {threads} torch thread(s)" if threads else str(info.get("kind"))


def _median_run(runs: list[Any]) -> Any:
    """The round whose throughput is the median one (the first of the two middle ones)."""
    ordered = sorted(runs, key=lambda r: r.metrics.throughput_ips)
    return ordered[(len(ordered) - 1) // 2]


def write_plots(result: BenchResult, out_dir: Path) -> list[Path]:
    """``latency_cdf.png`` and ``load.png`` (throughput and p99 against the load levels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    names = [t.name for t in result.config.targets]
    styles = ["-", "--", ":", "-."]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

    fig, ax = plt.subplots(figsize=(8, 5))
    for li, lr in enumerate(result.levels):
        for ti, name in enumerate(names):
            lat = sorted(r.latency * 1000 for run in lr.runs[name] for r in run.records if r.ok)
            if not lat:
                continue
            ys = [(i + 1) / len(lat) for i in range(len(lat))]
            ax.step(
                lat,
                ys,
                where="post",
                color=colors[li % len(colors)],
                linestyle=styles[ti % len(styles)],
                label=f"{name} {lr.level.label}",
            )
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of successful requests")
    ax.set_title("Latency CDF per load level and target (every round)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    cdf = out_dir / "latency_cdf.png"
    fig.savefig(cdf, dpi=90)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    xs = list(range(len(result.levels)))
    labels = [lr.level.label for lr in result.levels]
    for ti, name in enumerate(names):
        color = colors[ti % len(colors)]
        # Closed- and open-loop levels are different axes of load: one line segment each.
        for mode in ("closed", "open"):
            idx = [i for i, lr in enumerate(result.levels) if lr.level.mode == mode]
            if not idx:
                continue
            thr = [_median([r.metrics.throughput_ips for r in result.levels[i].runs[name]]) for i in idx]
            p99 = [_median([r.metrics.latency_ms.p99 for r in result.levels[i].runs[name]]) for i in idx]
            label = name if mode == "closed" or not any(lr.level.mode == "closed" for lr in result.levels) else None
            style = dict(marker="o", color=color, linestyle=styles[ti % len(styles)], label=label)
            a1.plot(idx, thr, **style)
            a2.plot(idx, p99, **style)
    for ax, title, unit in ((a1, "Throughput vs load (median round)", "images/s"), (a2, "p99 latency vs load", "ms")):
        ax.set_xticks(xs, labels, rotation=30 if len(xs) > 4 else 0)
        ax.set_xlabel("load level")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    load = out_dir / "load.png"
    fig.savefig(load, dpi=90)
    plt.close(fig)
    return [cdf, load]


def dump_report(data: dict[str, Any]) -> str:
    """Indented JSON with each per-request record on one line (a third of the size, still diffable)."""
    compact: list[str] = []

    def placeholder(record: dict[str, Any]) -> str:
        compact.append(json.dumps(record, separators=(",", ":")))
        return f"@@record{len(compact) - 1}@@"

    shallow = {**data, "levels": []}
    for level in data.get("levels", []):
        results = {}
        for name, entry in level["results"].items():
            rounds = []
            for run in entry["rounds"]:
                if "records" in run:
                    run = {**run, "records": [placeholder(r) for r in run["records"]]}
                rounds.append(run)
            results[name] = {**entry, "rounds": rounds}
        shallow["levels"].append({**level, "results": results})
    text = json.dumps(shallow, indent=1)
    for i, line in enumerate(compact):
        text = text.replace(f'"@@record{i}@@"', line, 1)
    return text + "\n"


def write_report(
    result: BenchResult, out_dir: str | Path, *, include_records: bool = True, plots: bool = True
) -> dict[str, Any]:
    """Write every output into ``out_dir`` (created); returns their paths by name."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = out / "report.json"
    report.write_text(dump_report(result.to_json(include_records=include_records)))
    summary = out / "summary.md"
    summary.write_text(summary_markdown(result))
    return {"report": report, "summary": summary, "plots": write_plots(result, out) if plots else []}
