"""Finding a model and reading what the stages need to know about it, without loading weights.

A model is a folder in diffusers layout (``model_index.json``, ``tokenizer/``, ``text_encoder/``,
``unet/``, ``vae/``, ``scheduler/``) or a hub id, which is downloaded once into the hub cache
(users with network access only: nothing in this project's tests or defaults downloads).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from serve.errors import ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

COMPONENTS = ("tokenizer", "text_encoder", "unet", "vae", "scheduler")


@dataclass(frozen=True)
class ModelInfo:
    """What every stage and the API need to know about a model: read from its config files."""

    name: str
    path: Path
    scheduler_class: str
    scheduler_config: dict[str, Any] = field(repr=False)
    vae_scale_factor: int
    vae_scaling_factor: float
    latent_channels: int
    native_size: tuple[int, int]  # (width, height)
    text_hidden_size: int
    max_token_length: int
    time_cond_proj_dim: int | None

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Latents of ``n`` images, e.g. 512x512 at factor 8 -> (n, 4, 64, 64)."""
        f = self.vae_scale_factor
        return (n, self.latent_channels, height // f, width // f)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file missing: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model file is not valid JSON: {path}: {exc}") from exc


def resolve_model_path(source: str | Path) -> Path:
    """A local folder as is; ``s3://bucket/prefix`` through the repository cache; a hub id
    (``org/name``) through the hub cache."""
    if str(source).startswith("s3://"):
        from serve.settings import Settings
        from serve.storage.repository import fetch_s3_repository

        return fetch_s3_repository(str(source), Settings.from_env().cache_dir)
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "manifest.json").is_file():
            raise ModelLoadError(f"{path} is not a diffusers model folder (no model_index.json)")
        return path.resolve()
    text = str(source)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFoundError("model", text, "no such model folder, and not a hub id of the form org/name")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            text,
            allow_patterns=[f"{c}/*" for c in COMPONENTS] + ["model_index.json"],
            ignore_patterns=["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*non_ema*", "*.onnx", "*.pb"],
        )
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load"
        raise ModelLoadError(f"could not fetch model {text!r} from the hub: {exc}") from exc
    return Path(local)


def read_model_info(source: str | Path) -> ModelInfo:
    """Read a model's configs (no weights): cheap enough for an API process to call."""
    path = resolve_model_path(source)
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    unet = _read_json(path / "unet" / "config.json")
    vae = _read_json(path / "vae" / "config.json")
    text = _read_json(path / "text_encoder" / "config.json")
    tok_cfg_path = path / "tokenizer" / "tokenizer_config.json"
    tok = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    factor = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    sample = unet.get("sample_size", 64)
    side = (sample if isinstance(sample, int) else sample[0]) * factor
    max_len = tok.get("model_max_length", 77)
    if not isinstance(max_len, int) or max_len > 4096:  # "very large int" means unset
        max_len = text.get("max_position_embeddings", 77)
    if (path / "darkroom_tiny.json").is_file():
        name = "tiny"  # the random tiny model, whatever cache folder it was made in
    elif (path / "darkroom_demo.json").is_file():
        name = "darkroom-demo"  # the shipped demo model (serve/demo/weights), wherever installed
    elif Path(source).expanduser().is_dir() or str(source).startswith("s3://"):
        name = Path(str(source).rstrip("/")).name
    else:
        name = str(source)
    return ModelInfo(
        name=name,
        path=path,
        scheduler_class=sched.get("_class_name", "PNDMScheduler"),
        scheduler_config=sched,
        vae_scale_factor=factor,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        latent_channels=int(unet.get("in_channels", 4)),
        native_size=(side, side),
        text_hidden_size=int(text.get("hidden_size", 768)),
        max_token_length=int(max_len),
        time_cond_proj_dim=unet.get("time_cond_proj_dim"),
    )


#: Model names that mean a model this package provides rather than a folder or hub id.
TINY_MODEL_NAME = "tiny"
DEMO_MODEL_NAMES = ("darkroom-demo", "demo")


def resolve_source(model: str | None) -> str:
    """``model`` as given; no model (or ``darkroom-demo``): the shipped demo model (package
    data, no download, no training); ``tiny``: the random tiny model (made once into the cache
    folder), which parity tests use."""
    if model == TINY_MODEL_NAME:
        from serve.settings import Settings
        from serve.tiny import default_tiny_model

        return str(default_tiny_model(Settings.from_env().cache_dir))
    if model and model not in DEMO_MODEL_NAMES:
        return model
    from serve.demo import demo_model_path

    return str(demo_model_path())
