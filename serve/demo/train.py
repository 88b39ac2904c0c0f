"""`darkroom train-demo OUT`: train the demo model on synthetic scenes, resumably, on a CPU.

Three phases, each a plain PyTorch loop over diffusers' own models and training utilities:

1. **vae** -- ``AutoencoderKL`` on freshly rendered scenes: reconstruction (MSE, shape pixels
   weighted up) plus a small KL term on ``latent_dist``, sampled with the reparameterisation as
   SD's VAE was trained.
2. **latents** -- ``dataset_size`` training scenes encoded once (posterior mean and std kept,
   a latent sampled from them per step, as diffusers' training scripts do); the VAE's
   ``scaling_factor`` is set so scaled latents have unit variance (SD's 0.18215, measured here).
3. **unet** -- ``UNet2DConditionModel`` and ``CLIPTextModel`` trained together (no pretrained
   text encoder exists here) on the v-prediction objective (``DDPMScheduler.add_noise`` and
   ``get_velocity``) over SD's
   betas (plus offset noise), min-SNR loss weights (``diffusers.training_utils.compute_snr``), AdamW with a cosine
   schedule (``diffusers.optimization.get_scheduler``), an ``EMAModel`` of both networks, and
   captions dropped to "" 10% of the time so classifier-free guidance has an unconditional
   branch to push away from.

Then the EMA weights are written as a ``StableDiffusionPipeline`` (``OUT/model``).

Every batch is a pure function of ``(seed, phase, step)``, so a run resumed from a checkpoint
(``OUT/checkpoints/``, written every ``checkpoint_every`` steps and on Ctrl-C) continues exactly
as if it had not stopped.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from serve.demo.data import COLOURS, IMAGE_SIZE, Scene, caption_for, render, training_scene
from serve.demo.model import (
    DEFAULT_GUIDANCE,
    DEMO_MODEL_VERSION,
    MARKER,
    VAE_FACTOR,
    build_scheduler,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    write_tokenizer_extras,
)
from serve.errors import DarkroomError

logger = logging.getLogger(__name__)

#: ``progress(phase, done, total, metrics)``: called after every step of every phase.
Progress = Callable[[str, int, int, dict[str, float]], None]

# Seed offsets per phase, so the VAE, the encoded data set and the UNet never see the same
# scene stream (the held-out combinations are excluded from all of them).
_VAE_DATA, _DATASET, _UNET_DATA = 1, 2, 3


class TrainConfig(BaseModel):
    """Everything that decides the trained weights (saved with the run; a resume must match)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, ge=0, description="seed of the scene streams, initial weights and noise")
    vae_steps: int = Field(2000, ge=0, description="VAE optimiser steps")
    vae_batch_size: int = Field(8, ge=1, description="rendered scenes per VAE step")
    vae_foreground_weight: float = Field(
        10.0, ge=0, description="extra loss weight of shape pixels (and a 1-pixel rim) over background ones"
    )
    vae_learning_rate: float = Field(
        3e-4, gt=0, description="peak AdamW learning rate of the VAE (1e-3 plateaued at MSE 0.09 here; 3e-4 did not)"
    )
    vae_kl_weight: float = Field(1e-6, ge=0, description="weight of the KL term (summed per image) in the VAE loss")
    dataset_size: int = Field(16000, ge=1, description="training scenes encoded once into latents for the UNet")
    unet_steps: int = Field(8000, ge=0, description="UNet + text encoder optimiser steps")
    batch_size: int = Field(32, ge=1, description="latents per UNet step")
    learning_rate: float = Field(5e-4, gt=0, description="peak AdamW learning rate of the UNet and text encoder")
    warmup_steps: int = Field(200, ge=0, description="linear learning-rate warm-up before the cosine decay")
    ema_decay: float = Field(0.999, gt=0, lt=1, description="EMAModel's maximum decay (it warms up to it)")
    unet_foreground_weight: float = Field(
        0.0,
        ge=0,
        description="extra UNet loss weight of latent cells a shape touches (0: plain MSE over all cells)",
    )
    unet_text_time_embedding: bool = Field(
        True, description="add a pooled caption embedding to the UNet's timestep embedding (build_unet)"
    )
    unet_channels: tuple[int, int, int] = Field(
        (48, 64, 64), description="UNet channels at 16x16, 8x8 and 4x4 latent pixels (multiples of 8)"
    )
    timestep_sampling: str = Field(
        "high",
        pattern="^(uniform|high)$",
        description="training timesteps: uniform, or high (density rising linearly with t: more of the "
        "noisy steps where only the caption tells the shape)",
    )
    caption_dropout: float = Field(0.1, ge=0, le=1, description="share of captions replaced by '' (for CFG)")
    snr_gamma: float | None = Field(5.0, gt=0, description="min-SNR loss weighting gamma; None for plain MSE")
    noise_offset: float = Field(
        0.1, ge=0, description="std of a per-image, per-channel constant added to the noise (diffusers' noise_offset)"
    )
    checkpoint_every: int = Field(250, ge=1, description="steps between checkpoints, in each phase")


def _progress_noop(phase: str, done: int, total: int, metrics: dict[str, float]) -> None:
    return None


def _save(obj: Any, path: Path) -> None:
    """torch.save through a temporary file: a crash mid-write never leaves a torn checkpoint."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: Path) -> dict[str, Any] | None:
    import torch

    return torch.load(path, weights_only=False) if path.is_file() else None


def _images(scenes: list[Scene]):
    """Rendered scenes as SD's VAE input: float (n, 3, H, W) in [-1, 1]."""
    import torch

    pixels = np.stack([render(s) for s in scenes]).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()


class Trainer:
    """One training run in ``out``: phases skip what a previous (interrupted) run finished."""

    def __init__(self, out: str | os.PathLike[str], config: TrainConfig, progress: Progress | None = None) -> None:
        self.out = Path(out).expanduser().resolve()
        self.config = config
        self.progress = progress or _progress_noop
        self.ckpt = self.out / "checkpoints"
        self.ckpt.mkdir(parents=True, exist_ok=True)
        saved = self.out / "train_config.json"
        if saved.is_file():
            previous = TrainConfig.model_validate_json(saved.read_text())
            if previous != config:
                raise DarkroomError(
                    f"{self.out} holds a run with another configuration ({saved}); "
                    "resume it with the same flags or train into a new folder"
                )
        else:
            saved.write_text(config.model_dump_json(indent=2))
        self.tokenizer = build_tokenizer()
        self._token_cache: dict[str, Any] = {}

    # -- phase 1: VAE ---------------------------------------------------------------------------
    def train_vae(self):
        import torch
        import torch.nn.functional as F
        from diffusers.optimization import get_scheduler

        cfg = self.config
        torch.manual_seed(cfg.seed)
        vae = build_vae()
        with torch.no_grad():
            # Start the posterior's log-variance at -6 (std 0.05) instead of 0 (std 1). SD's VAE
            # trained for 100k+ steps, time enough to learn it; in ~1000 Adam steps the bias
            # moves by ~1, and until it falls the sampled latents are mostly noise and the
            # decoder can only learn average colours (seen here: 250 steps, backgrounds wrong).
            vae.quant_conv.bias[vae.config.latent_channels :] -= 6.0
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_learning_rate)
        # Cosine decay: the last steps at a small rate sharpen edges more than extra steps would.
        lr_scheduler = get_scheduler(
            "cosine", opt, num_warmup_steps=min(50, cfg.vae_steps // 10), num_training_steps=max(cfg.vae_steps, 1)
        )
        state = _load(self.ckpt / "vae.pt")
        step = 0
        if state is not None:
            vae.load_state_dict(state["vae"])
            opt.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            step = state["step"]
            logger.info("vae: resumed at step %d", step)

        def checkpoint() -> None:
            state = {"vae": vae.state_dict(), "optimizer": opt.state_dict(), "step": step}
            _save(state | {"lr_scheduler": lr_scheduler.state_dict()}, self.ckpt / "vae.pt")

        vae.train()
        try:
            while step < cfg.vae_steps:
                scenes = [
                    training_scene(cfg.seed * 10 + _VAE_DATA, step * cfg.vae_batch_size + j)
                    for j in range(cfg.vae_batch_size)
                ]
                x = _images(scenes)
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
                posterior = vae.encode(x).latent_dist
                recon = vae.decode(posterior.sample(generator=g)).sample
                # Shapes cover ~5% of the pixels, so plain MSE is mostly background and the
                # VAE learns blobs first: weighting shape pixels 10x took the checker's shape
                # rate on reconstructions from 39% to 73% in 800 steps (measured here).
                background = torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float32)
                background = background[:, :, None, None] / 127.5 - 1.0
                shape = ((x - background).abs().sum(1, keepdim=True) > 0.05).float()
                weight = 1.0 + cfg.vae_foreground_weight * F.max_pool2d(shape, 3, stride=1, padding=1)
                mse = F.mse_loss(recon, x)
                kl = posterior.kl().mean()
                loss = (weight * (recon - x) ** 2).mean() + cfg.vae_kl_weight * kl
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
                opt.step()
                lr_scheduler.step()
                step += 1
                self.progress("vae", step, cfg.vae_steps, {"mse": mse.item(), "kl": kl.item()})
                if step % cfg.checkpoint_every == 0 or step == cfg.vae_steps:
                    checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise
        return vae.eval()

    # -- phase 2: encode the data set -----------------------------------------------------------
    def encode_dataset(self, vae) -> tuple[Any, Any, list[Scene], float]:
        """(posterior means, stds, scenes, scaling_factor); cached in OUT for a resume."""
        import torch

        cfg = self.config
        scenes = [training_scene(cfg.seed * 10 + _DATASET, i) for i in range(cfg.dataset_size)]
        cached = _load(self.ckpt / "latents.pt")
        if cached is not None and cached["n"] == cfg.dataset_size:
            return cached["mean"], cached["std"], scenes, cached["scaling_factor"]
        means, stds = [], []
        chunk = 256
        with torch.no_grad():
            for start in range(0, len(scenes), chunk):
                dist = vae.encode(_images(scenes[start : start + chunk])).latent_dist
                means.append(dist.mean.half())
                stds.append(dist.std.half())
                self.progress("latents", min(start + chunk, len(scenes)), len(scenes), {})
        mean, std = torch.cat(means), torch.cat(stds)
        # Unit variance of sampled latents, as SD's 0.18215 was chosen: std of mean + std * eps.
        variance = (mean.float().var() + std.float().pow(2).mean()).item()
        scaling_factor = float(1.0 / np.sqrt(variance))
        _save(
            {"mean": mean, "std": std, "scaling_factor": scaling_factor, "n": cfg.dataset_size},
            self.ckpt / "latents.pt",
        )
        logger.info("latents: %d scenes, scaling_factor %.4f", len(scenes), scaling_factor)
        return mean, std, scenes, scaling_factor

    def foreground_masks(self, scenes: list[Scene]):
        """Per scene, float (1, h, w) at latent resolution: 1 where a latent cell holds shape pixels.

        Rendered again (cached in OUT for a resume): the scenes are pure functions of their index.
        """
        import torch
        import torch.nn.functional as F

        cached = _load(self.ckpt / "masks.pt")
        if cached is not None and cached["n"] == len(scenes):
            return cached["masks"]
        chunks = []
        chunk = 256
        for start in range(0, len(scenes), chunk):
            part = scenes[start : start + chunk]
            pixels = torch.from_numpy(np.stack([render(s) for s in part]).astype(np.int16))
            background = torch.tensor([COLOURS[s.background] for s in part], dtype=torch.int16)[:, None, None, :]
            shape = ((pixels - background).abs().sum(-1) > 6).float()[:, None]
            chunks.append(F.max_pool2d(shape, VAE_FACTOR).bool())
            self.progress("masks", min(start + chunk, len(scenes)), len(scenes), {})
        masks = torch.cat(chunks)
        _save({"masks": masks, "n": len(scenes)}, self.ckpt / "masks.pt")
        return masks

    # -- phase 3: UNet + text encoder -----------------------------------------------------------
    def _token_ids(self, captions: list[str]):
        import torch

        missing = [c for c in dict.fromkeys(captions) if c not in self._token_cache]
        if missing:
            ids = self.tokenizer(
                missing,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            self._token_cache.update(zip(missing, ids, strict=True))
        return torch.stack([self._token_cache[c] for c in captions])

    def _captions(self, scenes: list[Scene], step: int) -> list[str]:
        """A fresh phrasing of each scene every step (or "" for the unconditional branch)."""
        cfg = self.config
        rng = random.Random(cfg.seed * 1_000_003 + step)
        captions = []
        for s in scenes:
            if rng.random() < cfg.caption_dropout:
                captions.append("")
            else:
                captions.append(caption_for(rng, s.colour, s.shape, s.position, s.background, s.size, s.count))
        return captions

    def train_unet(self, mean, std, scenes: list[Scene], scaling_factor: float):
        import torch
        import torch.nn.functional as F
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import EMAModel, compute_snr

        cfg = self.config
        torch.manual_seed(cfg.seed + 1)
        unet = build_unet(cfg.unet_text_time_embedding, cfg.unet_channels)
        text_encoder = build_text_encoder(self.tokenizer)
        params = list(unet.parameters()) + list(text_encoder.parameters())
        # The shipped scheduler's betas (from_config drops PNDM-only keys).
        noise_scheduler = DDPMScheduler.from_config(build_scheduler().config)
        opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=1e-2)
        lr_scheduler = get_scheduler(
            "cosine", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=max(cfg.unet_steps, 1)
        )
        ema = EMAModel(params, decay=cfg.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4)
        step = 0
        state = _load(self.ckpt / "unet.pt")
        if state is not None:
            unet.load_state_dict(state["unet"])
            text_encoder.load_state_dict(state["text_encoder"])
            opt.load_state_dict(state["optimizer"])
            lr_scheduler.load_state_dict(state["lr_scheduler"])
            ema.load_state_dict(state["ema"])
            step = state["step"]
            logger.info("unet: resumed at step %d", step)

        def checkpoint() -> None:
            _save(
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "optimizer": opt.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "ema": ema.state_dict(),
                    "step": step,
                },
                self.ckpt / "unet.pt",
            )

        unet.train()
        text_encoder.train()
        n = mean.shape[0]
        masks = self.foreground_masks(scenes) if cfg.unet_foreground_weight > 0 else None
        try:
            while step < cfg.unet_steps:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_777_777 + step)
                idx = torch.randint(0, n, (cfg.batch_size,), generator=g)
                eps = torch.randn(mean[idx].shape, generator=g)
                latents = (mean[idx].float() + std[idx].float() * eps) * scaling_factor
                noise = torch.randn(latents.shape, generator=g)
                # Offset noise (diffusers' --noise_offset): SD's schedule leaves ~8% of the
                # signal at its last timestep, and a 16x16 latent's mean is a strong clue to the
                # background colour. Without the offset the model read the colour off that
                # clue instead of the caption, and from pure noise drew pink or orange
                # backgrounds whatever was asked (12% right after 1000 steps).
                noise = noise + cfg.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g)
                steps_total = noise_scheduler.config.num_train_timesteps
                if cfg.timestep_sampling == "high":
                    u = torch.rand(cfg.batch_size, generator=g)
                    timesteps = (steps_total * u.sqrt()).long().clamp(max=steps_total - 1)
                else:
                    timesteps = torch.randint(0, steps_total, (cfg.batch_size,), generator=g)
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                ids = self._token_ids(self._captions([scenes[i] for i in idx.tolist()], step))
                hidden = text_encoder(ids)[0]
                pred = unet(noisy, timesteps, hidden).sample
                v_prediction = noise_scheduler.config.prediction_type == "v_prediction"
                target = noise_scheduler.get_velocity(latents, noise, timesteps) if v_prediction else noise
                error = F.mse_loss(pred, target, reduction="none")
                if masks is not None:
                    # A shape covers ~5-15% of the latent cells, so plain MSE is mostly
                    # background: the model learnt background, place and colour but drew blobs.
                    error = error * (1.0 + cfg.unet_foreground_weight * masks[idx].float())
                per_sample = error.mean(dim=(1, 2, 3))
                if cfg.snr_gamma is not None:
                    # Weights that cap how much the image error counts at low noise (min-SNR),
                    # keeping it at >= 1 at high noise: there the caption decides background
                    # and place. In image-error terms the v loss weighs SNR + 1, epsilon SNR.
                    snr = compute_snr(noise_scheduler, timesteps)
                    if v_prediction:
                        per_sample = per_sample * torch.clamp(snr + 1, max=cfg.snr_gamma) / (snr + 1)
                    else:
                        per_sample = per_sample * torch.clamp(snr, max=cfg.snr_gamma) / snr
                loss = per_sample.mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                lr_scheduler.step()
                ema.step(params)
                step += 1
                self.progress("unet", step, cfg.unet_steps, {"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]})
                if step % cfg.checkpoint_every == 0 or step == cfg.unet_steps:
                    checkpoint()
        except KeyboardInterrupt:
            checkpoint()
            raise
        ema.copy_to(params)  # the shipped weights are the EMA's
        return unet.eval(), text_encoder.eval()

    # -- the whole run --------------------------------------------------------------------------
    def run(self) -> Path:
        t0 = time.perf_counter()
        vae = self.train_vae()
        mean, std, scenes, scaling_factor = self.encode_dataset(vae)
        vae.register_to_config(scaling_factor=scaling_factor)
        unet, text_encoder = self.train_unet(mean, std, scenes, scaling_factor)
        final = self.export(vae, unet, text_encoder)
        logger.info("wrote demo model to %s (%.0f s)", final, time.perf_counter() - t0)
        return final

    def export(self, vae, unet, text_encoder) -> Path:
        """The trained networks as a ``StableDiffusionPipeline`` folder, ``OUT/model``."""
        import torch
        from diffusers import StableDiffusionPipeline

        # Shipped as float16 (half the bytes: ~5 MB in all): diffusers loads UNet and VAE
        # weights into float32 models whatever their stored dtype, so every path computes in
        # float32 on the same (rounded) weights. The text encoder stays float32 (0.6 MB):
        # transformers keeps a checkpoint's stored dtype, and float16 CLIP on a CPU is slow.
        pipe = StableDiffusionPipeline(
            vae=vae.to(torch.float16),
            text_encoder=text_encoder,
            tokenizer=self.tokenizer,
            unet=unet.to(torch.float16),
            scheduler=build_scheduler(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        final = self.out / "model"
        tmp = self.out / ".model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_tokenizer_extras(tmp / "tokenizer")
        marker = {
            "version": DEMO_MODEL_VERSION,
            "image_size": IMAGE_SIZE,
            "default_guidance": DEFAULT_GUIDANCE,
            "train": self.config.model_dump(),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return final


def train_demo(
    out: str | os.PathLike[str], config: TrainConfig | None = None, progress: Progress | None = None
) -> Path:
    """Train (or resume training) the demo model into ``out``; returns ``out/model``."""
    return Trainer(out, config or TrainConfig(), progress).run()
