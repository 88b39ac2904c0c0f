"""The load generator and its report: HTTP (and in-process) only; nothing heavy at import."""

from bench.core import BenchConfig, BenchResult, TargetSpec, run_benchmark
from bench.metrics import Distribution, Metrics, Ratios, RequestRecord, compare, compute_metrics, percentile
from bench.runner import HttpTarget, Level
from bench.schedule import DEFAULT_PROMPTS, Workload, arrival_offsets, read_prompts

__all__ = [
    "DEFAULT_PROMPTS",
    "BenchConfig",
    "BenchResult",
    "Distribution",
    "HttpTarget",
    "Level",
    "Metrics",
    "Ratios",
    "RequestRecord",
    "TargetSpec",
    "Workload",
    "arrival_offsets",
    "compare",
    "compute_metrics",
    "percentile",
    "read_prompts",
    "run_benchmark",
]
