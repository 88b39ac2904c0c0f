"""One engine interface (``load``, ``run``, ``shutdown``) for every backend and component.

A component is one network of a model: a text encoder, the denoiser (``unet`` or
``transformer``) or the ``vae_decoder``; which ones a model has, and their input and output
names, is its family's business (``serve/families``: each component's torch wrapper and export
spec use the same names). For SD 1.x, for example:

- ``text_encoder``: ``input_ids`` (B, 77) int64 -> ``last_hidden_state`` (B, 77, D)
- ``unet``: ``sample`` (B, 4, h, w), ``timestep`` (B,) float32, ``encoder_hidden_states``
  (B, 77, D) -> ``noise_pred`` (B, 4, h, w)
- ``vae_decoder``: ``latent`` (B, 4, h, w), already scaled for the VAE -> ``image`` (B, 3, 8h, 8w)
  in [-1, 1]

``run`` takes inputs by name and returns every output by name; tensors live on the engine's
``device`` (a backend converts at its edge).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from serve.model import ModelInfo


class Engine(ABC):
    """A loaded network for one component on one device."""

    backend: str = "?"
    #: Most samples one ``run`` may take (a TensorRT profile's max batch); None = no limit.
    max_batch_samples: int | None = None

    def __init__(self, info: ModelInfo, component: str, device: torch.device, dtype: torch.dtype) -> None:
        self.info = info
        self.model_path: Path = info.path
        self.component = component
        self.device = device
        self.dtype = dtype

    @abstractmethod
    def load(self) -> None:
        """Load weights or engine files; called once before ``run``."""

    @abstractmethod
    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run one batch; inputs and outputs by the component's names."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook; most backends free on GC
        """Release memory; the engine is unusable afterwards."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.component}, {self.device}, {self.dtype})"
