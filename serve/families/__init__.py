"""Model families: SD 1.x/2.x (``sd``), SDXL (``sdxl``) and Flux (``flux``), one module each.

A model's family comes from its ``model_index.json`` ``_class_name`` (``StableDiffusionPipeline``,
``StableDiffusionXLPipeline``, ``FluxPipeline``) or an explicit ``--family``. Adding a family is
one module with a ``Family`` subclass plus a line in ``FAMILIES``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from serve.errors import InvalidRequestError, ModelLoadError
from serve.families.base import Family, Plan
from serve.families.flux import FluxFamily
from serve.families.sd import SDFamily
from serve.families.sdxl import SDXLFamily

if TYPE_CHECKING:
    from serve.model import ModelInfo

FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (SDFamily, SDXLFamily, FluxFamily)}
_BY_PIPELINE = {cls.pipeline_class: cls for cls in FAMILIES.values()}


def family_class(name: str | None, pipeline_class: str = "", *, field: str = "family") -> type[Family]:
    """The family named ``name``, else the one whose diffusers pipeline is ``pipeline_class``."""
    if name is not None:
        if name not in FAMILIES:
            raise InvalidRequestError(field, name, f"unknown model family; choose one of {', '.join(FAMILIES)}")
        return FAMILIES[name]
    if pipeline_class in _BY_PIPELINE:
        return _BY_PIPELINE[pipeline_class]
    raise ModelLoadError(
        f"model_index.json names pipeline {pipeline_class!r}; Darkroom serves "
        f"{', '.join(_BY_PIPELINE)} (or pass --family {'|'.join(FAMILIES)})"
    )


def family_of(info: ModelInfo) -> Family:
    """The family object of a model (configs only, no weights: cheap to make)."""
    return FAMILIES[info.family](info)


__all__ = ["FAMILIES", "Family", "FluxFamily", "Plan", "SDFamily", "SDXLFamily", "family_class", "family_of"]
