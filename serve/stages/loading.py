"""One way for every stage to load its engines from a model source."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from serve.engines import Engine, default_device, default_dtype, load_engine
from serve.families import Family, family_of
from serve.model import ModelInfo, read_model_info

if TYPE_CHECKING:
    from serve.engines.torch_options import TorchOptions


def load_stage_engines(
    source: str | Path | ModelInfo,
    components: Sequence[str] | None = None,
    *,
    role: str | None = None,
    backend: str = "torch",
    device: str | None = None,
    dtype: str | None = None,
    torch_options: TorchOptions | None = None,
) -> tuple[ModelInfo, Family, dict[str, Engine]]:
    """The model's info, family, and engines for ``components`` (or the family's ``role``:
    ``text``, ``denoiser`` or ``decoder``) on the chosen (or default) device and dtype
    (``torch_options``: the torch backend's CUDA graphs, compile, layout, VAE tiling)."""
    info = source if isinstance(source, ModelInfo) else read_model_info(source)
    family = family_of(info)
    if components is None:
        components = {
            "text": family.text_components,
            "denoiser": (family.denoiser_component,),
            "decoder": ("vae_decoder",),
        }[role or ""]
    dev = default_device(device)
    dt = default_dtype(dev, dtype)
    return info, family, {c: load_engine(backend, info, c, dev, dt, torch_options) for c in components}
