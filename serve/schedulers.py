"""The scheduler registry: DESIGN.md's names, each ``Cls.from_config(model's scheduler config)``.

A scheduler object holds per-run state (``_step_index``, multistep history), so every request
gets its own instance (diffusers #1606, #3672, #9833); ``from_config`` costs ~0.1 ms.
"""

from __future__ import annotations

import inspect
from typing import Any

from serve.errors import InvalidRequestError

# name -> diffusers class name, as strings so importing this module stays cheap. The keys are
# serve.params.SCHEDULER_NAMES; a unit test holds them equal.
_CLASSES: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


def scheduler_name(class_name: str) -> str | None:
    """The name users type for a diffusers scheduler class (``PNDMScheduler`` -> ``pndm``), or None."""
    for name, cls_name in _CLASSES.items():
        if cls_name == class_name:
            return name
    return None


def scheduler_class(name: str | None, default_class: str) -> type:
    """The diffusers class for ``name``; ``None`` means the model's own (``default_class``)."""
    import diffusers

    if name is None:
        cls_name = default_class
    elif name in _CLASSES:
        cls_name = _CLASSES[name]
    else:
        raise InvalidRequestError("scheduler", name, f"unknown scheduler; choose one of {', '.join(_CLASSES)}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise InvalidRequestError("scheduler", name, f"diffusers has no scheduler class {cls_name}")
    return cls


def make_scheduler(name: str | None, config: dict[str, Any], default_class: str) -> Any:
    """A fresh scheduler for one request."""
    return scheduler_class(name, default_class).from_config(config)


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """The extra ``step()`` arguments, as diffusers' ``prepare_extra_step_kwargs`` chooses them."""
    params = inspect.signature(scheduler.step).parameters
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs
