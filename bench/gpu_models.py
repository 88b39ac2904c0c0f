"""Full-size model architectures with random weights, written in code (no download) for bench/gpu.py.

``sd15``: Stable Diffusion 1.5's UNet (860M parameters), CLIP ViT-L text encoder and VAE, as in
its published configs; ``sdxl``: SDXL base 1.0's UNet (2.6B), its two text encoders (CLIP ViT-L,
OpenCLIP bigG) and VAE. Only the tokenizer is Darkroom's offline one (the tiny models'), so the
text encoders' vocabularies are its size; everything the GPU spends its time on has the real
shapes. ``tiny`` builds the embedded tiny models instead (the CPU smoke test).

Random weights: the images are noise, which is fine for timing and for a step cache's distance
to its own uncached image, not for judging how good an image looks.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

#: Model name -> (family, native side in pixels). ``flux`` is built at tiny size only (FLUX.1's
#: 12B-parameter transformer is not written here): it exercises TeaCache in the smoke test.
MODELS: dict[str, tuple[str, int]] = {"sd15": ("sd", 512), "sdxl": ("sdxl", 1024), "flux": ("flux", 1024)}

SD15_SCHEDULER = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def _clip(vocab: dict[str, int], hidden: int, layers: int, heads: int, act: str, projection: int | None = None):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection else {}
    return CLIPTextConfig(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"],
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        max_position_embeddings=77,
        vocab_size=len(vocab),
        hidden_act=act,
        **extra,
    )


def _vae(scaling_factor: float, sample_size: int, force_upcast: bool) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=sample_size,
        scaling_factor=scaling_factor,
        force_upcast=force_upcast,
    )


def write_sd15(folder: Path, device: str) -> None:
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from serve.tiny.tokenizers import build_tokenizer_files, clip_tokenizer, write_clip_files

    vocab, merges = build_tokenizer_files()
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1B parameters is minutes on a CPU, seconds on a GPU
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        text_encoder = CLIPTextModel(_clip(vocab, 768, 12, 12, "quick_gelu"))
        vae = _vae(0.18215, 512, force_upcast=True)
    pipe = StableDiffusionPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        tokenizer=clip_tokenizer(vocab, merges),
        unet=unet.half(),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_files(folder / "tokenizer", vocab, merges)


def write_sdxl(folder: Path, device: str) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from serve.tiny.sdxl import SCHEDULER_CONFIG
    from serve.tiny.tokenizers import build_tokenizer_files, clip_tokenizer, write_clip_files

    vocab, merges = build_tokenizer_files()
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=128,
            in_channels=4,
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,  # 6 * 256 + 1280
        )
        text_encoder = CLIPTextModel(_clip(vocab, 768, 12, 12, "quick_gelu"))
        text_encoder_2 = CLIPTextModelWithProjection(_clip(vocab, 1280, 32, 20, "gelu", projection=1280))
        vae = _vae(0.13025, 1024, force_upcast=True)
    pipe = StableDiffusionXLPipeline(
        vae=vae.half(),
        text_encoder=text_encoder.half(),
        text_encoder_2=text_encoder_2.half(),
        tokenizer=clip_tokenizer(vocab, merges),
        tokenizer_2=clip_tokenizer(vocab, merges, pad_token="!"),
        unet=unet.half(),
        scheduler=EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_files(folder / "tokenizer", vocab, merges)
    write_clip_files(folder / "tokenizer_2", vocab, merges)


def build(name: str, root: Path, *, tiny: bool, device: str) -> Path:
    """The model's folder under ``root``, made once per version of the code that writes it.

    The folder is named by a hash of that code (this module, and every module of ``serve/tiny/`` for
    tiny models), so a changed architecture or weight seed builds a new folder rather than reusing a
    stale one from a persistent cache; a finished folder holds ``gpu_bench.json``."""
    sources = [Path(__file__)]
    if tiny:
        import serve.tiny

        sources.extend(sorted(Path(serve.tiny.__file__).parent.glob("*.py")))
    key = hashlib.sha256(b"".join(s.read_bytes() for s in sources)).hexdigest()[:12]
    folder = root / f"{'tiny-' if tiny else ''}{name}-{key}"
    done = folder / "gpu_bench.json"
    if done.is_file():
        return folder
    family, _ = MODELS[name]
    if tiny:
        from serve.tiny import write_tiny_model

        write_tiny_model(folder, family=family)
    elif name == "flux":
        raise ValueError("flux is built at tiny size only (--tiny)")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        {"sd15": write_sd15, "sdxl": write_sdxl}[name](folder, device)
    done.write_text(json.dumps({"model": name, "tiny": tiny}))
    return folder


__all__ = ["MODELS", "build", "write_sd15", "write_sdxl"]
