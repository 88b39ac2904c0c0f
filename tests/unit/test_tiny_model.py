from __future__ import annotations

import hashlib
import json
from pathlib import Path

from serve.families import family_of
from serve.model import read_model_info
from serve.tiny import build_tokenizer_files, write_tiny_model


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
    from serve.tiny import default_tiny_model

    first = default_tiny_model(tmp_path)
    marker = first / "unet" / "config.json"
    inode = marker.stat().st_ino
    # A second writer racing on the same cache folder keeps the finished copy in place.
    again = write_tiny_model(first, overwrite=False)
    assert again == first and marker.stat().st_ino == inode
    # An explicit rewrite (darkroom tiny-model DIR) replaces it.
    write_tiny_model(first)
    assert marker.stat().st_ino != inode
