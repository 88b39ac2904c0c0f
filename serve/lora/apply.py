"""The per-row LoRA update of one layer in a shared call: segmented or stacked, by a cost rule.

Both compute, for every row i and every adapter a that row uses on this layer,

    y[i] += up_a(down_a(x[i])) * scaling_a * scale_{i,a}      (peft: lora_B(lora_A(x)) * scaling)

- **segmented** (Punica / S-LoRA's gathered matmuls): per adapter, its rows only -- a slice when
  they are contiguous (one request), else gathered with ``index_select`` and scatter-added back.
  Work grows with each adapter's rows; kernel launches with the number of adapters (3-5 each).
- **stacked**: the layer's adapters concatenated along the rank axis, ``down_cat`` (R, in) and
  ``up_cat`` (out, R) with each block pre-multiplied by its ``scaling``; every row runs all R ranks
  and a per-row mask (each adapter's columns hold that row's scale, 0 where the row does not use it)
  keeps only its own: ``y += ((x @ down_cat.T) * mask) @ up_cat.T`` -- 3 launches, whatever the
  number of adapters, for R / r_a times the rank work.

``prefer_stacked`` picks per layer and call from launches and FLOPs (a pure function). Worked
examples. The tiny SD UNet on a CPU (a launch costs ~2e5 FLOPs of time): a 64 -> 64 attention
projection over 16 rows x 16 tokens, four rank-4 adapters, each used by 4 rows in 2 spans:
segmented = 4 x (5 launches + 2*4*16*4*128 FLOPs) = 4.3e6, stacked = 3 launches + 2*16*16*16*128
= 1.6e6 -> stacked. An SDXL 1280 -> 1280 layer on a GPU (a launch ~5e7) over 16 rows x 4096
tokens, four rank-64 adapters, 4 rows each in 2 spans: segmented = 4 x (2.5e8 + 5.4e9) = 2.3e10,
stacked = 1.5e8 + 2*16*4096*256*2560 = 8.6e10 -> segmented. Either way the result is the same up
to float rounding (tests hold both to peft's, row by row, and images to 3 levels of diffusers').
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from serve.lora.weights import LoadedAdapter, ModuleLora

Choice = tuple[str, float]
Run = tuple[int, tuple[Choice, ...]]

#: What one kernel launch costs, in FLOPs of the device's time (order of magnitude: ~10 us per
#: small op on a CPU core at ~20 GFLOP/s; ~5 us per launch on a GPU at ~10 TFLOP/s for small GEMMs).
LAUNCH_FLOPS = {"cpu": 2e5, "cuda": 5e7}


def prefer_stacked(
    spans: Sequence[int],
    rows_used: Sequence[int],
    ranks: Sequence[int],
    *,
    rows: int,
    tokens: int,
    fan: int,
    launch_flops: float,
) -> bool:
    """Whether the stacked form is cheaper than the segmented one for one layer and call.

    ``spans[k]``/``rows_used[k]``/``ranks[k]``: adapter k's contiguous row spans, rows and rank;
    ``tokens``: positions per row (sequence length, or output pixels of a conv); ``fan``: FLOPs per
    rank per position (``in + out`` for a Linear, ``in * kh * kw + out`` for a conv).
    """
    segmented = sum(
        (3 if s == 1 else 5) * launch_flops + 2 * n * tokens * r * fan
        for s, n, r in zip(spans, rows_used, ranks, strict=True)
    )
    stacked = 3 * launch_flops + 2 * rows * tokens * sum(ranks) * fan
    return stacked <= segmented


@dataclass
class Segment:
    """The rows of one call that use one adapter, and each row's scale."""

    spans: list[tuple[int, int, float]] = field(default_factory=list)  # (lo, hi, scale)
    rows: int = 0
    index: torch.Tensor | None = None  # gathered rows when the spans are more than one
    scales: torch.Tensor | None = None  # per-gathered-row scale
    column: torch.Tensor | None = None  # (rows of the call,) scale per row, 0 where unused

    def finish(self, total: int, device: torch.device, dtype: torch.dtype) -> None:
        self.rows = sum(hi - lo for lo, hi, _ in self.spans)
        if len(self.spans) > 1:
            self.index = torch.cat([torch.arange(lo, hi) for lo, hi, _ in self.spans]).to(device)
            self.scales = torch.cat([torch.full((hi - lo,), s) for lo, hi, s in self.spans]).to(device, dtype)
        column = torch.zeros(total)
        for lo, hi, s in self.spans:
            column[lo:hi] = s
        self.column = column.to(device, dtype)


def delta(m: ModuleLora, x: torch.Tensor) -> torch.Tensor:
    """``up(down(x))`` of one adapter on one layer (unscaled)."""
    if m.conv is None:
        # Fold to 2D first: peft's adapter weights are Parameters, and torch's matmul folds a
        # (B, T, C) input into one (B*T, C) matrix product when a weight requires grad (copying a
        # non-contiguous input). Folding here gives the same rounding bit for bit; without it a
        # transposed input (SDXL's proj_in) took a batched path ~1 ulp off, which 20 steps of a
        # chaotic tiny model grow into several levels.
        lead = x.shape[:-1]
        h = F.linear(F.linear(x.reshape(-1, x.shape[-1]), m.down), m.up, m.bias)
        return h.view(*lead, h.shape[-1])
    stride, padding, dilation = m.conv
    return F.conv2d(F.conv2d(x, m.down, None, stride, padding, dilation), m.up, m.bias)


class Stacks:
    """Concatenated weights per (layer, adapters), LRU-bounded in bytes (a copy of theirs)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Any, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] = OrderedDict()
        self.nbytes = 0

    def get(self, key: Any, mods: Sequence[ModuleLora]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
            return found
        down = torch.cat([m.down for m in mods])
        up = torch.cat([m.up * m.scaling for m in mods], dim=1)
        found = (down, up, tuple(m.down.shape[0] for m in mods))
        self._items[key] = found
        self.nbytes += (down.numel() + up.numel()) * down.element_size()
        while self.nbytes > self.max_bytes and len(self._items) > 1:
            _, (d, u, _) = self._items.popitem(last=False)
            self.nbytes -= (d.numel() + u.numel()) * d.element_size()
        return found


class Active:
    """One call's adapters: adapter -> the rows using it (built once per call, read by every hook)."""

    def __init__(
        self,
        runs: Sequence[Run],
        adapters: Mapping[str, LoadedAdapter],
        stacks: Stacks,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.rows = sum(count for count, _ in runs)
        self.adapters = adapters
        self.stacks = stacks
        self.launch_flops = LAUNCH_FLOPS.get(device.type, LAUNCH_FLOPS["cuda"])
        self.segments: dict[str, Segment] = {}
        start = 0
        for count, choices in runs:
            for name, scale in choices:
                self.segments.setdefault(name, Segment()).spans.append((start, start + count, float(scale)))
            start += count
        for seg in self.segments.values():
            seg.finish(self.rows, device, dtype)
        self._masks: dict[tuple[tuple[str, int], ...], torch.Tensor] = {}
        self.stacked_calls = 0  # layers updated the stacked way in this call (tests)

    def apply(self, component: str, path: str, x: torch.Tensor, output: torch.Tensor) -> None:
        mods = []
        for name, seg in self.segments.items():
            m = self.adapters[name].modules.get(component, {}).get(path)
            if m is not None:
                mods.append((name, seg, m))
        if not mods:
            return
        if len(mods) > 1 or mods[0][1].index is not None:
            if self._stacked_is_cheaper(mods, x, output):
                self._stacked(component, path, mods, x, output)
                return
        for _, seg, m in mods:
            if seg.index is None:
                lo, hi, scale = seg.spans[0]
                output[lo:hi] += delta(m, x[lo:hi]) * (m.scaling * scale)
            else:
                d = delta(m, x.index_select(0, seg.index))
                s = (seg.scales * m.scaling).view(-1, *([1] * (d.dim() - 1)))
                output.index_add_(0, seg.index, d * s)

    def _stacked_is_cheaper(self, mods, x: torch.Tensor, output: torch.Tensor) -> bool:
        m0 = mods[0][2]
        if any(m.bias is not None for _, _, m in mods):
            return False
        if m0.conv is None:
            fan = x.shape[-1] + output.shape[-1]
            tokens = max(1, x.numel() // (x.shape[0] * x.shape[-1]))
        else:
            kernel = m0.down.shape[2] * m0.down.shape[3]
            fan = x.shape[1] * kernel + output.shape[1]
            tokens = output.shape[2] * output.shape[3]
        return prefer_stacked(
            [len(seg.spans) for _, seg, _ in mods],
            [seg.rows for _, seg, _ in mods],
            [m.down.shape[0] for _, _, m in mods],
            rows=self.rows,
            tokens=tokens,
            fan=fan,
            launch_flops=self.launch_flops,
        )

    def _mask(self, mods) -> torch.Tensor:
        key = tuple((name, m.down.shape[0]) for name, _, m in mods)
        mask = self._masks.get(key)
        if mask is None:
            cols = [seg.column[:, None].expand(self.rows, m.down.shape[0]) for _, seg, m in mods]
            mask = self._masks[key] = torch.cat(cols, dim=1).contiguous()
        return mask

    def _stacked(self, component: str, path: str, mods, x: torch.Tensor, output: torch.Tensor) -> None:
        key = (component, path, tuple((name, self.adapters[name].version) for name, _, _ in mods))
        down, up, _ = self.stacks.get(key, [m for _, _, m in mods])
        mask = self._mask(mods)
        self.stacked_calls += 1
        m0 = mods[0][2]
        if m0.conv is None:
            flat = x.reshape(-1, x.shape[-1])
            h = F.linear(flat, down).view(self.rows, -1, down.shape[0])
            h = (h * mask[:, None, :]).view(-1, down.shape[0])
            out2 = output.view(-1, output.shape[-1]) if output.is_contiguous() else None
            if out2 is not None:
                out2.addmm_(h, up.t())
            else:
                output += F.linear(h, up).view_as(output)
        else:
            stride, padding, dilation = m0.conv
            h = F.conv2d(x, down, None, stride, padding, dilation) * mask[:, :, None, None]
            output += F.conv2d(h, up)


__all__ = ["LAUNCH_FLOPS", "Active", "Segment", "Stacks", "delta", "prefer_stacked"]
