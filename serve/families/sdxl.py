"""SDXL: two CLIP text encoders, a UNet with added conditioning, a VAE (``StableDiffusionXLPipeline``).

What differs from SD, as ``StableDiffusionXLPipeline.__call__`` does it:

- the prompt is encoded by both encoders; each gives the hidden state of its *penultimate* layer
  and the two are concatenated along the feature axis (768 + 1280 = 2048 for SDXL base); the
  second encoder's projected pooled output (``text_embeds``) conditions the UNet too;
- with ``force_zeros_for_empty_prompt`` (model_index.json, true for SDXL base) and no negative
  prompt, the negative conditioning is zeros, not the encoding of "" (PITFALLS);
- micro-conditioning ``time_ids`` = original size + crop top-left + target size, with diffusers'
  defaults ``(h, w) + (0, 0) + (h, w)`` per request;
- the VAE may carry ``latents_mean``/``latents_std``; with ``force_upcast`` it decodes in fp32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from serve.engines.specs import ComponentSpec, Range, SizeRange, TensorSpec, float_dtype
from serve.families.base import guided_rows
from serve.families.sd import UNetFamily
from serve.params import GenerationParams
from serve.stages.messages import DenoiseJob

if TYPE_CHECKING:
    import torch


class SDXLFamily(UNetFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_components = ("text_encoder", "text_encoder_2")
    lora_components = ("text_encoder", "text_encoder_2", "unet")
    default_guidance = 5.0

    @property
    def widths(self) -> tuple[int, int]:
        """Hidden sizes of the two text encoders (768 and 1280 for SDXL base)."""
        return (
            int(self.info.config("text_encoder").get("hidden_size", 768)),
            int(self.info.config("text_encoder_2").get("hidden_size", 1280)),
        )

    @property
    def projection_dim(self) -> int:
        return int(self.info.config("text_encoder_2").get("projection_dim", 1280))

    def negative_text(self, params: GenerationParams) -> str | None:
        zeros = bool(self.info.config("model_index").get("force_zeros_for_empty_prompt", True))
        if params.negative_prompt is None and zeros:
            return None
        return params.negative_prompt or ""

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {
            "encoder_hidden_states": (self.tokenizer_length("text_encoder"), sum(self.widths)),
            "text_embeds": (self.projection_dim,),
        }

    def encode(self, engines: Mapping[str, Any], tokenizers: Mapping[str, Any], texts: Sequence[str]):
        import torch

        first = engines["text_encoder"].run(input_ids=self.token_ids(tokenizers["text_encoder"], texts))
        second = engines["text_encoder_2"].run(input_ids=self.token_ids(tokenizers["text_encoder_2"], texts))
        hidden = torch.cat([first["penultimate_hidden_state"], second["penultimate_hidden_state"]], dim=-1)
        return {"encoder_hidden_states": hidden, "text_embeds": second["text_embeds"]}

    def request_inputs(self, job: DenoiseJob, device, dtype) -> dict[str, torch.Tensor]:
        import torch

        rows = guided_rows(job, device, dtype)
        # original_size (h, w) + crops_coords_top_left (0, 0) + target_size (h, w): diffusers' defaults.
        time_ids = torch.tensor([[job.height, job.width, 0, 0, job.height, job.width]], dtype=dtype, device=device)
        rows["time_ids"] = time_ids.expand(rows["text_embeds"].shape[0], 6)
        return rows

    def set_timesteps(self, scheduler: Any, job: DenoiseJob, device: torch.device) -> None:
        super().set_timesteps(scheduler, job, device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)

    def vae_input(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        vae = self.info.config("vae")
        mean, std = vae.get("latents_mean"), vae.get("latents_std")
        if mean is not None and std is not None:
            c = latents.shape[1]
            m = torch.tensor(mean, dtype=latents.dtype, device=latents.device).view(1, c, 1, 1)
            s = torch.tensor(std, dtype=latents.dtype, device=latents.device).view(1, c, 1, 1)
            return latents * s / self.info.vae_scaling_factor + m
        return latents / self.info.vae_scaling_factor

    def component_dtype(self, component: str, dtype: torch.dtype) -> torch.dtype:
        import torch

        # SDXL's VAE overflows in fp16 (NaN images): its config asks for fp32 decoding.
        if component == "vae_decoder" and dtype == torch.float16 and self.info.config("vae").get("force_upcast"):
            return torch.float32
        return dtype

    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        from serve.families.modules import ClipTextWrapper, load_pretrained

        if component == "text_encoder":
            clip = load_pretrained("transformers", "CLIPTextModel", self.info.path, "text_encoder", dtype)
            return ClipTextWrapper(clip, ("penultimate_hidden_state",))
        if component == "text_encoder_2":
            clip = load_pretrained(
                "transformers", "CLIPTextModelWithProjection", self.info.path, "text_encoder_2", dtype
            )
            return ClipTextWrapper(clip, ("penultimate_hidden_state", "text_embeds"))
        if component == "unet":
            return self.unet_module(dtype)
        if component == "vae_decoder":
            return self.vae_module(dtype)
        raise KeyError(component)

    def specs(self, batch: Range, size: SizeRange, precision: str) -> dict[str, ComponentSpec]:
        fdt = float_dtype(precision)
        seq = self.tokenizer_length("text_encoder")
        w1, w2 = self.widths
        proj = self.projection_dim
        text_batch = (("batch", Range(batch.min, batch.opt, batch.max * 2)),)
        lat = ("batch", self.info.latent_channels, "latent_height", "latent_width")
        return {
            "text_encoder": ComponentSpec(
                component="text_encoder",
                inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
                outputs=(TensorSpec("penultimate_hidden_state", fdt, ("batch", seq, w1)),),
                dims=text_batch,
            ),
            "text_encoder_2": ComponentSpec(
                component="text_encoder_2",
                inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
                outputs=(
                    TensorSpec("penultimate_hidden_state", fdt, ("batch", seq, w2)),
                    TensorSpec("text_embeds", fdt, ("batch", proj)),
                ),
                dims=text_batch,
            ),
            "unet": ComponentSpec(
                component="unet",
                inputs=(
                    TensorSpec("sample", fdt, lat),
                    TensorSpec("timestep", "float32", ("batch",)),
                    TensorSpec("encoder_hidden_states", fdt, ("batch", seq, w1 + w2)),
                    TensorSpec("text_embeds", fdt, ("batch", proj)),
                    TensorSpec("time_ids", fdt, ("batch", 6)),
                ),
                outputs=(TensorSpec("noise_pred", fdt, lat),),
                dims=(("batch", batch.scaled(2, keep_min=True)), *self.latent_dims(size)),
            ),
            "vae_decoder": self.vae_decoder_spec(batch, size, precision),
        }


__all__ = ["SDXLFamily"]
