"""How the torch backend runs a component: memory format, CUDA graphs, torch.compile, VAE tiling.

Defaults keep eager PyTorch as published, bit for bit, everywhere but in memory layout on CUDA
(channels_last for the UNet and the VAE: the same math, faster convolutions). What changes the
computation is opt-in:

- ``cuda_graphs``: the denoiser's forward is captured once per (batch bucket, input shapes) and
  replayed, removing the per-kernel launch cost (large for a UNet step at small batch). Batches
  are padded up to the next of ``batch_buckets`` so a handful of graphs serve every batch size;
  the padding rows repeat the last row and their outputs are dropped (rows never mix).
- ``compile``: ``torch.compile`` of the denoiser (``compile_mode``), also over bucketed batches
  so it compiles once per bucket and size (the first request of each pays the compile).
- ``jit``: the denoiser traced with TorchScript (``torch.jit.trace``) once per input shapes and
  replayed (the same ops, batches as they come, no padding). Its forward then runs in C++ without
  holding Python's GIL: in a colocated replica on CPU the HTTP and Ray threads run beside the
  forward instead of taking turns with it (``python -m bench.gil`` measures it; the scheduler's
  steps between forwards still take turns). The traces are TorchScript's, which PyTorch calls deprecated (it
  still ships and runs): an opt-in for CPU serving, off by default.
- ``warm_up`` (on by default; only with ``jit``, ``cuda_graphs`` or ``compile``): the Denoiser
  stage runs one step for batches of 1..max requests at the native size when it loads
  (``Denoiser.warm_up``), so no request waits for those traces, captures or compiles.
- ``vae_tiling_min_side``: decode latents whose image side exceeds this in tiles (diffusers'
  ``AutoencoderKL`` tiling; bounded memory for large images; tiles blend at their seams, so such
  images are outside the 3-level seed contract). None: never.
- SDPA attention is diffusers' default processor on torch 2 (``AttnProcessor2_0``,
  ``F.scaled_dot_product_attention``: flash / memory-efficient kernels on CUDA); the engine keeps
  it and says so in its log.

Everything here but the capture itself is plain logic tested on CPU (bucket choice, graph keys,
the graph cache); CUDA-only steps are guarded by the device.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class TorchOptions:
    """Torch backend settings for one stage (``AppConfig.torch``, ``Pipeline.load(torch_options=...)``)."""

    channels_last: bool | None = None  # None: on CUDA for convolutional components
    cuda_graphs: bool = False
    compile: bool = False
    jit: bool = False
    compile_mode: str = "max-autotune-no-cudagraphs"
    batch_buckets: tuple[int, ...] = DEFAULT_BUCKETS
    max_graphs: int = 24  # captured graphs (or traces) kept per engine (each holds its own input/output buffers)
    vae_tiling_min_side: int | None = None
    warm_up: bool = True  # with jit, cuda_graphs or compile: prepare the common batches at load

    def __post_init__(self) -> None:
        if not self.batch_buckets or any(b < 1 for b in self.batch_buckets):
            raise ValueError(f"batch_buckets must be positive sizes, got {self.batch_buckets}")
        if list(self.batch_buckets) != sorted(set(self.batch_buckets)):
            raise ValueError(f"batch_buckets must be increasing, got {self.batch_buckets}")
        if self.max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {self.max_graphs}")
        if self.jit and self.compile:
            raise ValueError("jit and compile are two ways of compiling the denoiser: choose one")
        if self.vae_tiling_min_side is not None and self.vae_tiling_min_side < 64:
            raise ValueError(f"vae_tiling_min_side must be >= 64 px, got {self.vae_tiling_min_side}")

    @property
    def buckets_batches(self) -> bool:
        """Whether denoiser batches are padded to buckets (only worth it when a graph is reused)."""
        return self.cuda_graphs or self.compile


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding ``rows``; past the largest, ``rows`` itself (run as is).

    Worked example, buckets (1, 2, 4, 8, 16): 3 rows -> 4, 8 -> 8, 9 -> 16, 40 -> 40 (no graph
    for that size: it runs eagerly).
    """
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    for b in buckets:
        if b >= rows:
            return b
    return rows


def pad_rows(inputs: Mapping[str, Any], rows: int, bucket: int) -> dict[str, Any]:
    """Batched inputs (first axis ``rows``) padded to ``bucket`` rows by repeating the last row;
    inputs without that batch axis (Flux's ``img_ids``/``txt_ids``) pass unchanged."""
    if bucket == rows:
        return dict(inputs)
    import torch

    out = {}
    for name, x in inputs.items():
        if getattr(x, "ndim", 0) and x.shape[0] == rows:
            out[name] = torch.cat([x, x[-1:].expand(bucket - rows, *x.shape[1:])])
        else:
            out[name] = x
    return out


def graph_key(inputs: Mapping[str, Any]) -> tuple:
    """What a captured graph is specific to: every input's name, shape, dtype and device (sorted
    by name), e.g. ``(("sample", (8, 4, 64, 64), "torch.float16", "cuda:0"), ...)``."""
    return tuple((name, tuple(x.shape), str(x.dtype), str(x.device)) for name, x in sorted(inputs.items()))


class GraphCache:
    """Captured graphs by ``graph_key``, least recently used dropped past ``max_graphs``.

    ``capture(inputs) -> replay`` makes one (on CUDA: ``capture_cuda_graph``); ``replay(inputs)``
    copies the inputs into the graph's buffers, replays it and returns fresh output tensors.
    Injected so the cache's logic is tested on CPU.
    """

    def __init__(self, capture: Callable[[dict[str, Any]], Callable[[dict[str, Any]], Any]], max_graphs: int) -> None:
        self.capture = capture
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, Callable[[dict[str, Any]], Any]] = OrderedDict()
        self.captures = 0
        self.replays = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def keys(self) -> list[tuple]:
        return list(self._graphs)

    def run(self, inputs: dict[str, Any]) -> Any:
        key = graph_key(inputs)
        replay = self._graphs.get(key)
        if replay is None:
            replay = self.capture(inputs)
            self.captures += 1
            self._graphs[key] = replay
            while len(self._graphs) > self.max_graphs:
                dropped, _ = self._graphs.popitem(last=False)
                logger.info("dropped the CUDA graph for %s (more than %d kept)", dropped, self.max_graphs)
        else:
            self._graphs.move_to_end(key)
        self.replays += 1
        return replay(inputs)


def trace_module(module: Any, inputs: dict[str, Any]) -> Callable[[dict[str, Any]], Any]:
    """``module(**inputs)`` traced with TorchScript for these input shapes; returns its replay.

    Shape-dependent Python branches (diffusers' upsample-size and batch-size checks) are frozen
    into the trace, which is why the cache keys traces by every input's shape (``graph_key``).
    The tracer's warnings about exactly that, and TorchScript's deprecation notice, are muted:
    the log says once per shape that a trace was made."""
    import warnings

    import torch

    names = sorted(inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example_kwarg_inputs={n: inputs[n] for n in names}, check_trace=False)
    logger.info("traced %s for %s", type(module).__name__, graph_key(inputs))

    def replay(new: dict[str, Any]) -> Any:
        return tuple(traced(**new))

    return replay


def capture_cuda_graph(module: Any, inputs: dict[str, Any], warmup: int = 2) -> Callable[[dict[str, Any]], Any]:
    """Capture ``module(**inputs)`` as a CUDA graph (CUDA only); returns its replay function.

    The pattern of PyTorch's CUDA graphs guide: warm up on a side stream (cuDNN picks its
    algorithms, allocator pools settle), capture into static buffers, then each replay copies new
    inputs into those buffers and clones the outputs (the next replay overwrites them).
    """
    import torch

    if not all(getattr(x, "is_cuda", False) for x in inputs.values()):
        raise RuntimeError("CUDA graphs need every input on a CUDA device")
    static = {name: x.clone() for name, x in inputs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            module(**static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = module(**static)

    def replay(new: dict[str, Any]) -> Any:
        for name, x in new.items():
            static[name].copy_(x)
        graph.replay()
        return tuple(o.clone() for o in outputs)

    return replay


__all__ = [
    "DEFAULT_BUCKETS",
    "GraphCache",
    "TorchOptions",
    "bucket_for",
    "capture_cuda_graph",
    "graph_key",
    "pad_rows",
    "trace_module",
]
