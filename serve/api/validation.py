"""pydantic ``ValidationError`` -> one ``InvalidRequestError`` naming the field (a dotted JSON path)
and saying what was wrong in a JSON client's words ("must be an integer, not a string")."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import ValidationError

from serve.errors import InvalidRequestError


def json_type(value: Any) -> str:
    """How a JSON client would name the type it sent, for "must be X, not Y" messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, Mapping):
        return "an object"
    return type(value).__name__


def _reason(error: Mapping[str, Any], fields: Iterable[str]) -> str:
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        field = str(error["loc"][-1]) if error["loc"] else ""
        close = difflib.get_close_matches(field, list(fields), n=1)
        return f"unknown field (did you mean '{close[0]}'?)" if close else "unknown field"
    if kind == "int_type":
        return f"must be an integer, not {json_type(value)}"
    if kind == "float_type":
        return f"must be a number, not {json_type(value)}"
    if kind == "string_type":
        return f"must be a string, not {json_type(value)}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "greater_than_equal":
        return f"must be at least {ctx['ge']}"
    if kind == "less_than_equal":
        return f"must be at most {ctx['le']}"
    if kind == "too_long":
        return f"at most {ctx.get('max_length')} items"
    if kind == "literal_error":
        return f"must be {ctx['expected']}"
    if kind == "value_error" and "error" in ctx:
        cause = ctx["error"]
        return cause.reason if isinstance(cause, InvalidRequestError) else str(cause)
    message = str(error.get("msg", "is invalid"))
    return message[:1].lower() + message[1:]


def _dotted(loc: Any) -> str:
    """``("loras", 0, "scale")`` -> ``loras[0].scale``: list items as JSON paths name them."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def invalid_request_from(exc: ValidationError, fields: Iterable[str] = ()) -> InvalidRequestError:
    """One ``InvalidRequestError`` for a pydantic ``ValidationError``: its first error.

    ``fields``: the model's field names, for "did you mean" on an unknown one.
    Unknown fields are reported first: for ``{"promt": "a cat"}`` the useful message is
    "promt: unknown field (did you mean 'prompt'?)", not the "prompt: field required" it causes.
    """
    errors = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")
    first = errors[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, InvalidRequestError) and not first["loc"]:
        return cause  # a check across fields (model validator) names its own field
    field = _dotted(first["loc"]) or "body"
    value = None if first["type"] == "missing" else first.get("input")
    return InvalidRequestError(field, value, _reason(first, fields))


__all__ = ["invalid_request_from", "json_type"]
