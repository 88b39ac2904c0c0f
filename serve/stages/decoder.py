"""Stage 3: latents -> uint8 images (VAE decode, batched across requests) -> encoded, stored images."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.engines import Engine
from serve.families import Family, family_of
from serve.families.preview import FIT_MAX_PIXELS, FIT_MIN_PIXELS, PreviewFit, fit_latent_rgb
from serve.imageio import encode_image
from serve.metrics import NO_METRICS, Metrics
from serve.model import ModelInfo
from serve.request_context import bound
from serve.stages.loading import load_stage_engines
from serve.stages.messages import DecodedImage, DecodeRequest, StageResult
from serve.storage import ResultStore
from serve.storage.base import image_format, result_image_key

logger = logging.getLogger(__name__)

logger = logging.getLogger(__name__)


class Decoder:
    """Decodes latents of any number of requests; same-size latents share VAE calls."""

    def __init__(self, info: ModelInfo, engine: Engine, *, max_batch_samples: int = 16) -> None:
        self.info = info
        self.family: Family = family_of(info)
        self.engine = engine
        self.max_batch_samples = max_batch_samples
        self.vae_calls = 0
        self.metrics: Metrics = NO_METRICS  # a deployment sets its replica's recorder
        # serve.safety.ImageSafetyChecker when the policy config names one: flagged images are
        # withheld (neither encoded, stored nor returned).
        self.safety: Any = None
        self._preview_map: np.ndarray | None = None  # fitted on random latents, at first use
        self._preview_lock = threading.Lock()
        self._preview_failed = False
        self._real_fit = PreviewFit(info.latent_channels)  # refitted from the images decoded here

    @classmethod
    def load(
        cls,
        source: str | Path | ModelInfo,
        *,
        backend: str = "torch",
        device: str | None = None,
        dtype: str | None = None,
        torch_options: Any = None,
    ) -> Decoder:
        info, _, engines = load_stage_engines(
            source, role="decoder", backend=backend, device=device, dtype=dtype, torch_options=torch_options
        )
        return cls(info, engines["vae_decoder"])

    def validate(self, latents: np.ndarray) -> None:
        """Latents must be (n, C, h, w) with the VAE's channel count (a bad call fails alone)."""
        c = self.info.latent_channels
        if not isinstance(latents, np.ndarray) or latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(f"latents must be an (n, {c}, h, w) array, got {getattr(latents, 'shape', latents)}")

    def decode(self, latents: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Each (n, C, h, w) latent array -> (n, f*h, f*w, 3) uint8, as diffusers' postprocess makes."""
        out: list[np.ndarray | None] = [None] * len(latents)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, lat in enumerate(latents):
            groups.setdefault(tuple(lat.shape[1:]), []).append(i)
        for idxs in groups.values():
            batch = torch.from_numpy(np.concatenate([latents[i] for i in idxs]))
            batch = self.family.vae_input(batch.to(self.engine.device, self.engine.dtype))
            images = []
            chunk = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
            for lo in range(0, batch.shape[0], chunk):
                images.append(self.engine.run(latent=batch[lo : lo + chunk])["image"])
                self.vae_calls += 1
            pixels = to_uint8(torch.cat(images))
            offset = 0
            for i in idxs:
                k = latents[i].shape[0]
                out[i] = pixels[offset : offset + k]
                offset += k
            # The preview map learns from the first real images (a pooling and a (C+1)^2 sum; it
            # stops at FIT_MAX_PIXELS rows, four 1024x1024 images: the map has settled by then).
            with self._preview_lock:
                if self._real_fit.rows < FIT_MAX_PIXELS:
                    self._real_fit.add_image(np.concatenate([latents[i] for i in idxs]), pixels)
        return out  # type: ignore[return-value]

    def preview_map(self) -> np.ndarray | None:
        """The latent -> RGB map for partial images, fitted once on this VAE (serve/families/preview.py).

        None when the fit fails (an engine whose profiles refuse the fit's size, say): streaming
        then still works, without partial images."""
        with self._preview_lock:
            if self._real_fit.rows >= FIT_MIN_PIXELS:
                return self._real_fit.solve()
            if self._preview_map is None and not self._preview_failed:
                chunk = min(self.max_batch_samples, self.engine.max_batch_samples or self.max_batch_samples)
                try:
                    self._preview_map = fit_latent_rgb(
                        self.family,
                        lambda latent: self.engine.run(latent=latent)["image"],
                        device=self.engine.device,
                        dtype=self.engine.dtype,
                        max_batch=chunk,
                    )
                except Exception:
                    logger.warning("could not fit the preview map: partial images are off", exc_info=True)
                    self._preview_failed = True
            return self._preview_map

    def decode_requests(
        self, batch: Sequence[tuple[np.ndarray, DecodeRequest]], store: ResultStore
    ) -> list[StageResult]:
        """VAE-decode all requests' latents together, check them (when a safety checker is set),
        then encode and store each image with its metadata.

        A request with a ``result_id`` stores image i under ``result_image_key(result_id, i)``,
        written only if absent: the same request decoded twice (a retry after a replica died)
        stores each image once.
        """
        t0 = time.perf_counter()
        pixels = self.decode([lat for lat, _ in batch])
        decode_s = time.perf_counter() - t0  # shared by the batch
        self.observe_batch(len(batch), decode_s)
        flags = self.check(pixels)
        return self.store_requests(
            pixels, [req for _, req in batch], store, decode_s, batch_size=len(batch), flags=flags
        )

    def observe_batch(self, batch_size: int, decode_s: float) -> None:
        """Record one VAE pass over ``batch_size`` requests."""
        self.metrics.observe("darkroom_batch_size", batch_size)
        self.metrics.observe("darkroom_step_seconds", decode_s)

    def store_requests(
        self,
        pixels: Sequence[np.ndarray],
        requests: Sequence[DecodeRequest],
        store: ResultStore,
        decode_s: float,
        *,
        batch_size: int,
        flags: Sequence[Sequence[bool]] | None = None,
    ) -> list[StageResult]:
        """Check (unless ``flags`` already holds the verdicts), encode and store each request's
        decoded images with its metadata, under its once-only keys. ``decode_s`` is the VAE time
        of the batch of ``batch_size`` requests they were decoded in.

        The colocated profile runs the check (torch) in its model thread and passes its ``flags``,
        then runs this outside that thread: encoding and storing are no model work.
        """
        if flags is None:
            flags = self.check(pixels)
        out = []
        for px, flagged, req in zip(pixels, flags, requests, strict=True):
            with bound(req.request_id):
                out.append(self._store_request(px, flagged, req, decode_s, store, batch_size))
        return out

    def check(self, pixels: Sequence[np.ndarray]) -> list[list[bool]]:
        """Per request, per image: whether the safety check withholds it (all False without one)."""
        if self.safety is None:
            return [[False] * len(px) for px in pixels]
        verdicts = self.safety.check(np.concatenate(pixels))
        out, k = [], 0
        for px in pixels:
            out.append(verdicts[k : k + len(px)])
            k += len(px)
        return out

    def _store_request(
        self,
        px: np.ndarray,
        flagged: Sequence[bool],
        req: DecodeRequest,
        decode_s: float,
        store: ResultStore,
        batch_size: int,
    ) -> StageResult:
        images, encode_s, store_s = [], 0.0, 0.0
        extension, _ = image_format(req.output_format)
        created = float(req.metadata.get("created") or time.time())
        for index, img in enumerate(px):
            if flagged[index]:
                self.metrics.inc("darkroom_images_total", status="withheld")
                self.metrics.inc("darkroom_policy_blocks_total", check="image")
                images.append(DecodedImage("", "", None, withheld=True))
                continue
            a = time.perf_counter()
            data = encode_image(img, req.output_format, req.output_compression)
            b = time.perf_counter()
            meta = {**req.metadata, "index": index}
            meta["timings_ms"] = {**meta.get("timings_ms", {}), "decode": round((decode_s + b - a) * 1000, 3)}
            key = result_image_key(req.result_id, index, extension, created) if req.result_id else None
            try:
                stored = store.save_image(data, req.output_format, meta, key=key)
            except Exception:
                self.metrics.inc("darkroom_store_errors_total", op="image")
                self.metrics.inc("darkroom_images_total", status="failed")
                raise
            c = time.perf_counter()
            self.metrics.observe("darkroom_store_seconds", c - b, op="image")
            self.metrics.inc("darkroom_images_total", status="stored")
            store_s += c - b
            encode_s += b - a
            images.append(DecodedImage(stored.key, stored.content_type, data if req.inline else None))
        withheld = sum(flagged)
        logger.info(
            "decoded %d image(s): %d stored, %d withheld by the safety check", len(px), len(px) - withheld, withheld
        )
        total = decode_s + encode_s + store_s
        return StageResult(images, total, batch_size=batch_size, extra={"storage_s": store_s})


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW -> uint8 NHWC, the arithmetic of diffusers' VaeImageProcessor.postprocess."""
    images = (images / 2 + 0.5).clamp(0, 1)
    arr = images.cpu().permute(0, 2, 3, 1).float().numpy()
    return (arr * 255).round().astype("uint8")


__all__ = ["Decoder", "to_uint8"]
