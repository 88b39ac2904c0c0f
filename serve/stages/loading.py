"""One way for every stage to load its engine from a model source."""

from __future__ import annotations

from pathlib import Path

from serve.engines import Engine, default_device, default_dtype, load_engine
from serve.model import ModelInfo, read_model_info


def load_stage_engine(
    source: str | Path, component: str, *, backend: str = "torch", device: str | None = None, dtype: str | None = None
) -> tuple[ModelInfo, Engine]:
    """The model's info and ``component``'s engine on the chosen (or default) device and dtype."""
    info = read_model_info(source)
    dev = default_device(device)
    return info, load_engine(backend, info.path, component, dev, default_dtype(dev, dtype))
