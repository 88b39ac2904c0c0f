"""LoRA adapters chosen per request (Ray-free).

- ``files``: safetensors headers -> what an adapter touches and whom it fits (no torch);
- ``repository``: a folder or ``s3://`` prefix of ``<name>.safetensors``, listed on demand;
- ``catalog``: the Ingress's checks and ``GET /v1/loras`` (no torch);
- ``weights``: a file -> per-module low-rank weights, through diffusers' own key conversions;
- ``runtime``: per-row application in shared forward calls, and the byte-bounded adapter cache;
- ``random``: random adapters in diffusers/peft or kohya layout (tests, bench).

Torch-side names load on first use, so importing the package costs the Ingress nothing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from serve.lora.catalog import LORA_BACKENDS, MAX_LORAS, MAX_SCALE, LoraCatalog
from serve.lora.files import check_choices
from serve.lora.repository import AdapterEntry, LoraRepository

if TYPE_CHECKING:
    from serve.lora.runtime import LoraRuntime

_LAZY = {
    "LoraRuntime": "serve.lora.runtime",
    "AdapterCache": "serve.lora.runtime",
    "slice_runs": "serve.lora.runtime",
    "load_adapter": "serve.lora.weights",
    "write_random_lora": "serve.lora.random",
}

#: Default byte bound of a replica's adapter cache (1 GiB: ~8 SDXL rank-64 adapters).
DEFAULT_CACHE_BYTES = 1 << 30


def runtime_for(
    engines: dict[str, Any],
    family: Any,
    repository: LoraRepository | str | None,
    *,
    max_bytes: int = DEFAULT_CACHE_BYTES,
) -> LoraRuntime | None:
    """A ``LoraRuntime`` over the torch engines among ``engines`` that take adapters, or None
    (no repository, or the engines are not torch: ONNX/TensorRT graphs have no layers to hook)."""
    if repository is None:
        return None
    models = {
        c: e.module.model
        for c, e in engines.items()
        if c in family.lora_components and getattr(e, "backend", None) == "torch"
    }
    if not models:
        return None
    from serve.lora.runtime import LoraRuntime

    repo = repository if isinstance(repository, LoraRepository) else LoraRepository(str(repository))
    first = next(iter(engines[c] for c in models))
    unet = family.info.configs.get("unet") if family.denoiser_component == "unet" else None
    return LoraRuntime(
        repo,
        models,
        pipeline_class=family.pipeline_class,
        unet_config=unet,
        device=first.device,
        dtype=first.dtype,
        max_bytes=max_bytes,
    )


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serve.lora' has no attribute {name!r}")


__all__ = [
    "DEFAULT_CACHE_BYTES",
    "LORA_BACKENDS",
    "MAX_LORAS",
    "MAX_SCALE",
    "AdapterEntry",
    "LoraCatalog",
    "LoraRepository",
    "check_choices",
    "runtime_for",
    *_LAZY,
]
