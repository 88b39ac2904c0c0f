"""Stage 3: latents -> uint8 images (VAE decode, batched across requests) -> encoded bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serve.engines import Engine
from serve.model import ModelInfo
from serve.stages.loading import load_stage_engine


class Decoder:
    """Decodes latents of any number of requests; same-size latents share VAE calls."""

    def __init__(self, info: ModelInfo, engine: Engine, *, max_batch_samples: int = 16) -> None:
        self.info = info
        self.engine = engine
        self.max_batch_samples = max_batch_samples
        self.vae_calls = 0

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
    ) -> Decoder:
        info, engine = load_stage_engine(source, "vae_decoder", backend=backend, device=device, dtype=dtype)
        return cls(info, engine)

    def decode(self, latents: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each (n, C, h, w) latent array -> (n, 8h, 8w, 3) uint8, as diffusers' postprocess makes."""
        out: list[np.ndarray | None] = [None] * len(latents)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, lat in enumerate(latents):
            groups.setdefault(tuple(lat.shape[1:]), []).append(i)
        for idxs in groups.values():
            batch = torch.from_numpy(np.concatenate([latents[i] for i in idxs]))
            batch = batch.to(self.engine.device, self.engine.dtype) / self.info.vae_scaling_factor
            images = []
            chunk = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
            for lo in range(0, batch.shape[0], chunk):
                images.append(self.engine.run(latent=batch[lo : lo + chunk]))
                self.vae_calls += 1
            pixels = to_uint8(torch.cat(images))
            offset = 0
            for i in idxs:
                k = latents[i].shape[0]
                out[i] = pixels[offset : offset + k]
                offset += k
        return out  # type: ignore[return-value]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, the arithmetic of diffusers' VaeImageProcessor.postprocess."""
    images = (images / 2 + 0.5).clamp(0, 1)
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (arr * 255).round().astype("uint8")
