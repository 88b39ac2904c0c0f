"""The model-family seam: what differs between SD 1.x/2.x, SDXL and Flux, behind one interface.

diffusers keeps one pipeline class per family for the same reason: the stages are the same
(encode the prompt -> prepare latents -> denoise -> decode) but what flows between them is not.
A ``Family`` owns, for one model:

- its **components** (text encoders, the denoiser, the VAE decoder), their torch wrappers with
  named inputs/outputs and their export specs -- read by the torch backend, ONNX export and
  TensorRT build alike;
- its **tokenizers and encoders** and the ``Conditioning`` they produce (named arrays whose names
  are the denoiser's inputs);
- **latent preparation**, the per-step **model inputs**, how guidance combines, and the
  **batch key** (requests with equal keys share a denoiser call each step);
- ``plan(params)``: the one request -> stage-jobs recipe, used by the in-process ``Pipeline``, the
  HTTP service and the monolith alike.

Adding a family = one module defining a subclass, registered in ``serve/families/__init__.py``.
A family object is cheap (configs only, no weights): ``family_of(info)`` builds one per process.
Planning a request needs neither torch nor diffusers (the Ingress starts without them): the
hooks that touch tensors import torch where they run.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from serve.engines.specs import ComponentSpec, Range, SizeRange, TensorSpec, float_dtype, latent_range
from serve.errors import InvalidRequestError
from serve.params import GenerationParams
from serve.schedulers import UNET_SCHEDULERS, SchedulerFactory
from serve.stages.messages import Conditioning, DenoiseJob

if TYPE_CHECKING:
    import torch

    from serve.engines.base import Engine
    from serve.model import ModelInfo

#: Engine component -> its folder in the diffusers layout (the rest are named as their folder).
FOLDERS = {"vae_decoder": "vae"}


@dataclass(frozen=True)
class Plan:
    """What one request asks of each stage, in order: the recipe ``Family.plan`` writes.

    ``texts`` go to the TextEncoder (the prompt, then the negative prompt when it is encoded);
    ``denoise_job(encoded)`` turns the TextEncoder's rows for those texts into the Denoiser's job.
    ``negative`` says where the negative conditioning comes from: ``encoded`` (the second text),
    ``zeros`` (SDXL's ``force_zeros_for_empty_prompt``: zeros shaped like the prompt's), or
    ``none`` (no guidance batch).
    """

    params: GenerationParams
    texts: tuple[str, ...]
    negative: Literal["none", "encoded", "zeros"]
    cfg_scale: float | None

    def denoise_job(self, encoded: Sequence[Mapping[str, np.ndarray]]) -> DenoiseJob:
        if len(encoded) != len(self.texts):
            raise ValueError(f"expected {len(self.texts)} encoded texts, got {len(encoded)}")
        positive = dict(encoded[0])
        negative: dict[str, np.ndarray] | None = None
        if self.negative == "encoded":
            negative = dict(encoded[1])
        elif self.negative == "zeros":
            negative = {k: np.zeros_like(v) for k, v in positive.items()}
        p = self.params
        return DenoiseJob(
            conditioning=Conditioning(positive, negative),
            seed=p.seed,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            width=p.width,
            height=p.height,
            n=p.n,
            scheduler=p.scheduler,
            cfg_scale=self.cfg_scale,
            loras=p.loras,
        )


class Family(ABC):
    """One model family; subclasses set the class attributes and implement the abstract hooks."""

    #: Short name users and configs use: ``sd``, ``sdxl``, ``flux``.
    name: ClassVar[str]
    #: diffusers' pipeline class for the family (model_index.json's ``_class_name``).
    pipeline_class: ClassVar[str]
    #: Engine components of the TextEncoder stage, in the order ``encode`` runs them.
    text_components: ClassVar[tuple[str, ...]]
    #: The Denoiser stage's engine component: ``unet`` or ``transformer``.
    denoiser_component: ClassVar[str]
    #: Scheduler names this family accepts (name -> diffusers class), see ``serve.schedulers``.
    schedulers: ClassVar[Mapping[str, str]] = UNET_SCHEDULERS
    #: Latent patch side: Flux packs 2x2 latent patches, so its sides are multiples of 2x the VAE's.
    latent_patch: ClassVar[int] = 1
    #: Components LoRA adapters may touch, as the family's diffusers pipeline loads them
    #: (its ``_lora_loadable_modules``: Flux's T5 takes none).
    lora_components: ClassVar[tuple[str, ...]] = ("text_encoder", "unet")

    def __init__(self, info: ModelInfo) -> None:
        self.info = info

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.info.name})"

    # -- what the model is ----------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def native_size(cls, info: ModelInfo) -> tuple[int, int]:
        """The ``(width, height)`` a request without ``size`` gets, as diffusers' pipeline defaults."""

    @property
    def components(self) -> tuple[str, ...]:
        return (*self.text_components, self.denoiser_component, "vae_decoder")

    @staticmethod
    def folder(component: str) -> str:
        """The diffusers folder a component's weights and config live in."""
        return FOLDERS.get(component, component)

    @property
    def size_multiple(self) -> int:
        """Every image side must be a multiple of this (8 for SD/SDXL, 16 for Flux)."""
        return self.info.vae_scale_factor * self.latent_patch

    # -- requests -------------------------------------------------------------------------------
    #: Values for fields a request leaves out, as the family's diffusers ``__call__`` defaults them.
    default_guidance: ClassVar[float] = 7.5
    default_steps: ClassVar[int] = 50

    def request_defaults(self) -> dict[str, float]:
        """The family's defaults; a model may name its own guidance (the demo model's
        ``default_guidance``: SD's 7.5 over-guides it)."""
        guidance = self.info.default_guidance if self.info.default_guidance is not None else self.default_guidance
        return {"guidance_scale": guidance, "num_inference_steps": self.default_steps}

    def check(self, params: GenerationParams) -> None:
        """Refuse what this family cannot do, naming the request field (400s, before any stage)."""
        m = self.size_multiple
        if params.width % m or params.height % m:
            raise InvalidRequestError(
                "size", f"{params.width}x{params.height}", f"each side must be a multiple of {m} for {self.name} models"
            )
        if params.scheduler is not None and params.scheduler not in self.schedulers:
            raise InvalidRequestError(
                "scheduler",
                params.scheduler,
                f"{self.name} models accept {', '.join(self.schedulers)} (or null for the model's own)",
            )
        self.check_guidance(params)

    def check_guidance(self, params: GenerationParams) -> None:
        """The guidance fields this family takes (UNet families: ``guidance_scale`` only)."""
        if params.true_cfg_scale != 1.0:
            raise InvalidRequestError(
                "true_cfg_scale",
                params.true_cfg_scale,
                f"only Flux models take it; {self.name} models use guidance_scale",
            )

    @abstractmethod
    def cfg_scale(self, params: GenerationParams) -> float | None:
        """The classifier-free guidance weight, or None when the request runs no negative batch."""

    def negative_text(self, params: GenerationParams) -> str | None:
        """The negative text to encode (with CFG), or None for zeros instead of an encoding."""
        return params.negative_prompt or ""

    def plan(self, params: GenerationParams) -> Plan:
        """The request -> stage-jobs recipe (checks the request first)."""
        self.check(params)
        cfg = self.cfg_scale(params)
        if cfg is None:
            return Plan(params, (params.prompt,), "none", None)
        negative = self.negative_text(params)
        if negative is None:
            return Plan(params, (params.prompt,), "zeros", cfg)
        return Plan(params, (params.prompt, negative), "encoded", cfg)

    def scheduler_label(self, name: str | None) -> str:
        """The scheduler as users name it (``pndm``), for logs, metadata and the CLI."""
        from serve.schedulers import scheduler_name

        return name or scheduler_name(self.info.scheduler_class, self.schedulers) or self.info.scheduler_class

    # -- text encoding (TextEncoder stage) -------------------------------------------------------
    def tokenizer_length(self, component: str) -> int:
        """``model_max_length`` of a CLIP tokenizer (77), falling back to the encoder's positions."""
        folder = "tokenizer" if component == "text_encoder" else "tokenizer_2"
        max_len = self.info.tokenizer_configs.get(folder, {}).get("model_max_length", 77)
        if not isinstance(max_len, int) or max_len > 4096:  # "very large int" means unset
            max_len = self.info.config(component).get("max_position_embeddings", 77)
        return int(max_len)

    @abstractmethod
    def load_tokenizers(self) -> dict[str, Any]:
        """The family's tokenizers by text component name, loaded from the model folder."""

    @abstractmethod
    def encode(
        self, engines: Mapping[str, Engine], tokenizers: Mapping[str, Any], texts: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        """Each text's conditioning, batched along dim 0 (one row per text), by model input name."""

    @abstractmethod
    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of one text's row of each conditioning array (validates jobs)."""

    # -- denoising (Denoiser stage) ---------------------------------------------------------------
    def new_scheduler(self, name: str | None) -> Any:
        return self._scheduler_factory.new(name)

    @functools.cached_property
    def _scheduler_factory(self) -> SchedulerFactory:
        return SchedulerFactory(self.info.scheduler_config, self.info.scheduler_class, self.schedulers)

    def set_timesteps(self, scheduler: Any, job: DenoiseJob, device: torch.device) -> None:
        scheduler.set_timesteps(job.num_inference_steps, device=device)

    def step_kwargs(self, scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
        """Extra ``scheduler.step`` arguments, as the family's pipeline passes them."""
        return self._scheduler_factory.step_kwargs(scheduler, generator)

    def batch_key(self, job: DenoiseJob) -> Hashable:
        """Requests with equal keys share one denoiser call per step (same latent shape)."""
        return (job.width, job.height)

    @abstractmethod
    def initial_latents(
        self, job: DenoiseJob, generator: torch.Generator, scheduler: Any, device: torch.device, dtype: torch.dtype
    ) -> torch.Tensor:
        """The request's starting latents, drawn from its generator exactly as its pipeline draws them."""

    @abstractmethod
    def request_inputs(self, job: DenoiseJob, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The request's per-row conditioning inputs, rows ``[negative x n, positive x n]`` with CFG."""

    def scale_input(self, scheduler: Any, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return scheduler.scale_model_input(sample, t)

    def timestep_input(self, t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        """The denoiser's per-row timestep (the UNet embeds it as float32: get_timestep_embedding)."""
        import torch

        return t.to(torch.float32).reshape(1).expand(rows)

    def step_inputs(
        self, sample: torch.Tensor, timestep: torch.Tensor, conditioning: dict[str, torch.Tensor], job: DenoiseJob
    ) -> dict[str, torch.Tensor]:
        """The denoiser engine's inputs for one call; ``job`` is any job of the call's batch key."""
        return {"sample": sample, "timestep": timestep, **conditioning}

    def final_latents(self, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        """The Denoiser's result as the VAE reads it: (n, C, h, w) latents (Flux unpacks here)."""
        return latents

    # -- previews (partial images; serve/families/preview.py) ---------------------------------------
    def denoised(
        self, scheduler: Any, model_input: torch.Tensor, noise_pred: torch.Tensor, t: torch.Tensor
    ) -> torch.Tensor:
        """The step's estimate of the final latents (x0), from the denoiser's input and output.

        A preview of x0 shows the picture the run is heading for; the current latents are mostly
        noise until the last steps. Default: the input itself (a family without a formula)."""
        return model_input

    def preview(self, latents: torch.Tensor, job: DenoiseJob) -> np.ndarray:
        """A partial image of the request's latents (as the Denoiser holds them: Flux's packed):
        uint8 (n, h, w, 3) at the latent grid's size, through ``job.preview_map``, never the VAE."""
        from serve.families.preview import latent_rgb

        if job.preview_map is None:
            raise ValueError("the job has no preview map")
        return latent_rgb(self.final_latents(latents, job), job.preview_map)

    # -- decoding (Decoder stage) -------------------------------------------------------------------
    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Final latents -> what the VAE decodes (``latents / scaling_factor`` for SD)."""
        return latents / self.info.vae_scaling_factor

    # -- components ------------------------------------------------------------------------------
    def component_dtype(self, component: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype a component runs in when the stage asks for ``dtype`` (SDXL's VAE: fp32)."""
        return dtype

    @abstractmethod
    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        """A component's torch module (on the CPU), wrapped to take and return its spec's names."""

    @abstractmethod
    def specs(self, batch: Range, size: SizeRange, precision: str) -> dict[str, ComponentSpec]:
        """Every component's export spec, in ``components`` order."""

    def vae_module(self, dtype: torch.dtype) -> torch.nn.Module:
        from serve.families.modules import VaeDecoderWrapper, load_pretrained

        return VaeDecoderWrapper(load_pretrained("diffusers", "AutoencoderKL", self.info.path, "vae", dtype))

    def latent_dims(self, size: SizeRange) -> tuple[tuple[str, Range], tuple[str, Range]]:
        f = self.info.vae_scale_factor
        return (
            ("latent_height", latent_range(size.height, f, "size")),
            ("latent_width", latent_range(size.width, f, "size")),
        )

    def vae_decoder_spec(self, batch: Range, size: SizeRange, precision: str) -> ComponentSpec:
        """``latent`` (B, C, h, w), already scaled for the VAE -> ``image`` (B, 3, 8h, 8w)."""
        f = self.info.vae_scale_factor
        fdt = float_dtype(precision)
        return ComponentSpec(
            component="vae_decoder",
            inputs=(TensorSpec("latent", fdt, ("batch", self.info.latent_channels, "latent_height", "latent_width")),),
            outputs=(TensorSpec("image", fdt, ("batch", 3, "image_height", "image_width")),),
            dims=(("batch", batch), *self.latent_dims(size)),
            derived=(("image_height", "latent_height", f), ("image_width", "latent_width", f)),
        )

    def default_size_range(self) -> SizeRange:
        w, h = self.info.native_size
        return SizeRange(Range(w // 2, w, w * 2), Range(h // 2, h, h * 2))

    # -- the reference pipeline (the monolith) ------------------------------------------------------
    def pipeline_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        """Keyword arguments of the family's diffusers ``__call__`` for ``params`` (no generator)."""
        return {
            "prompt": params.prompt,
            "negative_prompt": params.negative_prompt,
            "height": params.height,
            "width": params.width,
            "num_inference_steps": params.num_inference_steps,
            "guidance_scale": params.guidance_scale,
            "num_images_per_prompt": params.n,
        }


def expand_rows(rows: Mapping[str, np.ndarray], n: int, device: Any, dtype: Any) -> dict[str, torch.Tensor]:
    """One text's arrays -> tensors of ``n`` identical rows (``num_images_per_prompt`` repeats)."""
    import torch

    out = {}
    for name, row in rows.items():
        x = torch.tensor(np.asarray(row), device=device, dtype=dtype)  # copy: the array may be read-only
        out[name] = x[None].expand(n, *x.shape)
    return out


def guided_rows(job: DenoiseJob, device: Any, dtype: Any) -> dict[str, torch.Tensor]:
    """The job's conditioning as rows: ``[negative x n, positive x n]`` with CFG, else ``positive x n``."""
    import torch

    pos = expand_rows(job.conditioning.positive, job.n, device, dtype)
    if not job.cfg:
        return pos
    if job.conditioning.negative is None:
        raise InvalidRequestError("conditioning.negative", None, "required with classifier-free guidance")
    neg = expand_rows(job.conditioning.negative, job.n, device, dtype)
    return {k: torch.cat([neg[k], pos[k]]) for k in pos}


__all__ = ["FOLDERS", "Family", "Plan", "expand_rows", "guided_rows"]
