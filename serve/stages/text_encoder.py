"""Stage 1: tokenize and encode prompts, batched across requests, with an embedding cache.

What a prompt becomes is the family's (``Family.encode``: SD's CLIP hidden states, SDXL's two
encoders and pooled embedding, Flux's CLIP pooled + T5 states); this stage batches, caches and
hands back one row of named arrays per text.

Text-encoder LoRA adapters apply per text (``serve.lora``): texts of requests with different
adapters share one encoder call, each row with its own. The cache key is the text plus the
adapters (name, file version, scale) that touch this stage's encoders; adapters that touch only
the denoiser leave the key, and so the cache hit, as they are.
"""

from __future__ import annotations

import contextlib
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
from serve.lora.catalog import refuse_loras
from serve.metrics import NO_METRICS, Metrics
from serve.model import ModelInfo
from serve.stages.loading import load_stage_engines
from serve.stages.messages import StageResult

logger = logging.getLogger(__name__)

Row = dict[str, np.ndarray]
Choices = tuple[tuple[str, float], ...]
#: A cache key: the text and the text-encoder adapters applied to it ((name, version, scale), ...).
Key = tuple[str, tuple[tuple[str, str, float], ...]]


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
        self,
        info: ModelInfo,
        engines: Mapping[str, Engine],
        tokenizers: Mapping[str, Any],
        *,
        cache_size: int = 1024,
        loras: Any = None,
        lora_cache_bytes: int | None = None,
    ) -> None:
        from serve.lora import DEFAULT_CACHE_BYTES, runtime_for

        self.info = info
        self.family: Family = family_of(info)
        self.engines = dict(engines)
        self.tokenizers = dict(tokenizers)
        self.cache_size = cache_size
        self.lora_repository = loras
        self.lora = runtime_for(self.engines, self.family, loras, max_bytes=lora_cache_bytes or DEFAULT_CACHE_BYTES)
        self._cache: OrderedDict[Key, Row] = OrderedDict()
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
        loras: Any = None,
        lora_cache_bytes: int | None = None,
    ) -> TextEncoder:
        info, family, engines = load_stage_engines(
            source, role="text", backend=backend, device=device, dtype=dtype, torch_options=torch_options
        )
        return cls(info, engines, family.load_tokenizers(), loras=loras, lora_cache_bytes=lora_cache_bytes)

    def prepare(self, loras: Choices) -> None:
        """Load a request's adapters now (a 400 naming ``loras[i].name`` if one is unknown or does
        not fit), so that the batched call it joins next finds them in the cache."""
        refuse_loras(self.lora, self.lora_repository, self.engines.values(), loras)
        if loras:
            with self.lora.use(loras):
                pass

    def encode(self, texts: Sequence[str], loras: Choices = ()) -> list[Row]:
        """One row per text, in order; duplicates and cached texts cost no model call."""
        return self.encode_requests([(list(texts), loras)], timed=False)[0]

    def _keys(self, texts: Sequence[str], loras: Choices, loaded: Mapping[str, Any]) -> list[tuple[Key, Choices]]:
        own = tuple((n, s) for n, s in loras if loaded[n].components)  # adapters touching this stage
        suffix = tuple((n, loaded[n].version, float(s)) for n, s in own)
        return [((t, suffix), own) for t in texts]

    def _encode(self, items: Sequence[tuple[Key, Choices]]) -> list[Row]:
        keys = [k for k, _ in items]
        with self._lock:
            missing = {k: c for k, c in items if k not in self._cache}
        self.metrics.inc("darkroom_prompt_cache_total", len(keys) - len(missing), result="hit")
        self.metrics.inc("darkroom_prompt_cache_total", len(missing), result="miss")
        if missing:
            t0 = time.perf_counter()
            order = list(missing)
            runs = [(1, missing[k]) for k in order]
            rows = self.lora.rows(runs) if self.lora is not None else contextlib.nullcontext()
            with torch.inference_mode(), rows:
                batch = self.family.encode(self.engines, self.tokenizers, [k[0] for k in order])
            arrays = {name: to_numpy(x) for name, x in batch.items()}
            self.calls += 1
            self.metrics.observe("darkroom_step_seconds", time.perf_counter() - t0)
            with self._lock:
                for i, key in enumerate(order):
                    self._cache[key] = {name: a[i] for name, a in arrays.items()}
                    self._cache.move_to_end(key)
                found = {k: self._cache[k] for k in keys}
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            with self._lock:
                found = {k: self._cache[k] for k in keys}
                for k in found:
                    self._cache.move_to_end(k)
        return [found[k] for k in keys]

    def clear_cache(self) -> None:
        """Forget every cached embedding (a benchmark's timed run encodes every prompt)."""
        with self._lock:
            self._cache.clear()

    def cached(self, texts: Sequence[str]) -> list[Row] | None:
        """Every text's row (without adapters) when all of them are cached (no model call, safe on
        an event loop), else None."""
        keys: list[Key] = [(t, ()) for t in texts]
        with self._lock:
            if not all(k in self._cache for k in keys):
                return None
            for k in keys:
                self._cache.move_to_end(k)
            rows = [self._cache[k] for k in keys]
        self.metrics.inc("darkroom_prompt_cache_total", len(keys), result="hit")
        return rows

    def encode_requests(self, batch: Sequence[Any], *, timed: bool = True) -> list[Any]:
        """Each request's texts (its plan's ``texts``, or ``(texts, loras)``) -> its rows, encoded
        together in one call. Returns ``StageResult``s (``timed=False``: the rows lists)."""
        t0 = time.perf_counter()
        if timed:
            self.metrics.observe("darkroom_batch_size", len(batch))
        # A request is its texts (strings; a family's plan may hold them in a tuple) or a pair
        # (texts, loras): a pair's first item is a sequence, never a string.
        requests = [
            (list(r[0]), tuple(r[1]))
            if isinstance(r, tuple) and len(r) == 2 and not isinstance(r[0], str)
            else (list(r), ())
            for r in batch
        ]
        for _, loras in requests:
            refuse_loras(self.lora, self.lora_repository, self.engines.values(), loras)
        with contextlib.ExitStack() as pins:
            items: list[tuple[Key, Choices]] = []
            for texts, loras in requests:
                loaded = pins.enter_context(self.lora.use(loras)) if loras else {}
                items += self._keys(texts, loras, loaded)
            rows = self._encode(items)
        dt = time.perf_counter() - t0
        out, k = [], 0
        for texts, _ in requests:
            part = rows[k : k + len(texts)]
            out.append(StageResult(part, dt, batch_size=len(batch)) if timed else part)
            k += len(texts)
        return out


__all__ = ["TextEncoder", "to_numpy"]
