"""Stable Diffusion 1.x / 2.x: one CLIP text encoder, a UNet, a VAE (``StableDiffusionPipeline``).

Per request this is diffusers' ``StableDiffusionPipeline.__call__``: ``encode_prompt`` (CLIP's last
hidden state; the negative prompt, "" when none, encoded when guidance is on) -> latents
``randn(n, 4, h/8, w/8) * init_noise_sigma`` from ``Generator("cpu").manual_seed(seed)`` -> per
step: CFG doubling, ``scale_model_input``, UNet, ``uncond + g * (text - uncond)``, ``step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from serve.engines.specs import ComponentSpec, Range, SizeRange, TensorSpec, float_dtype
from serve.families.base import Family, guided_rows
from serve.params import GenerationParams
from serve.stages.messages import DenoiseJob

if TYPE_CHECKING:
    import torch


class UNetFamily(Family):
    """What SD and SDXL share: CLIP tokenizers, a UNet over (n, C, h, w) latents, epsilon schedulers."""

    denoiser_component = "unet"

    @classmethod
    def native_size(cls, info: Any) -> tuple[int, int]:
        sample = info.config("unet").get("sample_size", 64)
        side = (sample if isinstance(sample, int) else sample[0]) * info.vae_scale_factor
        return (side, side)

    def cfg_scale(self, params: GenerationParams) -> float | None:
        # diffusers' rule: CFG when guidance > 1 and the UNet has no guidance embedding.
        if params.guidance_scale > 1.0 and self.info.config("unet").get("time_cond_proj_dim") is None:
            return params.guidance_scale
        return None

    def load_tokenizers(self) -> dict[str, Any]:
        from transformers import CLIPTokenizer

        folders = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}
        return {c: CLIPTokenizer.from_pretrained(self.info.path, subfolder=folders[c]) for c in self.text_components}

    @staticmethod
    def token_ids(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
        """Token ids padded/truncated to the tokenizer's max length, exactly as diffusers does."""
        return tokenizer(
            list(texts),
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def initial_latents(self, job, generator, scheduler, device, dtype) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        shape = self.info.latent_shape(job.n, job.width, job.height)
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype) * scheduler.init_noise_sigma

    def denoised(self, scheduler, model_input, noise_pred, t) -> torch.Tensor:
        """x0 from the UNet's prediction. ``model_input`` is the scaled sample the UNet saw, which is
        x_t = sqrt(a) x0 + sqrt(1 - a) eps for every scheduler here (``scale_model_input`` maps the
        sigma-space latents of Euler, LMS and Heun into that form), a = alphas_cumprod at t
        (interpolated: Euler's timesteps can fall between integers). Worked example, t = 500 of SD's
        schedule: a = 0.28, so x0 = (x_t - 0.85 eps) / 0.53."""
        import torch

        table = scheduler.alphas_cumprod.to(torch.float32)
        pos = float(t) if float(t) < len(table) - 1 else float(len(table) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(table) - 1)
        alpha = float(table[lo] + (table[hi] - table[lo]) * (pos - lo))
        a, b = alpha**0.5, (1 - alpha) ** 0.5
        x, pred = model_input.float(), noise_pred.float()
        kind = scheduler.config.get("prediction_type", "epsilon")
        if kind == "v_prediction":
            return a * x - b * pred
        if kind == "sample":
            return pred
        return (x - b * pred) / a

    def unet_module(self, dtype: torch.dtype) -> torch.nn.Module:
        from serve.families.modules import UNetWrapper, load_pretrained

        return UNetWrapper(load_pretrained("diffusers", "UNet2DConditionModel", self.info.path, "unet", dtype))


class SDFamily(UNetFamily):
    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    text_components = ("text_encoder",)

    @property
    def text_width(self) -> int:
        return int(self.info.config("text_encoder").get("hidden_size", 768))

    def conditioning_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"encoder_hidden_states": (self.tokenizer_length("text_encoder"), self.text_width)}

    def encode(self, engines: Mapping[str, Any], tokenizers: Mapping[str, Any], texts: Sequence[str]):
        ids = self.token_ids(tokenizers["text_encoder"], texts)
        out = engines["text_encoder"].run(input_ids=ids)["last_hidden_state"]
        return {"encoder_hidden_states": out}

    def request_inputs(self, job: DenoiseJob, device, dtype) -> dict[str, torch.Tensor]:
        return guided_rows(job, device, dtype)

    def module(self, component: str, dtype: torch.dtype) -> torch.nn.Module:
        from serve.families.modules import ClipTextWrapper, load_pretrained

        if component == "text_encoder":
            clip = load_pretrained("transformers", "CLIPTextModel", self.info.path, "text_encoder", dtype)
            return ClipTextWrapper(clip, ("last_hidden_state",))
        if component == "unet":
            return self.unet_module(dtype)
        if component == "vae_decoder":
            return self.vae_module(dtype)
        raise KeyError(component)

    def specs(self, batch: Range, size: SizeRange, precision: str) -> dict[str, ComponentSpec]:
        """Worked example, the tiny model (VAE factor 8) with ``batch=1:1:4`` and ``size=32:64:128``:
        the UNet's ``sample`` profile is min (1, 4, 4, 4), opt (2, 4, 8, 8), max (8, 4, 16, 16) -- the
        UNet's batch doubles at opt and max because classifier-free guidance runs the unconditional and
        the conditional sample of every image together."""
        fdt = float_dtype(precision)
        seq, hidden = self.tokenizer_length("text_encoder"), self.text_width
        lat = ("batch", self.info.latent_channels, "latent_height", "latent_width")
        text = ComponentSpec(
            component="text_encoder",
            inputs=(TensorSpec("input_ids", "int64", ("batch", seq)),),
            outputs=(TensorSpec("last_hidden_state", fdt, ("batch", seq, hidden)),),
            dims=(("batch", Range(batch.min, batch.opt, batch.max * 2)),),
        )
        unet = ComponentSpec(
            component="unet",
            inputs=(
                TensorSpec("sample", fdt, lat),
                TensorSpec("timestep", "float32", ("batch",)),
                TensorSpec("encoder_hidden_states", fdt, ("batch", seq, hidden)),
            ),
            outputs=(TensorSpec("noise_pred", fdt, lat),),
            dims=(("batch", batch.scaled(2, keep_min=True)), *self.latent_dims(size)),
        )
        return {"text_encoder": text, "unet": unet, "vae_decoder": self.vae_decoder_spec(batch, size, precision)}


__all__ = ["SDFamily", "UNetFamily"]
