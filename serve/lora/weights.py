"""An adapter file -> per-module low-rank weights and scalings, exactly as diffusers + peft load it.

Key layouts are diffusers' business, so this module calls diffusers' own conversions rather than
mapping names by hand: ``<FamilyPipeline>.lora_state_dict`` (kohya -> diffusers names and
``network_alphas``; SDXL's sgm block names through ``unet_config``), then, per component, the
steps of ``load_lora_adapter`` (denoisers) and ``_load_lora_into_text_encoder`` (text encoders):
``convert_unet_state_dict_to_peft`` / ``convert_state_dict_to_peft``, the rank dict and
``get_peft_kwargs`` -- which yield peft's ``LoraConfig`` fields (``r``, ``lora_alpha``,
``rank_pattern``, ``alpha_pattern``). What peft would then do per module is mirrored here without
importing peft: the module's alpha is ``alpha_pattern``'s entry for it (peft's ``get_pattern_key``
match) else ``lora_alpha``, and its scaling is ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
``set_adapters(names, adapter_weights=scales)`` multiplies that scaling by the request's scale.

Nothing is merged into the model: the weights are kept aside for per-row application
(``serve.lora.runtime``), on the engine's device and in its dtype (peft moves adapter weights to
the base layer's).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# Imported here, once, not inside the loaders: diffusers' lazy module is not thread-safe, and
# adapters load in worker threads (several at once: "module 'diffusers' has no attribute
# 'StableDiffusionPipeline'" was seen under a burst).
from diffusers.configuration_utils import FrozenDict
from diffusers.loaders.lora_pipeline import (
    FluxLoraLoaderMixin,
    StableDiffusionLoraLoaderMixin,
    StableDiffusionXLLoraLoaderMixin,
)
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
from diffusers.utils.peft_utils import get_peft_kwargs

#: diffusers' conversions run one at a time: they are quick, and a thread-safety bug in a library
#: internals is not worth finding under load.
_CONVERT = threading.Lock()

#: The family pipeline -> its LoRA loader (the mixin whose ``lora_state_dict`` the pipeline uses).
LOADERS = {
    "StableDiffusionPipeline": StableDiffusionLoraLoaderMixin,
    "StableDiffusionXLPipeline": StableDiffusionXLLoraLoaderMixin,
    "FluxPipeline": FluxLoraLoaderMixin,
}

#: Text-encoder modules diffusers counts ranks for (``_load_lora_into_text_encoder``).
_TEXT_RANK_SUFFIXES = (".q_proj", ".k_proj", ".v_proj", ".out_proj", ".fc1", ".fc2")
#: safetensors metadata key diffusers stores a LoraConfig under.
METADATA_KEY = "lora_adapter_metadata"


class LoraFitError(ValueError):
    """The adapter does not fit the model (a module it targets is missing or has other shapes)."""


@dataclass(frozen=True)
class ModuleLora:
    """One module's low-rank update: ``up(down(x)) * scaling`` (conv: ``down`` is a conv with the
    base layer's kernel, stride and padding, ``up`` a 1x1 conv -- peft's Conv2d LoRA)."""

    down: torch.Tensor  # lora_A: (r, in) or (r, in, kh, kw)
    up: torch.Tensor  # lora_B: (out, r) or (out, r, 1, 1)
    bias: torch.Tensor | None  # lora_B's bias (peft's lora_bias), scaled with the rest
    scaling: float  # alpha / r: the request's scale multiplies it
    conv: tuple[Any, Any, Any] | None = None  # (stride, padding, dilation) of the base conv

    @property
    def nbytes(self) -> int:
        parts = [self.down, self.up] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in parts)


@dataclass(frozen=True)
class LoadedAdapter:
    """An adapter's weights for the components one stage runs, keyed by module path inside the
    component's model (``down_blocks.1.attentions.0.proj_in``: the wrapper's ``model.`` dropped)."""

    name: str
    version: str
    modules: dict[str, dict[str, ModuleLora]]  # component -> module path -> weights

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for mods in self.modules.values() for m in mods.values())

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(c for c, mods in self.modules.items() if mods)


def pattern_key(patterns: Any, key: str) -> str:
    """peft's ``get_pattern_key``: the first pattern that matches ``key`` as a dotted suffix, else key."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def read_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A safetensors adapter's tensors (on the CPU) and diffusers' LoRA metadata, if it has one."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get(METADATA_KEY)
    return load_file(str(path)), (json.loads(raw) if raw else None)


def diffusers_state_dict(
    tensors: dict[str, torch.Tensor], pipeline_class: str, unet_config: Mapping[str, Any] | None
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """``<pipeline_class>.lora_state_dict``: any supported layout -> diffusers names + network alphas."""
    cls = LOADERS[pipeline_class]
    kwargs: dict[str, Any] = {}
    if pipeline_class == "StableDiffusionXLPipeline" and unet_config is not None:
        kwargs["unet_config"] = FrozenDict(unet_config)
    if pipeline_class == "FluxPipeline":
        kwargs["return_alphas"] = True
    with _CONVERT:
        out = cls.lora_state_dict(dict(tensors), **kwargs)
    return out[0], out[1]


def component_config(
    state_dict: dict[str, torch.Tensor],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    prefix: str,
    *,
    text: bool,
    model: torch.nn.Module,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """One component's peft-named state dict and LoraConfig fields, as diffusers builds them.

    Denoisers follow ``ModelMixin.load_lora_adapter``, text encoders ``_load_lora_into_text_encoder``
    (diffusers 0.42). None when the adapter has nothing for this component.
    """

    sd = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
    meta = None
    if metadata is not None:
        meta = {k.removeprefix(f"{prefix}."): v for k, v in metadata.items() if k.startswith(f"{prefix}.")}
    if not sd:
        return None
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in sd):
        raise LoraFitError("DoRA adapters are not supported")
    rank: dict[str, int] = {}
    if text:
        sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
        if not hasattr(model, "text_model"):  # CLIPTextModel is flat in transformers 5
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        for name, _ in model.named_modules():
            if name.endswith(_TEXT_RANK_SUFFIXES) and f"{name}.lora_B.weight" in sd:
                rank[f"{name}.lora_B.weight"] = sd[f"{name}.lora_B.weight"].shape[1]
        if alphas is not None:
            alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    else:
        if "lora_A" not in next(iter(sd)):
            sd = convert_unet_state_dict_to_peft(sd)
        rank = {f"^{k}": v.shape[1] for k, v in sd.items() if "lora_B" in k and v.ndim > 1}
        if alphas:
            alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.startswith(f"{prefix}.")}
    if meta:
        config = dict(meta)
    else:
        if not rank:
            raise LoraFitError(f"no {prefix} module has a lora_B weight with a rank")
        config = get_peft_kwargs(rank, alphas, sd, is_unet=not text)
    if config.get("use_dora"):
        raise LoraFitError("DoRA adapters are not supported")
    return sd, config


def module_weights(
    sd: dict[str, torch.Tensor],
    config: Mapping[str, Any],
    model: torch.nn.Module,
    component: str,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, ModuleLora]:
    """Per targeted module: its weights and scaling, checked against the module's type and shapes."""
    targets = sorted({k.split(".lora_")[0] for k in sd if ".lora_A." in k or ".lora_B." in k})
    leftovers = [k for k in sd if ".lora_A." not in k and ".lora_B." not in k]
    if leftovers:
        raise LoraFitError(f"{component}: keys that are not LoRA weights: {', '.join(leftovers[:3])}")
    named = dict(model.named_modules())
    alpha_pattern = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    out: dict[str, ModuleLora] = {}
    for path in targets:
        module = named.get(path)
        if module is None:
            raise LoraFitError(f"targets {component}.{path}, which this model does not have")
        try:
            down, up = sd[f"{path}.lora_A.weight"], sd[f"{path}.lora_B.weight"]
        except KeyError as exc:
            raise LoraFitError(f"{component}.{path}: missing {exc.args[0]}") from None
        bias = sd.get(f"{path}.lora_B.bias")
        r = down.shape[0]
        if isinstance(module, torch.nn.Linear):
            want_down, want_up = (r, module.in_features), (module.out_features, r)
            conv = None
        elif isinstance(module, torch.nn.Conv2d):
            if module.groups != 1:
                raise LoraFitError(f"{component}.{path} is a grouped convolution; LoRA on it is not supported")
            want_down = (r, module.in_channels, *module.kernel_size)
            want_up = (module.out_channels, r, 1, 1)
            conv = (module.stride, module.padding, module.dilation)
        else:
            raise LoraFitError(
                f"targets {component}.{path}, a {type(module).__name__}: only Linear and Conv2d take LoRA"
            )
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise LoraFitError(
                f"{component}.{path}: LoRA shapes {tuple(down.shape)}/{tuple(up.shape)} do not fit the "
                f"layer (expected {want_down}/{want_up})"
            )
        alpha = alpha_pattern.get(pattern_key(alpha_pattern.keys(), path), config.get("lora_alpha", r))
        scaling = float(alpha) / (math.sqrt(r) if rslora else r)
        out[path] = ModuleLora(
            down=down.to(device=device, dtype=dtype).contiguous(),
            up=up.to(device=device, dtype=dtype).contiguous(),
            bias=None if bias is None else bias.to(device=device, dtype=dtype),
            scaling=scaling,
            conv=conv,
        )
    return out


def load_adapter(
    path: str | Path,
    name: str,
    version: str,
    *,
    pipeline_class: str,
    unet_config: Mapping[str, Any] | None,
    models: Mapping[str, torch.nn.Module],
    device: torch.device,
    dtype: torch.dtype,
) -> LoadedAdapter:
    """Read an adapter for ``models`` (component -> its diffusers/transformers model); the parts for
    components not in ``models`` (another stage's) are skipped."""
    tensors, metadata = read_file(path)
    try:
        state_dict, alphas = diffusers_state_dict(tensors, pipeline_class, unet_config)
    except (ValueError, KeyError) as exc:
        raise LoraFitError(f"diffusers cannot read its keys: {exc}") from None
    modules: dict[str, dict[str, ModuleLora]] = {}
    for component, model in models.items():
        text = component.startswith("text_encoder")
        found = component_config(state_dict, alphas, metadata, component, text=text, model=model)
        if found is not None:
            sd, config = found
            modules[component] = module_weights(sd, config, model, component, device, dtype)
    return LoadedAdapter(name, version, modules)


__all__ = ["LoadedAdapter", "LoraFitError", "ModuleLora", "load_adapter", "pattern_key", "read_file"]
