"""The scheduler registry: DESIGN.md's names, each ``Cls.from_config(model's scheduler config)``.

One list for the whole project: the schema, the CLI, the families and the tests read it here.
UNet families (SD 1.x/2.x, SDXL) take every name of ``UNET_SCHEDULERS``; flow-matching families
(Flux) take ``FLOW_SCHEDULERS``: the epsilon/v-prediction schedulers make no sense for a model
trained on flow matching, so a family refuses them by name (``Family.check``).

A scheduler object holds per-run state (``_step_index``, multistep history), so every request
gets its own instance (diffusers #1606, #3672, #9833). ``from_config`` inspects the class's
signature and registers its config each time (~1 ms on the 2-core dev machine, in the model
thread, holding the GIL); ``SchedulerFactory`` builds each name once and hands out deep copies of
that untouched template (~0.15 ms), the same object a fresh ``from_config`` gives.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Mapping
from typing import Any

from serve.errors import InvalidRequestError

# name -> diffusers class name, as strings so importing this module stays cheap.
UNET_SCHEDULERS: dict[str, str] = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp_2m": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
#: Flow matching: Flux's own Euler (``FluxPipeline`` passes it per-request sigmas and ``mu``).
FLOW_SCHEDULERS: dict[str, str] = {"euler": "FlowMatchEulerDiscreteScheduler"}

#: Every name some family accepts, in DESIGN.md's order: what the request schema lets through
#: before the served model's family checks it.
SCHEDULER_NAMES: tuple[str, ...] = tuple(dict.fromkeys([*UNET_SCHEDULERS, *FLOW_SCHEDULERS]))


def scheduler_class(name: str | None, default_class: str, accepted: Mapping[str, str] = UNET_SCHEDULERS) -> type:
    """The diffusers class for ``name``; ``None`` means the model's own (``default_class``)."""
    import diffusers

    if name is None:
        cls_name = default_class
    elif name in accepted:
        cls_name = accepted[name]
    else:
        raise InvalidRequestError("scheduler", name, f"unknown scheduler; choose one of {', '.join(accepted)}")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise InvalidRequestError("scheduler", name, f"diffusers has no scheduler class {cls_name}")
    return cls


def make_scheduler(
    name: str | None, config: dict[str, Any], default_class: str, accepted: Mapping[str, str] = UNET_SCHEDULERS
) -> Any:
    """A fresh scheduler for one request."""
    return scheduler_class(name, default_class, accepted).from_config(config)


class SchedulerFactory:
    """Fresh schedulers for one model: ``make_scheduler``'s result, built once per name and then
    deep-copied (the template is never stepped, so every copy starts as ``from_config`` would).
    Safe across threads: two first requests for a name may both build it, and ``setdefault`` keeps one."""

    def __init__(self, config: dict[str, Any], default_class: str, accepted: Mapping[str, str] = UNET_SCHEDULERS):
        self.config = config
        self.default_class = default_class
        self.accepted = accepted
        self._templates: dict[str | None, Any] = {}
        self._step_params: dict[type, frozenset[str]] = {}

    def new(self, name: str | None) -> Any:
        template = self._templates.get(name)
        if template is None:
            template = make_scheduler(name, self.config, self.default_class, self.accepted)  # raises for bad names
            template = self._templates.setdefault(name, template)
        return copy.deepcopy(template)

    def step_kwargs(self, scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
        """``step_kwargs`` with the class's ``step`` signature read once."""
        params = self._step_params.get(type(scheduler))
        if params is None:
            params = frozenset(inspect.signature(scheduler.step).parameters)
            self._step_params[type(scheduler)] = params
        return _step_kwargs(params, generator, eta)


def scheduler_name(class_name: str, accepted: Mapping[str, str] = UNET_SCHEDULERS) -> str | None:
    """The name users type for a diffusers class (``PNDMScheduler`` -> ``pndm``); None if it has none."""
    for name, cls_name in accepted.items():
        if cls_name == class_name:
            return name
    return None


def step_kwargs(scheduler: Any, generator: Any, eta: float = 0.0) -> dict[str, Any]:
    """The extra ``step()`` arguments, as diffusers' ``prepare_extra_step_kwargs`` chooses them."""
    return _step_kwargs(inspect.signature(scheduler.step).parameters, generator, eta)


def _step_kwargs(params: Any, generator: Any, eta: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if "eta" in params:
        kwargs["eta"] = eta
    if "generator" in params:
        kwargs["generator"] = generator
    return kwargs


__all__ = [
    "FLOW_SCHEDULERS",
    "SCHEDULER_NAMES",
    "SchedulerFactory",
    "UNET_SCHEDULERS",
    "make_scheduler",
    "scheduler_class",
    "scheduler_name",
    "step_kwargs",
]
