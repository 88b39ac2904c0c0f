from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from serve.errors import InvalidRequestError
from serve.families import family_of
from serve.model import read_model_info
from serve.tiny import (
    FAMILIES,
    TINY_MODEL_VERSION,
    build_tokenizer_files,
    default_tiny_model,
    tiny_model_dirname,
    write_tiny_model,
)
from tests.conftest import make_params, max_level_diff


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_tiny_model_layout_size_and_determinism(tiny_model, tmp_path):
    root = Path(tiny_model)
    for sub in (
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "text_encoder/config.json",
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
        "model_index.json",
    ):
        assert (root / sub).is_file(), sub
    size = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    assert size < 10e6
    again = write_tiny_model(tmp_path / "again")
    assert _digest(again) == _digest(root)


def test_tiny_model_info(tiny_model):
    info = read_model_info(tiny_model)
    assert info.vae_scale_factor == 8
    assert info.native_size == (64, 64)
    assert info.scheduler_class == "PNDMScheduler"
    assert info.family == "sd" and family_of(info).conditioning_shapes() == {"encoder_hidden_states": (77, 32)}
    assert info.latent_shape(2, 64, 48) == (2, 4, 6, 8)


def test_tokenizer_is_real_bpe(tiny_model):
    from transformers import CLIPTokenizer

    vocab, merges = build_tokenizer_files()
    assert len(vocab) == 512 + len(merges) + 2 and len(merges) > 300
    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    ids = tok("a photo of a lighthouse").input_ids
    assert ids[0] == vocab["<|startoftext|>"] and ids[-1] == vocab["<|endoftext|>"]
    # Merges are applied: "photo</w>" is one token, not five characters.
    assert vocab["photo</w>"] in ids
    # Any text tokenizes through the byte alphabet, even characters the corpus never saw.
    assert len(tok("Zürich ☃ 42").input_ids) > 3
    saved = json.loads((Path(tiny_model) / "tokenizer" / "vocab.json").read_text())
    assert saved == vocab


def test_default_model_is_kept_when_another_writer_finished_first(tmp_path):
    first = default_tiny_model(tmp_path)
    marker = first / "unet" / "config.json"
    inode = marker.stat().st_ino
    # A second writer racing on the same cache folder keeps the finished copy in place.
    again = write_tiny_model(first, overwrite=False)
    assert again == first and marker.stat().st_ino == inode
    # An explicit rewrite (darkroom tiny-model DIR) replaces it.
    write_tiny_model(first)
    assert marker.stat().st_ino != inode


# --- SDXL and Flux --------------------------------------------------------------------------


def _config(root: str, sub: str) -> dict:
    return json.loads((Path(root) / sub / "config.json").read_text())


def _mean_level_diff(a, b) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _size(root: str) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def test_cache_folder_names_and_bad_family_or_variant():
    assert tiny_model_dirname() == f"tiny-model-v{TINY_MODEL_VERSION}"  # SD's historical name
    assert tiny_model_dirname("sdxl") == f"tiny-sdxl-v{TINY_MODEL_VERSION}"
    assert tiny_model_dirname("flux") == tiny_model_dirname("flux", "dev") == f"tiny-flux-v{TINY_MODEL_VERSION}"
    assert tiny_model_dirname("flux", "schnell") == f"tiny-flux-schnell-v{TINY_MODEL_VERSION}"
    assert set(FAMILIES) == {"sd", "sdxl", "flux"}
    with pytest.raises(InvalidRequestError) as err:
        write_tiny_model("/nonexistent/x", family="sd3")
    assert err.value.field == "family"
    for family, variant in (("flux", "pro"), ("sdxl", "dev"), ("sd", "schnell")):
        with pytest.raises(InvalidRequestError) as err:
            tiny_model_dirname(family, variant)
        assert err.value.field == "variant"


@pytest.mark.parametrize(
    ("family", "variant", "fixture"),
    [("sdxl", None, "tiny_sdxl"), ("flux", "dev", "tiny_flux"), ("flux", "schnell", "tiny_flux_schnell")],
)
def test_default_model_is_deterministic_per_family(family, variant, fixture, request, tmp_path):
    """default_tiny_model writes the same files as an explicit write, under the family's folder."""
    root = request.getfixturevalue(fixture)
    path = default_tiny_model(tmp_path, family=family, variant=variant)
    assert path == tmp_path / tiny_model_dirname(family, variant)
    assert _digest(path) == _digest(Path(root))
    marker = json.loads((path / "darkroom_tiny.json").read_text())
    assert marker["family"] == family and marker.get("variant") == variant
    assert marker["version"] == TINY_MODEL_VERSION and marker["seed"] == 0
    assert _size(root) < 10e6
    # Cached: a second call writes nothing.
    inode = (path / "model_index.json").stat().st_ino
    assert default_tiny_model(tmp_path, family=family, variant=variant) == path
    assert (path / "model_index.json").stat().st_ino == inode


def test_sdxl_layout_matches_the_pipeline_checks(tiny_sdxl):
    index = json.loads((Path(tiny_sdxl) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder"][1] == "CLIPTextModel"
    assert index["text_encoder_2"][1] == "CLIPTextModelWithProjection"
    unet, te, te2 = (_config(tiny_sdxl, s) for s in ("unet", "text_encoder", "text_encoder_2"))
    assert unet["addition_embed_type"] == "text_time"
    # StableDiffusionXLPipeline._get_add_time_ids' check: 6 time ids + the pooled embedding.
    assert unet["projection_class_embeddings_input_dim"] == unet["addition_time_embed_dim"] * 6 + te2["projection_dim"]
    assert unet["cross_attention_dim"] == te["hidden_size"] + te2["hidden_size"]
    assert te["hidden_size"] != te2["hidden_size"]  # a mix-up of the encoders fails on shapes
    vae = _config(tiny_sdxl, "vae")
    assert vae["scaling_factor"] == 0.13025 and len(vae["block_out_channels"]) == 4  # factor 8
    assert unet["sample_size"] * 8 == 64
    sched = json.loads((Path(tiny_sdxl) / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "EulerDiscreteScheduler"
    assert (sched["beta_schedule"], sched["beta_start"], sched["beta_end"]) == ("scaled_linear", 0.00085, 0.012)
    assert (sched["steps_offset"], sched["timestep_spacing"]) == (1, "leading")


def test_sdxl_tokenizers_are_the_real_bpe_with_sdxl_padding(tiny_sdxl):
    from transformers import CLIPTokenizer

    vocab, _ = build_tokenizer_files()
    tok = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer")
    tok2 = CLIPTokenizer.from_pretrained(tiny_sdxl, subfolder="tokenizer_2")
    assert tok.model_max_length == tok2.model_max_length == 77
    assert tok("a photo").input_ids == tok2("a photo").input_ids
    assert vocab["photo</w>"] in tok("a photo").input_ids
    # SDXL's second tokenizer pads with "!" (id 0), the first with <|endoftext|>.
    assert tok.pad_token_id == vocab["<|endoftext|>"]
    assert tok2.pad_token == "!" and tok2.pad_token_id == vocab["!"]


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_flux_schnell"])
def test_flux_layout_matches_the_pipeline(fixture, request):
    root = request.getfixturevalue(fixture)
    index = json.loads((Path(root) / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"][1] == "CLIPTextModel" and index["text_encoder_2"][1] == "T5EncoderModel"
    tr, clip, t5, vae = (_config(root, s) for s in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    # FluxPipeline: num_channels_latents = in_channels // 4 (2x2 packing).
    assert tr["in_channels"] == 4 * vae["latent_channels"] and tr["patch_size"] == 1
    assert tr["pooled_projection_dim"] == clip["hidden_size"]
    assert tr["joint_attention_dim"] == t5["d_model"] != clip["hidden_size"]
    assert sum(tr["axes_dims_rope"]) == tr["attention_head_dim"]
    assert (vae["scaling_factor"], vae["shift_factor"]) == (0.3611, 0.1159)
    assert len(vae["block_out_channels"]) == 4  # factor 8: 64x64 images are 4x4 = 16 packed tokens
    sched = json.loads((Path(root) / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert (sched["base_shift"], sched["max_shift"]) == (0.5, 1.15)
    assert (sched["base_image_seq_len"], sched["max_image_seq_len"]) == (256, 4096)
    dev = fixture == "tiny_flux"
    assert tr["guidance_embeds"] is dev
    assert (sched["use_dynamic_shifting"], sched["shift"]) == ((True, 3.0) if dev else (False, 1.0))


def test_flux_t5_tokenizer_is_real_and_loads_like_flux_pipeline(tiny_flux):
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast.from_pretrained(tiny_flux, subfolder="tokenizer_2")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("a photo of a lighthouse").input_ids
    assert ids[-1] == tok.eos_token_id and tok.convert_ids_to_tokens(ids[:-1]) == [
        "▁a",
        "▁photo",
        "▁of",
        "▁a",
        "▁lighthouse",
    ]
    # Words outside the vocabulary split into pieces, unknown characters become <unk>.
    assert len(tok("lighthouses").input_ids) == 3
    assert tok.unk_token_id in tok("☃").input_ids
    # As FluxPipeline._get_t5_prompt_embeds calls it: </s> then <pad> up to max_sequence_length.
    batch = tok(["a cat", "a red fox"], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    assert tuple(batch.input_ids.shape) == (2, 512)
    assert batch.input_ids[0, :4].tolist() == [*tok("a cat").input_ids, 0]
    assert int((batch.input_ids[1] == 0).sum()) == 512 - len(tok("a red fox").input_ids)


GEN = dict(height=64, width=64, num_inference_steps=4, output_type="np")


def _pipeline(cls_name: str, root: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(root)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, prompt, seed=1234, **kw):
    import torch

    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **GEN, **kw)
    return (out.images * 255).round().astype("uint8")


def test_sdxl_generates_deterministically_and_both_encoders_steer_it(tiny_sdxl):
    pipe = _pipeline("StableDiffusionXLPipeline", tiny_sdxl)
    assert pipe.default_sample_size * pipe.vae_scale_factor == 64  # native size
    base = _generate(pipe, "a photo of a cat", prompt_2="a photo of a cat", guidance_scale=7.5)
    assert base.shape == (1, 64, 64, 3) and base.std() > 10
    again = _generate(pipe, "a photo of a cat", prompt_2="a photo of a cat", guidance_scale=7.5)
    assert np.array_equal(base, again)
    other = _generate(pipe, "a lighthouse at dusk", prompt_2="a lighthouse at dusk", guidance_scale=7.5)
    only_2 = _generate(pipe, "a photo of a cat", prompt_2="a photo of a dog", guidance_scale=7.5)
    only_1 = _generate(pipe, "a photo of a dog", prompt_2="a photo of a cat", guidance_scale=7.5)
    # More than the 3-level parity tolerance, so a prompt mix-up in either encoder shows.
    assert _mean_level_diff(base, other) > 6
    assert _mean_level_diff(base, only_2) > 3
    assert _mean_level_diff(base, only_1) > 3


@pytest.mark.parametrize("fixture", ["tiny_flux", "tiny_flux_schnell"])
def test_flux_generates_deterministically_and_both_encoders_steer_it(fixture, request):
    pipe = _pipeline("FluxPipeline", request.getfixturevalue(fixture))
    base = _generate(pipe, "a photo of a cat", prompt_2="a photo of a cat", guidance_scale=3.5)
    assert base.shape == (1, 64, 64, 3) and base.std() > 10
    assert np.array_equal(base, _generate(pipe, "a photo of a cat", prompt_2="a photo of a cat", guidance_scale=3.5))
    other = _generate(pipe, "a lighthouse at dusk", guidance_scale=3.5)
    t5_only = _generate(pipe, "a photo of a cat", prompt_2="a photo of a dog", guidance_scale=3.5)
    clip_only = _generate(pipe, "a photo of a dog", prompt_2="a photo of a cat", guidance_scale=3.5)
    assert _mean_level_diff(base, other) > 6
    assert _mean_level_diff(base, t5_only) > 3  # the T5 sequence (prompt_embeds) matters
    assert _mean_level_diff(base, clip_only) > 3  # the pooled CLIP vector matters
    guided = _generate(pipe, "a photo of a cat", prompt_2="a photo of a cat", guidance_scale=1.0)
    # dev embeds the guidance scale; schnell has no guidance input at all.
    assert (_mean_level_diff(base, guided) > 0) is (fixture == "tiny_flux")


@pytest.mark.parametrize(
    ("family", "fixture"),
    [("sdxl", "reference_sdxl"), ("flux", "reference_flux"), ("flux", "reference_flux_schnell")],
)
def test_reference_fixtures_run_diffusers(family, fixture, request):
    reference = request.getfixturevalue(fixture)
    p = make_params(num_inference_steps=3, n=2, width=64, height=48, guidance_scale=3.5, seed=7)
    images = reference(p)
    assert images.shape == (2, 48, 64, 3) and images.dtype == np.uint8
    assert np.array_equal(images, reference(p))
    assert max_level_diff(images[0], images[1]) > 3  # n images, n different latents
    if family == "sdxl":
        negative = reference(dataclasses.replace(p, negative_prompt="blurry"))
        assert max_level_diff(images, negative) > 3
    else:
        # FluxPipeline ignores a negative prompt unless true_cfg_scale > 1.
        assert np.array_equal(images, reference(p, negative_prompt="blurry"))
        true_cfg = reference(p, negative_prompt="blurry", true_cfg_scale=2.0)
        assert max_level_diff(images, true_cfg) > 3
