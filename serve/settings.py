"""The one place Darkroom reads environment variables, and its one boolean parser.

Everything else takes a ``Settings`` (or explicit arguments), so tests pass a dict instead of
patching ``os.environ``, and a typo such as ``DARKROOM_DEVICE=gpu`` fails at startup naming
the variable rather than deep inside model loading. S3 and AWS settings are deliberately
absent: boto3 reads its own standard variables (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...).

An empty variable counts as unset (``DARKROOM_DEVICE=`` means auto), as shells and compose
files make "set to nothing" the easy way to clear one.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve.errors import InvalidRequestError

#: Settings field -> the environment variable it is read from.
ENV_VARS: dict[str, str] = {
    "cache_dir": "DARKROOM_CACHE_DIR",
    "device": "DARKROOM_DEVICE",
    "dtype": "DARKROOM_DTYPE",
    "api_keys": "DARKROOM_API_KEYS",
    "log_level": "DARKROOM_LOG_LEVEL",
    "bench_ignore_sessions": "DARKROOM_BENCH_IGNORE_SESSIONS",
}

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_DEVICE_RE = re.compile(r"cpu|cuda(?::([0-9]+))?")
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_bool(value: str | None, default: bool, *, name: str = "value") -> bool:
    """Parse a boolean flag: 1/true/yes/on or 0/false/no/off, any case; None or blank -> default.

    Anything else raises ``InvalidRequestError`` (a ``ValueError``) naming ``name``, the
    variable: silently reading ``"ture"`` as False is how a feature flag stays off for a week.
    """
    if value is None or not value.strip():
        return default
    word = value.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise InvalidRequestError(name, value, "must be a boolean: 1/true/yes/on or 0/false/no/off")


def _require_str(value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"must be a string, not {type(value).__name__}")


def _normalize_device(value: str | None) -> str | None:
    _require_str(value)
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    match = _DEVICE_RE.fullmatch(value.strip().lower())
    if match is None:
        raise ValueError("must be 'cpu', 'cuda' or 'cuda:N' ('auto' or unset picks one)")
    return f"cuda:{int(match[1])}" if match[1] is not None else match[0]


def _normalize_dtype(value: str | None) -> str | None:
    _require_str(value)
    if value is None or value.strip().lower() in ("", "auto"):
        return None
    dtype = _DTYPES.get(value.strip().lower())
    if dtype is None:
        raise ValueError("must be float32, float16 or bfloat16 ('auto' or unset picks one)")
    return dtype


def _normalize_log_level(value: str | None) -> str:
    _require_str(value)
    if value is None or not value.strip():
        return "INFO"
    level = value.strip().upper()
    level = "WARNING" if level == "WARN" else level
    if level not in _LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(_LOG_LEVELS)}")
    return level


def _normalize_api_keys(value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    # "k1, k2,,k3" -> ("k1", "k2", "k3"): spaces after commas and stray commas are common in env
    # files and are never part of a key. Duplicates are dropped, order kept.
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    keys: list[str] = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError("must be strings")
        key = part.strip()
        if key and key not in keys:
            keys.append(key)
    return tuple(keys)


def _home(environ: Mapping[str, str]) -> Path:
    home = environ.get("HOME")
    return Path(home) if home else Path.home()


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/darkroom``, else ``~/.cache/darkroom`` (XDG: relative values are ignored)."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "darkroom"
    return _home(env) / ".cache" / "darkroom"


def _cache_dir_from(raw: str, environ: Mapping[str, str]) -> Path:
    raw = raw.strip()
    if raw == "~" or raw.startswith("~/"):
        return _home(environ) / raw[2:]
    return Path(raw).expanduser()


class Settings(BaseModel):
    """Process-wide settings, read once at startup with ``Settings.from_env()``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where models, exported engines and tiny models are cached (DARKROOM_CACHE_DIR; "
        "default $XDG_CACHE_HOME/darkroom or ~/.cache/darkroom).",
    )
    device: str | None = Field(
        None,
        description="Torch device: 'cpu', 'cuda' or 'cuda:N' (DARKROOM_DEVICE); None picks CUDA if present.",
    )
    dtype: str | None = Field(
        None,
        description="Weights/compute dtype: float32, float16 or bfloat16 (DARKROOM_DTYPE); "
        "None picks float16 on CUDA, float32 on CPU.",
    )
    api_keys: tuple[str, ...] = Field(
        (),
        repr=False,  # keep secrets out of logs that print the settings
        description="Bearer tokens the HTTP API accepts (DARKROOM_API_KEYS, comma-separated); empty disables auth.",
    )
    log_level: str = Field(
        "WARNING",
        description="Python logging level name (DARKROOM_LOG_LEVEL); the CLI prints its own progress "
        "lines at any level, so INFO adds the libraries' details.",
    )

    bench_ignore_sessions: tuple[str, ...] = Field(
        (),
        description="Ray sessions `darkroom bench --in-process` does not count as a live cluster "
        "(DARKROOM_BENCH_IGNORE_SESSIONS, comma-separated session names): for a test suite's own "
        "session-wide cluster, which the bench must not refuse to run beside. Empty: every one counts.",
    )

    @field_validator("device", mode="before")
    @classmethod
    def _check_device(cls, value: Any) -> str | None:
        return _normalize_device(value)

    @field_validator("dtype", mode="before")
    @classmethod
    def _check_dtype(cls, value: Any) -> str | None:
        return _normalize_dtype(value)

    @field_validator("api_keys", "bench_ignore_sessions", mode="before")
    @classmethod
    def _check_api_keys(cls, value: Any) -> tuple[str, ...]:
        return _normalize_api_keys(value)

    @field_validator("log_level", mode="before")
    @classmethod
    def _check_log_level(cls, value: Any) -> str:
        return _normalize_log_level(value)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``DARKROOM_*`` variable from ``environ`` (default ``os.environ``).

        A bad value raises ``InvalidRequestError`` whose ``field`` is the variable's name.
        """
        env = os.environ if environ is None else environ
        readers: dict[str, Callable[[str], Any]] = {
            "cache_dir": lambda raw: _cache_dir_from(raw, env),
            "device": _normalize_device,
            "dtype": _normalize_dtype,
            "api_keys": _normalize_api_keys,
            "log_level": _normalize_log_level,
            "bench_ignore_sessions": _normalize_api_keys,  # the same comma-separated list
        }
        values: dict[str, Any] = {"cache_dir": default_cache_dir(env)}
        for field, var in ENV_VARS.items():
            raw = env.get(var)
            if raw is None or not raw.strip():
                continue
            try:
                values[field] = readers[field](raw)
            except ValueError as exc:
                raise InvalidRequestError(var, raw, str(exc)) from exc
        return cls(**values)


__all__ = ["ENV_VARS", "Settings", "default_cache_dir", "parse_bool"]
