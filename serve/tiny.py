"""`darkroom tiny-model`: a tiny random-weight Stable Diffusion model in diffusers layout.

It is the embedded default model and what every test runs on: it has the real architecture
(CLIP text encoder with a real BPE tokenizer, `UNet2DConditionModel`, `AutoencoderKL`, an SD 1.x
scheduler config) at toy width, so every code path a full model takes is exercised in seconds on
a CPU, and no weights are ever downloaded. Deterministic: the same files every time.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the tiny model's architecture or tokenizer changes, so caches are remade.
TINY_MODEL_VERSION = 1

# The tokenizer learns its merges from these words (a prompt-ish vocabulary). Any text still
# tokenizes: CLIP's byte-level alphabet is always in the vocabulary.
_CORPUS = """
a an the of in on at with and or by from to under over near beside behind above
photo photograph painting portrait landscape illustration drawing sketch render
cat dog horse bird fish lion tiger wolf fox owl dragon robot astronaut knight wizard
city street house castle tower bridge lighthouse mountain river lake ocean sea beach
forest tree flower garden field desert island sky cloud sun moon star night dusk dawn
red orange yellow green blue purple pink black white golden silver gray brown
beautiful detailed highly realistic cinematic dramatic soft bright dark vivid colorful
lighting light shadow style art digital oil watercolor anime studio masterpiece quality
high resolution sharp focus blurry low ugly bad deformed noise artifacts
sunset sunrise winter summer autumn spring rain snow fog storm
old young small large giant tiny ancient futuristic modern vintage
standing sitting running flying walking looking wearing holding
""".split()

# At most 486 merges: 256 bytes x 2 (plain, word-final) + 486 + 2 specials <= 1000 tokens. The
# corpus runs out of pairs first (~410 merges), which is fine: the vocabulary is what it learned.
_N_MERGES = 486


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-unicode map (the BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _learn_merges(words: list[str], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE on word-final-marked symbols; ties broken by the pair itself (deterministic)."""
    freqs = Counter(words)
    splits = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in freqs}
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for w, syms in splits.items():
            for a, b in zip(syms, syms[1:], strict=False):
                pairs[(a, b)] += freqs[w]
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, syms in splits.items():
            out, i = [], 0
            while i < len(syms):
                if i + 1 < len(syms) and (syms[i], syms[i + 1]) == best:
                    out.append(syms[i] + syms[i + 1])
                    i += 2
                else:
                    out.append(syms[i])
                    i += 1
            splits[w] = tuple(out)
    return merges


def build_tokenizer_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of the tiny CLIP tokenizer, laid out like CLIP's own."""
    alphabet = list(_bytes_to_unicode().values())
    vocab_list = alphabet + [c + "</w>" for c in alphabet]
    merges = _learn_merges(_CORPUS, _N_MERGES)
    vocab_list += ["".join(m) for m in merges]
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    seen: dict[str, int] = {}
    for tok in vocab_list:
        seen.setdefault(tok, len(seen))
    return seen, merges


def write_tiny_model(out_dir: str | os.PathLike[str], *, seed: int = 0, overwrite: bool = True) -> Path:
    """Write the tiny model to ``out_dir`` (diffusers layout) and return its path.

    Writes into a temporary sibling first and renames, so a crash or a concurrent writer
    never leaves a half-written model behind. With ``overwrite=False`` a model that another
    process finished first is kept as it is (replicas starting together on an empty cache must
    not delete the folder a sibling is already loading).
    """
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(out_dir).expanduser().resolve()
    vocab, merges = build_tokenizer_files()
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    tokenizer.model_max_length = 77

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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        # Also the classic CLIP files, so tokenizer loaders that predate tokenizer.json work.
        (tmp / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
        (tmp / "tokenizer" / "merges.txt").write_text(merges_txt, encoding="utf-8")
        (tmp / "darkroom_tiny.json").write_text(json.dumps({"version": TINY_MODEL_VERSION, "seed": seed}))
        try:
            os.replace(tmp, out)  # fails if out is a non-empty folder
        except OSError:
            if not overwrite and (out / "darkroom_tiny.json").is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny model to %s", out)
    return out


def default_tiny_model(cache_dir: str | os.PathLike[str]) -> Path:
    """The embedded default model: made once into ``cache_dir`` and reused afterwards."""
    path = Path(cache_dir).expanduser() / f"tiny-model-v{TINY_MODEL_VERSION}"
    marker = path / "darkroom_tiny.json"
    if marker.is_file():
        return path
    return write_tiny_model(path, overwrite=False)
