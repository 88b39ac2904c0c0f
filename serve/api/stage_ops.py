"""Stage work shared by every way of hosting the stages (Ray deployments, in-process).

Each function takes a whole batch of requests and returns one answer per request, so the Ray
deployments' ``@serve.batch`` methods and the in-process client call the same code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from serve.api.service import DecodedImage, DecodeRequest, StageResult
from serve.imageio import encode_image
from serve.stages import Decoder, DenoiseJob, Denoiser, TextEncoder
from serve.storage import ResultStore


def encode_batch(encoder: TextEncoder, batch: Sequence[list[str]]) -> list[StageResult]:
    """Each request's texts ([prompt] or [prompt, negative]) -> its rows of embeddings."""
    t0 = time.perf_counter()
    flat = [t for texts in batch for t in texts]
    embeds = encoder.encode(flat)
    dt = time.perf_counter() - t0
    out, k = [], 0
    for texts in batch:
        out.append(StageResult(embeds[k : k + len(texts)], dt, batch_size=len(batch)))
        k += len(texts)
    return out


def denoise_batch(denoiser: Denoiser, batch: Sequence[DenoiseJob]) -> list[StageResult]:
    t0 = time.perf_counter()
    latents = denoiser.denoise(list(batch))
    dt = time.perf_counter() - t0
    return [StageResult(lat, dt, batch_size=len(batch)) for lat in latents]


def decode_batch(
    decoder: Decoder, store: ResultStore, batch: Sequence[tuple[np.ndarray, DecodeRequest]]
) -> list[StageResult]:
    """VAE-decode all latents together, then encode and store each image with its metadata."""
    t0 = time.perf_counter()
    pixels = decoder.decode([lat for lat, _ in batch])
    decode_s = time.perf_counter() - t0  # shared by the batch
    out = []
    for px, (_, req) in zip(pixels, batch, strict=True):
        images, encode_s, store_s = [], 0.0, 0.0
        for index, img in enumerate(px):
            a = time.perf_counter()
            data = encode_image(img, req.output_format, req.output_compression)
            b = time.perf_counter()
            meta = {**req.metadata, "index": index}
            meta["timings_ms"] = {**meta.get("timings_ms", {}), "decode": round((decode_s + b - a) * 1000, 3)}
            stored = store.save_image(data, req.output_format, meta)
            store_s += time.perf_counter() - b
            encode_s += b - a
            images.append(DecodedImage(stored.key, stored.content_type, data if req.inline else None))
        total = decode_s + encode_s + store_s
        out.append(StageResult(images, total, batch_size=len(batch), extra={"storage_s": store_s}))
    return out
