"""The eager PyTorch backend: diffusers / transformers modules as published."""

from __future__ import annotations

import logging

import torch

from serve.engines.base import Engine
from serve.errors import EngineError

logger = logging.getLogger(__name__)


class TorchEngine(Engine):
    backend = "torch"

    def load(self) -> None:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        path = self.model_path
        try:
            if self.component == "text_encoder":
                module = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=self.dtype)
            elif self.component == "unet":
                module = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=self.dtype)
            else:
                module = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=self.dtype)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load {self.component} from {path}: {exc}") from exc
        self.module = module.to(self.device).eval()
        self.use_attention_mask = bool(getattr(getattr(module, "config", None), "use_attention_mask", False))
        logger.info("loaded %s from %s on %s (%s)", self.component, path, self.device, self.dtype)

    @torch.inference_mode()
    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        if self.component == "text_encoder":
            return self.module(inputs["input_ids"].to(self.device), attention_mask=inputs.get("attention_mask"))[0]
        if self.component == "unet":
            return self.module(
                inputs["sample"],
                inputs["timestep"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                return_dict=False,
            )[0]
        return self.module.decode(inputs["latent"], return_dict=False)[0]

    def shutdown(self) -> None:
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
