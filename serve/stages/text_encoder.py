"""Stage 1: tokenize and encode prompts, batched across requests, with an embedding cache."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from serve.engines import Engine
from serve.model import ModelInfo
from serve.stages.loading import load_stage_engine

logger = logging.getLogger(__name__)


class TextEncoder:
    """Prompts -> CLIP hidden states, one row per prompt, as diffusers' ``encode_prompt`` makes them.

    Encoding is per prompt (CLIP's causal mask and max-length padding keep batch rows
    independent), so a batch may mix any prompts. The empty negative prompt and repeated
    prompts hit an LRU cache: a cached prompt costs no model call.
    """

    def __init__(self, info: ModelInfo, engine: Engine, tokenizer, *, cache_size: int = 1024) -> None:
        self.info = info
        self.engine = engine
        self.tokenizer = tokenizer
        self.cache_size = cache_size
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()
        self.calls = 0  # model calls made, for tests and metrics

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
    ) -> TextEncoder:
        from transformers import CLIPTokenizer

        info, engine = load_stage_engine(source, "text_encoder", backend=backend, device=device, dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(info.path, subfolder="tokenizer")
        return cls(info, engine, tokenizer)

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded/truncated to the model's max length, exactly as diffusers does."""
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """(len(prompts), seq, hidden) in the engine's dtype; duplicates encoded once."""
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if missing:
            ids = self.tokenize(missing)
            embeds = self.engine.run(input_ids=ids).to(self.engine.dtype).cpu().numpy()
            self.calls += 1
            with self._lock:
                for prompt, row in zip(missing, embeds, strict=True):
                    self._cache[prompt] = row
                    self._cache.move_to_end(prompt)
                found = {p: self._cache[p] for p in prompts}
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        else:
            with self._lock:
                found = {p: self._cache[p] for p in prompts}
                for p in found:
                    self._cache.move_to_end(p)
        return np.stack([found[p] for p in prompts])
