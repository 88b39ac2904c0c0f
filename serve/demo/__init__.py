"""The demo model: SD 1.x's architecture at 64x64, trained here on captioned synthetic scenes.

``data`` makes the scenes and captions (and the held-out combinations), ``model`` the
architecture, ``train`` the training run (``darkroom train-demo``), ``checker`` reads a generated
image back into words and ``evaluate`` measures prompt adherence (``darkroom eval``). The trained
weights ship in ``weights/`` (diffusers layout), the default model of ``darkroom serve`` and
``darkroom generate``.
"""

from __future__ import annotations

from pathlib import Path

from serve.errors import ModelLoadError

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def demo_model_path() -> Path:
    """The shipped demo model's folder (package data; nothing is downloaded or trained)."""
    if not (WEIGHTS_DIR / "model_index.json").is_file():
        raise ModelLoadError(
            f"the demo model's weights are missing from {WEIGHTS_DIR} (a broken install?); "
            "reinstall darkroom, train them with `darkroom train-demo OUT`, or pass --model"
        )
    return WEIGHTS_DIR


__all__ = ["WEIGHTS_DIR", "demo_model_path"]
