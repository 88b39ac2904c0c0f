"""The tiny Stable Diffusion 1.x model (``StableDiffusionPipeline`` layout).

Its files are frozen: caches, parity tests and exported repositories depend on them, so the
seeds, the order of ``torch.manual_seed`` calls and every config value stay as they are.
"""

from __future__ import annotations

from pathlib import Path

from serve.tiny.tokenizers import build_tokenizer_files, clip_tokenizer, write_clip_files


def write(folder: Path, seed: int, variant: str | None = None) -> None:
    """Save the tiny SD model into ``folder`` (an empty folder); SD has no variants."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab, merges = build_tokenizer_files()
    tokenizer = clip_tokenizer(vocab, merges)

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=len(vocab),
            layer_norm_eps=1e-5,
        )
    ).eval()
    torch.manual_seed(seed + 1)
    # sample_size 8 latents x VAE factor 8 = 64x64 native images, like SD's 64 -> 512.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).eval()
    # Random init makes cross-attention nearly inert, so prompts would barely change the image
    # and a test could not tell one request's prompt from another's. Amplify it: with x16 two
    # prompts differ by ~11 levels on average at seed 1 (x1: ~2, inside the 3-level tolerance).
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(16.0)
    torch.manual_seed(seed + 2)
    # Four blocks give SD's VAE scale factor of 8 (2 ** (4 - 1)).
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
    ).eval()
    # SD 1.x's own scheduler config.
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_files(folder / "tokenizer", vocab, merges)
