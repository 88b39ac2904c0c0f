"""What an adapter file is, read from its safetensors header alone (no torch, no weights).

A safetensors file starts with an 8-byte little-endian length and that many bytes of JSON: every
tensor's name, dtype and shape, plus a ``__metadata__`` string map. That is enough for the Ingress
(which starts without torch) to list adapters, tell which components one touches and refuse an
adapter made for another family before any stage works on the request. The stages then check
every module and shape when they load the weights (``serve.lora.weights``).

Two key layouts are recognised, as diffusers' ``load_lora_weights`` reads them:

- **diffusers/peft**: ``unet.<module>.lora_A.weight`` / ``lora_B`` (or the older ``lora.down`` /
  ``lora.up``, ``lora_linear_layer``), prefixed by the component: ``unet``, ``transformer``,
  ``text_encoder``, ``text_encoder_2``;
- **kohya** (sd-scripts, A1111): ``lora_unet_<module_with_underscores>.lora_down.weight`` /
  ``lora_up`` / ``alpha``, with ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL's two encoders).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from serve.errors import InvalidRequestError

#: safetensors refuses headers over 100 MB; so do we (a corrupt length would read the whole file).
MAX_HEADER_BYTES = 100 * 1024 * 1024

#: diffusers/peft component prefixes -> the component (the denoiser's is resolved per family).
_PREFIXES = ("unet", "transformer", "text_encoder", "text_encoder_2")
#: kohya prefixes -> component; ``lora_unet_`` is the denoiser of every family (Flux's too).
_KOHYA = (("lora_unet_", "denoiser"), ("lora_transformer_", "denoiser"), ("lora_te_", "text_encoder"))
_KOHYA += (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"))


class HeaderError(ValueError):
    """The file is not a readable safetensors file."""


@dataclass(frozen=True)
class Header:
    """A safetensors header: ``tensors`` name -> (dtype, shape), and the string ``metadata``."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    metadata: dict[str, str] = field(default_factory=dict)


def header_length(prefix: bytes) -> int:
    """The JSON header's length from a file's first 8 bytes."""
    if len(prefix) < 8:
        raise HeaderError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n <= 1 or n > MAX_HEADER_BYTES:
        raise HeaderError(f"implausible safetensors header length {n}")
    return n


def parse_header(raw: bytes) -> Header:
    """The JSON after the 8-byte length (``raw`` is exactly that JSON)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HeaderError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise HeaderError("safetensors header is not a JSON object")
    meta = data.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in data.items():
        if not isinstance(entry, Mapping) or "shape" not in entry:
            raise HeaderError(f"tensor {name!r} has no shape")
        tensors[name] = (str(entry.get("dtype", "")), tuple(int(s) for s in entry["shape"]))
    return Header(tensors, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, Mapping) else {})


def read_header(f: BinaryIO) -> Header:
    """The header of an open safetensors file (reads only the header's bytes)."""
    n = header_length(f.read(8))
    raw = f.read(n)
    if len(raw) != n:
        raise HeaderError("truncated safetensors header")
    return parse_header(raw)


@dataclass(frozen=True)
class AdapterFacts:
    """What the header says about an adapter: key layout, components, the widths it expects."""

    layout: str  # "diffusers" | "kohya"
    #: Components by their diffusers names; the denoiser is "denoiser" until a family names it.
    components: tuple[str, ...]
    #: Input width of the cross-attention key projection (``attn2.to_k``), when the adapter has one:
    #: the text conditioning's width (SD 1.x 768, SD 2.x 1024, SDXL 2048) -- tells SD from SDXL.
    cross_attention_width: int | None
    #: Per text component, the input width of its attention projections (the encoder's hidden size).
    text_widths: dict[str, int]
    #: Flux-only module names (double/single transformer blocks) appear in the keys.
    flux_blocks: bool
    tensors: int
    #: A UNet attention with a second transformer block (``transformer_blocks.1``): SDXL's UNet has 2
    #: or 10 per attention, SD 1.x/2.x's UNets one.
    stacked_blocks: bool = False


def _down_width(shape: tuple[int, ...]) -> int | None:
    return shape[1] if len(shape) >= 2 else None


def facts(header: Header) -> AdapterFacts:
    """Classify an adapter by its keys; HeaderError when it has no LoRA weights at all."""
    names = [k for k in header.tensors if not k.endswith((".alpha", "dora_scale"))]
    if not names or not all("lora" in k for k in names):
        raise HeaderError("not a LoRA file: every weight name must contain 'lora'")
    kohya = all(any(k.startswith(p) for p, _ in _KOHYA) for k in header.tensors)
    components: set[str] = set()
    cross, text = None, {}
    for key, (_, shape) in header.tensors.items():
        if kohya:
            comp = next(c for p, c in _KOHYA if key.startswith(p))
            flat = key.replace(".", "_")
        else:
            head = key.split(".", 1)[0]
            comp = ("denoiser" if head in ("unet", "transformer") else head) if head in _PREFIXES else "denoiser"
            flat = key.replace(".", "_")
        components.add(comp)
        is_down = any(s in key for s in ("lora_A", "lora_down", "lora.down", "down.weight"))
        if not is_down:
            continue
        if comp == "denoiser" and cross is None and "attn2_to_k" in flat:
            cross = _down_width(shape)
        if comp.startswith("text_encoder") and comp not in text and ("q_proj" in flat or "k_proj" in flat):
            width = _down_width(shape)
            if width is not None:
                text[comp] = width
    flux = any(s in k for k in header.tensors for s in ("single_transformer_blocks", "single_blocks", "double_blocks"))
    stacked = any(
        "attentions" in k and ("transformer_blocks.1." in k or "transformer_blocks_1_" in k) for k in header.tensors
    )
    order = ("text_encoder", "text_encoder_2", "denoiser")
    return AdapterFacts(
        layout="kohya" if kohya else "diffusers",
        components=tuple(c for c in order if c in components),
        cross_attention_width=cross,
        text_widths=text,
        flux_blocks=flux,
        tensors=len(header.tensors),
        stacked_blocks=stacked,
    )


#: Cross-attention widths of published UNet families (the text conditioning's width).
_KNOWN_CROSS = {768: "sd", 1024: "sd", 2048: "sdxl"}


@dataclass(frozen=True)
class Fit:
    """How an adapter relates to the served model: its family (when known) and why it cannot run."""

    family: str | None
    components: tuple[str, ...]  # with the family's denoiser name (unet / transformer)
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def fit(found: AdapterFacts, family: str, denoiser: str, text_components: tuple[str, ...], configs: Any) -> Fit:
    """Check an adapter against the served model from the header alone (the stages check the rest).

    ``configs`` is ``ModelInfo.config`` (folder -> config dict). Worked example: an SDXL adapter
    (cross-attention width 2048) against SD 1.5 (768): family "sdxl", problem "is an sdxl adapter".
    """
    comps = tuple(denoiser if c == "denoiser" else c for c in found.components)
    guess: str | None = "flux" if found.flux_blocks else None
    if guess is None and ("text_encoder_2" in comps or found.stacked_blocks) and family != "flux":
        guess = "sdxl"
    problem = None
    if denoiser == "unet" and found.cross_attention_width is not None:
        want = configs("unet").get("cross_attention_dim")
        want = want[0] if isinstance(want, (list, tuple)) else want
        if found.cross_attention_width == want:
            guess = guess or family
        else:
            guess = guess or _KNOWN_CROSS.get(found.cross_attention_width)
            problem = f"its cross-attention width is {found.cross_attention_width}; this model's is {want}"
    for comp, width in found.text_widths.items():
        if comp not in text_components:
            continue
        have = configs(comp).get("hidden_size", configs(comp).get("d_model"))
        if have is not None and width != have and problem is None:
            problem = f"its {comp} width is {width}; this model's is {have}"
    if guess is not None and guess != family:
        problem = f"is a {guess} adapter; this server serves {family} models"
    missing = [c for c in comps if c != denoiser and c not in text_components]
    if missing and problem is None:
        problem = f"touches {', '.join(missing)}, which {family} models do not have"
    return Fit(guess if guess is not None else (family if problem is None else None), comps, problem)


def check_choices(loras: Any, *, max_loras: int, max_scale: float) -> tuple[tuple[str, float], ...]:
    """``[{"name", "scale"}, ...]`` or ``[(name, scale), ...]`` -> a checked tuple of (name, scale)."""
    if loras is None:
        return ()
    if not isinstance(loras, (list, tuple)):
        raise InvalidRequestError("loras", loras, "must be a list of {name, scale} objects")
    if len(loras) > max_loras:
        raise InvalidRequestError("loras", len(loras), f"at most {max_loras} adapters per request")
    out: list[tuple[str, float]] = []
    for i, item in enumerate(loras):
        if isinstance(item, Mapping):
            name, scale = item.get("name"), item.get("scale", 1.0)
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, scale = item
        else:
            raise InvalidRequestError(f"loras[{i}]", item, "must be an object {name, scale}")
        check_name(name, f"loras[{i}].name")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale != scale:
            raise InvalidRequestError(f"loras[{i}].scale", scale, "must be a number")
        if not -max_scale <= scale <= max_scale:
            raise InvalidRequestError(f"loras[{i}].scale", scale, f"must be within -{max_scale:g}..{max_scale:g}")
        if any(name == n for n, _ in out):
            raise InvalidRequestError(f"loras[{i}].name", name, "is listed twice; give each adapter once")
        out.append((name, float(scale)))
    return tuple(out)


def check_name(name: Any, field_name: str) -> str:
    """An adapter name is its file's stem: letters, digits, ``-``, ``_``, ``.``; no path parts."""
    if not isinstance(name, str) or not name:
        raise InvalidRequestError(field_name, name, "must be a non-empty string (the adapter file's name)")
    if len(name) > 128 or name.startswith(".") or not all(c.isalnum() or c in "-_." for c in name):
        raise InvalidRequestError(field_name, name, "must be 1-128 letters, digits, '-', '_' or '.'")
    return name


__all__ = [
    "AdapterFacts",
    "Fit",
    "Header",
    "HeaderError",
    "check_choices",
    "check_name",
    "facts",
    "fit",
    "header_length",
    "parse_header",
    "read_header",
]
