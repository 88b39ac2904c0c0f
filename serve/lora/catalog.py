"""The Ingress's view of the adapter repository: list adapters and refuse bad choices early.

Torch-free (the Ingress starts without torch): everything comes from the repository listing and
each adapter's safetensors header (``serve.lora.files``). A request naming an unknown adapter,
one made for another family or one whose widths do not fit the served model is a 400 naming
``loras[i].name`` before any stage runs; the stages check every module and shape again when
they load the weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from serve.errors import InvalidRequestError
from serve.lora.files import Fit, HeaderError, facts, fit
from serve.lora.repository import AdapterEntry, LoraRepository

logger = logging.getLogger(__name__)

#: Most adapters one request may combine, and the scale bound (the issue's limits).
MAX_LORAS = 4
MAX_SCALE = 4.0
#: Backends that run per-request adapters (the others are refused by name: ``loras``).
LORA_BACKENDS = ("torch",)


def refuse_loras(runtime: Any, repository: Any, engines: Any, loras: Sequence[tuple[str, float]]) -> None:
    """A request with adapters on a stage that cannot apply them: a 400 naming ``loras``."""
    if loras and runtime is None:
        backends = sorted({getattr(e, "backend", "?") for e in engines})
        why = (
            "this server has no adapter repository (start it with --loras DIR)"
            if repository is None
            else f"per-request LoRA runs on the torch backend; this deployment runs {', '.join(backends)}"
        )
        raise InvalidRequestError("loras", [n for n, _ in loras], why)


class LoraCatalog:
    """Adapters of ``repository`` as they fit the served model (``family`` is a ``Family``)."""

    def __init__(self, repository: LoraRepository, family: Any) -> None:
        self.repository = repository
        self.family = family
        self._fits: dict[tuple[str, str], Fit] = {}

    def fit_of(self, entry: AdapterEntry) -> Fit:
        key = (entry.name, entry.version)
        if key not in self._fits:
            try:
                found = facts(self.repository.header(entry))
            except HeaderError as exc:
                return Fit(None, (), f"is not a LoRA file: {exc}")
            except InvalidRequestError as exc:
                return Fit(None, (), exc.reason)
            fam = self.family
            denoiser_lora = fam.denoiser_component if fam.denoiser_component in fam.lora_components else ""
            text = tuple(c for c in fam.lora_components if c != fam.denoiser_component)
            self._fits[key] = fit(found, fam.name, denoiser_lora or fam.denoiser_component, text, fam.info.config)
        return self._fits[key]

    def check(self, choices: Sequence[tuple[str, float]]) -> None:
        """400 naming ``loras[i].name`` for an unknown or unfitting adapter."""
        for i, (name, _) in enumerate(choices):
            field_name = f"loras[{i}].name"
            entry = self.repository.entry(name, field_name)
            found = self.fit_of(entry)
            if not found.ok:
                raise InvalidRequestError(field_name, name, f"cannot be used with this model: it {found.problem}")

    def listing(self) -> list[dict[str, Any]]:
        """``GET /v1/loras``: every adapter with its family, components, size and whether it fits."""
        out = []
        for name, entry in sorted(self.repository.entries().items()):
            found = self.fit_of(entry)
            item: dict[str, Any] = {
                "name": name,
                "object": "lora",
                "family": found.family,
                "components": list(found.components),
                "size_bytes": entry.size,
                "compatible": found.ok,
            }
            if not found.ok:
                item["problem"] = f"it {found.problem}"
            out.append(item)
        return out


__all__ = ["LORA_BACKENDS", "MAX_LORAS", "MAX_SCALE", "LoraCatalog", "refuse_loras"]
