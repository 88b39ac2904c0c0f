"""Torch wrappers that give every component named inputs and outputs (its spec's names).

The torch backend runs them, ONNX export traces them, TensorRT verification compares against
them: one definition of "what this component computes". A wrapper's ``forward`` takes its
inputs positionally in spec order (the ONNX exporter passes a tuple) and returns a tuple in
``output_names`` order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from serve.errors import EngineError


def load_pretrained(library: str, class_name: str, path: Path, folder: str, dtype: torch.dtype) -> Any:
    """``Cls.from_pretrained(path, subfolder=folder)`` from ``diffusers`` or ``transformers``."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    try:
        return cls.from_pretrained(path, subfolder=folder, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise EngineError(f"cannot load {folder} ({class_name}) from {path}: {exc}") from exc


class Wrapper(torch.nn.Module):
    output_names: tuple[str, ...] = ()

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return getattr(self.model, "config", None)


class ClipTextWrapper(Wrapper):
    """CLIP: ``input_ids`` -> any of ``last_hidden_state``, ``penultimate_hidden_state`` (SDXL reads
    the layer before last), ``pooler_output`` (Flux), ``text_embeds`` (CLIP with projection)."""

    def __init__(self, model: torch.nn.Module, outputs: tuple[str, ...]) -> None:
        super().__init__(model)
        self.output_names = outputs

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden = "penultimate_hidden_state" in self.output_names
        out = self.model(input_ids=input_ids, output_hidden_states=hidden)
        values = {
            "last_hidden_state": lambda: out.last_hidden_state,
            "penultimate_hidden_state": lambda: out.hidden_states[-2],
            "pooler_output": lambda: out.pooler_output,
            "text_embeds": lambda: out.text_embeds,
        }
        return tuple(values[name]() for name in self.output_names)


class T5Wrapper(Wrapper):
    """T5 encoder: ``input_ids`` -> ``last_hidden_state``."""

    output_names = ("last_hidden_state",)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(input_ids=input_ids, output_hidden_states=False)[0],)


class UNetWrapper(Wrapper):
    """``sample``, per-sample float32 ``timestep`` (B,), ``encoder_hidden_states`` (+ SDXL's
    ``text_embeds`` and ``time_ids``) -> ``noise_pred``."""

    output_names = ("noise_pred",)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        out = self.model(
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )
        return (out[0],)


class FluxTransformerWrapper(Wrapper):
    """Flux's transformer: packed latents and text, per-sample timestep (t / 1000) and, for
    dev-style models, the guidance embedding's scale -> ``noise_pred``."""

    output_names = ("noise_pred",)

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        pooled_projections: torch.Tensor,
        img_ids: torch.Tensor,
        txt_ids: torch.Tensor,
        guidance: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor]:
        out = self.model(
            hidden_states=hidden_states,
            timestep=timestep,
            guidance=guidance,
            pooled_projections=pooled_projections,
            encoder_hidden_states=encoder_hidden_states,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )
        return (out[0],)


class VaeDecoderWrapper(Wrapper):
    """``latent`` (already scaled and shifted for the VAE) -> ``image`` in [-1, 1]."""

    output_names = ("image",)

    def forward(self, latent: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model.decode(latent, return_dict=False)[0],)


__all__ = [
    "ClipTextWrapper",
    "FluxTransformerWrapper",
    "T5Wrapper",
    "UNetWrapper",
    "VaeDecoderWrapper",
    "Wrapper",
    "load_pretrained",
]
