"""Engine backends behind one interface; ``load_engine`` picks one by name."""

from __future__ import annotations

from pathlib import Path

import torch

from serve.engines.base import COMPONENT_NAMES, Engine
from serve.errors import InvalidRequestError

BACKENDS = ("torch",)


def default_device(requested: str | None = None) -> torch.device:
    """CUDA when present, else CPU; ``requested`` (cpu, cuda, cuda:1) overrides."""
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """fp16 on CUDA, fp32 on CPU (CPU fp16 convolutions are slow and lose parity)."""
    if requested:
        try:
            return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[requested]
        except KeyError:
            raise InvalidRequestError("dtype", requested, "choose float32, float16 or bfloat16") from None
    return torch.float16 if device.type == "cuda" else torch.float32


def load_engine(
    backend: str, model_path: Path, component: str, device: torch.device, dtype: torch.dtype
) -> Engine:
    """Load one component's engine with the named backend."""
    if backend == "torch":
        from serve.engines.torch_backend import TorchEngine

        engine: Engine = TorchEngine(model_path, component, device, dtype)
    else:
        raise InvalidRequestError("backend", backend, f"unknown backend; choose one of {', '.join(BACKENDS)}")
    engine.load()
    return engine


__all__ = ["BACKENDS", "COMPONENT_NAMES", "Engine", "default_device", "default_dtype", "load_engine"]
