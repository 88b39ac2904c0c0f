"""LoRA test helpers: random adapters for the tiny models, and diffusers' reference with them.

The reference is diffusers' own pipeline class after ``load_lora_weights(file, adapter_name=name)``
for every adapter and, per request, ``set_adapters(names, adapter_weights=scales)`` (``disable_lora``
for none) -- the seed contract with adapters (DESIGN.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: Adapters written per model: name -> (components, layout, extra options of write_random_lora).
ADAPTERS = {
    # diffusers/peft layout, denoiser only (scaling 1: no alphas)
    "ink": (("denoiser",), "diffusers", {"seed": 11}),
    # kohya layout with per-layer alphas and conv layers (resnets, time projections)
    "oil": (("denoiser",), "kohya", {"seed": 12, "convs": True, "vary_alpha": True, "alpha": 2.0}),
    # text encoder(s) only, kohya layout (alpha 2 of rank 4: scaling 0.5)
    "wordy": (("text",), "kohya", {"seed": 13, "alpha": 2.0}),
    # denoiser and text encoder(s), diffusers layout
    "both": (("denoiser", "text"), "diffusers", {"seed": 14}),
    # kohya, denoiser only, a second one (four distinct adapters for the mixed-batch tests)
    "chalk": (("denoiser",), "kohya", {"seed": 15, "alpha": 4.0}),
}


def components_of(model: str | Path, kinds) -> tuple[str, ...]:
    model = Path(model)
    out = []
    for kind in kinds:
        if kind == "denoiser":
            out.append("unet" if (model / "unet").is_dir() else "transformer")
        else:
            out.append("text_encoder")
            if (model / "text_encoder_2").is_dir() and (model / "unet").is_dir():
                out.append("text_encoder_2")  # SDXL's second CLIP (Flux's T5 takes none)
    return tuple(out)


def write_adapters(
    model: str | Path, folder: str | Path, names=None, *, strength: float = 1.0, layout: str | None = None
) -> Path:
    """Write ``ADAPTERS`` for ``model`` into ``folder``; ``strength`` scales every update (SDXL's tiny
    model amplifies cross-attention, so its adapters are made gentler: see the parity tests);
    ``layout`` (diffusers or kohya) overrides every adapter's."""
    from serve.lora.random import write_random_lora

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, (kinds, default_layout, opts) in ADAPTERS.items():
        if names is not None and name not in names:
            continue
        opts = {**opts, "strength": opts.get("strength", 1.0) * strength}
        comps = components_of(model, kinds)
        write_random_lora(
            folder / f"{name}.safetensors", model, components=comps, layout=layout or default_layout, **opts
        )
    return folder


def lora_reference(pipe, folder: str | Path, names=None, *, flow: bool = False):
    """``run(params, **kw) -> uint8 (n, H, W, 3)``: ``pipe`` with every adapter of ``folder`` loaded,
    ``params.loras`` activated by ``set_adapters`` (none: ``disable_lora``); the rest is
    ``tests.conftest._diffusers_reference``."""
    from tests.conftest import _diffusers_reference

    folder = Path(folder)
    for path in sorted(folder.glob("*.safetensors")):
        if names is None or path.stem in names:
            pipe.load_lora_weights(str(path), adapter_name=path.stem)
    base = _diffusers_reference(pipe, negative_prompt=not flow, flow=flow)

    def run(p, **kw) -> np.ndarray:
        if p.loras:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in p.loras], adapter_weights=[s for _, s in p.loras])
        else:
            pipe.disable_lora()
        return base(p, **kw)

    return run


#: The parity cases: name -> loras. One adapter, two with different scales, a text-encoder
#: adapter (alone and with a denoiser one), none.
CASES = {
    "one": (("ink", 0.8),),
    "two_scales": (("oil", 1.0), ("ink", -0.7)),
    "text_encoder": (("wordy", 1.2),),
    "both_components": (("both", 0.9), ("chalk", 0.6)),
    "none": (),
}
