"""The demo model's architecture: Stable Diffusion 1.x's components, scaled down to 64x64 images.

The same classes and layout as SD 1.x (``CLIPTokenizer`` + ``CLIPTextModel``,
``UNet2DConditionModel``, ``AutoencoderKL``, SD's PNDM scheduler config with SD 2.x's
v-prediction), so everything that
serves SD 1.x -- every stage, engine, ONNX export and diffusers' ``StableDiffusionPipeline`` --
serves this model unchanged. Sizes are picked for training on two CPU cores in under an hour:

- VAE: three blocks (factor 4): 64x64x3 images <-> 16x16x4 latents, the same 12x compression
  per latent cell as SD's 8x8x3 -> 4 (SD's 48x would leave a 14-pixel star one latent cell);
- UNet: 32/64/64 channels at 16/8/4 latent pixels, cross-attention at 8x8 and 4x4 only (at
  16x16 it doubled the training step for no visible gain in position or shape);
- text encoder: a 2-layer, 64-wide CLIP transformer trained with the UNet, over a BPE
  vocabulary learned from the captions' words (each caption word is one token).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from serve.demo.data import IMAGE_SIZE, vocabulary

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

#: Marker file in a demo model folder; ``serve.model.read_model_info`` names the model from it.
MARKER = "darkroom_demo.json"
MODEL_NAME = "darkroom-demo"
#: Bump when the architecture, tokenizer or training data change.
DEMO_MODEL_VERSION = 1

#: The guidance scale with the best measured adherence (``darkroom eval``'s default; written in the
#: model's marker file as ``default_guidance``). SD's 7.5 over-guides this model: colours go wrong.
DEFAULT_GUIDANCE = 3.0

VAE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_FACTOR
TEXT_WIDTH = 64
MAX_TOKENS = 77  # CLIP's, so prompts pad and truncate exactly as SD's do

# SD's PNDM scheduler config with SD 2.x's v-prediction (training uses DDPMScheduler over the
# same betas). Why v: SD's betas leave 7% of the signal at the last timestep, so at high noise
# an epsilon model's loss barely depends on the picture (an error in the implied image is scaled
# by SNR, 0.005 there) and at low noise the picture is readable from the input itself: nothing
# taught a short run to take background and place from the caption. With epsilon after 1500
# steps: object colour 83%, background 15% and place 25% (chance: 12% and 20%).
SCHEDULER_CONFIG = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
    prediction_type="v_prediction",
    # Keys PNDM ignores but a request's scheduler reads through from_config, as in SD's own
    # scheduler_config.json: without clip_sample=False, DDIM (default True) clips the predicted
    # latents to [-1, 1] and the demo model drew washed-out colours (colour 18% on the seen split, 20 steps; PNDM: 99%).
    clip_sample=False,
)


def build_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's byte-level BPE layout with merges learned from the caption vocabulary.

    Reuses the tiny model's learner (``serve.tiny``). Any text still tokenizes (the byte
    alphabet is in the vocabulary); caption words come out as one token each.
    """
    from serve.tiny.tokenizers import _bytes_to_unicode, _learn_merges

    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(vocabulary(), 1000)  # runs out of pairs long before 1000
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {}
    for tok in vocab_list:
        vocab.setdefault(tok, len(vocab))
    return vocab, merges


def build_tokenizer() -> CLIPTokenizer:
    from transformers import CLIPTokenizer

    vocab, merges = build_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = MAX_TOKENS
    return tokenizer


def write_tokenizer_extras(folder: Path) -> None:
    """The classic CLIP files next to tokenizer.json, for loaders that predate it."""
    vocab, merges = build_tokenizer_files()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")


def build_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = tokenizer.get_vocab()
    return CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            hidden_size=TEXT_WIDTH,
            intermediate_size=4 * TEXT_WIDTH,
            num_attention_heads=4,
            num_hidden_layers=2,
            max_position_embeddings=MAX_TOKENS,
            vocab_size=len(vocab),
            layer_norm_eps=1e-5,
        )
    )


def build_unet(
    text_time_embedding: bool = False, channels: tuple[int, int, int] = (32, 64, 64)
) -> UNet2DConditionModel:
    """``text_time_embedding``: also add a pooled caption embedding to the timestep embedding
    (diffusers' ``addition_embed_type="text"``), so every ResNet block -- the 16x16 ones without
    cross-attention too -- sees the caption. The UNet's inputs stay SD's (sample, timestep,
    encoder_hidden_states): every pipeline, stage and export runs it unchanged. ``channels``: per
    level (16x16, 8x8, 4x4 latent pixels)."""
    from diffusers import UNet2DConditionModel

    extra = {"addition_embed_type": "text", "addition_embed_type_num_heads": 4} if text_time_embedding else {}
    return UNet2DConditionModel(
        **extra,
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH,
        attention_head_dim=4,  # diffusers' name for the number of heads: 64 channels -> 4 x 16
        norm_num_groups=8,
    )


def build_vae() -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        # Four groups, not SD's many: GroupNorm erases what is constant inside a group, and in
        # a flat-coloured scene the colour is constant. The decoder's last norm sees 16
        # channels; in 8 groups of 2 only the sign of each pair's difference survives it.
        # Measured, 400 steps: MSE 0.021 with 8 groups, 0.012 with 4, 0.013 with 1.
        norm_num_groups=4,
        sample_size=IMAGE_SIZE,
    )


def build_scheduler() -> PNDMScheduler:
    from diffusers import PNDMScheduler

    return PNDMScheduler.from_config(SCHEDULER_CONFIG)
