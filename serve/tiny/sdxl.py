"""The tiny SDXL model (``StableDiffusionXLPipeline`` layout).

Like SDXL base 1.0: two CLIP text encoders (the second with a projection, whose pooled output
and the six size/crop ``add_time_ids`` condition the UNet through ``addition_embed_type
"text_time"``), cross-attention over both encoders' penultimate hidden states concatenated,
a factor-8 VAE with SDXL's scaling factor, SDXL's Euler scheduler config and
``force_zeros_for_empty_prompt``. The two encoders have different widths (32 and 64) so that a
mix-up between them fails on shapes instead of passing silently.
"""

from __future__ import annotations

from pathlib import Path

from serve.tiny.tokenizers import build_tokenizer_files, clip_tokenizer, write_clip_files

# SDXL base 1.0's scheduler_config.json, verbatim: the keys EulerDiscreteScheduler ignores
# (clip_sample, set_alpha_to_one, ...) matter when a request switches to DDIM or PNDM.
SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}

TEXT_HIDDEN = 32  # text_encoder (CLIP ViT-L in SDXL)
TEXT_2_HIDDEN = 64  # text_encoder_2 (OpenCLIP bigG in SDXL)
TEXT_2_PROJECTION = 48  # text_encoder_2's projection: the pooled embedding's width
TIME_EMBED_DIM = 8  # per add_time_id (SDXL: 256)


def write(folder: Path, seed: int, variant: str | None = None) -> None:
    """Save the tiny SDXL model into ``folder`` (an empty folder); SDXL has no variants."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    vocab, merges = build_tokenizer_files()
    tokenizer = clip_tokenizer(vocab, merges)
    # SDXL's second tokenizer pads with "!" (id 0), not <|endoftext|> like the first.
    tokenizer_2 = clip_tokenizer(vocab, merges, pad_token="!")

    def clip_config(hidden: int, **extra: int) -> CLIPTextConfig:
        return CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=77,
            vocab_size=len(vocab),
            layer_norm_eps=1e-5,
            **extra,
        )

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(clip_config(TEXT_HIDDEN)).eval()
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config(TEXT_2_HIDDEN, projection_dim=TEXT_2_PROJECTION)).eval()
    torch.manual_seed(seed + 2)
    # sample_size 8 latents x VAE factor 8 = 64x64 native images, like SDXL's 128 -> 1024.
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),  # diffusers' legacy name: the number of heads, as SDXL's config uses it
        use_linear_projection=True,
        cross_attention_dim=TEXT_HIDDEN + TEXT_2_HIDDEN,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        # The pipeline checks this equals addition_time_embed_dim * 6 + text_encoder_2's projection_dim.
        projection_class_embeddings_input_dim=TIME_EMBED_DIM * 6 + TEXT_2_PROJECTION,
        norm_num_groups=8,
    ).eval()
    # Random init makes cross-attention nearly inert (see sd.py), and diluted: a prompt's few tokens
    # are a small part of 77 positions, the rest pads that barely depend on the prompt. Sharpen the
    # UNet's cross-attention (to_k x16: queries pick out tokens instead of averaging all 77),
    # amplify it (to_out x16), and let every position of each text encoder take in more of the
    # prompt (self-attention out_proj x8 / x4, balancing the narrower first encoder). Measured at
    # 64x64, 4 Euler steps, CFG 7.5, seeds 1 and 1234: "a lighthouse at dusk" vs "a red fox in the
    # snow" differ by 15-16 levels on average, "a photo of a cat" vs "... dog" by 10-11, that change
    # in prompt_2 only (text_encoder_2) by 7.5-10, in prompt only (text_encoder) by ~8. With only
    # SD's to_out x16: 4.5-7.5 and 1.4-1.9; with no amplification at all: 4-4.5 and 2.
    with torch.no_grad():
        for name, module in unet.named_modules():
            if name.endswith("attn2"):
                module.to_out[0].weight.mul_(16.0)
                module.to_k.weight.mul_(16.0)
        for encoder, gain in ((text_encoder, 8.0), (text_encoder_2, 4.0)):
            for name, module in encoder.named_modules():
                if name.endswith("self_attn"):
                    module.out_proj.weight.mul_(gain)
    torch.manual_seed(seed + 3)
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
        scaling_factor=0.13025,  # SDXL's VAE
    ).eval()
    scheduler = EulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_clip_files(folder / "tokenizer", vocab, merges)
    write_clip_files(folder / "tokenizer_2", vocab, merges)
