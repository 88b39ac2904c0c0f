"""Choosing and loading an engine backend: ``load_engine(backend, info, component, device, dtype)``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from serve.engines.base import Engine
from serve.engines.manifest import is_exported_repository
from serve.errors import EngineError, InvalidRequestError

if TYPE_CHECKING:
    from serve.engines.torch_options import TorchOptions
    from serve.model import ModelInfo

BACKENDS = ("torch", "onnxruntime", "tensorrt", "auto")


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


def resolve_backend(backend: str, model_path: Path, component: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``backend`` (``auto`` resolved per component, see the module doc)."""
    if backend not in BACKENDS:
        raise InvalidRequestError("backend", backend, f"unknown backend; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    if not is_exported_repository(model_path):
        return "torch"
    from serve.engines.tensorrt_backend import find_engine_file

    if find_engine_file(Path(model_path), component, device, dtype) is not None:
        return "tensorrt"
    return "onnxruntime"


def load_engine(
    backend: str,
    info: ModelInfo,
    component: str,
    device: torch.device,
    dtype: torch.dtype,
    options: TorchOptions | None = None,
) -> Engine:
    """Load one of the model's components with the named backend (or ``auto``); ``options`` are
    the torch backend's (``serve/engines/torch_options.py``), ignored by the others."""
    model_path = info.path
    name = resolve_backend(backend, model_path, component, device, dtype)
    if name == "torch":
        if is_exported_repository(model_path):
            raise EngineError(
                f"{model_path} is an exported model repository (ONNX/TensorRT, no PyTorch weights): "
                "use backend onnxruntime, tensorrt or auto, or give the torch backend the diffusers folder"
            )
        from serve.engines.torch_backend import TorchEngine

        engine: Engine = TorchEngine(info, component, device, dtype, options)
    elif name == "onnxruntime":
        from serve.engines.onnxruntime_backend import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(info, component, device, dtype)
    else:
        from serve.engines.tensorrt_backend import TensorRTEngine

        engine = TensorRTEngine(info, component, device, dtype)
    engine.load()
    return engine


__all__ = ["BACKENDS", "default_device", "default_dtype", "load_engine", "resolve_backend"]
