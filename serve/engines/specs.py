"""Component specs: one frozen dataclass per component, read by ONNX export, TensorRT build and runtimes.

A ``ComponentSpec`` names a component's inputs and outputs (the names its family's torch wrapper
takes and returns, see ``serve/families``), their dtypes, which axes are dynamic, and the
min/opt/max range of every dynamic axis. Shapes are written once, with named axes, e.g. the
UNet's ``sample`` is ``("batch", 4, "latent_height", "latent_width")``; ONNX ``dynamic_axes``,
TensorRT optimisation profiles and the runtimes' output shapes are all derived from that one
description. Each family builds its components' specs (``Family.specs``); this module is data.

Worked example, the tiny model (VAE factor 8) with ``batch=1:1:4`` and ``size=32:64:128``:
the UNet's ``sample`` profile is min (1, 4, 4, 4), opt (2, 4, 8, 8), max (8, 4, 16, 16) -- the
UNet's batch doubles at opt and max because classifier-free guidance runs the unconditional and
the conditional sample of every image together.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from serve.errors import InvalidRequestError

PROFILE_LEVELS = ("min", "opt", "max")

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Range:
    """A min/opt/max range of one integer (a batch size, an image side)."""

    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.min, self.opt, self.max)):
            raise InvalidRequestError("range", (self.min, self.opt, self.max), "values must be integers")
        if not 0 < self.min <= self.opt <= self.max:
            raise InvalidRequestError("range", f"{self.min}:{self.opt}:{self.max}", "need 0 < MIN <= OPT <= MAX")

    def at(self, level: str) -> int:
        return {"min": self.min, "opt": self.opt, "max": self.max}[level]

    def scaled(self, factor: int, *, keep_min: bool = False) -> Range:
        return Range(self.min if keep_min else self.min * factor, self.opt * factor, self.max * factor)

    def __str__(self) -> str:
        return f"{self.min}:{self.opt}:{self.max}"


@dataclass(frozen=True)
class SizeRange:
    """Image sizes in pixels: a width range and a height range (min/opt/max each)."""

    width: Range
    height: Range

    def __str__(self) -> str:
        return ":".join(f"{self.width.at(k)}x{self.height.at(k)}" for k in PROFILE_LEVELS)


def parse_batch(text: str | tuple[int, int, int] | Range, field: str = "batch") -> Range:
    """``"1:1:4"`` (or a tuple) -> Range; ``"4:2:1"`` raises InvalidRequestError naming ``field``."""
    if isinstance(text, Range):
        return text
    try:
        values = tuple(int(v) for v in (text.split(":") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise InvalidRequestError(field, text, "expected MIN:OPT:MAX integers, e.g. 1:1:4") from None
    if len(values) != 3:
        raise InvalidRequestError(field, text, "expected MIN:OPT:MAX integers, e.g. 1:1:4")
    try:
        return Range(*values)
    except InvalidRequestError as exc:
        raise InvalidRequestError(field, text, exc.reason) from None


_SIDE = re.compile(r"^\s*(\d+)(?:\s*[xX]\s*(\d+))?\s*$")


def parse_size(text: str | tuple[Any, Any, Any] | SizeRange, field: str = "size") -> SizeRange:
    """Image side pixels ``MIN:OPT:MAX``; each is ``S`` (square) or ``WxH``.

    ``"64:64:128"`` -> widths and heights 64..128 (opt 64x64); ``"512x384:512x512:768x768"`` ->
    widths 512..768, heights 384..768. The profile covers every WxH inside those ranges.
    """
    if isinstance(text, SizeRange):
        return text
    parts = text.split(":") if isinstance(text, str) else list(text)
    if len(parts) != 3:
        raise InvalidRequestError(field, text, "expected MIN:OPT:MAX, each S or WxH pixels, e.g. 256:512:768")
    widths, heights = [], []
    for part in parts:
        if isinstance(part, int):
            w = h = part
        elif isinstance(part, tuple | list) and len(part) == 2:
            w, h = (int(v) for v in part)
        else:
            m = _SIDE.match(str(part))
            if not m:
                raise InvalidRequestError(field, text, f"cannot read {part!r}: use S or WxH pixels")
            w = int(m.group(1))
            h = int(m.group(2)) if m.group(2) else w
        widths.append(w)
        heights.append(h)
    try:
        return SizeRange(Range(*widths), Range(*heights))
    except InvalidRequestError as exc:
        raise InvalidRequestError(field, text, exc.reason + " for widths and heights") from None


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: name, dtype (numpy name) and shape; strings name dynamic axes."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def resolve(self, dims: Mapping[str, int]) -> Shape:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class ComponentSpec:
    """Everything an exporter, a TensorRT builder or a runtime needs to know about a component.

    ``dims`` holds the min/opt/max of every dynamic axis an input uses; ``derived`` the output
    axes that follow from them (``image_height = 8 * latent_height``).
    """

    component: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: tuple[tuple[str, Range], ...]
    derived: tuple[tuple[str, str, int], ...] = ()

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def dim_range(self, name: str) -> Range:
        return dict(self.dims)[name]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """ONNX ``dynamic_axes``: ``{"sample": {0: "batch", 2: "latent_height", ...}, ...}``."""
        return {
            t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in (*self.inputs, *self.outputs)
        }

    def dims_at(self, level: str) -> dict[str, int]:
        return {name: r.at(level) for name, r in self.dims}

    def shapes(self, level: str) -> dict[str, Shape]:
        """Input shapes at one profile level (``min``, ``opt`` or ``max``)."""
        dims = self.dims_at(level)
        return {t.name: t.resolve(dims) for t in self.inputs}

    @property
    def profile(self) -> dict[str, tuple[Shape, Shape, Shape]]:
        """Per input ``(min, opt, max)`` shapes: a TensorRT optimisation profile."""
        levels = [self.shapes(k) for k in PROFILE_LEVELS]
        return {t.name: (levels[0][t.name], levels[1][t.name], levels[2][t.name]) for t in self.inputs}

    def axis_values(self, input_shapes: Mapping[str, Shape]) -> dict[str, int]:
        """Named axis values read off concrete input shapes (plus the derived output axes)."""
        values: dict[str, int] = {}
        for t in self.inputs:
            shape = input_shapes[t.name]
            if len(shape) != len(t.shape):
                raise InvalidRequestError(t.name, tuple(shape), f"expected {len(t.shape)} dims {t.shape}")
            for want, got in zip(t.shape, shape, strict=True):
                if isinstance(want, int):
                    if want != got:
                        raise InvalidRequestError(t.name, tuple(shape), f"expected shape {t.shape}")
                elif values.setdefault(want, got) != got:
                    raise InvalidRequestError(t.name, tuple(shape), f"axis {want} disagrees with other inputs")
        for name, source, factor in self.derived:
            values[name] = values[source] * factor
        return values

    def output_shapes(self, input_shapes: Mapping[str, Shape]) -> dict[str, Shape]:
        values = self.axis_values(input_shapes)
        return {t.name: t.resolve(values) for t in self.outputs}

    def outside_profile(self, input_shapes: Mapping[str, Shape]) -> list[str]:
        """Axes whose value lies outside the profile, e.g. ``["batch=9 (1..8)"]``."""
        values = self.axis_values(input_shapes)
        return [
            f"{name}={values[name]} ({r.min}..{r.max})" for name, r in self.dims if not r.min <= values[name] <= r.max
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.inputs],
            "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in self.outputs],
            "dims": {name: [r.min, r.opt, r.max] for name, r in self.dims},
            "derived": {name: [source, factor] for name, source, factor in self.derived},
            "profile": {name: [list(s) for s in shapes] for name, shapes in self.profile.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ComponentSpec:
        def tensors(items: list[dict[str, Any]]) -> tuple[TensorSpec, ...]:
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in items)

        return cls(
            component=data["component"],
            inputs=tensors(data["inputs"]),
            outputs=tensors(data["outputs"]),
            dims=tuple((name, Range(*v)) for name, v in data["dims"].items()),
            derived=tuple((name, v[0], int(v[1])) for name, v in data.get("derived", {}).items()),
        )


def float_dtype(precision: str) -> str:
    """The numpy float name of an export precision: ``fp32`` -> ``float32``, ``fp16`` -> ``float16``."""
    if precision not in ("fp32", "fp16"):
        raise InvalidRequestError("precision", precision, "choose fp32 or fp16")
    return "float16" if precision == "fp16" else "float32"


def latent_range(side: Range, factor: int, field: str) -> Range:
    """Pixel sides -> latent sides: 32:64:128 at factor 8 -> 4:8:16 (sides must be multiples)."""
    for v in (side.min, side.opt, side.max):
        if v % factor:
            raise InvalidRequestError(field, str(side), f"image sides must be multiples of {factor}")
    return Range(side.min // factor, side.opt // factor, side.max // factor)


def random_inputs(
    spec: ComponentSpec,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    seed: int = 0,
    vocab: int = 1000,
    device: Any = "cpu",
) -> dict[str, Any]:
    """Plausible random inputs by spec, as torch tensors: token ids in the vocabulary, a UNet's
    timesteps in [0, 1000) (a transformer's in [0, 1): Flux takes t / 1000), guidance in [1, 10),
    position ids as small integers, N(0, 1) floats. For verifying exports and warming engines up."""
    import torch

    dtypes = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
    gen = torch.Generator("cpu").manual_seed(seed)
    out = {}
    for t in spec.inputs:
        shape = tuple(shapes[t.name])
        if t.dtype.startswith("int"):
            x = torch.randint(0, vocab, shape, generator=gen)
        elif t.name == "timestep":
            x = torch.rand(shape, generator=gen) * (1 if spec.component == "transformer" else 1000)
        elif t.name == "guidance":
            x = 1 + torch.rand(shape, generator=gen) * 9
        elif t.name.endswith("_ids"):
            x = torch.randint(0, 64, shape, generator=gen).float()
        else:
            x = torch.randn(shape, generator=gen)
        out[t.name] = x.to(device=device, dtype=dtypes[t.dtype])
    return out


__all__ = [
    "PROFILE_LEVELS",
    "ComponentSpec",
    "Range",
    "SizeRange",
    "TensorSpec",
    "float_dtype",
    "latent_range",
    "parse_batch",
    "parse_size",
    "random_inputs",
]
