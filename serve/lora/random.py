"""Random-weight LoRA adapters for a model, in diffusers/peft or kohya key layout (tests, bench).

Like the tiny models: no hub, so tests and benchmarks make their own adapters. The layers an
adapter targets are read from the model's weight headers (no weights loaded): attention and
feed-forward projections, plus (``convs=True``) resnet convolutions and time projections, so
Conv2d LoRA (kohya's ``conv1``/``conv2``) is exercised too.

``strength`` sets the update's size: the low-rank product is scaled so that an adapter at scale
1 moves the tiny models' images by tens of levels (mix-ups of adapters or scales must show
beyond the 3-level parity tolerance), without saturating them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

from serve.lora.files import read_header

#: Layers targeted per component kind (suffixes of module paths).
_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_FF = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_in", "proj_out")
_CONVS = ("conv1", "conv2", "time_emb_proj")
_TEXT = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _weights_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no safetensors weights in {folder}")


def target_layers(
    model: str | Path, component: str, *, convs: bool = False, attention_only: bool = False
) -> dict[str, tuple[int, ...]]:
    """Module path -> weight shape of the layers a random adapter targets in ``component``.

    ``attention_only``: the attention projections alone (``to_q``, ``to_k``, ``to_v``, ``to_out.0``:
    the default targets of diffusers' LoRA training scripts).
    """
    with open(_weights_file(Path(model) / component), "rb") as f:
        header = read_header(f)
    if component.startswith("text_encoder"):
        suffixes = _TEXT
    elif attention_only:
        suffixes = _ATTENTION
    else:
        suffixes = _ATTENTION + _FF + (_CONVS if convs else ())
    out = {}
    for key, (_, shape) in sorted(header.tensors.items()):
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        path = key[: -len(".weight")]
        if path.endswith(suffixes) and ("attentions" in path or "blocks" in path or "layers" in path):
            if component.startswith("text_encoder") and not path.startswith(("encoder.", "text_model.")):
                continue  # T5's layers are named differently; adapters for it are not made here
            out[path] = tuple(shape)
    return out


def _kohya_name(component: str, path: str, sdxl: bool) -> str:
    if component.startswith("text_encoder"):
        head = {"text_encoder": "lora_te1_" if sdxl else "lora_te_", "text_encoder_2": "lora_te2_"}[component]
        path = path if path.startswith("text_model.") else f"text_model.{path}"
        return head + path.replace(".", "_")
    return "lora_unet_" + path.replace(".", "_")


def write_random_lora(
    out: str | Path,
    model: str | Path,
    *,
    components: Sequence[str] = ("unet",),
    layout: str = "diffusers",
    rank: int = 4,
    seed: int = 0,
    strength: float = 1.0,
    alpha: float | None = None,
    vary_alpha: bool = False,
    convs: bool = False,
    attention_only: bool = False,
    metadata: bool = False,
) -> Path:
    """Write ``out`` (a .safetensors file) with random LoRA weights for ``model``'s ``components``.

    ``layout``: ``diffusers`` (``unet.<path>.lora_A.weight``; text encoders as
    ``text_encoder.text_model.<path>``, as older transformers named them) or ``kohya``
    (``lora_unet_<path>.lora_down.weight`` + ``.alpha``; ``lora_te_`` / ``lora_te1_``/``lora_te2_``).
    ``alpha`` (kohya, or diffusers with ``metadata``) makes the scaling ``alpha / rank``;
    ``vary_alpha`` gives each denoiser layer its own alpha (kohya), so per-module alphas are used.
    """
    import torch
    from safetensors.torch import save_file

    if layout not in ("diffusers", "kohya"):
        raise ValueError(f"layout must be diffusers or kohya, not {layout!r}")
    sdxl = (Path(model) / "text_encoder_2").is_dir() and (Path(model) / "unet").is_dir()
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    config_meta: dict[str, object] = {}
    for component in components:
        layers = target_layers(model, component, convs=convs, attention_only=attention_only)
        if not layers:
            raise ValueError(f"{model} has no LoRA-able layers in {component}")
        text = component.startswith("text_encoder")
        for i, (path, shape) in enumerate(layers.items()):
            out_f, in_f = shape[0], shape[1]
            kernel = tuple(shape[2:])
            # Scaled so the update's size is about strength x a unit-variance layer's, whatever the rank/width.
            down = (
                torch.randn((rank, in_f, *kernel), generator=g)
                / (in_f * max(1, kernel[0] * kernel[1] if kernel else 1)) ** 0.5
            )
            up = torch.randn((out_f, rank, *([1, 1] if kernel else [])), generator=g) * strength / rank**0.5
            layer_alpha = alpha
            if vary_alpha and not text:
                layer_alpha = float(rank) * (0.5 + (i % 4) * 0.25)
            if layout == "kohya":
                name = _kohya_name(component, path, sdxl)
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(layer_alpha if layer_alpha is not None else rank))
            else:
                prefix = f"{component}.text_model.{path}" if text and not path.startswith("text_model.") else ""
                key = prefix or f"{component}.{path}"
                tensors[f"{key}.lora_A.weight"] = down
                tensors[f"{key}.lora_B.weight"] = up
        if metadata and layout == "diffusers":
            config_meta.update(
                {f"{component}.r": rank, f"{component}.lora_alpha": alpha or rank, f"{component}.target_modules": []}
            )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if config_meta:
        for component in components:
            prefix = f"{component}.text_model." if component.startswith("text_encoder") else f"{component}."
            targets = sorted(
                {re.sub(r"\.lora_[AB]\.weight$", "", k)[len(prefix) :] for k in tensors if k.startswith(prefix)}
            )
            config_meta[f"{component}.target_modules"] = targets
        meta["lora_adapter_metadata"] = json.dumps(config_meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out), metadata=meta)
    return out


__all__ = ["target_layers", "write_random_lora"]
