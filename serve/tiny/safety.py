"""A tiny random-weight image safety checker, in diffusers' layout, for tests (no downloads).

``write_tiny_safety_checker(folder, mode)`` saves ``safety_checker/`` (a
``StableDiffusionSafetyChecker`` with a toy CLIP vision tower) and ``feature_extractor/`` (a
``CLIPImageProcessor`` at 32 px) into ``folder``: the real checker's files, at toy size, loaded
by the same code (``serve.safety.ImageSafetyChecker.load``). Deterministic: same files each time.

What it flags is set by the concept thresholds, not by chance: a cosine similarity lies in
[-1, 1], so thresholds of -2 flag every image (``flag-all``) and +2 none (``flag-none``).
"""

from __future__ import annotations

from pathlib import Path

from serve.errors import InvalidRequestError

MODES = ("flag-all", "flag-none")


def write_tiny_safety_checker(folder: str | Path, mode: str = "flag-all", seed: int = 0) -> Path:
    """Write the tiny checker's two subfolders into ``folder`` (made if needed); returns ``folder``."""
    if mode not in MODES:
        raise InvalidRequestError("mode", mode, f"choose one of {', '.join(MODES)}")
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    folder = Path(folder)
    config = CLIPConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(seed)
    model = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        model.concept_embeds.copy_(torch.randn(17, config.projection_dim))
        model.special_care_embeds.copy_(torch.randn(3, config.projection_dim))
        model.concept_embeds_weights.fill_(-2.0 if mode == "flag-all" else 2.0)
        model.special_care_embeds_weights.fill_(2.0)  # never "special care": thresholds stay as set
    model.save_pretrained(folder / "safety_checker")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(
        folder / "feature_extractor"
    )
    return folder


__all__ = ["MODES", "write_tiny_safety_checker"]
