"""The workload, fixed up front from a seed: request bodies and open-loop arrival times.

Everything is a pure function of its arguments, so two targets (``--compare``) and two runs
with the same ``--seed`` see the same requests at the same offsets. Arrival times are absolute
offsets from the start of a run (the sender sleeps until each one), so a slow send never
shifts the ones after it.

Gamma arrivals: inter-arrival gaps ~ Gamma(shape=B, scale=1/(rate*B)) have mean 1/rate at any
burstiness B and coefficient of variation 1/sqrt(B): B = 1 is Poisson (exponential gaps),
B = 0.25 gives gaps with CV 2 (bursts and lulls), B = 4 gives CV 0.5 (close to uniform).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_SEED = 2**32 - 1

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a lighthouse on a cliff at dusk, oil painting",
    "a red fox in fresh snow, telephoto photograph",
    "an isometric city block made of paper",
    "a bowl of ramen, studio lighting, 35mm",
    "a castle by the sea under a thunderstorm",
    "a watercolor map of an imaginary archipelago",
    "an astronaut riding a horse on the moon",
    "a cozy library with a cat asleep on the books",
    "a neon-lit alley in the rain, cinematic",
    "a field of sunflowers under a starry sky",
    "a steampunk owl made of brass gears",
    "a mountain lake at sunrise, mist over the water",
)

ARRIVALS = ("poisson", "gamma")


def _rng(seed: int, stream: str, index: int | None = None) -> random.Random:
    # Seeding with a string is deterministic across processes (sha512, not hash()).
    return random.Random(f"darkroom-bench:{seed}:{stream}:{index}")


@dataclass(frozen=True)
class Workload:
    """What each request asks for; ``body(i)`` is a pure function of the workload and ``i``."""

    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    seed: int = 0
    size: str | None = None  # None: the model's native size
    steps: int | None = None  # None: the server's default (50)
    n: int = 1
    guidance_scale: float | None = None
    response_format: str = "url"
    #: LoRA adapters: each request carries one, drawn from these, at ``lora_scale`` (none when empty).
    loras: tuple[str, ...] = ()
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the workload needs at least one prompt")

    def body(self, index: int, stream: str = "measure") -> dict[str, Any]:
        """The JSON body of request ``index`` (``stream="warmup"`` for warm-up requests).

        With ``loras``, the same request plus one adapter drawn from them (its own seeded stream:
        prompts and seeds are those of the same workload without adapters).
        """
        rng = _rng(self.seed, stream, index)
        body: dict[str, Any] = {
            "prompt": rng.choice(self.prompts),
            "seed": rng.randint(0, MAX_SEED),
            "n": self.n,
            "response_format": self.response_format,
        }
        if self.size is not None:
            body["size"] = self.size
        if self.steps is not None:
            body["num_inference_steps"] = self.steps
        if self.guidance_scale is not None:
            body["guidance_scale"] = self.guidance_scale
        if self.loras:
            name = _rng(self.seed, f"{stream}:lora", index).choice(self.loras)
            body["loras"] = [{"name": name, "scale": self.lora_scale}]
        return body


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """One prompt per line; blank lines and lines starting with ``#`` are skipped."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = tuple(line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#"))
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line)")
    return prompts


def arrival_offsets(
    rate: float,
    *,
    seed: int,
    count: int | None = None,
    duration_s: float | None = None,
    arrival: str = "poisson",
    burstiness: float = 1.0,
) -> list[float]:
    """Absolute send offsets (seconds from the run's start), non-decreasing, the first at 0.

    Exactly ``count`` arrivals, or every arrival before ``duration_s``. Each gap is drawn from
    Gamma(burstiness, 1 / (rate * burstiness)); ``arrival="poisson"`` forces burstiness 1.
    """
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if arrival not in ARRIVALS:
        raise ValueError(f"arrival must be one of {', '.join(ARRIVALS)}, got {arrival!r}")
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    if (count is None) == (duration_s is None):
        raise ValueError("give exactly one of count and duration_s")
    shape = 1.0 if arrival == "poisson" else burstiness
    scale = 1.0 / (rate * shape)
    rng = _rng(seed, f"arrivals:{arrival}:{shape}:{rate}")
    offsets: list[float] = []
    t = 0.0
    while True:
        if count is not None and len(offsets) >= count:
            break
        if duration_s is not None and t >= duration_s:
            break
        offsets.append(t)
        t += rng.gammavariate(shape, scale)
    return offsets


def gaps(offsets: Sequence[float]) -> list[float]:
    return [b - a for a, b in zip(offsets, offsets[1:], strict=False)]
