"""`darkroom tiny-model`: tiny random-weight models of each family, in diffusers layout.

They are the embedded default model and what every test runs on: each has its family's real
architecture (text encoders with real tokenizers, the denoiser, `AutoencoderKL`, the family's
scheduler config) at toy width, so every code path a full model takes is exercised in seconds on
a CPU, and no weights are ever downloaded. Deterministic: the same files every time.

- ``sd``: Stable Diffusion 1.x layout (``StableDiffusionPipeline``), see ``sd.py``.
- ``sdxl``: ``StableDiffusionXLPipeline`` layout (two CLIP encoders, text_time UNet), ``sdxl.py``.
- ``flux``: ``FluxPipeline`` layout (CLIP pooled + T5, ``FluxTransformer2DModel``), ``flux.py``;
  variant ``dev`` (guidance embedding, the default) or ``schnell`` (none).

Each family's conditioning path is amplified so that two prompts give visibly different images
(parity tests must be able to tell one request's prompt from another's).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from serve.errors import InvalidRequestError
from serve.tiny.tokenizers import build_tokenizer_files

logger = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "TINY_MODEL_VERSION",
    "VARIANTS",
    "build_tokenizer_files",
    "default_tiny_model",
    "tiny_model_dirname",
    "write_tiny_model",
]

# Bump when a tiny model's architecture or tokenizer changes, so caches are remade.
TINY_MODEL_VERSION = 1

FAMILIES: tuple[str, ...] = ("sd", "sdxl", "flux")

# Variants per family; the first is the default. SD and SDXL have none.
VARIANTS: dict[str, tuple[str, ...]] = {"sd": (), "sdxl": (), "flux": ("dev", "schnell")}

MARKER = "darkroom_tiny.json"


def _resolve_variant(family: str, variant: str | None) -> str | None:
    """``variant`` checked against the family's, or the family's default (None: it has none)."""
    if family not in FAMILIES:
        raise InvalidRequestError("family", family, f"unknown tiny model family; choose one of {', '.join(FAMILIES)}")
    allowed = VARIANTS[family]
    if variant is None:
        return allowed[0] if allowed else None
    if variant not in allowed:
        reason = f"choose one of {', '.join(allowed)}" if allowed else "this family has no variants"
        raise InvalidRequestError("variant", variant, f"{reason} (family {family})")
    return variant


def tiny_model_dirname(family: str = "sd", variant: str | None = None) -> str:
    """The cache folder name of a family's tiny model: ``tiny-model-v1``, ``tiny-sdxl-v1``, ...

    The default Flux variant (dev) is ``tiny-flux-v1``; other variants add their name
    (``tiny-flux-schnell-v1``). SD keeps its historical ``tiny-model-v{N}``.
    """
    variant = _resolve_variant(family, variant)
    if family == "sd":
        return f"tiny-model-v{TINY_MODEL_VERSION}"
    name = family if variant is None or variant == VARIANTS[family][0] else f"{family}-{variant}"
    return f"tiny-{name}-v{TINY_MODEL_VERSION}"


def _builder(family: str) -> Callable[[Path, int, str | None], None]:
    """The family's ``write(folder, seed, variant)``; imported lazily (each pulls in torch)."""
    if family == "sd":
        from serve.tiny.sd import write
    elif family == "sdxl":
        from serve.tiny.sdxl import write
    else:
        from serve.tiny.flux import write
    return write


def _marker(family: str, variant: str | None, seed: int) -> dict[str, object]:
    # SD's marker predates families; it stays byte-for-byte what it was.
    if family == "sd":
        return {"version": TINY_MODEL_VERSION, "seed": seed}
    marker: dict[str, object] = {"version": TINY_MODEL_VERSION, "seed": seed, "family": family}
    if variant:
        marker["variant"] = variant
    if family == "flux":
        # FluxPipeline's default is 1024 px (default_sample_size 128 is hard-coded, not in any
        # config); a tiny model's requests without a size get the 64 px it is built for.
        marker["native_size"] = [64, 64]
    return marker


def write_tiny_model(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "sd",
    variant: str | None = None,
    seed: int = 0,
    overwrite: bool = True,
) -> Path:
    """Write a family's tiny model to ``out_dir`` (diffusers layout) and return its path.

    Writes into a temporary sibling first and renames, so a crash or a concurrent writer
    never leaves a half-written model behind. With ``overwrite=False`` a model that another
    process finished first is kept as it is (replicas starting together on an empty cache must
    not delete the folder a sibling is already loading).
    """
    variant = _resolve_variant(family, variant)
    write = _builder(family)
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp, seed, variant)
        (tmp / MARKER).write_text(json.dumps(_marker(family, variant, seed)))
        try:
            os.replace(tmp, out)  # fails if out is a non-empty folder
        except OSError:
            if not overwrite and (out / MARKER).is_file():
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            shutil.rmtree(out)
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote tiny %s model to %s", family + (f" ({variant})" if variant else ""), out)
    return out


def default_tiny_model(cache_dir: str | os.PathLike[str], family: str = "sd", variant: str | None = None) -> Path:
    """A family's embedded tiny model: made once into ``cache_dir`` and reused afterwards."""
    path = Path(cache_dir).expanduser() / tiny_model_dirname(family, variant)
    if (path / MARKER).is_file():
        return path
    return write_tiny_model(path, family=family, variant=variant, overwrite=False)
