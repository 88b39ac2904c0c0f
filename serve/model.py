"""Finding a model and reading what the stages need to know about it, without loading weights.

A model is a folder in diffusers layout (``model_index.json`` plus one subfolder per component:
``tokenizer/``, ``text_encoder/``, ``unet/`` or ``transformer/``, ``vae/``, ``scheduler/``, ...),
an exported repository (``darkroom export``: the same configs plus ONNX graphs), ``s3://`` URI of
either, or a hub id, which is downloaded once into the hub cache (users with network access
only: nothing in this project's tests or defaults downloads). Its family (SD, SDXL, Flux) comes
from ``model_index.json``'s ``_class_name`` unless the caller names one.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from serve.errors import ModelLoadError, ModelNotFoundError

logger = logging.getLogger(__name__)

#: Files a hub download fetches besides component folders (weights in other formats are skipped).
_HUB_IGNORE = ["*.bin", "*.ckpt", "*.msgpack", "*.h5", "*non_ema*", "*.onnx", "*.pb", "*.fp16.*"]
#: Marker of the models ``darkroom tiny-model`` writes (tests' tiny models, the embedded default).
TINY_MARKER = "darkroom_tiny.json"


@dataclass(frozen=True)
class ModelInfo:
    """What every stage and the API need to know about a model: read from its config files.

    Family-independent facts are fields; what only one family reads (text encoder widths, the
    UNet's added conditioning, Flux's guidance embedding) comes from ``configs`` through that
    family (``serve.families.family_of(info)``).
    """

    name: str
    path: Path
    family: str  # "sd" | "sdxl" | "flux" (serve.families.FAMILIES)
    class_name: str  # model_index.json's _class_name, e.g. "StableDiffusionXLPipeline"
    scheduler_class: str
    scheduler_config: dict[str, Any] = field(repr=False)
    #: config.json of every component folder, by folder name ("unet", "vae", "text_encoder_2", ...).
    configs: dict[str, dict[str, Any]] = field(repr=False)
    #: tokenizer_config.json of every tokenizer folder, by folder name.
    tokenizer_configs: dict[str, dict[str, Any]] = field(repr=False)
    vae_scale_factor: int
    vae_scaling_factor: float
    vae_shift_factor: float
    latent_channels: int  # the VAE's latent channels
    native_size: tuple[int, int]  # (width, height)
    marker: dict[str, Any] = field(default_factory=dict, repr=False)  # darkroom_tiny.json, if any
    #: The guidance a request gets when it names none, where the model says (darkroom_demo.json).
    default_guidance: float | None = None

    def latent_shape(self, n: int, width: int, height: int) -> tuple[int, int, int, int]:
        """Latents of ``n`` images, e.g. 512x512 at factor 8 -> (n, 4, 64, 64)."""
        f = self.vae_scale_factor
        return (n, self.latent_channels, height // f, width // f)

    def config(self, folder: str) -> dict[str, Any]:
        """A component folder's config; ModelLoadError naming the folder when the model has none."""
        try:
            return self.configs[folder]
        except KeyError:
            raise ModelLoadError(f"{self.path}: no {folder}/config.json (is it a {self.family} model?)") from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model file missing: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"model file is not valid JSON: {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"model file is not a JSON object: {path}")
    return data


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

        local = snapshot_download(text, ignore_patterns=_HUB_IGNORE)
    except Exception as exc:  # network, auth, missing repo: all mean "cannot load"
        raise ModelLoadError(f"could not fetch model {text!r} from the hub: {exc}") from exc
    return Path(local)


def read_model_info(source: str | Path, family: str | None = None) -> ModelInfo:
    """Read a model's configs (no weights): cheap enough for an API process to call.

    ``family`` ("sd", "sdxl", "flux") overrides the one ``model_index.json`` names.
    """
    from serve.families import family_class

    path = resolve_model_path(source)
    index = _read_json(path / "model_index.json")
    class_name = str(index.get("_class_name", ""))
    cls = family_class(family, class_name, field="family" if family else "model")
    configs: dict[str, dict[str, Any]] = {"model_index": index}
    tokenizer_configs: dict[str, dict[str, Any]] = {}
    for sub in sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (sub / "config.json").is_file():
            configs[sub.name] = _read_json(sub / "config.json")
        if (sub / "tokenizer_config.json").is_file():
            tokenizer_configs[sub.name] = _read_json(sub / "tokenizer_config.json")
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    vae = configs.get("vae")
    if vae is None:
        raise ModelLoadError(f"model file missing: {path / 'vae' / 'config.json'}")
    marker = _read_json(path / TINY_MARKER) if (path / TINY_MARKER).is_file() else {}
    factor = 2 ** (len(vae.get("block_out_channels", [1, 1, 1, 1])) - 1)
    if str(source).startswith("s3://"):
        name = Path(str(source).rstrip("/")).name  # a repository is named by its prefix
    elif marker:
        # A tiny model is named by its family, whatever (cache) folder it was made in.
        parts = [marker.get("family"), marker.get("variant")]
        name = "-".join(["tiny"] + [str(p) for p in parts if p not in (None, "sd", "dev")])
    elif (path / "darkroom_demo.json").is_file():
        name = "darkroom-demo"  # the shipped demo model (serve/demo/weights), wherever installed
    elif Path(source).expanduser().is_dir():
        name = Path(str(source).rstrip("/")).name
    else:
        name = str(source)
    shift = vae.get("shift_factor")
    info = ModelInfo(
        name=name,
        path=path,
        family=cls.name,
        class_name=class_name,
        scheduler_class=sched.get("_class_name", "PNDMScheduler"),
        scheduler_config=sched,
        configs=configs,
        tokenizer_configs=tokenizer_configs,
        vae_scale_factor=factor,
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        vae_shift_factor=float(shift) if shift is not None else 0.0,
        latent_channels=int(vae.get("latent_channels", 4)),
        native_size=(0, 0),
        marker=marker,
        default_guidance=_demo_guidance(path),
    )
    native = marker.get("native_size")
    size = tuple(native) if native else cls.native_size(info)
    return replace(info, native_size=(int(size[0]), int(size[1])))


def _demo_guidance(path: Path) -> float | None:
    demo = path / "darkroom_demo.json"
    guidance = _read_json(demo).get("default_guidance") if demo.is_file() else None
    return float(guidance) if guidance is not None else None


#: Names of the tiny random-weight models (made once into the cache folder): name -> (family, variant).
TINY_NAMES = {
    "tiny": ("sd", None),
    "tiny-sdxl": ("sdxl", None),
    "tiny-flux": ("flux", None),
    "tiny-flux-schnell": ("flux", "schnell"),
}


#: Names of the demo model this package ships (trained here; package data).
DEMO_MODEL_NAMES = ("darkroom-demo", "demo")


def resolve_source(model: str | None) -> str:
    """``model`` as given; no model (or ``darkroom-demo``): the shipped demo model (package
    data, no download, no training); a tiny model's name (``tiny``, ``tiny-sdxl``, ``tiny-flux``,
    ``tiny-flux-schnell``): that random-weight model, made once into the cache folder (what
    parity tests use)."""
    if model in TINY_NAMES:
        from serve.settings import Settings
        from serve.tiny import default_tiny_model

        family, variant = TINY_NAMES[model]
        return str(default_tiny_model(Settings.from_env().cache_dir, family=family, variant=variant))
    if model and model not in DEMO_MODEL_NAMES:
        return model
    from serve.demo import demo_model_path

    return str(demo_model_path())
