"""One engine interface (``load``, ``run``, ``shutdown``) for every backend and component.

Components and their I/O names (the export specs in ``export/`` use the same names):

- ``text_encoder``: ``input_ids`` (B, 77) int64 -> ``last_hidden_state`` (B, 77, D)
- ``unet``: ``sample`` (B, 4, h, w), ``timestep`` (B,) float32, ``encoder_hidden_states``
  (B, 77, D) -> ``noise_pred`` (B, 4, h, w)
- ``vae_decoder``: ``latent`` (B, 4, h, w), already divided by the VAE scaling factor
  -> ``image`` (B, 3, 8h, 8w) in [-1, 1]

Inputs and outputs are torch tensors on the engine's ``device``; a backend converts at its edge.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

COMPONENT_NAMES = ("text_encoder", "unet", "vae_decoder")


class Engine(ABC):
    """A loaded network for one component on one device."""

    backend: str = "?"
    #: Most samples one ``run`` may take (a TensorRT profile's max batch); None = no limit.
    max_batch_samples: int | None = None

    def __init__(self, model_path: Path, component: str, device: torch.device, dtype: torch.dtype) -> None:
        if component not in COMPONENT_NAMES:
            raise ValueError(f"unknown component {component!r}; expected one of {COMPONENT_NAMES}")
        self.model_path = model_path
        self.component = component
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def load(self) -> None:
        """Load weights or engine files; called once before ``run``."""

    @abstractmethod
    def run(self, **inputs: torch.Tensor) -> torch.Tensor:
        """Run one batch; inputs by the component's input names."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook; most backends free on GC
        """Release memory; the engine is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.component}, {self.device}, {self.dtype})"
