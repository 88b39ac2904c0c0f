"""Stage 1: tokenize and encode prompts, batched across requests, with an embedding cache.

What a prompt becomes is the family's (``Family.encode``: SD's CLIP hidden states, SDXL's two
encoders and pooled embedding, Flux's CLIP pooled + T5 states); this stage batches, caches and
hands back one row of named arrays per text.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.engines import Engine
from serve.families import Family, family_of
from serve.metrics import NO_METRICS, Metrics
from serve.model import ModelInfo
from serve.stages.loading import load_stage_engines
from serve.stages.messages import StageResult

logger = logging.getLogger(__name__)

Row = dict[str, np.ndarray]


def to_numpy(x: torch.Tensor) -> np.ndarray:
    """A CPU numpy copy in the tensor's dtype (bfloat16, which numpy lacks, as float32)."""
    if x.dtype == torch.bfloat16:
        x = x.float()
    return x.detach().cpu().numpy()


class TextEncoder:
    """Texts -> one row of named conditioning arrays per text, as diffusers' ``encode_prompt`` makes them.

    Encoding is per text (causal masks and max-length padding keep batch rows independent), so a
    batch may mix any prompts. The empty negative prompt and repeated prompts hit an LRU cache:
    a cached prompt costs no model call.
    """

    def __init__(
        self, info: ModelInfo, engines: Mapping[str, Engine], tokenizers: Mapping[str, Any], *, cache_size: int = 1024
    ) -> None:
        self.info = info
        self.family: Family = family_of(info)
        self.engines = dict(engines)
        self.tokenizers = dict(tokenizers)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, Row] = OrderedDict()
        self._lock = threading.Lock()
        self.calls = 0  # model calls made, for tests and metrics
        self.metrics: Metrics = NO_METRICS  # a deployment sets its replica's recorder

    @classmethod
    def load(
        cls,
        source: str | Path | ModelInfo,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        torch_options: Any = None,
    ) -> TextEncoder:
        info, family, engines = load_stage_engines(
            source, role="text", backend=backend, device=device, dtype=dtype, torch_options=torch_options
        )
        return cls(info, engines, family.load_tokenizers())

    def encode(self, texts: Sequence[str]) -> list[Row]:
        """One row per text, in order; duplicates and cached texts cost no model call."""
        with self._lock:
            missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        self.metrics.inc("darkroom_prompt_cache_total", len(texts) - len(missing), result="hit")
        self.metrics.inc("darkroom_prompt_cache_total", len(missing), result="miss")
        if missing:
            t0 = time.perf_counter()
            with torch.inference_mode():
                batch = self.family.encode(self.engines, self.tokenizers, missing)
            arrays = {name: to_numpy(x) for name, x in batch.items()}
            self.calls += 1
            self.metrics.observe("darkroom_step_seconds", time.perf_counter() - t0)
            with self._lock:
                for i, text in enumerate(missing):
                    self._cache[text] = {name: a[i] for name, a in arrays.items()}
                    self._cache.move_to_end(text)
                found = {t: self._cache[t] for t in texts}
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            with self._lock:
                found = {t: self._cache[t] for t in texts}
                for t in found:
                    self._cache.move_to_end(t)
        return [found[t] for t in texts]

    def cached(self, texts: Sequence[str]) -> list[Row] | None:
        """Every text's row when all of them are cached (no model call, safe on an event loop), else None."""
        with self._lock:
            if not all(t in self._cache for t in texts):
                return None
            for t in texts:
                self._cache.move_to_end(t)
            rows = [self._cache[t] for t in texts]
        self.metrics.inc("darkroom_prompt_cache_total", len(texts), result="hit")
        return rows

    def encode_requests(self, batch: Sequence[Sequence[str]]) -> list[StageResult]:
        """Each request's texts (its plan's ``texts``) -> its rows, encoded together in one call."""
        t0 = time.perf_counter()
        self.metrics.observe("darkroom_batch_size", len(batch))
        rows = self.encode([t for texts in batch for t in texts])
        dt = time.perf_counter() - t0
        out, k = [], 0
        for texts in batch:
            out.append(StageResult(rows[k : k + len(texts)], dt, batch_size=len(batch)))
            k += len(texts)
        return out


__all__ = ["TextEncoder", "to_numpy"]
