"""The eager PyTorch backend: the family's torch wrapper of each component, as published weights."""

from __future__ import annotations

import logging

import torch

from serve.engines.base import Engine
from serve.errors import EngineError

logger = logging.getLogger(__name__)


class TorchEngine(Engine):
    backend = "torch"

    def load(self) -> None:
        from serve.families import family_of

        family = family_of(self.info)
        if self.component not in family.components:
            raise EngineError(f"{family.name} models have no component {self.component!r} ({family.components})")
        self.dtype = family.component_dtype(self.component, self.dtype)
        self.module = family.module(self.component, self.dtype).to(self.device).eval()
        self.output_names = self.module.output_names
        logger.info("loaded %s from %s on %s (%s)", self.component, self.model_path, self.device, self.dtype)

    @torch.inference_mode()
    def run(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        outputs = self.module(**{name: x.to(self.device) for name, x in inputs.items()})
        return dict(zip(self.output_names, outputs, strict=True))

    def shutdown(self) -> None:
        self.module = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
