"""The PyTorch backend: the family's torch wrapper of each component, as published weights.

Eager by default (bit for bit what diffusers computes). ``TorchOptions`` (``torch_options.py``)
adds, where asked: channels_last memory format on CUDA, CUDA graphs per (batch bucket, input
shapes), ``torch.compile``, TorchScript traces per input shapes (``jit``), VAE tiling above a
size; and the denoiser runs the opt-in per-request step cache (``step_cache.py``: DeepCache for
UNets, TeaCache for transformers).
"""

from __future__ import annotations

import dataclasses
import logging

import torch

from serve.engines.base import Engine
from serve.engines.torch_options import (
    GraphCache,
    TorchOptions,
    bucket_for,
    capture_cuda_graph,
    pad_rows,
    trace_module,
)
from serve.errors import EngineError

logger = logging.getLogger(__name__)

#: Components made of convolutions, which channels_last speeds up on CUDA.
CONVOLUTIONAL = ("unet", "vae_decoder")
#: The step cache each denoiser component runs.
STEP_CACHE_KIND = {"unet": "deepcache", "transformer": "teacache"}


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, info, component, device, dtype, options: TorchOptions | None = None) -> None:
        super().__init__(info, component, device, dtype)
        self.options = options or TorchOptions()
        self.graphs: GraphCache | None = None
        self.is_denoiser = False
        self.step_cache_kind: str | None = None

    def load(self) -> None:
        from serve.families import family_of

        family = family_of(self.info)
        if self.component not in family.components:
            raise EngineError(f"{family.name} models have no component {self.component!r} ({family.components})")
        opts = self.options
        self.dtype = family.component_dtype(self.component, self.dtype)
        module = family.module(self.component, self.dtype).to(self.device).eval()
        cuda = self.device.type == "cuda"
        channels_last = opts.channels_last if opts.channels_last is not None else cuda
        if channels_last and self.component in CONVOLUTIONAL:
            module = module.to(memory_format=torch.channels_last)
        if self.component == "vae_decoder" and opts.vae_tiling_min_side is not None:
            configure_vae_tiling(module.model, opts.vae_tiling_min_side, self.info.vae_scale_factor)
        self.eager = module  # the step cache swaps submodules' forward: it runs the eager module
        self.module = module
        self.is_denoiser = self.component == family.denoiser_component
        if self.is_denoiser:
            self.step_cache_kind = STEP_CACHE_KIND.get(self.component)
            if opts.compile:
                self.module = torch.compile(module, mode=opts.compile_mode, dynamic=False)
            if opts.jit and not (opts.cuda_graphs and cuda):  # CUDA graphs, where they run, replay faster
                self.graphs = GraphCache(lambda inputs: trace_module(self.module, inputs), opts.max_graphs)
            if opts.cuda_graphs:
                if cuda:
                    self.graphs = GraphCache(lambda inputs: capture_cuda_graph(self.module, inputs), opts.max_graphs)
                else:
                    logger.warning(
                        "cuda_graphs needs a CUDA device; %s runs without them on %s", self.component, self.device
                    )
        self.output_names = module.output_names
        logger.info(
            "loaded %s from %s on %s (%s; %s)",
            self.component,
            self.model_path,
            self.device,
            self.dtype,
            describe(
                module,
                channels_last and self.component in CONVOLUTIONAL,
                self.graphs is not None and opts.cuda_graphs,
                opts.compile,
                traced=self.graphs is not None and not opts.cuda_graphs,
            ),
        )

    @property
    def shape_specialized(self) -> bool:
        """Whether the first call of each input shape pays a trace, a CUDA graph capture or a
        compile (``Denoiser.warm_up`` runs those at load)."""
        return self.is_denoiser and (self.graphs is not None or self.options.compile)

    def run_eagerly(self, reason: str) -> None:
        """Drop CUDA graphs, torch.compile and batch padding from now on (the eager module, batches
        as they come): for callers whose hooks must see every call's real rows (per-request LoRA)."""
        if not (self.options.cuda_graphs or self.options.compile or self.options.jit):
            return
        logger.warning("%s runs eagerly (no CUDA graphs, torch.compile or trace): %s", self.component, reason)
        self.options = dataclasses.replace(self.options, cuda_graphs=False, compile=False, jit=False)
        self.module = self.eager
        self.graphs = None

    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        inputs = {name: x.to(self.device) for name, x in inputs.items()}
        if self.is_denoiser and self.options.buckets_batches:
            rows = next(iter(inputs.values())).shape[0]
            bucket = bucket_for(rows, self.options.batch_buckets)
            outputs = self._forward(pad_rows(inputs, rows, bucket), graphable=bucket in self.options.batch_buckets)
            outputs = tuple(o[:rows] for o in outputs)
        else:  # traces (jit) are per exact shapes: batches as they come
            outputs = self._forward(inputs, graphable=self.options.jit)
        return dict(zip(self.output_names, outputs, strict=True))

    @torch.inference_mode()
    def _forward(self, inputs: dict[str, torch.Tensor], graphable: bool) -> tuple[torch.Tensor, ...]:
        if self.graphs is not None and graphable:
            return self.graphs.run(inputs)
        return self.module(**inputs)

    @torch.inference_mode()
    def run_step_cache(self, inputs: dict[str, torch.Tensor], groups: list) -> dict[str, torch.Tensor]:
        """The denoiser's ``noise_pred`` with each group's (request's) step cache applied."""
        from serve.engines.step_cache import run_deepcache, run_teacache

        if self.step_cache_kind is None:
            raise EngineError(f"{self.component} has no step cache")
        inputs = {name: x.to(self.device) for name, x in inputs.items()}
        run = run_deepcache if self.step_cache_kind == "deepcache" else run_teacache
        return {"noise_pred": run(self.eager, inputs, groups)}

    def shutdown(self) -> None:
        self.module = None
        self.eager = None
        self.graphs = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def configure_vae_tiling(vae: torch.nn.Module, min_side: int, scale_factor: int) -> None:
    """Decode in tiles when the image's side exceeds ``min_side`` px (diffusers' AutoencoderKL tiling)."""
    if not hasattr(vae, "enable_tiling"):
        logger.warning("%s has no tiling: vae_tiling_min_side ignored", type(vae).__name__)
        return
    vae.enable_tiling()
    vae.tile_sample_min_size = min_side
    vae.tile_latent_min_size = min_side // scale_factor


def describe(module: torch.nn.Module, channels_last: bool, graphs: bool, compiled: bool, traced: bool = False) -> str:
    """The modes a component runs in, for the log: attention processors, layout, graphs, compile."""
    processors = set()
    inner = getattr(module, "model", module)
    for proc in (getattr(inner, "attn_processors", None) or {}).values():
        processors.add(type(proc).__name__)
    parts = [f"attention {'/'.join(sorted(processors))}" if processors else "no attention processors"]
    parts.append("channels_last" if channels_last else "contiguous")
    if graphs:
        parts.append("CUDA graphs")
    if compiled:
        parts.append("torch.compile")
    if traced:
        parts.append("TorchScript traces per input shapes")
    return ", ".join(parts)
