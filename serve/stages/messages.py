"""What the stages exchange: jobs, results, and the client interface the request layer calls.

Plain dataclasses of numpy arrays and numbers: they cross process boundaries (Ray pickles them
between the Ingress and the stage replicas), so nothing here holds a tensor, a device or a lock.
Every family uses the same messages: what differs per family is inside ``Conditioning``'s named
arrays, whose names are the denoiser's model inputs (``encoder_hidden_states``, SDXL's
``text_embeds``, Flux's ``pooled_projections``, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np


@dataclass(frozen=True)
class Conditioning:
    """One request's encoded text: named arrays for the prompt and, with guidance, the negative.

    Each array is one prompt's row, without the batch axis, e.g. SD's ``encoder_hidden_states``
    (77, 768). ``negative`` is present exactly when the request runs classifier-free guidance.
    """

    positive: Mapping[str, np.ndarray]
    negative: Mapping[str, np.ndarray] | None = None


@dataclass(frozen=True)
class StepCache:
    """An opt-in per-request step cache (``serve/engines/step_cache.py``; torch backend).

    ``deepcache`` (UNets): the whole UNet every ``interval`` steps, its shallow branch on the
    kept deep feature in between. ``teacache`` (transformers): the blocks are skipped while the
    accumulated change of the first block's modulated input stays under ``threshold``. Either
    trades image fidelity for speed (bench/gpu.py measures both); without one (None, the
    default) images meet the seed contract.
    """

    kind: str  # "deepcache" | "teacache"
    interval: int = 3
    threshold: float = 0.2

    def __post_init__(self) -> None:
        if self.kind not in ("deepcache", "teacache"):
            raise ValueError(f"step cache kind must be deepcache or teacache, got {self.kind!r}")
        if self.interval < 1:
            raise ValueError(f"step cache interval must be >= 1, got {self.interval}")
        if self.threshold < 0:
            raise ValueError(f"step cache threshold must be >= 0, got {self.threshold}")


@dataclass(frozen=True)
class DenoiseJob:
    """One request's input to the Denoiser: small numpy data only (it crosses processes).

    ``cfg_scale`` is the weight of classifier-free guidance when the negative conditioning runs
    beside the positive one (``uncond + cfg_scale * (cond - uncond)``), None when it does not.
    ``guidance_scale`` is the request's as sent (Flux dev feeds it to the transformer as an
    embedding; SD/SDXL's CFG weight is the same number).
    """

    conditioning: Conditioning
    seed: int
    num_inference_steps: int
    guidance_scale: float
    width: int
    height: int
    n: int = 1
    scheduler: str | None = None
    cfg_scale: float | None = None
    #: LoRA adapters and their scales, ``((name, scale), ...)``: applied to this request's rows
    #: only (negative rows too, as diffusers does); not part of the batch key.
    loras: tuple[tuple[str, float], ...] = ()
    request_id: str | None = None  # the HTTP request's id, for the stage's log lines (never for keys)
    # Partial images (streaming, jobs): how many, at evenly spaced steps, and the latent -> RGB
    # map they are drawn with (the Decoder's fit, serve/families/preview.py). 0: none.
    partial_images: int = 0
    preview_map: np.ndarray | None = field(default=None, compare=False)
    # A streamed job's progress after every step (jobs' progress bars); without it a stream
    # carries only its partial images and result (POST streams: fewer messages across Ray).
    progress: bool = False
    #: Opt-in; None (default) keeps the seed contract. A job with ``loras`` runs uncached.
    step_cache: StepCache | None = None

    @property
    def cfg(self) -> bool:
        return self.cfg_scale is not None


@dataclass(frozen=True)
class DenoiseProgress:
    """How far a streamed ``DenoiseJob`` is: sent after each step it takes part in (coalesced).

    ``step`` of ``total_steps`` counts the request's ``num_inference_steps`` (a scheduler that
    runs more iterations per step, as Heun's two, is scaled to them); step 0 means admitted to
    the batch. Sent for every step only when the job asked for ``progress``, else only with
    its partial images. ``preview`` is a partial image of all n images, uint8 (n, h, w, 3) at the latent
    grid's size, at the steps chosen for ``partial_images``; ``partial_index`` counts them from 0.
    """

    step: int
    total_steps: int
    preview: np.ndarray | None = None
    partial_index: int | None = None


@dataclass
class StageResult:
    """A stage's answer plus the seconds its model work took (the rest of the call is queueing)."""

    value: Any
    compute_s: float
    batch_size: int = 1
    extra: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeRequest:
    """What the Decoder needs besides latents: how to encode and what to store beside each image."""

    output_format: str
    metadata: dict[str, Any]
    inline: bool  # return the encoded bytes too (response_format=b64_json)
    output_compression: int | None = None  # jpeg/webp quality 0..100; None = the encoder's default
    request_id: str | None = None  # the HTTP request's id, for the stage's log lines (never for keys)
    # Server-made id of this request's results (a job's id, else a fresh uuid): image i is stored
    # under a key made of it and i, written only if absent, so a decode call sent again after a
    # replica died finds the first call's images instead of storing them twice. None: fresh keys.
    result_id: str | None = None


@dataclass(frozen=True)
class DecodedImage:
    key: str
    content_type: str
    data: bytes | None  # only when DecodeRequest.inline
    withheld: bool = False  # the image safety check flagged it: neither stored nor returned (key "")


class StageClient(Protocol):
    """How the request layer reaches the stages. Every call is idempotent (safe to retry): decode
    stores under keys made from ``DecodeRequest.result_id``, written only if absent. The request
    id for the stages' log lines is ``serve.request_context.current()`` at the call."""

    async def encode(self, texts: list[str], loras: tuple[tuple[str, float], ...] = ()) -> StageResult: ...

    async def denoise(self, job: DenoiseJob) -> StageResult: ...

    def denoise_stream(self, job: DenoiseJob) -> AsyncIterator[DenoiseProgress | StageResult]:
        """``denoise`` with its progress: ``DenoiseProgress`` items, then the ``StageResult``.
        Closing the iterator (or cancelling its consumer) takes the job out of the batch."""
        ...

    async def preview_map(self) -> np.ndarray | None:
        """The model's latent -> RGB map for partial images (None: previews unavailable)."""
        ...

    async def decode(self, latents: np.ndarray, request: DecodeRequest) -> StageResult: ...

    async def ready(self) -> dict[str, str]: ...


__all__ = [
    "Conditioning",
    "DecodeRequest",
    "DecodedImage",
    "DenoiseJob",
    "DenoiseProgress",
    "StageClient",
    "StageResult",
    "StepCache",
]
