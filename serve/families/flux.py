"""Flux (FLUX.1 dev- and schnell-style): CLIP + T5 encoders, a transformer, a VAE (``FluxPipeline``).

What differs from the UNet families, as ``FluxPipeline.__call__`` does it:

- conditioning: CLIP's *pooled* output (``pooled_projections``) and T5's last hidden state at
  ``max_sequence_length`` 512 (``encoder_hidden_states``), plus position ids: ``txt_ids`` zeros
  (512, 3) and ``img_ids`` (row, column) per latent patch, which depend on the image size only;
- latents: ``randn(n, C, h, w)`` drawn as diffusers draws them, then packed 2x2 into a sequence of
  (h/2 * w/2) patches of 4C values; so sides are multiples of 16 for a factor-8 VAE;
- the scheduler is flow matching (``FlowMatchEulerDiscreteScheduler``) with sigmas
  ``linspace(1, 1/steps, steps)`` shifted by ``mu``, which grows with the image's sequence length:
  ``mu`` is per request (PITFALLS); the transformer sees ``t / 1000``;
- guidance: dev-style models (``guidance_embeds``) take ``guidance_scale`` as an embedding, no
  batch doubling; schnell-style ones take none. Classifier-free guidance with a negative prompt
  runs only with ``true_cfg_scale > 1`` (FluxPipeline's default is 1: it ignores
  ``negative_prompt``), so a negative prompt without it, or the reverse, is refused by name;
- decoding: unpack, then ``latents / scaling_factor + shift_factor``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from serve.engines.specs import ComponentSpec, Range, SizeRange, TensorSpec, float_dtype
from serve.errors import InvalidRequestError
from serve.families.base import Family, guided_rows
from serve.params import GenerationParams
from serve.schedulers import FLOW_SCHEDULERS
from serve.stages.messages import DenoiseJob

if TYPE_CHECKING:
    import torch

#: FluxPipeline's ``max_sequence_length`` default: a different length changes the image (PITFALLS).
MAX_SEQUENCE_LENGTH = 512
#: FluxPipeline's ``default_sample_size``: 128 latents x VAE factor 8 = 1024 px.
DEFAULT_SAMPLE_SIZE = 128


class FluxFamily(Family):
    name = "flux"
    pipeline_class = "FluxPipeline"
    text_components = ("text_encoder", "text_encoder_2")
    lora_components = ("text_encoder", "transformer")
    default_guidance = 3.5
    default_steps = 28
    denoiser_component = "transformer"
    schedulers = FLOW_SCHEDULERS
    latent_patch = 2

    @classmethod
    def native_size(cls, info: Any) -> tuple[int, int]:
        side = DEFAULT_SAMPLE_SIZE * info.vae_scale_factor
        return (side, side)

    @property
    def transformer_config(self) -> dict[str, Any]:
        return self.info.config("transformer")

    @property
    def guidance_embeds(self) -> bool:
        """dev-style (guidance as an embedding) rather than schnell-style (none)."""
        return bool(self.transformer_config.get("guidance_embeds", False))

    @property
    def packed_channels(self) -> int:
        return int(self.transformer_config.get("in_channels", 64))

    # -- requests ----------------------------------------------------------------------------------
    def check_guidance(self, params: GenerationParams) -> None:
        if params.true_cfg_scale != 1.0 and params.true_cfg_scale <= 1.0:
            raise InvalidRequestError(
                "true_cfg_scale", params.true_cfg_scale, "must be > 1 to turn on guidance with the negative prompt"
            )
        if params.negative_prompt is not None and params.true_cfg_scale <= 1.0:
            raise InvalidRequestError(
                "negative_prompt",
                params.negative_prompt,
                "Flux models ignore it unless true_cfg_scale > 1 (as FluxPipeline); send true_cfg_scale too",
            )
        if params.negative_prompt is None and params.true_cfg_scale > 1.0:
            raise InvalidRequestError(
                "true_cfg_scale", params.true_cfg_scale, "needs a negative_prompt to guide away from"
            )

    def cfg_scale(self, params: GenerationParams) -> float | None:
        if params.true_cfg_scale > 1.0 and params.negative_prompt is not None:
            return params.true_cfg_scale
        return None

    def negative_text(self, params: GenerationParams) -> str | None:
        return params.negative_prompt or ""

    # -- text encoding -------------------------------------------------------------------------------
    @property
    def t5_width(self) -> int:
        return int(self.info.config("text_encoder_2").get("d_model", 4096))

    @property
    def pooled_width(self) -> int:
        return int(self.info.config("text_encoder").get("hidden_size", 768))

    def load_tokenizers(self) -> dict[str, Any]:
        from transformers import CLIPTokenizer, T5TokenizerFast

        return {
            "text_encoder": CLIPTokenizer.from_pretrained(self.info.path, subfolder="tokenizer"),
            "text_encoder_2": T5TokenizerFast.from_pretrained(self.info.path, subfolder="tokenizer_2"),
        }

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "encoder_hidden_states": (MAX_SEQUENCE_LENGTH, self.t5_width),
            "pooled_projections": (self.pooled_width,),
        }

    def encode(self, engines: Mapping[str, Any], tokenizers: Mapping[str, Any], texts: Sequence[str]):
        clip_ids = tokenizers["text_encoder"](
            list(texts),
            padding="max_length",
            max_length=tokenizers["text_encoder"].model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        t5_ids = tokenizers["text_encoder_2"](
            list(texts), padding="max_length", max_length=MAX_SEQUENCE_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids
        pooled = engines["text_encoder"].run(input_ids=clip_ids)["pooler_output"]
        t5 = engines["text_encoder_2"].run(input_ids=t5_ids)["last_hidden_state"]
        return {"encoder_hidden_states": t5, "pooled_projections": pooled}

    # -- denoising -----------------------------------------------------------------------------------
    def latent_side(self, pixels: int) -> int:
        """Latent side before packing, as FluxPipeline computes it: 2 * (pixels // (factor * 2))."""
        return 2 * (pixels // (self.info.vae_scale_factor * 2))

    def image_seq_len(self, job: DenoiseJob) -> int:
        return (self.latent_side(job.height) // 2) * (self.latent_side(job.width) // 2)

    def set_timesteps(self, scheduler: Any, job: DenoiseJob, device: torch.device) -> None:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        steps = job.num_inference_steps
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        cfg = scheduler.config
        mu = calculate_shift(
            self.image_seq_len(job),
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)

    def step_kwargs(self, scheduler: Any, generator: torch.Generator) -> dict[str, Any]:
        return {}  # FluxPipeline calls step(noise_pred, t, latents) with nothing else

    def initial_latents(self, job, generator, scheduler, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        c = self.packed_channels // 4
        h, w = self.latent_side(job.height), self.latent_side(job.width)
        latents = randn_tensor((job.n, c, h, w), generator=generator, device=device, dtype=dtype)
        # FluxPipeline._pack_latents: 2x2 patches -> a sequence of (h/2 * w/2) tokens of 4c values.
        latents = latents.view(job.n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return latents.reshape(job.n, (h // 2) * (w // 2), c * 4)

    def request_inputs(self, job: DenoiseJob, device, dtype) -> dict[str, torch.Tensor]:
        import torch

        rows = guided_rows(job, device, dtype)
        if self.guidance_embeds:
            count = rows["pooled_projections"].shape[0]
            rows["guidance"] = torch.full((count,), job.guidance_scale, device=device, dtype=torch.float32)
        return rows

    def scale_input(self, scheduler: Any, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sample  # FluxPipeline feeds the latents as they are

    def timestep_input(self, t: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
        return t.expand(rows).to(dtype) / 1000

    def step_inputs(self, sample, timestep, conditioning, job) -> dict[str, torch.Tensor]:
        import torch

        h, w = self.latent_side(job.height) // 2, self.latent_side(job.width) // 2
        # FluxPipeline._prepare_latent_image_ids: (row, column) of each patch; txt_ids are zeros.
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = ids[..., 1] + torch.arange(h)[:, None]
        ids[..., 2] = ids[..., 2] + torch.arange(w)[None, :]
        img_ids = ids.reshape(h * w, 3).to(device=sample.device, dtype=sample.dtype)
        txt_ids = torch.zeros(MAX_SEQUENCE_LENGTH, 3, device=sample.device, dtype=sample.dtype)
        return {"hidden_states": sample, "timestep": timestep, "img_ids": img_ids, "txt_ids": txt_ids, **conditioning}

    def denoised(self, scheduler, model_input, noise_pred, t) -> torch.Tensor:
        """x0 under flow matching: x_t = (1 - s) x0 + s noise and the transformer predicts
        v = noise - x0, so x0 = x_t - s v, with s = t / num_train_timesteps (the scheduler's
        timesteps are its shifted sigmas times that number)."""
        sigma = float(t) / float(scheduler.config.get("num_train_timesteps", 1000))
        return model_input.float() - sigma * noise_pred.float()

    def final_latents(self, latents: torch.Tensor, job: DenoiseJob) -> torch.Tensor:
        # FluxPipeline._unpack_latents: the sequence of 2x2 patches back to (n, c, h, w).
        n, _, channels = latents.shape
        h, w = self.latent_side(job.height), self.latent_side(job.width)
        latents = latents.view(n, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
        return latents.reshape(n, channels // 4, h, w)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.info.vae_scaling_factor + self.info.vae_shift_factor

    # -- components ----------------------------------------------------------------------------------
    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        from serve.families.modules import ClipTextWrapper, FluxTransformerWrapper, T5Wrapper, load_pretrained

        path = self.info.path
        if component == "text_encoder":
            return ClipTextWrapper(
                load_pretrained("transformers", "CLIPTextModel", path, "text_encoder", dtype), ("pooler_output",)
            )
        if component == "text_encoder_2":
            return T5Wrapper(load_pretrained("transformers", "T5EncoderModel", path, "text_encoder_2", dtype))
        if component == "transformer":
            return FluxTransformerWrapper(
                load_pretrained("diffusers", "FluxTransformer2DModel", path, "transformer", dtype)
            )
        if component == "vae_decoder":
            return self.vae_module(dtype)
        raise KeyError(component)

    def specs(self, batch: Range, size: SizeRange, precision: str) -> dict[str, ComponentSpec]:
        fdt = float_dtype(precision)
        clip_len = self.tokenizer_length("text_encoder")
        seq = MAX_SEQUENCE_LENGTH
        text_batch = (("batch", Range(batch.min, batch.opt, batch.max * 2)),)

        def patches(level: str) -> int:
            return (self.latent_side(size.height.at(level)) // 2) * (self.latent_side(size.width.at(level)) // 2)

        image_seq = Range(patches("min"), patches("opt"), patches("max"))
        inputs = [
            TensorSpec("hidden_states", fdt, ("batch", "image_seq", self.packed_channels)),
            TensorSpec("timestep", fdt, ("batch",)),
            TensorSpec("encoder_hidden_states", fdt, ("batch", seq, self.t5_width)),
            TensorSpec("pooled_projections", fdt, ("batch", self.pooled_width)),
            TensorSpec("img_ids", fdt, ("image_seq", 3)),
            TensorSpec("txt_ids", fdt, (seq, 3)),
        ]
        if self.guidance_embeds:
            inputs.append(TensorSpec("guidance", "float32", ("batch",)))
        out_channels = int(self.transformer_config.get("out_channels") or self.packed_channels)
        return {
            "text_encoder": ComponentSpec(
                component="text_encoder",
                inputs=(TensorSpec("input_ids", "int64", ("batch", clip_len)),),
                outputs=(TensorSpec("pooler_output", fdt, ("batch", self.pooled_width)),),
                dims=text_batch,
            ),
            "text_encoder_2": ComponentSpec(
                component="text_encoder_2",
                inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
                outputs=(TensorSpec("last_hidden_state", fdt, ("batch", seq, self.t5_width)),),
                dims=text_batch,
            ),
            "transformer": ComponentSpec(
                component="transformer",
                inputs=tuple(inputs),
                outputs=(TensorSpec("noise_pred", fdt, ("batch", "image_seq", out_channels)),),
                dims=(("batch", batch.scaled(2, keep_min=True)), ("image_seq", image_seq)),
            ),
            "vae_decoder": self.vae_decoder_spec(batch, size, precision),
        }

    def pipeline_kwargs(self, params: GenerationParams) -> dict[str, Any]:
        kwargs = super().pipeline_kwargs(params)
        kwargs["true_cfg_scale"] = params.true_cfg_scale
        return kwargs


__all__ = ["MAX_SEQUENCE_LENGTH", "FluxFamily"]
