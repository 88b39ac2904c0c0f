"""The three pipeline stages as plain classes (no Ray; deployments wrap them) and their messages.

Names load on first use (PEP 562): ``serve.families`` imports ``serve.stages.messages``, and the
stage classes import ``serve.families``, so an eager import here would be circular.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "Conditioning": "serve.stages.messages",
    "DecodeRequest": "serve.stages.messages",
    "DecodedImage": "serve.stages.messages",
    "DenoiseJob": "serve.stages.messages",
    "DenoiseProgress": "serve.stages.messages",
    "StageClient": "serve.stages.messages",
    "StageResult": "serve.stages.messages",
    "StepCache": "serve.stages.messages",
    "TextEncoder": "serve.stages.text_encoder",
    "Denoiser": "serve.stages.denoiser",
    "Decoder": "serve.stages.decoder",
    "to_uint8": "serve.stages.decoder",
    "ContinuousDenoiser": "serve.stages.continuous",
    "BatchPolicy": "serve.stages.batching",
    "BatchQueue": "serve.stages.batching",
    "ModelThread": "serve.stages.batching",
    "ColocatedOptions": "serve.stages.colocated",
    "ColocatedStages": "serve.stages.colocated",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'serve.stages' has no attribute {name!r}")
