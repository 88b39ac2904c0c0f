"""An opt-in per-request step cache: reuse work from an earlier denoising step (torch backend).

Off by default (the seed contract holds only without it): a request opts in with a
``StepCache`` on its ``DenoiseJob`` (or the Denoiser's default from config). Every request in a
batch keeps its own cache, so requests with and without it, at different steps, share denoiser
calls as usual:

- **DeepCache** (UNets, SD/SDXL; Ma et al. 2023): the deep part of the UNet changes slowly
  between steps. On a *full* step the whole UNet runs and the output of the second-to-last up
  block is kept; on a *cached* step only the shallow branch runs -- time embedding, ``conv_in``,
  the first down block (for its skip connections) and the last up block -- on the kept feature.
  Full steps come every ``interval`` steps (``deepcache_full_step``), and always on the first.
- **TeaCache** (transformers, Flux; Liu et al. 2024): the first block's timestep-modulated input
  predicts how much the transformer's output will change. Its relative L1 change since the last
  step, rescaled by a polynomial, accumulates; while the sum stays under ``threshold`` the blocks
  are skipped and the residual they added last time is added again (``TeaCacheState``); the
  first and last steps always run.

Both run the model's own diffusers code for the parts they keep (the skipped submodules are
swapped for stubs during the call), so a full step is exactly the uncached computation. The
cost in quality is measured, not assumed: ``bench/gpu.py`` reports each cache's speed-up next to
its distance to the uncached image.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from serve.stages.messages import StepCache

#: TeaCache's rescaling polynomial for FLUX.1 (from the TeaCache authors' calibration), highest power first.
FLUX_TEACACHE_COEFFICIENTS = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)


def deepcache_full_step(step: int, interval: int, steps: int) -> bool:
    """Whether step ``step`` (0-based) of ``steps`` runs the whole UNet.

    Worked example, interval 3, 8 steps: full at 0, 3, 6; cached at 1, 2, 4, 5, 7 -> 3 full UNet
    passes instead of 8. Interval 1 is every step (no caching).
    """
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}")
    return step % interval == 0 or step >= steps


def polynomial(coefficients: Sequence[float], x: float) -> float:
    """``coefficients`` highest power first: ``polynomial((2, 0, 1), 3) == 19``."""
    out = 0.0
    for c in coefficients:
        out = out * x + c
    return out


@dataclass
class TeaCacheState:
    """One request's TeaCache bookkeeping (its modulated input, accumulated change, residual)."""

    threshold: float
    coefficients: Sequence[float] = FLUX_TEACACHE_COEFFICIENTS
    accumulated: float = 0.0
    previous: torch.Tensor | None = None
    residual: torch.Tensor | None = None

    def decide(self, relative_l1: float | None, step: int, steps: int) -> bool:
        """Whether this step computes the blocks (True) or reuses the residual (False).

        ``relative_l1`` is mean|m_t - m_{t-1}| / mean|m_{t-1}| of the modulated input (None on
        the first step). Worked example, threshold 0.3, rescaled changes 0.1, 0.15, 0.1: step 0
        computes; step 1 accumulates 0.1 -> skip; step 2 reaches 0.25 -> skip; step 3 reaches
        0.35 -> compute, and the sum starts again from 0.
        """
        if relative_l1 is None or step == 0 or step >= steps - 1 or self.residual is None:
            self.accumulated = 0.0
            return True
        self.accumulated += abs(polynomial(self.coefficients, relative_l1))
        if self.accumulated < self.threshold:
            return False
        self.accumulated = 0.0
        return True


@dataclass
class RequestCache:
    """A request's step cache: its settings, its state, and how many steps computed or reused."""

    config: StepCache
    feature: torch.Tensor | None = None  # DeepCache: the kept deep feature of this request's rows
    tea: TeaCacheState | None = None
    full_steps: int = 0
    cached_steps: int = 0

    def __post_init__(self) -> None:
        if self.config.kind == "teacache" and self.tea is None:
            self.tea = TeaCacheState(self.config.threshold)


@dataclass
class CacheGroup:
    """One request's rows in a denoiser call (``rows`` slices the batch), with its cache and step."""

    rows: slice
    cache: RequestCache | None
    step: int
    steps: int
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _stubbed(stubs: dict[torch.nn.Module, Any]) -> Iterator[None]:
    """Swap each module's forward for a stub during the block (nn.Module calls self.forward)."""
    saved = {m: m.__dict__.get("forward") for m in stubs}
    try:
        for module, stub in stubs.items():
            module.forward = stub
        yield
    finally:
        for module, old in saved.items():
            if old is None:
                del module.forward
            else:
                module.forward = old


def _residual_count(block: torch.nn.Module) -> int:
    """Skip connections a UNet down block hands to the up path: one per resnet, plus its downsampler's."""
    return len(block.resnets) + (1 if getattr(block, "downsamplers", None) else 0)


def _take(inputs: dict[str, torch.Tensor], index: torch.Tensor, batch: int) -> dict[str, torch.Tensor]:
    """The rows ``index`` of every batched input (inputs without the batch axis pass as they are)."""
    return {k: (x.index_select(0, index) if x.ndim and x.shape[0] == batch else x) for k, x in inputs.items()}


def _row_lists(groups: list[CacheGroup], batch: int, wanted: list[bool]) -> list[int]:
    rows: list[int] = []
    for g, take in zip(groups, wanted, strict=True):
        if take:
            rows += list(range(batch))[g.rows]
    return rows


def run_deepcache(wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], groups: list[CacheGroup]) -> torch.Tensor:
    """``noise_pred`` for the whole batch: full rows through the whole UNet (keeping each cached
    request's deep feature), cached rows through the shallow branch on their kept features."""
    unet = wrapper.model
    batch = inputs["sample"].shape[0]
    device = inputs["sample"].device
    full = [
        g.cache is None or g.cache.feature is None or deepcache_full_step(g.step, g.cache.config.interval, g.steps)
        for g in groups
    ]
    out = torch.empty_like(inputs["sample"])
    full_rows = _row_lists(groups, batch, full)
    if full_rows:
        index = torch.tensor(full_rows, device=device)
        kept: list[torch.Tensor] = []
        hook = unet.up_blocks[-2].register_forward_hook(lambda _m, _a, output: kept.append(output))
        try:
            out.index_copy_(0, index, wrapper(**_take(inputs, index, batch))[0])
        finally:
            hook.remove()
        offset = 0
        for g, is_full in zip(groups, full, strict=True):
            if not is_full:
                continue
            n = len(range(batch)[g.rows])
            if g.cache is not None:
                g.cache.feature = kept[-1][offset : offset + n]
                g.cache.full_steps += 1
            offset += n
    shallow_rows = _row_lists(groups, batch, [not f for f in full])
    if shallow_rows:
        index = torch.tensor(shallow_rows, device=device)
        cached = torch.cat([g.cache.feature for g, f in zip(groups, full, strict=True) if not f])  # type: ignore[union-attr]
        stubs: dict[torch.nn.Module, Any] = {}
        for block in unet.down_blocks[1:]:
            count = _residual_count(block)
            stubs[block] = lambda hidden_states, *a, _n=count, **k: (hidden_states, (hidden_states,) * _n)
        if unet.mid_block is not None:
            stubs[unet.mid_block] = lambda hidden_states, *a, **k: hidden_states
        for block in unet.up_blocks[:-2]:
            stubs[block] = lambda hidden_states, *a, **k: hidden_states
        stubs[unet.up_blocks[-2]] = lambda hidden_states, *a, **k: cached
        with _stubbed(stubs):
            out.index_copy_(0, index, wrapper(**_take(inputs, index, batch))[0])
        for g, is_full in zip(groups, full, strict=True):
            if not is_full and g.cache is not None:
                g.cache.cached_steps += 1
    return out


def run_teacache(wrapper: torch.nn.Module, inputs: dict[str, torch.Tensor], groups: list[CacheGroup]) -> torch.Tensor:
    """``noise_pred`` for the whole batch, each cached request's transformer blocks run or skipped
    by its own TeaCache decision (requests without a cache always run them)."""
    model = wrapper.model
    first = model.transformer_blocks[0]
    dual = list(model.transformer_blocks)
    single = list(model.single_transformer_blocks)
    original = {b: b.forward for b in dual + single}

    def blocks(hidden_states, encoder_hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        """The first dual block's stub: decides per request, runs every block for the rows that
        compute, reuses each skipping request's residual; the other blocks are identities."""
        modulated = first.norm1(hidden_states, emb=temb)[0]
        compute: list[int] = []
        for g in groups:
            rows = list(range(hidden_states.shape[0]))[g.rows]
            tea = g.cache.tea if g.cache is not None else None
            if tea is None:
                compute += rows
                g.extra["computed"] = True
                continue
            m = modulated[g.rows]
            change = None
            if tea.previous is not None and tea.previous.shape == m.shape:
                change = ((m - tea.previous).abs().mean() / tea.previous.abs().mean().clamp_min(1e-12)).item()
            tea.previous = m
            if tea.decide(change, g.step, g.steps):
                compute += rows
                g.extra["computed"] = True
            else:
                g.extra["computed"] = False
        out = hidden_states.clone()
        if compute:
            index = torch.tensor(compute, device=hidden_states.device)
            hs, ehs, tb = (x.index_select(0, index) for x in (hidden_states, encoder_hidden_states, temb))
            start = hs
            for b in dual + single:
                ehs, hs = original[b](
                    hidden_states=hs,
                    encoder_hidden_states=ehs,
                    temb=tb,
                    image_rotary_emb=image_rotary_emb,
                    joint_attention_kwargs=joint_attention_kwargs,
                )
            out.index_copy_(0, index, hs)
            residual = hs - start
            offset = 0
            for g in groups:
                if g.extra.get("computed") is False:
                    continue
                n = len(range(hidden_states.shape[0])[g.rows])
                if g.cache is not None and g.cache.tea is not None:
                    g.cache.tea.residual = residual[offset : offset + n]
                    g.cache.full_steps += 1
                offset += n
        for g in groups:
            if g.cache is not None and g.cache.tea is not None and g.extra.get("computed") is False:
                out[g.rows] = hidden_states[g.rows] + g.cache.tea.residual
                g.cache.cached_steps += 1
        return encoder_hidden_states, out

    def identity(hidden_states, encoder_hidden_states, *a, **k):
        return encoder_hidden_states, hidden_states

    stubs: dict[torch.nn.Module, Any] = {b: identity for b in dual[1:] + single}
    stubs[first] = blocks
    with _stubbed(stubs):
        return wrapper(**inputs)[0]


__all__ = [
    "FLUX_TEACACHE_COEFFICIENTS",
    "CacheGroup",
    "RequestCache",
    "TeaCacheState",
    "deepcache_full_step",
    "polynomial",
    "run_deepcache",
    "run_teacache",
]
