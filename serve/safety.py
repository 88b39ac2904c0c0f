"""The image safety check: diffusers' ``StableDiffusionSafetyChecker`` on decoded images.

The contract is diffusers' own (``StableDiffusionPipeline.run_safety_checker``): the feature
extractor (``CLIPImageProcessor``) turns each image into CLIP pixel values, the checker's CLIP
vision tower and projection embed it, and an image is flagged when its cosine similarity to any
of the 17 concept embeddings exceeds that concept's threshold (a "special care" match lowers the
thresholds by 0.01). It loads from a folder in diffusers' layout, ``safety_checker/`` and
``feature_extractor/`` (a Stable Diffusion model folder has both), so the real checker and the
tiny one (``serve/tiny/safety.py``) load the same way.

The Decoder runs it on the uint8 images before encoding or storing them; a flagged image is
withheld (neither stored nor returned). Off unless the policy config names a checker.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from serve.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUBFOLDERS = ("safety_checker", "feature_extractor")


def checker_folder(value: str, model_path: str | Path) -> Path:
    """The folder a policy's ``image_checker`` names: ``"model"`` = the served model's folder."""
    folder = Path(model_path) if value == "model" else Path(value).expanduser()
    missing = [name for name in SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelLoadError(
            f"image_checker {value!r}: {folder} has no {' or '.join(f'{m}/' for m in missing)} "
            "(diffusers' layout: safety_checker/ and feature_extractor/)"
        )
    return folder


class ImageSafetyChecker:
    """``check(images) -> [flagged, ...]`` for uint8 (n, H, W, 3) images."""

    def __init__(self, model, feature_extractor, *, device: str = "cpu") -> None:
        self.model = model.to(device).eval()
        self.feature_extractor = feature_extractor
        self.device = device

    @classmethod
    def load(cls, folder: str | Path, *, device: str = "cpu") -> ImageSafetyChecker:
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        folder = Path(folder)
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(folder / "safety_checker")
            extractor = CLIPImageProcessor.from_pretrained(folder / "feature_extractor")
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the image safety checker from {folder}: {exc}") from exc
        logger.info("image safety checker loaded from %s", folder)
        return cls(model, extractor, device=device)

    def check(self, images: np.ndarray) -> list[bool]:
        """Whether each image is flagged, as ``run_safety_checker``'s ``has_nsfw_concept``."""
        import torch
        from PIL import Image

        if len(images) == 0:
            return []
        pil = [Image.fromarray(np.asarray(img, dtype=np.uint8)) for img in images]
        inputs = self.feature_extractor(pil, return_tensors="pt")
        clip_input = inputs.pixel_values.to(self.device, next(self.model.parameters()).dtype)
        # The checker blacks out flagged images in what it is given; we only need its verdicts.
        placeholders = [np.zeros((1, 1, 3)) for _ in pil]
        with torch.no_grad():
            _, flagged = self.model(clip_input=clip_input, images=placeholders)
        return [bool(f) for f in flagged]


__all__ = ["SUBFOLDERS", "ImageSafetyChecker", "checker_folder"]
