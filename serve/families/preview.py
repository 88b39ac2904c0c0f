"""Cheap previews: a linear map from latents to RGB, fitted once per model from its own VAE.

A partial image must cost almost nothing next to a denoiser step, so it never runs the VAE: a
latent pixel becomes an RGB pixel by ``rgb = latent @ W[:C] + W[C]`` (C latent channels, one
bias row), at the latent grid's resolution (1/8 of each side for SD, SDXL and Flux). ``W``
comes from a least-squares fit, at load time, of the model's own VAE on random latents:

    z ~ N(0, 1), (k, C, s, s)    ->  VAE(vae_input(z)) in [-1, 1], (k, 3, f*s, f*s)
    pooled RGB = avg_pool(f) of (image / 2 + 0.5), (k, 3, s, s)
    W = argmin || [z, 1] W - pooled RGB ||^2,   one row per latent pixel: k*s*s rows, C + 1 unknowns

so it works for any VAE (published factors exist for the real SD/SDXL/Flux VAEs only). Random
N(0, 1) latents are in distribution for trained models (``scaling_factor`` makes their latents
unit-variance); the tiny random-weight test models end with latents of std ~10, where that fit
saturates. So the Decoder also refits from the real images it decodes (``PreviewFit``: the same
least squares over running sums, microseconds per image) and uses that fit once it has
``FIT_MIN_PIXELS`` rows. The Decoder owns the VAE, so it fits; the map (a few hundred bytes)
travels with each ``DenoiseJob`` that asks for previews. Previews are approximate by nature:
the final image never depends on the map.

Worked example, SD at 512x512: the latent is 4x64x64, so a preview is a 64x64 image from one
(4096 x 4) @ (4 x 3) product; the UNet step it follows is ~1e12 FLOPs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

    from serve.families.base import Family

logger = logging.getLogger(__name__)

#: Rows of the fit: at least this many latent pixels (5 unknowns per colour for SD: plenty).
FIT_MIN_PIXELS = 1024
#: Real rows (latent pixels) after which the Decoder stops refining the map.
FIT_MAX_PIXELS = 1 << 16
#: Fewest and most random latents the fit decodes.
FIT_MIN_SAMPLES, FIT_MAX_SAMPLES = 4, 64


def fit_plan(native_size: tuple[int, int], vae_scale_factor: int, latent_patch: int = 1) -> tuple[int, int]:
    """``(samples, latent_side)`` for the fit: half the native latent side (the smallest size a
    default TensorRT profile takes, so every backend can decode it), enough samples for
    ``FIT_MIN_PIXELS`` rows. The tiny SD model (64 px): side 4, 64 samples; SD (512 px): side 32, 4."""
    side = max(min(native_size) // vae_scale_factor // 2, latent_patch)
    side -= side % latent_patch  # Flux: whole 2x2 patches
    samples = min(FIT_MAX_SAMPLES, max(FIT_MIN_SAMPLES, math.ceil(FIT_MIN_PIXELS / (side * side))))
    return samples, side


def fit_latent_rgb(
    family: Family,
    decode: Callable[[torch.Tensor], torch.Tensor],
    *,
    device: Any = "cpu",
    dtype: Any = None,
    max_batch: int = 16,
    seed: int = 0,
) -> np.ndarray:
    """The (C + 1, 3) float32 map from final latents (what ``Family.final_latents`` returns,
    before ``vae_input``) to RGB in [0, 1]. ``decode(vae_latents) -> images in [-1, 1]`` is the
    VAE (an engine's ``run``). Deterministic: the random latents come from ``seed``."""
    import torch
    import torch.nn.functional as F

    info = family.info
    channels, f = info.latent_channels, info.vae_scale_factor
    samples, side = fit_plan(info.native_size, f, family.latent_patch)
    z = torch.randn(samples, channels, side, side, generator=torch.Generator("cpu").manual_seed(seed))
    images = []
    with torch.no_grad():
        for lo in range(0, samples, max_batch):
            part = family.vae_input(z[lo : lo + max_batch].to(device, dtype or torch.float32))
            images.append(decode(part).float().cpu())
    # No clamp before pooling: to_uint8 clamps after, and clamped targets would bias the fit.
    rgb = torch.cat(images) / 2 + 0.5
    pooled = F.avg_pool2d(rgb, rgb.shape[-1] // side)
    fit = PreviewFit(channels)
    fit.add(z.numpy(), pooled.permute(0, 2, 3, 1).numpy())
    logger.info("preview map fitted on %d random latents of %dx%d", samples, side, side)
    return fit.solve()


class PreviewFit:
    """Least squares ``[latent, 1] @ W = rgb`` over running sums (X'X, X'Y): rows are added as
    images come and the map is re-solved on demand; memory stays (C + 1)^2 whatever the traffic."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.xtx = np.zeros((channels + 1, channels + 1))
        self.xty = np.zeros((channels + 1, 3))
        self.rows = 0

    def add(self, latents: np.ndarray, rgb: np.ndarray) -> None:
        """(n, C, h, w) latents and their pooled colours (n, h, w, 3) in [0, 1]."""
        x = np.asarray(latents, dtype=np.float64).transpose(0, 2, 3, 1).reshape(-1, self.channels)
        x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        y = np.asarray(rgb, dtype=np.float64).reshape(-1, 3)
        self.xtx += x.T @ x
        self.xty += x.T @ y
        self.rows += x.shape[0]

    def add_image(self, latents: np.ndarray, pixels: np.ndarray) -> None:
        """Final latents (n, C, h, w) and the uint8 images (n, f*h, f*w, 3) the VAE made of them."""
        n, _, h, w = latents.shape
        f = pixels.shape[1] // h
        pooled = pixels[:, : h * f, : w * f].reshape(n, h, f, w, f, 3).mean(axis=(2, 4)) / 255.0
        self.add(latents, pooled)

    def solve(self) -> np.ndarray:
        """The (C + 1, 3) float32 map. A ridge of 1e-6 per row keeps it defined on few rows."""
        ridge = 1e-6 * max(self.rows, 1) * np.eye(self.channels + 1)
        return np.linalg.solve(self.xtx + ridge, self.xty).astype(np.float32)


def latent_rgb(latents: torch.Tensor, preview_map: np.ndarray) -> np.ndarray:
    """(n, C, h, w) latents -> (n, h, w, 3) uint8 through the map, rounded as ``to_uint8`` does."""
    import torch

    w = torch.as_tensor(np.asarray(preview_map), dtype=torch.float32, device=latents.device)
    channels = latents.shape[1]
    if w.shape != (channels + 1, 3):
        raise ValueError(f"preview map must be ({channels + 1}, 3) for {channels} latent channels, is {tuple(w.shape)}")
    rgb = torch.einsum("nchw,ck->nhwk", latents.float(), w[:channels]) + w[channels]
    return (rgb.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


__all__ = ["FIT_MAX_PIXELS", "FIT_MIN_PIXELS", "PreviewFit", "fit_latent_rgb", "fit_plan", "latent_rgb"]
