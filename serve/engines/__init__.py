"""Engine backends behind one interface; ``load_engine`` picks one by name.

Backends: ``torch`` (a diffusers folder), ``onnxruntime`` and ``tensorrt`` (an exported model
repository, see ``export/``), and ``auto``: for an exported repository, ``tensorrt`` where this
machine has TensorRT, CUDA and an engine built for its GPU, else ``onnxruntime``; for a diffusers
folder, ``torch``.

Names load on first use (PEP 562): the specs and the manifest reader (``serve.engines.specs``,
``serve.engines.manifest``) are plain data and must import without torch, because the Ingress
plans requests with them and starts without torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BACKENDS": "serve.engines.loader",
    "Engine": "serve.engines.base",
    "default_device": "serve.engines.loader",
    "default_dtype": "serve.engines.loader",
    "is_exported_repository": "serve.engines.manifest",
    "load_engine": "serve.engines.loader",
    "resolve_backend": "serve.engines.loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serve.engines' has no attribute {name!r}")
