"""A request's images as the API returns and records them: the response body (``data`` and
``withheld``), job/idempotency records, and the adapters that made them. Pure functions."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from typing import Any

from serve.params import GenerationParams
from serve.stages.messages import DecodedImage


def lora_list(loras: tuple[tuple[str, float], ...]) -> list[dict[str, Any]]:
    """``(("ink", 0.8),)`` -> ``[{"name": "ink", "scale": 0.8}]``: as the request sends them."""
    return [{"name": n, "scale": s} for n, s in loras]


def withheld_error(index: int) -> dict[str, Any]:
    """What the response says about an image the safety check withheld (OpenAI's moderation shape)."""
    return {
        "index": index,
        "error": {
            "message": f"image {index} was withheld: the image safety check flagged it",
            "type": "image_generation_user_error",
            "param": None,
            "code": "moderation_blocked",
        },
    }


def image_records(images: list[DecodedImage]) -> list[dict[str, Any]]:
    """Images as a job or idempotency record keeps them (in order: a withheld one keeps its place)."""
    return [{"withheld": True} if im.withheld else {"key": im.key, "content_type": im.content_type} for im in images]


def from_records(records: list[dict[str, Any]]) -> list[DecodedImage]:
    return [
        DecodedImage("", "", None, withheld=True)
        if im.get("withheld")
        else DecodedImage(im["key"], im["content_type"], None)
        for im in records
    ]


def image_metadata(
    params: GenerationParams, family: Any, model_name: str, timings_ms: dict[str, float]
) -> dict[str, Any]:
    """What is stored beside each image (its index is added per image)."""
    meta = {
        "prompt": params.prompt,
        "negative_prompt": params.negative_prompt,
        "seed": params.seed,
        "n": params.n,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "scheduler": family.scheduler_label(params.scheduler),
        "size": f"{params.width}x{params.height}",
        "model": model_name,
        "family": family.name,
        "output_format": params.output_format,
        "timings_ms": timings_ms,
        "created": int(time.time()),
    }
    if params.output_compression is not None:
        meta["output_compression"] = params.output_compression
    if params.user is not None:
        meta["user"] = params.user  # OpenAI's end-user id: recorded for abuse tracking
    if params.loras:
        meta["loras"] = lora_list(params.loras)
    return meta


def render_body(
    created: int,
    seed: int,
    images: list[DecodedImage],
    response_format: str,
    url_for: Callable[[str], str],
    read: Callable[[str], bytes],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The ``/v1/images/generations`` body: ``url_for(key)`` for urls, ``read(key)`` for b64_json
    of images not carried inline."""
    data, withheld = [], []
    # Each image carries what reproduces it: the request's seed and its index in the batch of
    # n (image i of seed s and n is image i when sent again with s and n). Fields Darkroom does
    # not fill (OpenAI's revised_prompt) are absent, never null; so is ``withheld`` when the
    # safety check withheld nothing.
    for index, image in enumerate(images):
        if image.withheld:
            withheld.append(withheld_error(index))
            continue
        item: dict[str, Any] = {"seed": seed, "index": index}
        if response_format == "b64_json":
            raw = image.data if image.data is not None else read(image.key)
            item["b64_json"] = base64.b64encode(raw).decode("ascii")
        else:
            item["url"] = url_for(image.key)
        data.append(item)
    out: dict[str, Any] = {"created": created, "data": data, "timings": timings}
    if withheld:
        out["withheld"] = withheld
    return out


__all__ = ["from_records", "image_metadata", "image_records", "lora_list", "render_body", "withheld_error"]
