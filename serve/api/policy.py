"""Pure request policies of the Ingress: API keys, prompt policy, retry back-off.

Policies are plain functions of their inputs (the clock passed in), so tests never sleep.
"""

from __future__ import annotations

import hmac
import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import ContentPolicyError

# Probes, and the playground's page and files (static, no secrets: the page asks for a key and
# sends it with its API calls).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/"})
OPEN_PREFIXES = ("/playground/",)


def api_key_ok(authorization: str | None, keys: tuple[str, ...]) -> bool:
    """``Authorization: Bearer <key>`` against the configured keys (constant-time compare).

    No keys configured means the API is open.
    """
    if not keys:
        return True
    if not authorization or not authorization.startswith("Bearer "):
        return False
    given = authorization[len("Bearer ") :].strip().encode()
    # Compare with every key (no early exit) so timing does not tell which prefix matched.
    matches = [hmac.compare_digest(given, k.encode()) for k in keys]
    return any(matches)


def bearer_key(authorization: str | None) -> str | None:
    """The key of ``Authorization: Bearer <key>``, else None (the caller's identity for limits)."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer ") :].strip() or None


class PromptPolicy(BaseModel):
    """What prompts the Ingress refuses with 400 ``content_policy_violation``.

    ``blocklist`` phrases match case-insensitively on word boundaries ("gore" refuses "Gore!"
    but not "gorgeous"); ``patterns`` are Python regular expressions (searched, ignore case);
    ``checker`` is ``"module:function"``, called as ``function(prompt) -> str | None`` (a reason
    to refuse, or None) — the hook for a model-based classifier.

    A request's ``moderation`` (OpenAI's field) sets how strictly this applies: ``auto`` (the
    default) applies all three; ``low`` skips the checker. The blocklist and the patterns are the
    operator's fixed rules and always apply; a classifier's verdict is a judgement call, which
    ``low`` relaxes (OpenAI: "less restrictive filtering").

    ``image_checker`` turns on the image safety check (``serve/safety.py``; off by default): it
    applies to every request whatever its ``moderation``, since an operator turns it on for safe
    output. Prompt refusals and withheld images count in one metric,
    ``darkroom_policy_blocks_total{check="prompt"|"image"}``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    blocklist: tuple[str, ...] = Field((), description="Phrases refused anywhere in a prompt (case-insensitive).")
    patterns: tuple[str, ...] = Field((), description="Regular expressions refused in a prompt (ignore case).")
    checker: str | None = Field(None, description='"module:function" returning a refusal reason or None.')
    image_checker: str | None = Field(
        None,
        description="The image safety check, run by the Decoder on every image before it is stored or returned: "
        "a folder with diffusers' safety_checker/ and feature_extractor/, or 'model' for the served model's own "
        "folder; a flagged image is withheld. None = images are not checked.",
    )

    @cached_property
    def _regexes(self) -> list[re.Pattern[str]]:
        out = [re.compile(rf"(?<!\w){re.escape(p)}(?!\w)", re.IGNORECASE) for p in self.blocklist if p.strip()]
        out += [re.compile(p, re.IGNORECASE) for p in self.patterns]
        return out

    @cached_property
    def _checker(self) -> Callable[[str], str | None] | None:
        if not self.checker:
            return None
        module, _, name = self.checker.partition(":")
        return getattr(importlib.import_module(module), name)

    def check(self, prompt: str, negative_prompt: str | None = None, moderation: str = "auto") -> None:
        """Raise :class:`ContentPolicyError` naming the field if a prompt is refused.

        Only the prompt is policed; a negative prompt steers away from content, so blocking
        "gore" in it would refuse exactly the careful users. ``moderation="low"`` skips the checker.
        """
        for regex in self._regexes:
            if regex.search(prompt):
                raise ContentPolicyError("prompt", prompt, "refused by the content policy")
        if self._checker is not None and moderation != "low":
            reason = self._checker(prompt)
            if reason:
                raise ContentPolicyError("prompt", prompt, f"refused by the content policy: {reason}")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential back-off for idempotent stage calls after a replica died.

    Worked example with the defaults: attempt 1 fails -> wait 0.2 s, attempt 2 fails -> wait
    0.4 s, ... capped at 2 s; after ``max_attempts`` (5) tries, or past the deadline, give up.
    """

    max_attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 2.0

    def delay(self, attempt: int, now: float, deadline: float) -> float | None:
        """Seconds to wait before try ``attempt + 1`` (``attempt`` tries failed), or None to give up."""
        if attempt >= self.max_attempts:
            return None
        wait = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt - 1))
        if now + wait >= deadline:
            return None
        return wait
